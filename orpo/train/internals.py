"""Every use of a private member of `transformers.Trainer`, in one place.

Private members are a contract we do not own: a transformers release may rename them, change their
arguments or stop calling them. `TrainerAdapter` is the only class that overrides or calls them; it
turns each into a method of ours with a public name, which `ORPOTrainer` implements:

| private member of Trainer (transformers)   | why orpo needs it                                  | ours                       |
| ------------------------------------------ | -------------------------------------------------- | -------------------------- |
| `_get_num_items_in_batch(batch_samples, device)` | the whole optimizer step's NLL tokens and pairs, to normalise the loss over the step | `step_totals`    |
| `_save_checkpoint(model, trial)`           | completion marker after a save, rotation after it  | `after_checkpoint_saved`   |
| `_get_output_dir(trial)`                   | where that checkpoint went                         | (inside the adapter)       |
| `_load_from_checkpoint(path)`              | load a finished run without training a step more   | `load_checkpoint`          |
| `_get_train_sampler(dataset)`              | group_by_length on pair lengths                    | `length_grouped_sampler`   |
| `_prepare_inputs(inputs)`                  | move an eval batch to the device                   | `inputs_to_device`         |
| `_save(output_dir, state_dict)`            | write the final model when FSDP checkpoints are sharded (the Trainer writes no weights then) | `save_model` (override) |

`loss_is_scaled_for_ga` (a documented class attribute since transformers 5) says that
`compute_loss` already normalises over the step, so the Trainer must not divide by the accumulation
steps again. `check_trainer_contract()` verifies all of it against the installed transformers and
fails loudly, naming the member, when a release changes it; ORPOTrainer runs it at its first start
in a process (`ensure_trainer_contract`) and tests/train/test_internals.py in CI.
"""
from __future__ import annotations

import functools
import inspect
import os

import torch
import transformers
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from orpo.errors import OrpoError

SUPPORTED_TRANSFORMERS = ">=5.23,<5.25"  # as in pyproject.toml; the range CI and the tests ran on

# private member → the parameters (after self) that the adapter relies on
CONTRACT = {
    "_get_num_items_in_batch": ("batch_samples", "device"),
    "_save_checkpoint": ("model", "trial"),
    "_get_output_dir": ("trial",),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_get_train_sampler": ("train_dataset",),
    "_prepare_inputs": ("inputs",),
    "_save": ("output_dir", "state_dict"),
}
# what the training loop must still do with them (source of Trainer)
CALLED_BY_TRAINER = ("self._get_num_items_in_batch(", "self._save_checkpoint(", "self.loss_is_scaled_for_ga")


def check_trainer_contract() -> None:
    """Raise OrpoError if the installed transformers.Trainer no longer has the private members orpo
    relies on with the parameters it passes, or no longer calls them."""
    where = f"transformers {transformers.__version__} (orpo supports {SUPPORTED_TRANSFORMERS})"
    for name, params in CONTRACT.items():
        member = getattr(Trainer, name, None)
        if member is None:
            raise OrpoError(f"{where}: Trainer.{name} is gone; orpo's adapter (orpo/train/internals.py) needs it")
        found = tuple(inspect.signature(member).parameters)[1 : 1 + len(params)]
        if found != params:
            raise OrpoError(f"{where}: Trainer.{name} takes {found}, orpo's adapter passes {params}")
    if not hasattr(Trainer, "loss_is_scaled_for_ga"):
        raise OrpoError(f"{where}: Trainer.loss_is_scaled_for_ga is gone; the loss would be divided twice")
    source = inspect.getsource(Trainer)
    for call in CALLED_BY_TRAINER:
        if call not in source:
            raise OrpoError(f"{where}: Trainer no longer uses {call.rstrip('(')}; orpo's step normalisation relies on it")


@functools.cache
def ensure_trainer_contract() -> None:
    """`check_trainer_contract` once per process (it reads Trainer's source: ~0.3 s); a failure is not
    cached, so it is raised at every start."""
    check_trainer_contract()


class TrainerAdapter(Trainer):
    """Trainer with its private hooks renamed to the public methods below (module docstring)."""

    # compute_loss normalises by the whole step's totals (step_totals): no second division by GA steps
    loss_is_scaled_for_ga = True

    # --- ours, implemented by ORPOTrainer ---
    def step_totals(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def after_checkpoint_saved(self, checkpoint_dir: str, run_dir: str, save_total_limit: int | None) -> None:
        """Called on every rank after the Trainer wrote `checkpoint_dir`, with rotation left to us."""

    def after_model_saved(self, output_dir: str) -> None:
        """Called on every rank after `save_model` (also inside each checkpoint save) wrote `output_dir`."""

    def length_grouped_sampler(self, dataset) -> torch.utils.data.Sampler | None:
        """A sampler for group_by_length, or None for the Trainer's default."""
        return None

    # --- calls into Trainer internals ---
    def load_checkpoint(self, checkpoint_dir: str) -> None:
        self._load_from_checkpoint(checkpoint_dir)

    def inputs_to_device(self, inputs: dict) -> dict:
        return self._prepare_inputs(inputs)

    # --- overrides of Trainer methods ---
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Trainer.save_model, plus: the final model of an FSDP run whose checkpoints are sharded
        (fsdp_config state_dict_type SHARDED_STATE_DICT) is written as one consolidated model (safetensors,
        loadable by from_pretrained in one process). Trainer.save_model writes weights under FSDP only with
        FULL_STATE_DICT; checkpoints (`_internal_call`) stay sharded, as the Trainer saves them. Then
        `after_model_saved` (also for each checkpoint, which the Trainer saves through here)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        fsdp = self.accelerator.state.fsdp_plugin if self.is_fsdp_enabled else None
        if not _internal_call and fsdp is not None and "FULL_STATE_DICT" not in str(fsdp.state_dict_type):
            state_dict = self.accelerator.get_state_dict(self.model)  # a collective: every rank gathers, rank 0 keeps it
            self._save(output_dir, state_dict=state_dict)
        super().save_model(output_dir, _internal_call)  # there: no weights, then push_to_hub if asked
        self.after_model_saved(output_dir)

    # --- overrides of Trainer internals ---
    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        return self.step_totals(batch_samples, device)

    def _save_checkpoint(self, model, trial):
        # The Trainer rotates old checkpoints inside its save; orpo rotates only after the new one is
        # complete, so a kill at any point leaves a complete checkpoint on disk.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        run_dir = self._get_output_dir(trial=trial)
        checkpoint_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self.after_checkpoint_saved(checkpoint_dir, run_dir, limit)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        sampler = self.length_grouped_sampler(dataset)
        return sampler if sampler is not None else super()._get_train_sampler(train_dataset)
