"""The one home of configuration: `ORPOConfig` (TrainingArguments + ORPO + data shape), and the
model and data-source arguments of the command line.

Every flag of `orpo train`, `orpo eval` and `orpo data inspect` is a field here; the subcommands
take their flags from these fields (`orpo.commands.cli`), so defaults and help are written once.
Names shared with TRL's `ORPOConfig` keep TRL's meaning.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from orpo.errors import OrpoError
from orpo.ops.packing import PACKED_ATTENTION

DTYPES = ("float32", "bfloat16", "float16", "auto")  # --dtype: weights dtype to load a model in


@dataclass
class ModelArguments:
    model: str = field(metadata={"help": "Hub id, local Hugging Face directory, or local .gguf file."})
    dtype: str = field(
        default="float32",
        metadata={"help": "Weights dtype to load the model in.", "choices": list(DTYPES)},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the model repo."})
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt; default: peft's choice for the architecture."}
    )


@dataclass
class DataArguments:
    dataset: str = field(metadata={"help": "Preference data: .jsonl/.json/.parquet/.csv (.gz too) or a hub dataset id."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Optional evaluation preference data."})
    eval_split: str = field(default="test", metadata={"help": "Split of a hub eval dataset."})
    prompt_column: str | None = field(default=None, metadata={"help": "Column holding the prompt (default: prompt)."})
    chosen_column: str | None = field(default=None, metadata={"help": "Column holding the chosen answer (default: chosen)."})
    rejected_column: str | None = field(
        default=None, metadata={"help": "Column holding the rejected answer (default: rejected)."}
    )
    skip_bad_rows: bool = field(
        default=False, metadata={"help": "Skip (and count) JSON lines that cannot be read instead of stopping."}
    )


ON_NONFINITE = ("skip", "stop")
NLL_SCOPES = ("full", "completion")


@dataclass
class ORPOConfig(TrainingArguments):
    """Training arguments for ORPO. Names shared with TRL's ORPOConfig keep TRL's meaning."""

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs"]

    # TrainingArguments fields whose defaults differ (TRL's ORPO defaults)
    learning_rate: float = field(default=1e-6, metadata={"help": "The initial learning rate for AdamW."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X optimizer steps."})
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Recompute activations in backward: far less memory for about a fifth more time. None (default) "
            "= on, as in TRL, unless the deprecated alias gradient_checkpointing says otherwise. "
            "--activation_checkpointing_kwargs '{\"every_n_layers\": 2}' keeps every other layer's activations."
        },
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: orpo reads the preference columns itself."}
    )

    beta: float = field(
        default=0.1,
        metadata={"help": "λ, the weight of the odds-ratio loss (paper: λ; official code: alpha; TRL: beta)."},
    )
    nll_scope: str = field(
        default="full",
        metadata={
            "help": "Tokens of the NLL term: 'full' = prompt + chosen completion (official code after release, TRL); "
            "'completion' = chosen completion only (paper Eq. 2).",
            "choices": list(NLL_SCOPES),
        },
    )
    max_length: int | None = field(
        default=1024, metadata={"help": "Maximum prompt + completion tokens of each sequence."}
    )
    max_prompt_length: int | None = field(
        default=512, metadata={"help": "Maximum prompt tokens; longer prompts keep their end."}
    )
    max_completion_length: int | None = field(
        default=None, metadata={"help": "Maximum completion tokens; longer completions are cut from the right."}
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout in the model."})
    padding_value: int | None = field(
        default=None, metadata={"help": "Pad token id for batches; None uses the tokenizer's pad token."}
    )
    packing: bool = field(
        default=True,
        metadata={
            "help": "Prefix-shared packing: each pair as one [prompt | chosen | rejected] sequence, several pairs "
            "per row (the fast path). False: prompt+chosen and prompt+rejected as separate padded rows (debugging)."
        },
    )
    packed_attention: str = field(
        default="spans",
        metadata={
            "help": "Attention of the packed layout: 'spans' = per-pair SDPA calls, all pairs of a micro-batch in "
            "one row, no dense mask (fast; needs attn_implementation 'sdpa', the default); 'mask' = one SDPA "
            "call per layer with a dense [rows, 1, T, T] mask (any attention that honours 4D masks).",
            "choices": list(PACKED_ATTENTION),
        },
    )
    logprob_chunk_size: int = field(
        default=1024, metadata={"help": "Target tokens per chunk of the output head (memory vs. speed)."}
    )
    strict: bool = field(default=False, metadata={"help": "Make any dropped pair an error."})
    on_nonfinite: str = field(
        default="skip",
        metadata={
            "help": "A step whose loss or gradient is NaN/inf: 'skip' = no optimizer update (counted in the "
            "logs as nonfinite_skipped, warned with the step and rows); 'stop' = stop with an error naming them.",
            "choices": list(ON_NONFINITE),
        },
    )
    report: bool = field(
        default=True,
        metadata={"help": "At the end of training, write report.html and PNG plots of metrics.jsonl into output_dir."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into an output_dir that already has files (without it, orpo refuses)."},
    )
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for AutoModelForCausalLM.from_pretrained when the model is a string."},
    )

    def __post_init__(self):
        for name, choices in (("nll_scope", NLL_SCOPES), ("packed_attention", PACKED_ATTENTION),
                              ("on_nonfinite", ON_NONFINITE)):
            if getattr(self, name) not in choices:
                raise OrpoError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.beta < 0:
            raise OrpoError(f"beta must be >= 0, got {self.beta}")
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; avoids a warning per run
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
            # Launched by torchrun/accelerate on a machine without GPUs: TrainingArguments only sets up
            # (gloo) data parallelism with use_cpu, and would otherwise train WORLD_SIZE unrelated copies.
            self.use_cpu = True
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # TRL's default; the alias keeps its meaning when set
        if isinstance(self.model_init_kwargs, str):
            self.model_init_kwargs = json.loads(self.model_init_kwargs)
        super().__post_init__()
