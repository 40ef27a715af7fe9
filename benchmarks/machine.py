"""The machine a benchmark figure was measured on, as one line for its results."""
from __future__ import annotations

import os
import platform
import subprocess

import torch

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what decides fp32/bf16 matmul speed on x86


def cpu_description() -> str:
    """CPU model, cores, torch threads and the matmul-relevant flags, from `lscpu` where it exists."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return f"{platform.processor()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = [f for f in FLAGS if f in fields.get("Flags", "").split()]
    return (f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
            f"flags {' '.join(flags)}")
