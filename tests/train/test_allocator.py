"""train/allocator.py: with keep_freed_memory, a large tensor allocated again reuses the freed pages.

Run in a fresh interpreter each (malloc's settings are per process and stay set)."""
import platform
import subprocess
import sys

import pytest

# Allocates and fills a 64 MiB tensor, frees it, does it again, and prints the minor page faults of the
# second time: with fresh mmap pages every page faults (16,384 of 4 KiB), reused heap pages do not.
SCRIPT = """
import resource, sys, torch
from orpo.train.allocator import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "keep" else "system")
def faults_of_one_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 * 2**20, dtype=torch.float32).fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_tensor()
print(faults_of_one_tensor())
"""

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc malloc's")


def second_allocation_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@glibc
def test_kept_memory_is_reused_without_page_faults():
    status, faults = second_allocation_faults("keep")
    assert status == "True"
    assert faults < 1000, faults  # 64 MiB = 16,384 pages: reused, not faulted in again


@glibc
def test_without_it_a_large_tensor_gets_fresh_pages():
    """The baseline the setting changes (if glibc ever stops mapping 64 MiB afresh, the setting is moot)."""
    _, faults = second_allocation_faults("system")
    assert faults > 10000, faults
