"""internals.py: the private transformers.Trainer members orpo relies on are still there, with the
parameters the adapter passes, and the Trainer still calls them; a broken contract is one loud line."""
import inspect
import re
from pathlib import Path

import pytest
import transformers
from packaging.specifiers import SpecifierSet

from orpo.errors import OrpoError
from orpo.train import internals
from orpo.train.internals import CONTRACT, SUPPORTED_TRANSFORMERS, TrainerAdapter, check_trainer_contract


def test_installed_transformers_keeps_the_contract():
    check_trainer_contract()  # raises OrpoError naming the member when a release changes it


def test_installed_transformers_is_in_the_supported_range_and_pyproject_says_the_same():
    assert transformers.__version__ in SpecifierSet(SUPPORTED_TRANSFORMERS)
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'"transformers{SUPPORTED_TRANSFORMERS}"' in pyproject


def test_adapter_overrides_exactly_the_contracted_members():
    overridden = {name for name in vars(TrainerAdapter) if name.startswith("_") and not name.startswith("__")}
    assert overridden == {"_get_num_items_in_batch", "_save_checkpoint", "_get_train_sampler"}
    assert overridden <= set(CONTRACT)


def test_no_other_module_touches_private_trainer_members():
    """Only internals.py names the private members (the contract lives in one place)."""
    package = Path(internals.__file__).resolve().parents[1]
    for path in package.rglob("*.py"):
        if path.name == "internals.py":
            continue
        text = path.read_text()
        for name in CONTRACT:  # the whole identifier: `_save` is not in `after_checkpoint_saved`
            assert not re.search(rf"(?<!\w){name}\b", text), f"{path.relative_to(package.parent)} uses Trainer.{name}"


@pytest.mark.parametrize("broken", ["gone", "renamed parameter", "no longer called"])
def test_a_changed_contract_fails_loudly(monkeypatch, broken):
    if broken == "gone":
        monkeypatch.delattr(transformers.Trainer, "_get_num_items_in_batch")
        match = "_get_num_items_in_batch is gone"
    elif broken == "renamed parameter":
        monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", lambda self, model, hp_trial: None)
        match = "_save_checkpoint takes"
    else:
        real = inspect.getsource
        monkeypatch.setattr(internals.inspect, "getsource",
                            lambda obj: real(obj).replace("self._get_num_items_in_batch(", "self._count("))
        match = "no longer uses self._get_num_items_in_batch"
    with pytest.raises(OrpoError, match=match):
        check_trainer_contract()
