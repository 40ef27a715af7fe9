"""Crash-safe checkpoints: a checkpoint counts only once it is completely on disk.

transformers' Trainer writes `checkpoint-N/` file by file; a process killed mid-save leaves a
directory that `resume_from_checkpoint=True` would pick and fail on (or half-load). After a save
completes, every file is fsynced and a marker `COMPLETE_MARKER` is written atomically (temp file
+ rename); resuming only considers checkpoints with the marker and deletes those without it.

A run that finished writes `FINISHED_MARKER` into its output directory: resuming it with "latest"
(a rerun of the same command, a requeued job) trains nothing and says so. Every save holds the
config as JSON (`CONFIG_FILE`) instead of transformers' pickled `training_args.bin`, so nothing in
an output directory needs unpickling: the other state files load with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import os
import re
import shutil

from orpo.errors import OrpoError

COMPLETE_MARKER = "orpo_checkpoint_complete.json"
FINISHED_MARKER = "orpo_run_finished.json"
CONFIG_FILE = "orpo_config.json"
PICKLED_ARGS = "training_args.bin"  # transformers' TRAINING_ARGS_NAME
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

LATEST = ("latest", "true")


def is_latest(resume: str | bool | None) -> bool:
    """`resume_from_checkpoint` asks for the newest complete checkpoint (True, "latest", "true")."""
    return resume is True or (isinstance(resume, str) and resume.lower() in LATEST)


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def mark_complete(checkpoint_dir: str, step: int, counters: dict[str, int] | None = None) -> None:
    """fsync every file of `checkpoint_dir`, then atomically write its completion marker, which also
    holds the trainer's `counters` at that step (e.g. nonfinite_skipped), restored on resume."""
    for root, _, files in os.walk(checkpoint_dir):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root, directory=True)
    files = sorted(os.listdir(checkpoint_dir))
    record = json.dumps({"step": step, "files": files, "counters": counters or {}})
    write_atomically(os.path.join(checkpoint_dir, COMPLETE_MARKER), record)
    _fsync(checkpoint_dir, directory=True)


def save_config_as_json(directory: str, config_json: str) -> None:
    """`directory` gets the run's config as JSON (CONFIG_FILE) and loses the pickled one. It may not
    exist yet: with FSDP's sharded checkpoints, the model is written after this."""
    os.makedirs(directory, exist_ok=True)
    write_atomically(os.path.join(directory, CONFIG_FILE), config_json)
    pickled = os.path.join(directory, PICKLED_ARGS)
    if os.path.exists(pickled):
        os.remove(pickled)


def mark_finished(output_dir: str, step: int) -> None:
    os.makedirs(output_dir, exist_ok=True)
    write_atomically(os.path.join(output_dir, FINISHED_MARKER), json.dumps({"step": step}))


def finished_step(output_dir: str) -> int | None:
    """The step the run in `output_dir` finished at, or None if it has not finished."""
    path = os.path.join(output_dir, FINISHED_MARKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return int(json.load(f)["step"])


class RunFinished(OrpoError):
    """Resuming "latest" in an output directory whose run finished: there is nothing to train."""


def check_unfinished(output_dir: str, resume, max_steps: int) -> None:
    """RunFinished if `resume` asks for the latest checkpoint of a run that finished, unless
    `max_steps` (> 0) now goes beyond the step it finished at (then the run is extended)."""
    step = finished_step(output_dir) if is_latest(resume) else None
    if step is not None and (max_steps <= 0 or step >= max_steps):
        raise RunFinished(
            f"{output_dir}: this run finished at step {step}; nothing to resume. Train on from it with a larger "
            f"--max_steps, or from a checkpoint you name (--resume_from_checkpoint "
            f"{os.path.join(output_dir, 'checkpoint-N')}), or start again with --overwrite_output_dir"
        )


def is_complete(checkpoint_dir: str) -> bool:
    return os.path.isfile(os.path.join(checkpoint_dir, COMPLETE_MARKER))


def completed_step(checkpoint_dir: str) -> int:
    """The optimizer step a complete checkpoint was saved at (from its marker)."""
    with open(os.path.join(checkpoint_dir, COMPLETE_MARKER)) as f:
        return int(json.load(f)["step"])


def read_counters(checkpoint_dir: str) -> dict[str, int]:
    """The counters saved with a complete checkpoint ({} for a checkpoint from before they were)."""
    with open(os.path.join(checkpoint_dir, COMPLETE_MARKER)) as f:
        return json.load(f).get("counters", {})


def checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint-N directory in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def latest_complete(output_dir: str) -> str | None:
    """The newest complete checkpoint in `output_dir`, or None."""
    complete = [path for _, path in checkpoints(output_dir) if is_complete(path)]
    return complete[-1] if complete else None


def remove_incomplete(output_dir: str) -> list[str]:
    """Delete checkpoint directories whose save never finished; returns their paths."""
    removed = [path for _, path in checkpoints(output_dir) if not is_complete(path)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def resolve_resume(
    output_dir: str, resume: str | bool | None, overwrite: bool, is_main: bool, metrics_file: str, max_steps: int = -1
) -> str | None:
    """The checkpoint path to pass to Trainer.train, after checking `output_dir`.

    resume True / "latest" / "true": the newest complete checkpoint (None if there is none: a fresh
    start); incomplete ones are deleted; RunFinished if the run in `output_dir` finished and
    `max_steps` does not extend it (check_unfinished). A path: must be a complete checkpoint.
    None/False: a fresh start, refused if `output_dir` has files unless `overwrite`. `metrics_file` (JSON lines
    with a "step") keeps only the records up to the resumed step, so a resumed run's log has no
    steps twice. Only the main process (`is_main`) deletes or rewrites files.
    """
    if is_latest(resume):
        check_unfinished(output_dir, resume, max_steps)
        if is_main:
            remove_incomplete(output_dir)
        path = latest_complete(output_dir)
    elif isinstance(resume, str) and resume:
        if not os.path.isdir(resume):
            raise OrpoError(f"resume_from_checkpoint: {resume}: no such checkpoint directory")
        if not is_complete(resume):
            raise OrpoError(
                f"resume_from_checkpoint: {resume} is incomplete (its save was interrupted, or it was not written "
                f"by orpo); use --resume_from_checkpoint latest for the newest complete one"
            )
        path = resume
    else:
        existing = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
        if existing and not overwrite:
            shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
            raise OrpoError(
                f"output_dir {output_dir} already has files ({shown}); pass --overwrite_output_dir to train into it, "
                "or --resume_from_checkpoint latest to continue its run"
            )
        path = None
    if is_main:
        if os.path.isfile(os.path.join(output_dir, FINISHED_MARKER)):  # training (again) from here on
            os.remove(os.path.join(output_dir, FINISHED_MARKER))
        _keep_metrics_until(metrics_file, completed_step(path) if path else 0)
    return path


def _keep_metrics_until(metrics_file: str, step: int) -> None:
    if not os.path.isfile(metrics_file):
        return
    with open(metrics_file) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(metrics_file + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(metrics_file + ".tmp", metrics_file)
