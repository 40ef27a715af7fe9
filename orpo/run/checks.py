"""Every input of a run checked before the work it would waste: one line each, never a traceback.

Three moments, each before the next expensive step:

1. the config's own fields (ranges, choices, conflicts): when it is constructed (`train/config.py`);
2. `check_before_loading`: what the filesystem and the machine say, before any tokenizer, model or data is
   loaded: every path the run will write, the state of output_dir (a previous run, a checkpoint to resume
   and whether the same settings and model made it), the `report_to` backends installed, one process per GPU,
   a launcher for a sharded run (unless a dry run plans it), the eval data the strategy needs;
3. what only the loaded model can say (that `model_init_kwargs` apply to it, that the LoRA targets exist in
   it): `run/setup.py` turns the loaders' refusals into one line, right after the load, before the data.

The data is checked as it is prepared (orpo/data), and its part of a checkpoint's stamp before training.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from orpo.errors import OrpoError
from orpo.run.launch import is_launched
from orpo.train.checkpoints import (check_output_dir, check_stamp, is_latest, latest_complete, run_stamp,
                                    stamp_settings)
from orpo.train.config import ORPOConfig


def check_writable_dir(flag: str, path: str) -> None:
    """One line unless `path` is, or can be made, a directory this process writes into."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise OrpoError(f"--{flag} {path}: exists and is not a directory")
    _check_nearest_dir(flag, path, target)


def check_writable_file(flag: str, path: str) -> None:
    """One line unless `path` names a file this process can write (a new one, or one it may replace)."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise OrpoError(f"--{flag} {path}: is a directory; name the file to write")
    if target.exists() and not os.access(target, os.W_OK):
        raise OrpoError(f"--{flag} {path}: exists and is not writable")
    _check_nearest_dir(flag, path, target.parent)


def _check_nearest_dir(flag: str, path: str, directory: Path) -> None:
    """The nearest existing directory at or above `directory` takes new files (`path`: the flag's value)."""
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        raise OrpoError(f"--{flag} {path}: {existing} is not a directory")
    try:  # os.access says yes to root on a read-only file system: make a file and see
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise OrpoError(f"--{flag} {path}: cannot write in {existing} ({err.strerror})") from None


# report_to backend → (transformers' availability function for it, in transformers.integrations; what installs it).
# tensorboard is orpo's extra; the others are their own packages. kubeflow is not here: transformers adds it by
# itself inside a Kubeflow TrainJob (an environment variable), there is nothing to install.
REPORT_BACKENDS = {
    "tensorboard": ("is_tensorboard_available", "pip install 'orpo[tensorboard]'"),
    "wandb": ("is_wandb_available", "pip install wandb"),
    "trackio": ("is_trackio_available", "pip install trackio"),
    "mlflow": ("is_mlflow_available", "pip install mlflow"),
    "comet_ml": ("is_comet_available", "pip install comet_ml"),
    "neptune": ("is_neptune_available", "pip install neptune"),
    "clearml": ("is_clearml_available", "pip install clearml"),
    "dagshub": ("is_dagshub_available", "pip install dagshub mlflow"),
    "dvclive": ("is_dvclive_available", "pip install dvclive"),
    "codecarbon": ("is_codecarbon_available", "pip install codecarbon"),
    "swanlab": ("is_swanlab_available", "pip install swanlab"),
    "azure_ml": ("is_azureml_available", "pip install azureml-core"),
    "flyte": ("is_flyte_deck_standard_available", "pip install flytekitplugins-deck-standard"),
}


def check_report_to(report_to: list[str]) -> None:
    """One line for the first `report_to` backend the Trainer could not set up: a name transformers has no
    callback for, or a backend that is not installed (transformers would stop with a traceback when the Trainer
    is built, after the model and data were loaded). `report_to` as TrainingArguments leaves it: a list of
    names ("all" already turned into the installed backends, "none" into [])."""
    from transformers import integrations

    for backend in report_to:
        if backend not in integrations.INTEGRATION_TO_CALLBACK:
            raise OrpoError(f"--report_to {backend}: not a backend transformers reports to; accepted: "
                            f"{', '.join(integrations.INTEGRATION_TO_CALLBACK)}, all, none")
        if backend in REPORT_BACKENDS:
            available, install = REPORT_BACKENDS[backend]
            if not getattr(integrations, available)():
                raise OrpoError(f"--report_to {backend}: {backend} is not installed; {install} (or --report_to none)")


def check_before_loading(config: ORPOConfig, model_name: str | None, has_eval: bool, local_gpus: int,
                         planned_processes: int | None = None) -> None:
    """Stage 2 (module docstring): one OrpoError line for the first problem, in the order a user would fix them.

    model_name:  the model as given (a hub id or path; None for a model object), for the checkpoint's stamp.
    has_eval:    whether eval data was given. local_gpus: the GPUs this process sees (transformers' n_gpu).
    planned_processes: None for a run in this process; N for a dry run that plans each process of a run of N
                 processes launched elsewhere (`orpo train --dry_run` without a launcher), which needs none."""
    resume = config.resume_from_checkpoint
    check_writable_dir("output_dir", config.output_dir)
    if resume or config.overwrite_output_dir:
        # (a fresh start without overwrite_output_dir into a directory with files is refused by orpo train before
        # this, and by ORPOTrainer.train(), whose resume_from_checkpoint may still ask to resume it)
        check_output_dir(config.output_dir, resume, config.overwrite_output_dir, config.previous_run, config.max_steps)
    if config.export_gguf:
        check_writable_file("export_gguf", config.export_gguf)
    check_report_to(config.report_to)
    if local_gpus > 1:
        raise OrpoError(f"this process sees {local_gpus} GPUs, and transformers would drive them all from it with "
                        "nn.DataParallel (slow, and not what orpo's step normalisation is built for): launch one "
                        f"process per GPU (torchrun --nproc_per_node {local_gpus} -m orpo train ...; "
                        "docs/distributed.md), or choose one GPU with CUDA_VISIBLE_DEVICES=0")
    engine = "--fsdp" if config.fsdp else "--deepspeed" if config.deepspeed else None
    if engine and planned_processes is None and not is_launched(config):
        # (transformers: a ValueError when the Trainer is built; DeepSpeed: an MPI discovery that fails)
        raise OrpoError(f"{engine} shards the model over several processes: launch with torchrun or accelerate "
                        "(torchrun --nproc_per_node N -m orpo train ...; docs/distributed.md); --dry_run plans "
                        "such a run without a launcher")
    if "trust_remote_code" in (config.model_init_kwargs or {}):
        raise OrpoError("--model_init_kwargs: trust_remote_code has its own flag (--trust_remote_code); give it there")
    if model_name is None and config.model_init_kwargs:
        raise OrpoError(f"model_init_kwargs {json.dumps(config.model_init_kwargs)} apply when orpo loads the model, "
                        "and the model was given already loaded: pass its name or path instead, or leave them unset")
    if not has_eval and config.eval_strategy != "no":  # (transformers: a ValueError when the Trainer is built)
        raise OrpoError(f"--eval_strategy {config.eval_strategy.value} evaluates during training, and no eval data "
                        "is given: pass --eval_dataset, or leave --eval_strategy at no")
    checkpoint = latest_complete(config.output_dir) if is_latest(resume) else resume or None
    if checkpoint and model_name is not None:  # the data's part is checked once it is prepared
        settings_and_model = run_stamp(stamp_settings(config), model_name, {})
        del settings_and_model["data"]
        check_stamp(checkpoint, settings_and_model, config.force_resume)
