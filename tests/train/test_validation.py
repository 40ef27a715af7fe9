"""validation.py: every field's range, choices and conflicts, checked as a config is constructed."""
import dataclasses

import pytest

from orpo.errors import OrpoError
from orpo.ranges import Range
from orpo.train.config import ModelArguments, ORPOConfig
from orpo.train.validation import CONFLICTS, RANGES, check_fields


def test_every_conflict_holds_for_its_example_and_none_for_the_defaults(tmp_path):
    defaults = {f.name: getattr(ORPOConfig(output_dir=str(tmp_path)), f.name) for f in dataclasses.fields(ORPOConfig)}
    defaults.update({f.name: f.default for f in dataclasses.fields(ModelArguments) if f.name != "model"})
    defaults.update(reference=False, batch_tokens=16384, batch_size=4)  # orpo eval's
    # one flat dataclass of every field, so that no config's own check runs before the conflict's
    flat = dataclasses.make_dataclass("Flat", [
        (name, object, dataclasses.field(default=value) if value is None or isinstance(value, (bool, int, float, str))
         else dataclasses.field(default_factory=lambda v=value: v)) for name, value in defaults.items()])
    for conflict in CONFLICTS:
        assert not conflict.holds(flat()), conflict.message
        assert conflict.holds(flat(**conflict.example)), conflict.message


def test_one_line_for_a_range_a_choice_or_a_conflict():
    @dataclasses.dataclass
    class Flags:
        beta: float = 0.1
        nll_scope: str = dataclasses.field(default="full", metadata={"choices": ["full", "completion"]})
        packing: bool | None = None
        packed_attention: str | None = None

        def __post_init__(self):
            check_fields(self)

    assert RANGES["beta"] == Range(float, 0)
    with pytest.raises(OrpoError, match=r"^--beta -1: out of range; accepted: a finite number >= 0$"):
        Flags(beta=-1)
    with pytest.raises(OrpoError, match=r"^--nll_scope 'prompt': accepted: full, completion$"):
        Flags(nll_scope="prompt")
    with pytest.raises(OrpoError, match=r"^--packed_attention applies to the prefix-shared layout"):
        Flags(packing=False, packed_attention="mask")
    Flags(packing=False)  # a conflict whose fields a dataclass lacks is not checked on it (packed_attention unset)


def test_lora_flags_without_lora_are_named():
    with pytest.raises(OrpoError, match=r"^--lora_r, --lora_alpha and --lora_dropout apply to --use_peft"):
        ModelArguments(model="m", lora_r=8)
    assert ModelArguments(model="m", use_peft=True, lora_r=8).lora_r == 8
