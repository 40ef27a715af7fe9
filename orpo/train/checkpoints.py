"""Crash-safe checkpoints: a checkpoint counts only once it is completely on disk.

transformers' Trainer writes `checkpoint-N/` file by file; a process killed mid-save leaves a
directory that `resume_from_checkpoint=True` would pick and fail on (or half-load). After a save
completes, every file is fsynced and a marker `COMPLETE_MARKER` is written atomically (temp file
+ rename); resuming only considers checkpoints with the marker and deletes those without it.

A run that finished writes `FINISHED_MARKER` into its output directory: resuming it with "latest"
(a rerun of the same command, a requeued job) trains nothing and says so. Every save holds the
config as JSON (`CONFIG_FILE`) instead of transformers' pickled `training_args.bin`, so nothing in
an output directory needs unpickling: the other state files load with `torch.load(weights_only=True)`.

Never resume another run, never lose one: each completion marker holds the run's stamp (its settings, model
and data: `run_stamp`), and a resume from a checkpoint stamped otherwise is refused in one line naming what
differs (`check_stamp`; `--force_resume` overrides). A new run in an output directory that holds a previous
run (`--overwrite_output_dir`) removes that run, or moves it aside, when training starts (`clear_previous_run`),
so none of its checkpoints can be resumed as the new run's and its metrics.jsonl is not continued.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil

from orpo.errors import OrpoError
from orpo.train.report import METRICS_FILE, PLAN_FILE, read_metric_lines

logger = logging.getLogger(__name__)

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


def mark_complete(checkpoint_dir: str, step: int, counters: dict[str, int] | None = None,
                  stamp: dict | None = None) -> None:
    """fsync every file of `checkpoint_dir`, then atomically write its completion marker, which also
    holds the trainer's `counters` at that step (e.g. nonfinite_skipped), restored on resume, and the run's
    `stamp` (`run_stamp`), checked on resume."""
    for root, _, files in os.walk(checkpoint_dir):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root, directory=True)
    files = sorted(os.listdir(checkpoint_dir))
    record = json.dumps({"step": step, "files": files, "counters": counters or {}, "stamp": stamp})
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


# Fields a resumed run may change: they decide how long it trains, what it logs and saves, where, how fast and
# with how much memory, not what a step computes (every route, recompute and head choice is exact). Every other
# field is part of a checkpoint's stamp (`stamp_settings`): resuming with another value is refused unless
# --force_resume, so a new field is stamped unless it is added here.
RESUMABLE_CHANGES = frozenset({
    "output_dir", "overwrite_output_dir", "previous_run", "resume_from_checkpoint", "force_resume", "max_steps",
    "num_train_epochs", "logging_dir", "logging_strategy", "logging_steps", "logging_first_step",
    "logging_nan_inf_filter", "save_strategy", "save_steps", "save_total_limit", "save_on_each_node",
    "save_only_model", "eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "per_device_eval_batch_size",
    "eval_accumulation_steps", "eval_split", "report_to", "run_name", "project", "trackio_space_id",
    "disable_tqdm", "log_level", "log_level_replica", "dataloader_num_workers", "dataloader_prefetch_factor",
    "dataloader_persistent_workers", "dataloader_pin_memory", "push_to_hub", "hub_model_id", "hub_strategy",
    "hub_token", "hub_private_repo", "hub_always_push", "hub_revision", "dataset_num_proc", "dataset_cache",
    "dataset_cache_dir", "memory_budget_gb", "report", "save_eval_pairs", "export_gguf", "export_outtype",
    "ddp_timeout", "local_rank", "use_cpu", "activation_checkpointing", "activation_checkpointing_kwargs",
    "gradient_checkpointing", "gradient_checkpointing_kwargs", "selective_checkpointing", "keep_head_probs",
    "logprob_chunk_size", "packing", "packed_attention", "reuse_cpu_memory", "on_nonfinite", "strict",
    "trust_remote_code", "torch_empty_cache_steps", "include_num_input_tokens_seen", "skip_memory_metrics",
})


def stamp_settings(config) -> dict:
    """The settings a checkpoint is stamped with: every field of `config` (an ORPOConfig, as `to_dict` gives
    it) but RESUMABLE_CHANGES."""
    return {name: value for name, value in config.to_dict().items() if name not in RESUMABLE_CHANGES}


def run_stamp(settings: dict, model: str, data: dict[str, tuple[str, str]]) -> dict:
    """What made a run, as its checkpoints record it: `settings` (`stamp_settings`), the `model` trained
    (as given: hub id, path or the name a model object carries) and `data`: role ("train", "eval") → (source as
    given, fingerprint of its content and preparation)."""
    return {"settings": settings, "model": model, "data": {role: list(value) for role, value in data.items()}}


def stamp_differences(made: dict, now: dict) -> list[str]:
    """What differs between the stamp a checkpoint was `made` with and the run's stamp `now`, one phrase each
    ("learning_rate 1e-05 (now 2e-05)", "other train data: a.jsonl (now b.jsonl)"); only the parts both stamps
    have are compared (a stamp made before the data was prepared has none)."""
    differences = []
    if "settings" in made and "settings" in now:
        before, after = made["settings"], now["settings"]
        differences += [f"{name} {before.get(name)!r} (now {after.get(name)!r})" for name in sorted(set(before) | set(after))
                        if before.get(name) != after.get(name)]
    if "model" in made and "model" in now and made["model"] != now["model"]:
        differences.append(f"the model {made['model']} (now {now['model']})")
    for role in sorted(set(made.get("data", {})) & set(now.get("data", {}))):
        (source, fingerprint), (source_now, fingerprint_now) = made["data"][role], now["data"][role]
        if fingerprint != fingerprint_now:
            same = "its content or preparation changed" if source == source_now else f"now {source_now}"
            differences.append(f"other {role} data: {source} ({same})")
    return differences


def check_stamp(checkpoint_dir: str, stamp: dict, force: bool) -> list[str]:
    """Refuse (one OrpoError line) to resume from `checkpoint_dir` when its stamp differs from the run's `stamp`,
    unless `force`; returns the differences (logged when forced). A checkpoint written before checkpoints were
    stamped is not checked."""
    with open(os.path.join(checkpoint_dir, COMPLETE_MARKER)) as f:
        made = json.load(f).get("stamp")
    if made is None:
        logger.warning("%s has no stamp of the settings and data that made it (an older orpo wrote it): resuming "
                       "it unchecked", checkpoint_dir)
        return []
    differences = stamp_differences(made, stamp)
    if differences and not force:
        shown = "; ".join(differences[:5]) + (f"; and {len(differences) - 5} more" if len(differences) > 5 else "")
        raise OrpoError(f"resume_from_checkpoint: {checkpoint_dir} was made by another run ({shown}); resume with the "
                        "settings and data that made it, start a new run with --overwrite_output_dir, or pass "
                        "--force_resume to resume it anyway")
    return differences


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


RUN_FILES = (METRICS_FILE, PLAN_FILE, CONFIG_FILE, FINISHED_MARKER)  # any of them: the directory holds an orpo run


def holds_run(output_dir: str) -> bool:
    """Whether `output_dir` holds what an orpo run writes (its logs, plan, config, markers or checkpoints)."""
    return any(os.path.exists(os.path.join(output_dir, name)) for name in RUN_FILES) or bool(checkpoints(output_dir))


def _entries(output_dir: str) -> list[str]:
    return sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []


def check_output_dir(output_dir: str, resume: str | bool | None, overwrite: bool, previous_run: str,
                     max_steps: int = -1) -> None:
    """Whether a run may start in `output_dir` as asked, before anything is loaded (nothing is written):

    resume True / "latest": RunFinished where its run finished and `max_steps` does not extend it.
    resume a path: it must be a complete checkpoint.
    no resume: an output_dir with files is refused unless `overwrite`; with `overwrite` and `previous_run`
    "remove", a directory whose files no orpo run wrote is refused (orpo deletes only runs it wrote)."""
    if is_latest(resume):
        check_unfinished(output_dir, resume, max_steps)
    elif isinstance(resume, str) and resume:
        if not os.path.isdir(resume):
            raise OrpoError(f"resume_from_checkpoint: {resume}: no such checkpoint directory")
        if not is_complete(resume):
            raise OrpoError(
                f"resume_from_checkpoint: {resume} is incomplete (its save was interrupted, or it was not written "
                f"by orpo); use --resume_from_checkpoint latest for the newest complete one"
            )
    elif existing := _entries(output_dir):
        shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
        if not overwrite:
            raise OrpoError(
                f"output_dir {output_dir} already has files ({shown}); pass --overwrite_output_dir to start a new run "
                "there (the previous one is removed), or --resume_from_checkpoint latest to continue its run"
            )
        if previous_run == "remove" and not holds_run(output_dir):
            raise OrpoError(f"output_dir {output_dir} has files that no orpo run wrote ({shown}); orpo removes only "
                            "runs it wrote: choose another output_dir, or --previous_run move to move them aside")


def clear_previous_run(output_dir: str, previous_run: str) -> str | None:
    """Before a new run trains in `output_dir`: its previous run removed ("remove": every entry) or moved
    aside ("move": the directory renamed to OUTPUT_DIR.previous-N, N the first free, and made again).
    Returns where it went (None: removed, or nothing was there)."""
    existing = _entries(output_dir)
    if not existing:
        return None
    if previous_run == "move":
        n = 1
        while os.path.exists(f"{output_dir.rstrip(os.sep)}.previous-{n}"):
            n += 1
        aside = f"{output_dir.rstrip(os.sep)}.previous-{n}"
        os.rename(output_dir, aside)
        os.makedirs(output_dir)
        logger.info("output_dir: the previous run moved to %s", aside)
        return aside
    for name in existing:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    logger.info("output_dir: the previous run's %d entries removed (%s)", len(existing),
                ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else ""))
    return None


def resolve_resume(output_dir: str, resume: str | bool | None, overwrite: bool, previous_run: str, is_main: bool,
                   max_steps: int = -1) -> str | None:
    """The checkpoint path to pass to Trainer.train, as training starts (`check_output_dir` again, then:)

    resume True / "latest": the newest complete checkpoint (None if there is none: a fresh start); incomplete
    ones are deleted. A path: that checkpoint. None/False: a fresh start; with `overwrite` the previous run is
    cleared (`clear_previous_run`). metrics.jsonl keeps only the records up to the resumed step, so a resumed
    run's log has no steps twice. Only the main process (`is_main`) deletes, moves or rewrites files."""
    check_output_dir(output_dir, resume, overwrite, previous_run, max_steps)
    if is_latest(resume):
        if is_main:
            remove_incomplete(output_dir)
        path = latest_complete(output_dir)
    elif isinstance(resume, str) and resume:
        path = resume
    else:
        path = None
        if is_main and overwrite:
            clear_previous_run(output_dir, previous_run)
    if is_main:
        if os.path.isfile(os.path.join(output_dir, FINISHED_MARKER)):  # training (again) from here on
            os.remove(os.path.join(output_dir, FINISHED_MARKER))
        keep_metrics_until(os.path.join(output_dir, METRICS_FILE), completed_step(path) if path else 0)
    return path


def keep_metrics_until(metrics_file: str, step: int) -> int:
    """Rewrite `metrics_file` with only its records up to `step`; a partial last line (a kill during a log
    write) is dropped and counted. Returns the records dropped."""
    if not os.path.isfile(metrics_file):
        return 0
    records, partial = read_metric_lines(metrics_file)
    kept = [record for record in records if record.get("step", 0) <= step]
    if partial:
        logger.warning("%s: its last line was partial (a kill during a log write): dropped", metrics_file)
    with open(metrics_file + ".tmp", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in kept)
    os.replace(metrics_file + ".tmp", metrics_file)
    return len(records) - len(kept) + partial
