"""precision.py: the precision a run gets when --bf16 is left unset, per device and CPU flags."""
import pytest
import torch

from orpo.train.config import ORPOConfig
from orpo.train.precision import choose_bf16, cpu_flags, default_bf16


@pytest.mark.parametrize("device, cuda_bf16, flags, expected", [
    ("cuda", True, set(), True),                          # Ampere and newer
    ("cuda", False, {"amx_bf16"}, False),                 # a V100/T4: the CPU's flags do not matter
    ("cpu", False, {"avx2", "amx_bf16", "amx_tile"}, True),  # Sapphire Rapids and newer
    ("cpu", False, {"avx2", "avx512f", "avx512_bf16"}, True),  # Cooper Lake, Zen 4
    ("cpu", False, {"avx2", "avx512f"}, False),           # Skylake-SP, Ice Lake
    ("cpu", False, {"avx2"}, False),                      # Zen 3
    ("cpu", False, set(), False),                         # flags unreadable (macOS, ...)
    ("mps", False, set(), False),
    ("xpu", False, set(), False),
])
def test_choose_bf16(device, cuda_bf16, flags, expected):
    on, reason = choose_bf16(device, cuda_bf16, flags)
    assert on is expected
    assert reason.startswith("bf16 autocast" if expected else "fp32")


def test_the_reason_names_what_was_found():
    assert choose_bf16("cpu", False, {"amx_bf16", "avx512_bf16"})[1] == \
        "bf16 autocast: the CPU computes bf16 natively (amx_bf16, avx512_bf16)"
    assert "--bf16 true turns it on" in choose_bf16("mps", False, set())[1]


def test_the_config_default_is_this_machines_choice(tmp_path):
    """bf16 unset: this machine's choice (bf16 on the CPUs of some CI machines, fp32 on others); set: as
    given; with fp16: no bf16. The choice and its reason are logged when the trainer starts."""
    chosen, reason = default_bf16(use_cpu=not torch.accelerator.is_available())
    if not torch.accelerator.is_available():
        assert chosen == any(flag in cpu_flags() for flag in ("amx_bf16", "avx512_bf16"))
    args = ORPOConfig(output_dir=str(tmp_path))
    assert args.bf16 is chosen and args.precision_reason == reason
    assert ORPOConfig(output_dir=str(tmp_path), bf16=False).bf16 is False
    fp16 = ORPOConfig(output_dir=str(tmp_path), fp16=True, use_cpu=True)
    assert fp16.bf16 is False and "fp16" in fp16.precision_reason
