"""reference.py: the config reference is generated from the field help, and docs/configuration.md carries the current one."""
import dataclasses
from pathlib import Path

from orpo.commands.reference import BEGIN, END, PAGE, config_reference, declared_fields, fields_table, replace_block

REFERENCE_PAGE = Path(__file__).resolve().parents[2] / PAGE


@dataclasses.dataclass
class _Base:
    rate: float = dataclasses.field(default=0.5, metadata={"help": "Base rate."})
    kept: int = dataclasses.field(default=1, metadata={"help": "Inherited as is."})


@dataclasses.dataclass
class _Config(_Base):
    name: str = dataclasses.field(default="x", metadata={"help": "A | b.", "choices": ["x", "y"]})
    rate: float = dataclasses.field(default=0.1, metadata={"help": "New rate."})
    flag: bool = dataclasses.field(default=False, metadata={"help": "On or off."})
    items: list = dataclasses.field(default_factory=list, metadata={"help": "Several."})


def test_fields_table_rows_by_hand():
    assert fields_table(dataclasses.fields(_Config)) == "\n".join([
        "| flag | default | meaning |",
        "| --- | --- | --- |",
        "| `--rate` | `0.1` | New rate. |",  # a redefined field keeps its place, with the new default
        "| `--kept` | `1` | Inherited as is. |",
        "| `--name` | `x` | A \\| b. One of: `x`, `y`. |",  # a pipe would split the markdown cell
        "| `--flag` | `false` | On or off. |",
        "| `--items` | `[]` | Several. |",
    ])


def test_declared_fields_are_the_added_and_redefined_ones():
    assert [f.name for f in declared_fields(_Config)] == ["rate", "name", "flag", "items"]


def test_orpo_fields_in_the_reference():
    block = config_reference()
    assert block.startswith(BEGIN) and block.endswith(END)
    for row in ("| `--beta` | `0.1` |", "| `--nll_scope` | `full` |", "| `--packed_attention` | none |",
                "| `--model` | required |", "| `--skip_bad_rows` | `false` |", "| `--learning_rate` | `1e-06` |"):
        assert row in block, row
    assert "`--per_device_train_batch_size`" not in block  # inherited unchanged from TrainingArguments


def test_the_page_carries_the_current_reference():
    text = REFERENCE_PAGE.read_text()
    assert replace_block(text, config_reference()) == text, "run: python -m orpo.commands.reference"
