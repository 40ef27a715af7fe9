"""What every field of the configuration accepts, checked when a config (or a command's flags) is constructed:
one line for the first value out of its range, not among its choices, or contradicting another field's.

`RANGES` holds one `Range` (orpo/ranges.py) per numeric field, orpo's own and those ORPOConfig inherits from
transformers' TrainingArguments: transformers' argument parser hands every key of a field's metadata to argparse,
so the ranges cannot sit in the metadata; tests/test_inputs.py fails for a numeric field without an entry, so a
new field cannot skip the check. `CONFLICTS` holds each pair of fields whose values contradict each other, with an
example of them the same tests pass as flags.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orpo.errors import OrpoError
from orpo.ranges import Range

# What every numeric field of the configuration accepts, by field name: orpo's own fields (ORPOConfig,
# ModelArguments, EvalArguments, InspectArguments) and those ORPOConfig inherits from TrainingArguments.
# tests/test_inputs.py fails for a numeric field that has no entry, so a new field cannot skip the check.
RANGES = {
    # ORPOConfig
    "beta": Range(float, 0),
    "learning_rate": Range(float, 0),
    "logging_steps": Range(float, 0, low_open=True, note="below 1: a fraction of the run's steps"),
    "max_length": Range(int, 2, optional=True, note="a prompt token and an answer token"),
    "max_prompt_length": Range(int, 1, optional=True),
    "max_completion_length": Range(int, 1, optional=True),
    "padding_value": Range(int, 0, optional=True),
    "logprob_chunk_size": Range(int, 1),
    "memory_budget_gb": Range(float, 0, low_open=True, optional=True),
    "dataset_num_proc": Range(int, 1, optional=True),
    "streaming_shuffle_buffer": Range(int, 0),
    # ModelArguments (orpo train)
    "lora_r": Range(int, 1),
    "lora_alpha": Range(int, 1),
    "lora_dropout": Range(float, 0, 1, high_open=True),
    "world_size": Range(int, 1, optional=True),
    # EvalArguments (orpo eval), InspectArguments (orpo data inspect)
    "limit": Range(int, 1, optional=True),
    "batch_tokens": Range(int, 1),
    "batch_size": Range(int, 1),
    "n": Range(int, 0),
    # inherited from TrainingArguments
    "per_device_train_batch_size": Range(int, 1),
    "per_device_eval_batch_size": Range(int, 1),
    "gradient_accumulation_steps": Range(int, 1),
    "eval_accumulation_steps": Range(int, 1, optional=True),
    "num_train_epochs": Range(float, 0),
    "max_steps": Range(int, 0, also=(-1,), note="-1: train num_train_epochs"),
    "warmup_steps": Range(float, 0, note="below 1: a fraction of the run's steps"),
    "weight_decay": Range(float, 0),
    "adam_beta1": Range(float, 0, 1, high_open=True),
    "adam_beta2": Range(float, 0, 1, high_open=True),
    "adam_epsilon": Range(float, 0),
    "max_grad_norm": Range(float, 0, note="0: no clipping"),
    "label_smoothing_factor": Range(float, 0, 0, note="orpo's loss has no label smoothing"),
    "neftune_noise_alpha": Range(float, 0, low_open=True, optional=True),
    "torch_empty_cache_steps": Range(int, 1, optional=True),
    "eval_steps": Range(float, 0, low_open=True, optional=True),
    "eval_delay": Range(float, 0),
    "save_steps": Range(float, 0, low_open=True),
    "save_total_limit": Range(int, 1, optional=True),
    "seed": Range(int, 0, 2**32 - 1),
    "data_seed": Range(int, 0, 2**32 - 1, optional=True),
    "dataloader_num_workers": Range(int, 0),
    "dataloader_prefetch_factor": Range(int, 1, optional=True),
    "ddp_bucket_cap_mb": Range(int, 1, optional=True),
    "ddp_timeout": Range(int, 1),
    "local_rank": Range(int, -1),
}


@dataclass(frozen=True)
class Conflict:
    """Values of several fields that contradict each other. `example`: one such set of values (the hostile-input
    tests pass it as flags); `holds`: whether a config's values conflict; `message`: the one line."""

    example: dict
    holds: Callable[[Any], bool]
    message: str


def _changed(config, *names: str) -> bool:
    """Whether any of the fields `names` of the dataclass `config` differs from the field's default."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    return any(getattr(config, name) != defaults[name] for name in names)


CONFLICTS = (
    Conflict({"packing": False, "packed_attention": "spans"},
             lambda c: c.packing is False and c.packed_attention is not None,
             "--packed_attention applies to the prefix-shared layout, and --packing false lays each pair out as two "
             "padded rows; leave one of them unset"),
    Conflict({"activation_checkpointing": False, "selective_checkpointing": True},
             lambda c: False in (c.activation_checkpointing, c.gradient_checkpointing) and c.selective_checkpointing,
             "--selective_checkpointing says how recomputed layers are recomputed, and --activation_checkpointing "
             "false recomputes none; leave one of them unset"),
    Conflict({"bf16": True, "fp16": True}, lambda c: c.bf16 and c.fp16,
             "--bf16 true and --fp16 true: choose one autocast precision"),
    Conflict({"max_steps": 0, "num_train_epochs": 0}, lambda c: c.max_steps <= 0 and c.num_train_epochs == 0,
             "--max_steps unset (or 0) and --num_train_epochs 0: nothing to train; set either to how long to train"),
    Conflict({"streaming": True, "max_steps": -1}, lambda c: c.streaming and c.max_steps <= 0,
             "--streaming needs --max_steps: a stream has no length to count epochs by"),
    Conflict({"streaming": True, "max_steps": 5, "dataloader_num_workers": 2},
             lambda c: c.streaming and c.dataloader_num_workers,
             "--streaming tokenizes in the training process (its drop counts are logged from there): leave "
             "--dataloader_num_workers at 0"),
    Conflict({"streaming": True, "max_steps": 5, "train_sampling_strategy": "group_by_length"},
             lambda c: c.streaming and c.train_sampling_strategy == "group_by_length",
             "--train_sampling_strategy group_by_length sorts by the pairs' lengths, which a stream does not know "
             "ahead; use it without --streaming"),
    Conflict({"streaming_shuffle_buffer": 5, "streaming": False},
             lambda c: not c.streaming and _changed(c, "streaming_shuffle_buffer"),
             "--streaming_shuffle_buffer applies to --streaming, which is off"),
    Conflict({"dataset_cache": False, "dataset_cache_dir": "cache"},
             lambda c: not c.dataset_cache and c.dataset_cache_dir is not None,
             "--dataset_cache_dir names the cache, and --dataset_cache false turns it off; leave one of them unset"),
    Conflict({"resume_from_checkpoint": "latest", "overwrite_output_dir": True},
             lambda c: bool(c.resume_from_checkpoint) and c.overwrite_output_dir,
             "--resume_from_checkpoint continues the run in output_dir, and --overwrite_output_dir replaces it; "
             "choose one"),
    Conflict({"previous_run": "move", "overwrite_output_dir": False},
             lambda c: _changed(c, "previous_run") and not c.overwrite_output_dir,
             "--previous_run says what --overwrite_output_dir does with the previous run, and it is not set"),
    Conflict({"force_resume": True, "resume_from_checkpoint": None},
             lambda c: c.force_resume and not c.resume_from_checkpoint,
             "--force_resume applies to --resume_from_checkpoint, which is not set"),
    Conflict({"export_outtype": "q8_0", "export_gguf": None},
             lambda c: _changed(c, "export_outtype") and not c.export_gguf,
             "--export_outtype applies to --export_gguf, which is not set"),
    Conflict({"objective": "reward", "beta": 0.5},
             lambda c: c.objective == "reward" and _changed(c, "beta"),
             "--beta weighs ORPO's odds-ratio term, and --objective reward trains with the Bradley-Terry loss alone; "
             "leave --beta unset"),
    Conflict({"objective": "reward", "nll_scope": "completion"},
             lambda c: c.objective == "reward" and _changed(c, "nll_scope"),
             "--nll_scope chooses ORPO's NLL tokens, and --objective reward has no NLL term; leave --nll_scope unset"),
    Conflict({"objective": "reward", "export_gguf": "model.gguf"},
             lambda c: c.objective == "reward" and bool(c.export_gguf),
             "--export_gguf writes a language model for llama.cpp, and --objective reward trains a reward model (a "
             "score head, no output over the vocabulary); leave --export_gguf unset"),
    Conflict({"fsdp": "full_shard", "deepspeed": "ds.json"}, lambda c: bool(c.fsdp) and bool(c.deepspeed),
             "--fsdp and --deepspeed are two ways of sharding the model: choose one"),
    # ModelArguments (orpo train)
    Conflict({"lora_r": 8, "use_peft": False},
             lambda c: not c.use_peft and _changed(c, "lora_r", "lora_alpha", "lora_dropout"),
             "--lora_r, --lora_alpha and --lora_dropout apply to --use_peft, which is not set"),
    Conflict({"lora_target_modules": ["q_proj"], "use_peft": False},
             lambda c: not c.use_peft and c.lora_target_modules,
             "--lora_target_modules applies to --use_peft, which is not set"),
    # orpo eval
    Conflict({"reference": True, "bf16": True}, lambda c: c.reference and c.bf16,
             "--reference runs the model in its own dtype; --bf16 is for the fast path (for a bf16 reference, "
             "--dtype bfloat16)"),
    Conflict({"reference": True, "batch_tokens": 1000}, lambda c: c.reference and _changed(c, "batch_tokens"),
             "--batch_tokens sizes the fast path's batches; --reference takes --batch_size pairs per call"),
    Conflict({"batch_size": 2, "reference": False}, lambda c: not c.reference and _changed(c, "batch_size"),
             "--batch_size sizes --reference's batches; the fast path takes --batch_tokens tokens per call"),
)


def check_fields(config) -> None:
    """One OrpoError line for the first field of the dataclass `config` (ORPOConfig, ModelArguments, a
    subcommand's flags) whose value is out of its range (RANGES) or not one of its choices, then for the
    first of CONFLICTS that holds among the fields it has."""
    names = {f.name for f in dataclasses.fields(config)}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if (accepted := RANGES.get(f.name)) is not None:
            accepted.check(f.name, value)
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices and not (value is None and f.default is None):
            raise OrpoError(f"--{f.name} {value!r}: accepted: {', '.join(map(str, choices))}")
    for conflict in CONFLICTS:
        if set(conflict.example) <= names and conflict.holds(config):
            raise OrpoError(conflict.message)
