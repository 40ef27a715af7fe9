"""Decide once, then run: every choice orpo makes for a training run, made before training starts, each a value
with its reason, in one frozen `Plan`.

`plan_run(config, setup, processes)` decides, from the user's config, the loaded model, the prepared data, the
run's processes and the device:

| choice | decided from |
| --- | --- |
| objective | --objective reward: a Bradley-Terry reward model (ops/reward.py); ORPO runs have no such choice |
| route | the model's structure, then a probe against separate forwards (ops/route.py) |
| NLL | an encoder-decoder model: the chosen completion whatever --nll_scope (its decoder does not predict the prompt) |
| precision | --bf16 / --fp16 where set, else the device's native bf16 (train/precision.py) |
| router load balancing | a MoE model loaded with output_router_logits (ops/moe.py); none for a reward model |
| activation checkpointing | --activation_checkpointing / --selective_checkpointing where set, else the largest micro-batch's memory against the budget (train/memory.py) |
| output head softmax | --keep_head_probs where set, else the same estimate |
| memory | the step's estimate with the choices above, per device |
| CPU memory allocator | --reuse_cpu_memory, the device and the C library (train/allocator.py) |
| train data, eval data | how each set was prepared (processes, cache) and what was dropped |
| output_dir | a new run, the previous run removed or moved aside, or the checkpoint resumed |
| processes | the launcher's world size, or (a dry run without a launcher) the world size it plans for and why; the pairs of an optimizer step, and how the model is spread over the processes |
| final evaluation, saved model, GGUF export | eval data; LoRA (merged into its base model); --export_gguf (checked now) |

The Trainer runs `plan.training_args`: a copy of the user's config with the decided values written in; the
config the user passed is never changed. The run log, `orpo train --dry_run`, the model card and the report
(PLAN_FILE in output_dir) all render `plan.choices`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from orpo.data.images import text_tokenizer
from orpo.data.prepare import PreparedData
from orpo.data.store import pair_lengths
from orpo.data.stream import PairStream
from orpo.errors import OrpoError
from orpo.ops.forward import causal_lm, is_encoder_decoder
from orpo.ops.moe import RouterBalancing, router_balancing
from orpo.ops.route import Route, choose_route, image_probe_pairs
from orpo.run.setup import Setup
from orpo.train.allocator import has_glibc_malloc
from orpo.train.checkpoints import is_latest, latest_complete, run_stamp, stamp_settings
from orpo.train.config import ORPOConfig
from orpo.train.memory import decoder_shape, estimate_step, plan_checkpointing, plan_head_probs
from orpo.train.models import is_hub_model_id, whole_weights_per_call
from orpo.train.precision import choose_precision


@dataclass(frozen=True)
class Choice:
    """One decision: its `name`, the `value` taken (JSON-able) and the `reason`, which says what was chosen and
    why, as the run log prints it ("precision: bf16 autocast: the CPU computes bf16 natively (amx_bf16)")."""

    name: str
    value: object
    reason: str

    def line(self) -> str:
        return f"{self.name}: {self.reason}"


@dataclass(frozen=True)
class Finish:
    """What happens after the last step (run/finish.py): a final evaluation (eval data given and none at the last
    step), the model saved (`lora`: its adapter merged into `merge_base`, or saved as an adapter where the base has
    no name or path to reload it by: merge_base None), the model card naming `base_model`, and the GGUF export
    (`export_gguf` None: none)."""

    final_eval: bool
    base_model: str
    lora: bool
    merge_base: str | None
    export_gguf: str | None
    export_outtype: str


@dataclass(frozen=True)
class Recompute:
    """Activation checkpointing as decided: every n-th layer recomputed (None: none), selectively or fully."""

    every_n_layers: int | None
    selective: bool
    reason: str


@dataclass(frozen=True)
class Plan:
    """A run's decisions (module docstring). `choices` renders them, in order; the other fields are what the
    trainer executes: the route, MoE load balancing, whether the head keeps its softmax, whether the CPU
    allocator keeps freed memory, the pad id, the finishing steps, the checkpoints' stamp and the
    TrainingArguments the Trainer runs with."""

    route: Route
    router_balancing: RouterBalancing | None
    keep_head_probs: bool
    reuse_cpu_memory: bool
    pad_id: int
    finish: Finish
    stamp: dict
    training_args: ORPOConfig
    choices: tuple[Choice, ...]

    def lines(self) -> list[str]:
        return [choice.line() for choice in self.choices]

    def choice(self, name: str) -> Choice:
        """The choice called `name` ("precision", "activation checkpointing", ...)."""
        return next(choice for choice in self.choices if choice.name == name)

    def to_json(self) -> str:
        """PLAN_FILE's text: the choices (name, value, reason) and the stamp."""
        return json.dumps({"choices": [dataclasses.asdict(c) for c in self.choices], "stamp": self.stamp},
                          indent=1, default=str)


def plan_run(config: ORPOConfig, setup: Setup, processes: tuple[int, str]) -> Plan:
    """The Plan of each process of a run of `config` on what `setup` loaded (module docstring); `processes`: (the
    run's processes, why: launch.launched_processes, or the world size a dry run plans for). Raises OrpoError (one
    line) for a choice that cannot be met: a forced route the model does not reproduce, an export the model cannot
    take."""
    model, train, device = setup.model, setup.train, config.device
    bf16, precision = choose_precision(config.bf16, config.fp16, device)
    images = image_probe_pairs(train.pairs) if isinstance(train, PreparedData) else []
    with whole_weights_per_call(model):  # ZeRO-3 partitioned them at load; the probe runs before the engine
        route = choose_route(model, config.packing, config.packed_attention, images)
    reward = config.objective == "reward"
    balancing = None if reward else router_balancing(causal_lm(model))
    memory_inputs = step_inputs(model, train, config, route, bf16)
    recompute = plan_recompute(config, memory_inputs)
    keep_head_probs, head_reason = (False, "none kept: a reward model's score head runs at each answer's last token, "
                                    "with no softmax over a vocabulary") if reward else \
        plan_head(config, recompute, memory_inputs)
    estimate = memory_estimate(memory_inputs, recompute, keep_head_probs)
    reuse = config.reuse_cpu_memory and device.type == "cpu" and has_glibc_malloc()
    finish = plan_finish(config, setup)
    nll_scope, nll = plan_nll_scope(config, model)
    choices = [
        *_data_choices(setup),
        _output_dir_choice(config),
        _processes_choice(config, *processes),
        *([Choice("objective", "reward", "a Bradley-Terry reward model: −log σ(r_chosen − r_rejected), mean over the "
                  "step's pairs, the rewards read at each answer's last token (--objective reward)")] if reward else []),
        Choice("route", route.layout + ("" if route.head == "chunked" else f"+{route.head}"), route.describe()),
        *([nll] if nll else []),
        Choice("precision", "bf16" if bf16 else "fp16" if config.fp16 else "fp32", precision),
        Choice("router load balancing", balancing.coef if balancing else None,
               f"loss + {balancing.coef:g} · aux_loss ({balancing.num_experts} experts, top-{balancing.top_k}; each "
               "token once)" if balancing else "off: a reward model's loss is the Bradley-Terry loss alone" if reward
               else "off: not a mixture-of-experts model loaded with output_router_logits"),
        Choice("activation checkpointing", recompute.every_n_layers, recompute.reason),
        Choice("output head softmax", keep_head_probs, head_reason),
        Choice("memory", estimate, estimate),
        Choice("CPU memory allocator", reuse, _allocator_reason(config, device.type, reuse)),
        *_finish_choices(config, finish),
    ]
    stamp = run_stamp(stamp_settings(config), _model_name(setup), data_fingerprints(setup))
    pad_id = config.padding_value if config.padding_value is not None else \
        text_tokenizer(setup.processing_class).pad_token_id
    return Plan(route, balancing, keep_head_probs, reuse, pad_id, finish, stamp,
                training_args(config, bf16, recompute, keep_head_probs, device.type, nll_scope), tuple(choices))


def plan_nll_scope(config: ORPOConfig, model) -> tuple[str, Choice | None]:
    """(the nll_scope the run computes, its Choice where it is not simply --nll_scope): an encoder-decoder model's
    decoder predicts the completion only (the prompt is the encoder's input), so its NLL is the chosen completion's,
    as TRL computes it; "full" (the default) then means that."""
    if not is_encoder_decoder(model):
        return config.nll_scope, None
    given = f"--nll_scope {config.nll_scope}: " if config.nll_scope == "full" else ""
    reason = (f"the chosen completion's tokens ({given}an encoder-decoder model's decoder does not predict the prompt, "
              "its encoder's input)")
    return "completion", Choice("NLL", "completion", reason)


def training_args(config: ORPOConfig, bf16: bool, recompute: Recompute, keep_head_probs: bool,
                  device_type: str, nll_scope: str | None = None) -> ORPOConfig:
    """A copy of `config` with the plan's values written in (TrainingArguments' own checks run on it again)."""
    on = recompute.every_n_layers is not None
    kwargs = dict(config.activation_checkpointing_kwargs or {})
    if on and recompute.every_n_layers > 1:
        kwargs["every_n_layers"] = recompute.every_n_layers
    overrides = dict(
        bf16=bf16, activation_checkpointing=on, gradient_checkpointing=on, activation_checkpointing_kwargs=kwargs or None,
        gradient_checkpointing_kwargs=kwargs or None, selective_checkpointing=recompute.selective,
        keep_head_probs=keep_head_probs,
        dataloader_pin_memory=config.dataloader_pin_memory and device_type == "cuda",  # pinning needs CUDA
        nll_scope=nll_scope or config.nll_scope,
    )
    if config.streaming:
        # every process reads the whole stream and keeps its share of each global batch (accelerate's
        # IterableDatasetShard); rank 0 batching for all (dispatch_batches, accelerate's default for
        # iterable data) would have to concatenate packed batches of different lengths
        overrides["accelerator_config"] = dataclasses.replace(config.accelerator_config, dispatch_batches=False)
    return dataclasses.replace(config, **overrides)


def step_inputs(model, pairs, config: ORPOConfig, route: Route, bf16: bool) -> tuple | str:
    """The arguments of memory.plan_checkpointing / plan_head_probs / estimate_step for this model, data and
    config, or why there are none (sharded weights, no data to size the step by)."""
    if config.deepspeed or config.fsdp:
        return "the model is sharded (DeepSpeed/FSDP), and orpo does not estimate sharded memory"
    if is_encoder_decoder(model):
        return "an encoder-decoder model, whose memory orpo does not estimate"
    if isinstance(pairs, PairStream) and pairs.limits.longest_pair() is None:
        return "streamed data without max_length to size it by"
    if pairs is None or (isinstance(pairs, PreparedData) and not pairs.kept):
        return "no training data to size it by"
    # a stream is sized by the longest pair its length limits let through, in every micro-batch
    lengths = ([pairs.limits.longest_pair()] * config.per_device_train_batch_size if isinstance(pairs, PairStream)
               else [tuple(lengths) for lengths in pair_lengths(pairs.pairs).tolist()])
    lm = causal_lm(model)
    shape = decoder_shape(lm, lm.config.get_text_config())
    if config.objective == "reward":  # the score head: one output, no [tokens, vocabulary] logits
        shape = dataclasses.replace(shape, vocab=1)
    on_device = next(lm.parameters()).device.type == config.device.type
    return (shape, lengths, config.per_device_train_batch_size, route.packing, route.attention,
            2 if bf16 or config.fp16 else shape.weight_bytes, config.logprob_chunk_size, on_device, config.device,
            int(os.environ.get("LOCAL_WORLD_SIZE", "1")), config.memory_budget_gb)


def plan_recompute(config: ORPOConfig, inputs: tuple | str) -> Recompute:
    """Activation checkpointing: as set, or (neither it nor TRL's old name set) what the memory estimate needs."""
    selective = config.selective_checkpointing
    if not config.chooses_checkpointing:
        on = bool(config.activation_checkpointing)
        every = (config.activation_checkpointing_kwargs or {}).get("every_n_layers", 1) if on else None
        how = "" if not on else (f", every {every} layers" if every > 1 else "") + \
            (", selective" if selective else ", full recompute")
        return Recompute(every, bool(selective) and on, f"{'on' if on else 'off'}{how} (as set)")
    if isinstance(inputs, str):
        sharded = inputs.startswith("the model is sharded")
        if sharded and (config.fsdp_config or {}).get("activation_checkpointing"):
            return Recompute(None, False, "off: FSDP's own activation checkpointing is set (fsdp_config)")
        return Recompute(1, bool(selective), f"on: {inputs}; --activation_checkpointing false turns it off")
    every, selective, reason = plan_checkpointing(*inputs, selective)
    return Recompute(every, selective and every is not None, reason)


def plan_head(config: ORPOConfig, recompute: Recompute, inputs: tuple | str) -> tuple[bool, str]:
    """(keep the output head's softmax for backward?, why): `keep_head_probs` if set; else kept where the step
    fits the memory budget without recompute (memory.plan_head_probs)."""
    if config.keep_head_probs is not None:
        return config.keep_head_probs, f"{'kept' if config.keep_head_probs else 'recomputed in backward'}: " \
                                       f"--keep_head_probs {str(config.keep_head_probs).lower()}"
    if recompute.every_n_layers is not None:
        return False, "recomputed in backward: memory is what this run saves (activation checkpointing)"
    if isinstance(inputs, str):
        return False, f"recomputed in backward: {inputs}"
    return plan_head_probs(*inputs)


def memory_estimate(inputs: tuple | str, recompute: Recompute, keep_head_probs: bool) -> str:
    """One line: the largest micro-batch's step memory as planned, per device (memory.estimate_step), or why
    there is none."""
    if isinstance(inputs, str):
        return f"not estimated: {inputs}"
    return estimate_step(*inputs, recompute.every_n_layers, recompute.selective, keep_head_probs)[2]


def _processes_choice(config: ORPOConfig, count: int, why: str) -> Choice:
    """How many processes the run has and why, the pairs of its optimizer step, and how the model is spread."""
    batch, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
    reason = (f"{count} ({why}): {batch} pairs per micro-batch x {accumulation} micro-batches x {count} "
              f"process{'es' if count > 1 else ''} = {batch * accumulation * count} pairs per optimizer step")
    if config.fsdp:
        version = (config.fsdp_config or {}).get("version", 1)
        reason += f"; the model sharded over them by FSDP{'2' if int(version) == 2 else ''}"
    elif config.deepspeed:
        reason += f"; the model sharded over them by DeepSpeed ZeRO-" \
                  f"{config.hf_deepspeed_config.get_value('zero_optimization.stage', 0)}"
    elif count > 1:
        reason += "; each a whole copy of the model (data parallel)"
    return Choice("processes", count, reason)


def _allocator_reason(config: ORPOConfig, device_type: str, reuse: bool) -> str:
    if reuse:
        return "freed CPU memory is kept for the next tensors (glibc malloc thresholds; --reuse_cpu_memory)"
    if not config.reuse_cpu_memory:
        return "the system's: --reuse_cpu_memory false"
    if device_type != "cpu":
        return f"the system's: the run is on {device_type}"
    return "the system's: reuse_cpu_memory needs glibc malloc, which this process does not have"


def _one_line(report: str) -> str:
    return report.replace(":\n  ", ": ").replace("\n  ", "; ")


def _data_choices(setup: Setup) -> list[Choice]:
    """How the training and eval data were prepared, and what they dropped (one choice per set)."""
    sets = [("train data", setup.train)]
    if isinstance(setup.eval, dict):
        sets += [(f"eval data ({name})", data) for name, data in setup.eval.items()]
    elif setup.eval is not None:
        sets.append(("eval data", setup.eval))
    choices = []
    for name, data in sets:
        if data is None:
            continue
        if isinstance(data, PairStream):
            choices.append(Choice(name, "streamed", f"streaming {data.name} (shuffle buffer {data.shuffle_buffer} "
                                                    "rows): rows are read, tokenized and counted as training takes them"))
        else:
            where = f"; {data.origin} in {data.seconds:.1f} s" if data.origin else ""
            source = f"{data.name}: " if data.name else ""
            choices.append(Choice(name, data.kept, source + _one_line(data.report()) + where))
    return choices


def _output_dir_choice(config: ORPOConfig) -> Choice:
    """What the run does in output_dir, as its config asks (ORPOTrainer.train(resume_from_checkpoint=...) may
    ask otherwise; it checks again)."""
    where, resume = config.output_dir, config.resume_from_checkpoint
    if is_latest(resume):
        path = latest_complete(where)
        return Choice("output_dir", path, f"resumes {path} (the newest complete checkpoint)" if path else
                      f"a new run in {where}: it has no complete checkpoint to resume")
    if resume:
        return Choice("output_dir", resume, f"resumes {resume}")
    entries = sorted(os.listdir(where)) if os.path.isdir(where) else []
    if entries:
        what = "moved aside to OUTPUT_DIR.previous-N" if config.previous_run == "move" else "removed"
        return Choice("output_dir", "new", f"a new run in {where}; the previous run there ({len(entries)} entries) "
                                           f"is {what} when training starts (--overwrite_output_dir)")
    return Choice("output_dir", "new", f"a new run in {where}")


def _model_name(setup: Setup) -> str:
    """The model as given, or the name/path a model object was loaded from ("" where it has none)."""
    model = setup.model.get_base_model() if setup.peft_config is not None else setup.model
    return setup.model_name or getattr(model, "name_or_path", "") or ""


def _loadable(name: str) -> bool:
    return bool(name) and (is_hub_model_id(name) or Path(name).expanduser().exists())


def plan_finish(config: ORPOConfig, setup: Setup) -> Finish:
    """The finishing steps; an export the model cannot take, or that needs a merge that cannot happen, is one
    line now rather than after training."""
    base = _model_name(setup)
    lora = setup.peft_config is not None
    merge_base = base if lora and _loadable(base) else None
    if config.export_gguf and lora and merge_base is None:
        raise OrpoError("--export_gguf writes the model with its LoRA adapter merged, and the base model has no name "
                        f"or path to reload it by for the merge ({base or 'a model built in Python'}): pass the model "
                        "by its name or path, or save it with save_pretrained first")
    if config.export_gguf:
        from orpo.export.gguf import check_exportable

        check_exportable(causal_lm(setup.model).config.get_text_config(), text_tokenizer(setup.processing_class))
    final_eval = setup.eval is not None
    return Finish(final_eval, base, lora, merge_base, config.export_gguf, config.export_outtype)


def _finish_choices(config: ORPOConfig, finish: Finish) -> list[Choice]:
    where = config.output_dir
    if finish.merge_base is not None:
        saved = ("merged", f"the LoRA adapter merged into {finish.merge_base}, as one safetensors model in {where}, "
                           "with the tokenizer and a model card (README.md)")
    elif finish.lora:
        saved = ("adapter", f"the LoRA adapter (peft's files), the tokenizer and a model card (README.md) in {where}: "
                            f"its base ({finish.base_model or 'a model built in Python'}) has no name or path to "
                            "reload it by for a merge (orpo export DIR --merged OUT --base BASE merges it)")
    else:
        saved = ("model", f"the trained model (safetensors), the tokenizer and a model card (README.md) in {where}")
    return [
        Choice("final evaluation", finish.final_eval,
               "on the eval data after the last step, unless an evaluation falls on it" if finish.final_eval
               else "none: no eval data"),
        Choice("saved", *saved),
        Choice("report", config.report, f"report.html and PNG plots of metrics.jsonl in {where}" if config.report
               else "none: --report false"),
        Choice("export", finish.export_gguf,
               f"{finish.export_gguf} ({finish.export_outtype}), with an Ollama Modelfile beside it; the model's "
               "architecture and tokenizer were checked for it" if finish.export_gguf else "none"),
    ]


def data_fingerprints(setup: Setup) -> dict[str, tuple[str, str]]:
    """role → (source name, fingerprint of its content and preparation) for the checkpoints' stamp."""
    out = {}
    for role, data in (("train", setup.train), ("eval", setup.eval)):
        if isinstance(data, dict):
            out.update({f"{role}_{name}": (name, d.fingerprint) for name, d in data.items()})
        elif isinstance(data, PairStream):
            out[role] = (data.name, f"stream:{data.name}")
        elif data is not None:
            out[role] = (data.name or role, data.fingerprint)
    return out
