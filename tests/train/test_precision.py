"""precision.py: the precision a run gets when --bf16 is left unset, per device and CPU flags."""
import pytest
import torch

from orpo.train.config import ORPOConfig
from orpo.train.precision import bf16_autocast, choose_bf16, choose_precision, cpu_flags


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


def test_unset_is_this_machines_choice_and_set_is_as_given(tmp_path):
    """bf16 unset: this machine's choice (bf16 on the CPUs of some CI machines, fp32 on others); set: as
    given; with fp16: no bf16. The config itself keeps what the user gave (unset); the plan decides."""
    cpu = torch.device("cpu")
    chosen, reason = choose_precision(None, False, cpu)
    assert chosen == any(flag in cpu_flags() for flag in ("amx_bf16", "avx512_bf16"))
    assert (chosen, reason) == choose_bf16("cpu", False, cpu_flags())
    assert choose_precision(False, False, cpu) == (False, "fp32: --bf16 false")
    assert choose_precision(True, False, cpu) == (True, "bf16 autocast: --bf16 true")
    assert choose_precision(None, True, cpu) == (False, "fp16 autocast (fp32 weights): --fp16 true")
    assert ORPOConfig(output_dir=str(tmp_path)).bf16 is None  # never decided in the config


def test_bf16_autocast_on_is_bf16_and_off_leaves_the_callers_own():
    cpu = torch.device("cpu")
    with bf16_autocast(cpu, True):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with bf16_autocast(cpu, False):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16), bf16_autocast(cpu, False):
        assert torch.is_autocast_enabled("cpu")  # off adds no context: the caller's autocast stands
