"""`ORPOConfig` and `ORPOTrainer`: ORPO on top of `transformers.Trainer` (wiring only).

Checkpoints, resume, schedulers, `report_to`, gradient checkpointing, DeepSpeed and FSDP come
from the Trainer. What this module adds: data preparation (prepare.py), the batch layout
(packing.py), one model call per micro-batch (forward.py), the loss (loss.py), and metrics.

Normalisation (ARCHITECTURE.md): the NLL is a token mean and the odds-ratio term a pair mean
over the whole optimizer step, so `_get_num_items_in_batch` returns both totals for the step and
`compute_loss` divides by them; the Trainer must then not divide by the accumulation steps again.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, rotate_checkpoints

from .attention import use_span_attention
from .checkpoints import completed_step, mark_complete, resolve_resume
from .errors import OrpoError
from .forward import causal_lm, check_prefix_sharing, check_supported, pair_logps
from .loss import orpo_loss
from .models import load_model, load_tokenizer
from .packing import PACKED_ATTENTION, collate_padded, collate_prefix_shared, nll_token_count
from .prepare import tokenize_rows
from .progress import ProgressReporter
from .render import TokenizedPair, ensure_chat_template
from .report import METRICS_FILE, write_report

logger = logging.getLogger(__name__)

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


class MetricTotals:
    """Sums over the micro-batches since the last log, so logged values are exact means."""

    KEYS = ("nll_sum", "nll_tokens", "or_sum", "log_odds_sum", "logps_chosen_sum", "logps_rejected_sum",
            "correct", "pairs", "tokens")

    def __init__(self):
        self.reset()

    def reset(self):
        self.totals = torch.zeros(len(self.KEYS), dtype=torch.float64)
        self.since = time.perf_counter()

    def add(self, **values: float):
        for key, value in values.items():
            self.totals[self.KEYS.index(key)] += float(value)

    def summary(self, reduce) -> dict[str, float]:
        t = dict(zip(self.KEYS, reduce(self.totals).tolist()))
        if t["pairs"] == 0:
            return {}
        elapsed = max(time.perf_counter() - self.since, 1e-9)
        return {
            "nll": t["nll_sum"] / max(t["nll_tokens"], 1),
            "or_loss": t["or_sum"] / t["pairs"],
            "log_odds": t["log_odds_sum"] / t["pairs"],
            "logps/chosen": t["logps_chosen_sum"] / t["pairs"],
            "logps/rejected": t["logps_rejected_sum"] / t["pairs"],
            "accuracy": t["correct"] / t["pairs"],
            "margin": (t["logps_chosen_sum"] - t["logps_rejected_sum"]) / t["pairs"],
            "tokens": t["tokens"],
            "tokens_per_second": t["tokens"] / elapsed,
        }


class MetricsJsonlCallback(TrainerCallback):
    """Appends every log record (train and eval) as one JSON line to OUTPUT_DIR/metrics.jsonl."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with open(os.path.join(args.output_dir, METRICS_FILE), "a") as f:
            f.write(json.dumps(record) + "\n")


class ReportCallback(TrainerCallback):
    """At the end of training, the main process writes report.html + PNGs (report.py) if `report`."""

    def on_train_end(self, args, state, control, **kwargs):
        if not (args.report and state.is_world_process_zero):
            return
        try:
            logger.info("training report: %s", write_report(args.output_dir))
        except OrpoError as err:  # e.g. nothing was logged: the run itself is fine
            logger.warning("no training report: %s", err)


class NonFiniteGuard(TrainerCallback):
    """Before each optimizer step: if the (clipped, all-reduced) gradient has a NaN or inf, skip
    the update or stop, per `on_nonfinite`, naming the step and the dataset rows of its pairs.
    Skipping drops every gradient, so the optimizer leaves the weights and its state untouched."""

    def __init__(self, trainer: "ORPOTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        rows, trainer._step_rows = trainer._step_rows, []
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads or torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            return
        where = f"step {state.global_step + 1}: non-finite loss or gradient; dataset rows {sorted(set(rows))}"
        if args.on_nonfinite == "stop":
            raise OrpoError(f"{where} (--on_nonfinite skip skips such steps)")
        logger.warning("%s: optimizer step skipped", where)
        trainer.nonfinite_skipped += 1
        for p in model.parameters():
            p.grad = None


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


class ORPOTrainer(Trainer):
    """ORPO trainer. Takes TRL's arguments: `model` (a model or a name/path), `args` (ORPOConfig),
    `train_dataset`/`eval_dataset` (preference rows in any shape formats.py accepts, or
    TokenizedPairs), `processing_class` (the tokenizer), `peft_config` (LoRA)."""

    # compute_loss normalises by the whole step's totals (see module docstring)
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model=None,
        args: ORPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        callbacks=None,
        optimizers=(None, None),
        **kwargs,
    ):
        args = args if args is not None else ORPOConfig(output_dir="orpo-output")
        if not isinstance(args, ORPOConfig):
            raise OrpoError(f"args must be an orpo.ORPOConfig, got {type(args).__name__}")
        if isinstance(model, str):
            name = model
            model = load_model(name, **(args.model_init_kwargs or {}))
            processing_class = processing_class or load_tokenizer(name)
        if processing_class is None:
            processing_class = load_tokenizer(model.name_or_path)
        for warning in ensure_chat_template(processing_class):
            logger.warning(warning)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if args.disable_dropout:
            disable_dropout(model)
        check_supported(model)
        if args.packing:
            if args.packed_attention == "spans":
                use_span_attention(causal_lm(model))
            check_prefix_sharing(model, args.packed_attention)

        self.prepared = {}
        train_pairs = self._prepare(train_dataset, processing_class, args, "train")
        eval_pairs = self._prepare(eval_dataset, processing_class, args, "eval")
        pad_id = args.padding_value if args.padding_value is not None else processing_class.pad_token_id
        if args.packing:
            # attention costs as much as the linear layers at a row width of about 3 × hidden size
            width = 3 * causal_lm(model).config.hidden_size
            collator = partial(
                collate_prefix_shared, pad_token_id=pad_id, attention=args.packed_attention, attention_width=width
            )
        else:
            collator = partial(collate_padded, pad_token_id=pad_id)
        super().__init__(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=train_pairs,
            eval_dataset=eval_pairs,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            **kwargs,
        )
        self.add_callback(MetricsJsonlCallback())
        for default in (ProgressCallback, PrinterCallback):  # replaced by one bar / one line per log
            self.remove_callback(default)
        self.add_callback(ProgressReporter())
        self.add_callback(NonFiniteGuard(self))
        self.add_callback(ReportCallback())
        self._metrics = {"train": MetricTotals(), "eval": MetricTotals()}
        self._step_rows: list[int] = []  # dataset rows of the current optimizer step (error messages)
        self.nonfinite_skipped = 0

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """Trainer.train, plus: `resume_from_checkpoint` True or "latest" = the newest *complete*
        checkpoint in output_dir (none: start fresh); half-written checkpoints are deleted; an
        output_dir with files is refused unless resuming or `overwrite_output_dir`."""
        resume = resolve_resume(
            self.args.output_dir, resume_from_checkpoint, self.args.overwrite_output_dir,
            self.is_world_process_zero(), os.path.join(self.args.output_dir, METRICS_FILE),
        )
        self.accelerator.wait_for_everyone()  # the main process may have deleted incomplete checkpoints
        self._step_rows = []
        if resume and 0 < self.args.max_steps <= (step := completed_step(resume)):
            # The run is finished; transformers' loop would still train one step past max_steps.
            logger.info("%s is at step %d, max_steps is %d: nothing to train", resume, step, self.args.max_steps)
            self._load_from_checkpoint(resume)
            self.state = TrainerState.load_from_json(os.path.join(resume, TRAINER_STATE_NAME))
            return TrainOutput(self.state.global_step, 0.0, {})
        return super().train(resume_from_checkpoint=resume, **kwargs)

    def _save_checkpoint(self, model, trial):
        """Trainer's save, then the completion marker (checkpoints.py); rotation only after it, so a
        kill at any point leaves the previous complete checkpoint in place."""
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        run_dir = self._get_output_dir(trial=trial)
        self.accelerator.wait_for_everyone()  # every rank has written its part (rng state)
        if self.args.should_save:
            mark_complete(os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"), self.state.global_step)
            rotate_checkpoints(run_dir, save_total_limit=limit, best_model_checkpoint=self.state.best_model_checkpoint)

    def _prepare(self, dataset, tokenizer, args: ORPOConfig, split: str) -> list[TokenizedPair] | None:
        if dataset is None:
            return None
        if isinstance(dataset, list) and dataset and isinstance(dataset[0], TokenizedPair):
            return dataset
        prepared = tokenize_rows(
            dataset, tokenizer, args.max_length, args.max_prompt_length, args.max_completion_length,
            strict=args.strict, source=f"{split} dataset",
        )
        logger.info("%s data: %s", split, prepared.report())
        self.prepared[split] = prepared
        return prepared.pairs

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy == "group_by_length":
            from transformers.trainer_pt_utils import LengthGroupedSampler

            dataset = train_dataset if train_dataset is not None else self.train_dataset
            lengths = [pair.shared_length for pair in dataset]
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=lengths)
        return super()._get_train_sampler(train_dataset)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        """[NLL tokens, pairs] of the whole optimizer step, summed over micro-batches and ranks."""
        totals = torch.stack(
            [torch.stack([nll_token_count(b["target_kind"], self.args.nll_scope), b["num_pairs"]]) for b in batch_samples]
        ).sum(0).to(device)
        if self.args.world_size > 1:
            totals = self.accelerator.gather(totals).view(-1, 2).sum(0)
        return totals

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self._step_rows += inputs["pair_index"].tolist()
        logps = pair_logps(model, inputs, self.args.logprob_chunk_size)
        batch_nll_tokens = nll_token_count(inputs["target_kind"], self.args.nll_scope)
        if num_items_in_batch is None:  # evaluation: normalise over this batch alone
            nll_tokens, pairs = batch_nll_tokens, inputs["num_pairs"]
        else:
            nll_tokens, pairs = num_items_in_batch[0], num_items_in_batch[1]
        nll_sum = logps.nll_sum(self.args.nll_scope)
        loss, or_loss, log_odds = orpo_loss(
            logps.logps_chosen, logps.logps_rejected, nll_sum, self.args.beta, nll_tokens, pairs
        )
        with torch.no_grad():
            self._metrics["train" if model.training else "eval"].add(
                nll_sum=nll_sum,
                nll_tokens=batch_nll_tokens,
                or_sum=or_loss.sum(),
                log_odds_sum=log_odds.sum(),
                logps_chosen_sum=logps.logps_chosen.sum(),
                logps_rejected_sum=logps.logps_rejected.sum(),
                correct=(log_odds > 0).sum(),
                pairs=inputs["num_pairs"],
                tokens=inputs["num_tokens"],
            )
        if num_items_in_batch is not None and self.accelerator.num_processes > 1:
            # DDP averages gradients over ranks; the loss is already normalised by global totals
            loss = loss * self.accelerator.num_processes
        return (loss, {"log_odds": log_odds}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        reduce = self.accelerator.reduce if self.accelerator.num_processes > 1 else (lambda t: t)
        metrics = self._metrics[split].summary(lambda t: reduce(t.to(self.args.device)).cpu())
        if split == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items() if k not in ("tokens_per_second",)}
        if split == "train" and self.nonfinite_skipped:
            metrics["nonfinite_skipped"] = self.nonfinite_skipped  # steps skipped so far
        logs.update(metrics)  # in place: evaluate() returns this same dict
        self._metrics[split].reset()
        super().log(logs, start_time)
