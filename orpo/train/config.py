"""The one home of configuration: `ORPOConfig` (TrainingArguments + ORPO + data shape), and the
model and data-source arguments of the command line.

Every flag of `orpo train`, `orpo eval` and `orpo data inspect` is a field here; the subcommands
take their flags from these fields (`orpo.commands.cli`), so defaults and help are written once.
Names shared with TRL's `ORPOConfig` keep TRL's meaning.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from orpo.data.formats import BINARIZE, RowFormat
from orpo.data.prepare import PreparedData, prepare_dataset
from orpo.data.render import LengthLimits
from orpo.data.stream import PairStream
from orpo.errors import OrpoError, first_line
from orpo.train.validation import check_fields
from orpo.ops.packing import PACKED_ATTENTION
from orpo.train.models import DTYPES, GGUF_OUTTYPES


@dataclass
class ModelArguments:
    """The model `orpo train` trains, and how (the rest of the run is ORPOConfig)."""

    model: str = field(metadata={"help": "Hub id, local Hugging Face directory, or local .gguf file."})
    dtype: str = field(
        default="float32",
        metadata={"help": "Weights dtype to load the model in (orpo train: model_init_kwargs' dtype, as in TRL).",
                  "choices": list(DTYPES)},
    )
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to adapt; default: peft's choice for the architecture."}
    )
    dry_run: bool = field(
        default=False,
        metadata={"help": "Print what the run would do and stop: every check a run makes, the settings that differ "
                  "from the defaults, the data's rows and drops, every choice orpo made with its reason (route, "
                  "precision, recompute, head softmax, memory per device, what happens to output_dir, what is "
                  "saved and exported). The data is prepared (and cached) and the model loaded; nothing is "
                  "trained and nothing is written to output_dir. A sharded run (--fsdp, --deepspeed) needs no "
                  "launcher for it: one process plans each of the run's processes (--world_size)."},
    )
    world_size: int | None = field(
        default=None,
        metadata={"help": "With --dry_run in a process no launcher started: plan each process of a run of this many "
                  "processes (all machines together). Default: what the --config file's `# Launch:` line starts "
                  "(torchrun --nproc_per_node N, times --nnodes M); a sharded run (--fsdp, --deepspeed) needs one "
                  "of the two. A launched run's world size is its launcher's."},
    )

    def __post_init__(self):
        check_fields(self)


@dataclass
class DataArguments:
    """Where the preference data comes from (how its columns are read: ORPOConfig's data fields)."""

    dataset: str = field(metadata={"help": "Preference data: .jsonl/.json/.parquet/.csv (.gz too), a hub dataset id, "
                                           "or a directory written by orpo data prepare --output."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Optional evaluation preference data."})


@dataclass
class EvalArguments:
    """Options of `orpo eval` that training does not have."""

    output: str | None = field(
        default=None, metadata={"help": "Write one JSON record per pair, then a summary line, to this file."}
    )
    limit: int | None = field(default=None, metadata={"help": "Only the first N usable pairs."})
    compare: str | None = field(
        default=None,
        metadata={"help": "A second model (e.g. the one before training, or an SFT-only run): both are scored on "
                  "the same pairs and compared pair by pair (fixed/broken pairs, sign test, Δlog_odds with a "
                  "95-percent bootstrap CI, Δlogp of chosen and rejected)."},
    )
    reference: bool = field(
        default=False,
        metadata={"help": "Score with plain unpacked forwards and full fp32 logits (slow; what the fast path, "
                  "the training path without gradients, is tested against)."},
    )
    batch_tokens: int = field(default=16384, metadata={"help": "Tokens per forward pass of the fast path."})
    batch_size: int = field(default=4, metadata={"help": "Pairs per forward pass of --reference."})


@dataclass
class InspectArguments:
    """Options of `orpo data inspect`."""

    n: int = field(default=3, metadata={"help": "Number of pairs to show.", "aliases": ["-n"]})


@dataclass
class PrepareArguments:
    """Options of `orpo data prepare`."""

    output: str | None = field(
        default=None,
        metadata={"help": "Also write the prepared set to this new directory: `--dataset DIR` of orpo train, eval "
                  "and data inspect then reads it (e.g. on every node of a multi-node job). Unset: the cache only."},
    )


ON_NONFINITE = ("skip", "stop")
OBJECTIVES = ("orpo", "reward")
NLL_SCOPES = ("full", "completion")
PREVIOUS_RUN = ("remove", "move")


@dataclass
class ORPOConfig(TrainingArguments):
    """Training arguments for ORPO. Names shared with TRL's ORPOConfig keep TRL's meaning."""

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs", "label_map"]

    # TrainingArguments fields whose defaults differ (TRL's ORPO defaults)
    learning_rate: float = field(default=1e-6, metadata={"help": "The initial learning rate for AdamW."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X optimizer steps (below 1: a fraction of "
                                                       "the run's steps)."})
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Recompute activations in backward: far less memory for about a fifth more time. Default (unset): "
            "orpo estimates the largest micro-batch's memory and recomputes only when it does not fit "
            "--memory_budget_gb (none, every n-th layer selectively, or every layer fully: --selective_checkpointing); "
            "the run log says which and why. "
            "true/false decide; --activation_checkpointing_kwargs '{\"every_n_layers\": 2}' keeps every other "
            "layer's activations.",
            "nargs": "?",  # a bare --activation_checkpointing means true, as in TrainingArguments and TRL
            "const": True,
        },
    )
    selective_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Layers recomputed in backward keep their matmul and attention outputs and recompute only "
                  "the element-wise work (norms, activations, rotary, casts; train/recompute.py): about half of "
                  "their activations' memory, and no matmul runs twice. Default (unset): orpo's memory planner "
                  "chooses it before full recompute when it chooses activation checkpointing; full recompute where "
                  "--activation_checkpointing true is set by hand.",
                  "nargs": "?", "const": True},
    )
    memory_budget_gb: float | None = field(
        default=None,
        metadata={"help": "Memory (GB) a training step may allocate on each device when orpo chooses activation "
                  "checkpointing (--activation_checkpointing unset). Default: 80 percent of the device's free "
                  "memory at start (a CPU's shared among the processes of the machine)."},
    )
    keep_head_probs: bool | None = field(
        default=None,
        metadata={"help": "Keep the output head's fp32 softmax from the forward for backward, which then skips the "
                  "head's second matmul and log-softmax over the vocabulary (same gradients): faster, and tokens x "
                  "vocabulary x 4 bytes more per micro-batch. Default (unset): kept where a step without activation "
                  "checkpointing still fits --memory_budget_gb with it; the run log says which and why.",
                  "nargs": "?", "const": True},
    )
    reuse_cpu_memory: bool = field(
        default=True,
        metadata={"help": "On the CPU (Linux, glibc): large tensors come from memory the process freed before, not "
                  "from fresh pages the kernel must zero-fill (train/allocator.py): 9 percent faster fp32 steps and 16 percent "
                  "faster bf16 steps on SmolLM2, the same numbers; freed memory stays with the process until it exits."},
    )

    objective: str = field(
        default="orpo",
        metadata={"help": "What the run trains: 'orpo' = the model itself with ORPO; 'reward' = a Bradley-Terry "
                  "reward model (a score head with one output on the model, AutoModelForSequenceClassification) on "
                  "the same pairs, loss −log σ(r_chosen − r_rejected), its held-out pair accuracy reported as "
                  "eval_accuracy (docs/reward-models.md). Every other flag means what it means for ORPO.",
                  "choices": list(OBJECTIVES)},
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "λ, the weight of the odds-ratio loss (paper: λ; official code: alpha; TRL: beta). 0.1 is TRL's "
                  "default; for small models the authors advise 0.5-1.0, and on SmolLM2-135M (docs/benchmarks.md: "
                  "alignment benchmark) 0.5-1.0 separated chosen from rejected on the trained pairs 3-4x more than 0.1."},
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
    freeze_vision_tower: bool = field(
        default=True,
        metadata={"help": "Vision-language models: keep the vision tower (the image encoder: Qwen-VL's visual, "
                          "LLaVA's and Gemma 3's vision_tower, Idefics3's vision_model) frozen, as LLaMA-Factory does "
                          "by default; the language model and the projector between them train. false trains it too."},
    )
    padding_value: int | None = field(
        default=None, metadata={"help": "Pad token id for batches; None uses the tokenizer's pad token."}
    )
    packing: bool | None = field(
        default=None,
        metadata={
            "help": "Prefix-shared packing: each pair as one [prompt | chosen | rejected] sequence, the prompt computed "
            "once. Unset: orpo chooses the route for the model and says why in the log (packing wherever it "
            "reproduces separate forwards; separate padded rows for models whose layers carry state along the "
            "sequence, such as Mamba or linear attention). true / false force it; a forced route that is wrong for "
            "the model is refused."
        },
    )
    packed_attention: str | None = field(
        default=None,
        metadata={
            "help": "Attention of the packed layout: 'spans' = per-pair SDPA calls, all pairs of a micro-batch in "
            "one row, no dense mask (fast; needs attn_implementation 'sdpa'); 'mask' = one call per layer with a "
            "dense [rows, 1, T, T] mask (any attention that honours 4D masks). Unset: orpo chooses (spans where "
            "they reproduce separate forwards).",
            "choices": list(PACKED_ATTENTION),
        },
    )
    logprob_chunk_size: int = field(
        default=1024, metadata={"help": "Target tokens per chunk of the output head (memory vs. speed)."}
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 autocast mixed precision (weights stay fp32; log-softmax, odds ratio and loss are fp32 "
                  "regardless). Default (unset): on where the device computes bf16 natively (CUDA GPUs from Ampere, "
                  "CPUs with AMX-BF16 or AVX512-BF16), fp32 elsewhere; the run log says which and why. true/false "
                  "force it. orpo eval: unset means fp32, so scores compare across machines."},
    )
    # --- how rows are read (orpo.data: every shape is detected per row; these map other names) ---
    dataset_split: str = field(
        default="train", metadata={"help": "Split of a hub dataset given by its id (training data).",
                                   "aliases": ["--split"]}
    )
    eval_split: str = field(default="test", metadata={"help": "Split of a hub eval dataset given by its id."})
    prompt_column: str | None = field(
        default=None,
        metadata={"help": "Column holding the prompt (default: prompt, else instruction). Several, comma-separated (instruction,input), "
                  "are joined: the non-empty parts with a blank line between."},
    )
    chosen_column: str | None = field(default=None, metadata={"help": "Column holding the chosen answer (default: chosen)."})
    rejected_column: str | None = field(
        default=None, metadata={"help": "Column holding the rejected answer (default: rejected)."}
    )
    response_columns: str | None = field(
        default=None,
        metadata={"help": "Label-based pairwise data: the two answer columns, comma-separated (response1,response2); "
                  "--label_column and --label_map say which one is preferred."},
    )
    label_column: str | None = field(
        default=None,
        metadata={"help": "Column of the preference label; several comma-separated (annotators): a strict majority "
                  "of them decides, otherwise the pair is a tie (dropped, counted)."},
    )
    label_map: dict[str, str] | str | None = field(
        default=None,
        metadata={"help": "JSON object: label value (as a string) -> the preferred column of --response_columns, "
                  "or \"tie\", e.g. '{\"1\": \"response1\", \"2\": \"response2\", \"0\": \"tie\"}'. Unmapped and "
                  "missing labels are counted drops."},
    )
    rating_key: str = field(
        default="overall_score",
        metadata={"help": "Rated completions (UltraFeedback raw: a 'completions' list): the key of each completion's score."},
    )
    binarize: str = field(
        default="best_vs_random",
        metadata={"help": "Rated completions -> one pair per row: the best-rated answer against a random lower-rated "
                  "one (seeded by --data_seed or --seed), or against the worst. Ties are counted drops.",
                  "choices": list(BINARIZE)},
    )
    strict: bool = field(default=False, metadata={"help": "Make any dropped pair an error."})
    dataset_num_proc: int | None = field(
        default=None,
        metadata={"help": "Processes that prepare (read, render, tokenize) the data; unset: the CPU cores this "
                  "process may use, for 2,000 rows or more (else 1). Any number gives the same pairs. Under "
                  "torchrun/accelerate the first process of each machine prepares, the others read its result."},
    )
    dataset_cache: bool = field(
        default=True,
        metadata={"help": "Keep prepared data in the cache and reuse it when the source's content, the tokenizer, "
                  "every data option and orpo's data code are the same (docs/data.md)."},
    )
    dataset_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Directory of the prepared-data cache; unset: orpo/ in the datasets cache "
                  "($HF_DATASETS_CACHE, ~/.cache/huggingface/datasets)."},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Read, shape and tokenize the training rows while training consumes them (a file or hub "
                  "dataset too large to prepare): nothing is cached, memory is bounded by the shuffle buffer, drops "
                  "are logged as running totals. Needs --max_steps. The eval data is prepared as usual."},
    )
    streaming_shuffle_buffer: int = field(
        default=10_000,
        metadata={"help": "With --streaming: rows held to shuffle the stream (seeded by data_seed, else seed; "
                  "reshuffled every pass); 0 keeps the source's order."},
    )
    skip_bad_rows: bool = field(
        default=False, metadata={"help": "Skip (and count) JSON lines that cannot be read instead of stopping."}
    )
    on_nonfinite: str = field(
        default="skip",
        metadata={
            "help": "A step whose loss or gradient is NaN/inf: 'skip' = no optimizer update (counted in the "
            "logs as nonfinite_skipped, warned with the step and rows); 'stop' = stop with an error naming them.",
            "choices": list(ON_NONFINITE),
        },
    )
    save_eval_pairs: bool = field(
        default=False,
        metadata={"help": "After each evaluation, write one JSON record per eval pair (log_odds, log-probs, NLL) "
                  "and a summary line to OUTPUT_DIR/eval_pairs.jsonl (eval_NAME_pairs.jsonl per named eval set), "
                  "the format of `orpo eval --output`."},
    )
    report: bool = field(
        default=True,
        metadata={"help": "At the end of training, write report.html and PNG plots of metrics.jsonl into output_dir."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start a new run in an output_dir that holds a previous run: that run (its checkpoints, "
                  "logs, model and report) is removed, or moved aside with --previous_run move, when training "
                  "starts, so nothing of it is resumed or mixed into the new run's logs. Without it orpo refuses "
                  "an output_dir with files."},
    )
    previous_run: str = field(
        default="remove",
        metadata={"help": "With --overwrite_output_dir: 'remove' deletes the previous run in output_dir; 'move' "
                  "renames it to OUTPUT_DIR.previous-N beside it. A directory whose files no orpo run wrote is "
                  "never removed (only moved).", "choices": list(PREVIOUS_RUN)},
    )
    force_resume: bool = field(
        default=False,
        metadata={"help": "Resume from a checkpoint although it was made with other settings, another model or "
                  "other data (orpo refuses such a resume by default, naming what differs; docs/errors.md)."},
    )
    export_gguf: str | None = field(
        default=None,
        metadata={"help": "After training, also write the saved model as this GGUF file for llama.cpp, with an Ollama "
                  "Modelfile beside it (what orpo export OUTPUT_DIR --gguf FILE does); the model and the path are "
                  "checked before training."},
    )
    export_outtype: str = field(
        default="f16", metadata={"help": "Storage of the GGUF file's matrices (norms stay f32).",
                                 "choices": list(GGUF_OUTTYPES)},
    )
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for from_pretrained when the model is a string (orpo train: always), "
                          "e.g. '{\"output_router_logits\": true}' for a mixture-of-experts model's load-balancing "
                          "loss or '{\"attn_implementation\": \"eager\"}'. Their dtype (as in TRL) is the "
                          "weights' dtype; orpo train takes it as --dtype."},
    )
    # --- accepted for TRL compatibility (TRL's ORPOConfig fields) ---
    # TRL's names, types and defaults, so every flag of HfArgumentParser(trl.experimental.orpo.ORPOConfig)
    # parses here with TRL's meaning (tests/train/test_config.py compares the two parsers).
    gradient_checkpointing: bool | None = field(
        default=True,
        metadata={"help": "TRL's name for activation_checkpointing, which wins when set. --no_gradient_checkpointing or "
                  "--gradient_checkpointing false turns recompute off (with transformers' deprecation warning for the "
                  "old name); true (the default, as in TRL) leaves the choice to orpo, as an unset "
                  "activation_checkpointing does: --activation_checkpointing true recomputes always."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow loading models (and tokenizers) that ship custom Python code in their repository."},
    )
    generate_during_eval: bool = field(
        default=False,
        metadata={"help": "Accepted for TRL compatibility; ignored: orpo generates no samples during evaluation "
                  "(TRL logs some to W&B/Comet). `orpo generate` compares a checkpoint's answers."},
    )
    is_encoder_decoder: bool | None = field(
        default=None,
        metadata={"help": "Accepted for TRL compatibility; orpo reads it from the model's config (T5, BART: "
                  "encoder-decoder), so it need not be set. True with a decoder-only model is an error."},
    )

    def __post_init__(self):
        """Every field checked (its range, its choices, its conflicts with other fields: `check_fields`), then
        TrainingArguments' own set-up, whose ValueErrors become one line. Nothing is decided here: what orpo
        chooses for a run (precision, recompute, ...) is the run's plan (orpo/run/plan.py), on a copy."""
        check_fields(self)
        _check_json_object("model_init_kwargs", self.model_init_kwargs)  # TrainingArguments would parse it
        to_row_format(self)  # inconsistent data options (label_map's JSON too) fail here, before any model is loaded
        _check_engine_configs(self)
        if not torch.accelerator.is_available() and (self.bf16 or int(os.environ.get("WORLD_SIZE", "1")) > 1):
            # The CPU is the only device: TrainingArguments accepts bf16 there, and sets up (gloo) data
            # parallelism under torchrun/accelerate, only with use_cpu (else a ValueError, or WORLD_SIZE
            # unrelated copies training the same model).
            self.use_cpu = True
        # activation_checkpointing unset and TRL's old name not false: orpo chooses (the run's plan). The parser
        # cannot tell the old name's default (TRL's true) from a given true; TrainingArguments would turn both
        # into true (with a deprecation warning), so the old name is set aside while it runs, and both stay unset.
        chooses = self.activation_checkpointing is None and self.gradient_checkpointing is not False
        if chooses:
            self.gradient_checkpointing = None
        try:
            super().__post_init__()
        except ValueError as err:  # TrainingArguments' own checks (strategies, schedulers, ...), as one line
            raise OrpoError(first_line(err)) from None
        if chooses:
            self.activation_checkpointing = self.gradient_checkpointing = None
        if self.streaming and self.accelerator_config.dispatch_batches:
            # every process reads the whole stream and keeps its share of each global batch (the plan turns
            # dispatch_batches off); rank 0 batching for all would concatenate packed batches of other lengths
            raise OrpoError("--streaming shards the stream over processes by batches; accelerator_config "
                            "dispatch_batches=true is not supported with it")

    @property
    def chooses_checkpointing(self) -> bool:
        """Whether orpo decides activation checkpointing for this config (neither name set by the user)."""
        return self.activation_checkpointing is None


def _check_json_object(name: str, value) -> None:
    """A JSON-object field given as text (a flag) must parse; TrainingArguments would raise a traceback."""
    if not isinstance(value, str):
        return
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise OrpoError(f"--{name}: invalid JSON ({err.msg}); expected an object, e.g. '{{\"key\": \"value\"}}'") \
            from None
    if not isinstance(parsed, dict):
        raise OrpoError(f"--{name}: expected a JSON object, got {type(parsed).__name__}")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _check_engine_configs(args) -> None:
    """--deepspeed and --fsdp_config problems as one line (TrainingArguments raises them as tracebacks). Whether a
    launcher started the process is checked before loading (run/checks.py): a dry run may plan a launched run."""
    if args.deepspeed and not _installed("deepspeed"):
        raise OrpoError("--deepspeed needs DeepSpeed, which is not installed: pip install 'orpo[deepspeed]'")
    for flag, value in (("deepspeed", args.deepspeed), ("fsdp_config", args.fsdp_config)):
        if isinstance(value, str) and value.endswith(".json") and not os.path.isfile(value):
            raise OrpoError(f"--{flag} {value}: no such file")


def prepare_data(args, source, tokenizer, split: str = "train", name: str | None = None,
                 output_dir: str | None = None) -> PreparedData:
    """`source` through the one data path (`orpo.data.prepare_dataset`) with the data fields of `args`
    (ORPOConfig, or the parsed flags of `orpo eval` / `orpo data inspect` / `orpo data prepare`).

    Under torchrun/accelerate (ORPOConfig with the cache on) the first process prepares while the others
    wait, then they read its set from the cache (`TrainingArguments.main_process_first`: the first process
    of each machine with --save_on_each_node, else of the job); with the cache off each prepares its own."""
    def prepare():
        return prepare_dataset(
            source, tokenizer, to_row_format(args), length_limits(args), strict=args.strict, skip_bad_rows=args.skip_bad_rows, split=split,
            name=name, num_proc=args.dataset_num_proc, cache_dir=args.dataset_cache_dir,
            use_cache=args.dataset_cache, output_dir=output_dir,
        )

    if not isinstance(args, TrainingArguments) or not args.dataset_cache or isinstance(source, PreparedData):
        return prepare()
    with args.main_process_first(local=args.save_on_each_node, desc=f"preparing {name or source}"):
        return prepare()


def stream_data(args, source, tokenizer, split: str = "train", name: str | None = None) -> PairStream:
    """`source` as a PairStream (`orpo.data.stream`, `--streaming`) with the data fields of ORPOConfig `args`."""
    return PairStream(
        source, tokenizer, to_row_format(args), length_limits(args),
        skip_bad_rows=args.skip_bad_rows, split=split, name=name, shuffle_buffer=args.streaming_shuffle_buffer,
        seed=args.data_seed if args.data_seed is not None else args.seed,
    )


def length_limits(args) -> LengthLimits:
    """The LengthLimits (orpo.data) of the length fields of `args` (ORPOConfig, or the flags of the data commands)."""
    return LengthLimits(args.max_length, args.max_prompt_length, args.max_completion_length)


def _names(value: str | None) -> tuple[str, ...] | None:
    """"instruction, input" → ("instruction", "input"); None stays None."""
    return None if value is None else tuple(name.strip() for name in value.split(",") if name.strip())


def to_row_format(args) -> RowFormat:
    """The `RowFormat` (orpo.data) of the data fields of `args` (ORPOConfig, or the parsed flags of
    `orpo eval` / `orpo data inspect`, which take these same fields); the rated-completions seed is
    `data_seed`, else `seed`. Inconsistent options are one `OrpoError` line."""
    label_map = args.label_map
    if isinstance(label_map, str):
        try:
            label_map = json.loads(label_map)
        except json.JSONDecodeError as err:
            raise OrpoError(f"label_map: invalid JSON ({err.msg}); expected an object like "
                            '\'{"1": "response1", "2": "response2", "0": "tie"}\'') from None
    responses, labels = _names(args.response_columns), _names(args.label_column)
    if responses is not None and len(responses) != 2:
        raise OrpoError(f"response_columns: expected two comma-separated column names, got {args.response_columns!r}")
    if (responses is None) != (labels is None) or (labels is not None) != (label_map is not None):
        raise OrpoError("label-based pairwise data needs all three of --response_columns, --label_column and "
                        "--label_map")
    if label_map is not None:
        if not isinstance(label_map, dict):
            raise OrpoError(f"label_map: expected a JSON object, got {type(label_map).__name__}")
        wrong = sorted({str(v) for v in label_map.values()} - {*responses, "tie"})
        if wrong:
            raise OrpoError(f"label_map: values {wrong} are neither one of --response_columns {list(responses)} "
                            "nor \"tie\"")
        label_map = {str(k): str(v) for k, v in label_map.items()}
    if args.binarize not in BINARIZE:
        raise OrpoError(f"binarize must be one of {', '.join(BINARIZE)}, got {args.binarize!r}")
    return RowFormat(
        prompt_columns=_names(args.prompt_column), chosen_column=args.chosen_column,
        rejected_column=args.rejected_column, response_columns=responses, label_columns=labels,
        label_map=label_map, rating_key=args.rating_key, binarize=args.binarize,
        seed=args.data_seed if args.data_seed is not None else args.seed,
    )


DEVICE_DERIVED = ("use_cpu",)  # set in __post_init__ where the CPU is the only device


def changed_settings(config: ORPOConfig) -> dict:
    """The ORPOConfig fields whose value differs from a config built with defaults only (the same output_dir):
    what a run's settings change, as `to_dict` gives them; the fields derived from the machine (DEVICE_DERIVED)
    are left out."""
    ours, defaults = config.to_dict(), type(config)(output_dir=config.output_dir).to_dict()
    return {name: value for name, value in ours.items()
            if value != defaults.get(name) and name not in DEVICE_DERIVED}
