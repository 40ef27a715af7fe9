"""train/allocator.py: with keep_freed_memory, large tensors allocated again and again reuse freed pages.

Run in a fresh interpreter each (malloc's settings are per process and stay set)."""
import platform
import subprocess
import sys

import pytest

# Allocates, fills and frees a 64 MiB tensor WARMUP times, then MEASURED times more, and prints the
# minor page faults of the measured ones: with fresh mmap pages every page faults (16,384 of 4 KiB per
# tensor). On the heap the first few may still grow it (a 64-byte-aligned request does not always fit
# the hole a freed one left next to small objects), so only the steady state after the warm-up is
# asserted, which is what a training loop repeating its steps sees.
WARMUP, MEASURED, PAGES_PER_TENSOR = 20, 10, 16 * 2**20 * 4 // 4096
SCRIPT = f"""
import resource, sys, torch
from orpo.train.allocator import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "keep" else "system")
def faults_of_one_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 * 2**20, dtype=torch.float32).fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range({WARMUP}):
    faults_of_one_tensor()
print(sum(faults_of_one_tensor() for _ in range({MEASURED})))
"""

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc malloc's")


def steady_state_faults(mode: str) -> tuple[str, int]:
    """(what keep_freed_memory returned, or "system"; minor page faults of the MEASURED tensors)."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@glibc
def test_kept_memory_is_reused_without_page_faults():
    status, faults = steady_state_faults("keep")
    assert status == "True"
    assert faults < 1000, faults  # ten tensors of 16,384 pages each: reused, not faulted in again


@glibc
def test_without_it_a_large_tensor_gets_fresh_pages():
    """The baseline the setting changes (if glibc ever stops mapping 64 MiB afresh, the setting is moot)."""
    _, faults = steady_state_faults("system")
    assert faults > MEASURED * PAGES_PER_TENSOR * 0.9, faults
