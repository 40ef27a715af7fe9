"""Which precision a run trains in when `--bf16` is left to orpo (the default, `bf16=None`; the run's plan
asks `choose_precision`).

bf16 autocast where the device computes bf16 natively, fp32 elsewhere:

| device | bf16 when | why |
| --- | --- | --- |
| CUDA | `torch.cuda.is_bf16_supported(including_emulation=False)` (Ampere and newer) | tensor cores |
| CPU | the CPU has AMX-BF16 or AVX512-BF16 (`/proc/cpuinfo` flags) | bf16 matmul instructions: 1.5× faster ORPO steps on SmolLM2 here (AMX) |
| other (MPS, XPU, ...) | never by default (`--bf16 true` turns it on) | support varies by chip and OS |

Autocast keeps the weights fp32; the log-softmax, the odds ratio and the loss are fp32 either way
(ops/logprobs.py, ops/loss.py).
"""
from __future__ import annotations

import contextlib

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose_bf16(device_type: str, cuda_bf16: bool, flags: set[str]) -> tuple[bool, str]:
    """(bf16 on?, the reason, for the run log) for a run on `device_type` ("cuda", "cpu", "mps", ...);
    `cuda_bf16`: the GPU computes bf16 natively; `flags`: the CPU's feature flags."""
    if device_type == "cuda":
        if cuda_bf16:
            return True, "bf16 autocast: the GPU computes bf16 natively"
        return False, "fp32: the GPU has no native bf16 (before Ampere); --fp16 true for mixed precision"
    if device_type == "cpu":
        native = [flag for flag in BF16_CPU_FLAGS if flag in flags]
        if native:
            return True, f"bf16 autocast: the CPU computes bf16 natively ({', '.join(native)})"
        return False, "fp32: the CPU has no bf16 instructions (no amx_bf16 / avx512_bf16)"
    return False, f"fp32: bf16 is not chosen automatically on {device_type}; --bf16 true turns it on"


def choose_precision(bf16: bool | None, fp16: bool, device: torch.device) -> tuple[bool, str]:
    """(bf16 autocast on?, what and why, for the run log) for a run on `device`: the user's `bf16` / `fp16`
    where set, else `choose_bf16` for the device (its native bf16 support, the CPU's flags)."""
    if fp16:
        return False, "fp16 autocast (fp32 weights): --fp16 true"
    if bf16 is not None:
        return bf16, f"{'bf16 autocast' if bf16 else 'fp32'}: --bf16 {str(bf16).lower()}"
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return choose_bf16(device.type, cuda_bf16, cpu_flags() if device.type == "cpu" else set())


def bf16_autocast(device: torch.device, bf16: bool):
    """The context a forward on `device` runs in: bf16 autocast (fp32 weights kept) when `bf16`, else none at all,
    so that a caller's own autocast stays as it is (`torch.autocast(enabled=False)` would turn it off)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
