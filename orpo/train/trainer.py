"""`ORPOTrainer`: ORPO on top of `transformers.Trainer` (wiring only).

Checkpoints, resume, schedulers, `report_to`, gradient checkpointing, DeepSpeed and FSDP come
from the Trainer. What this module adds: data preparation (prepare.py), the batch layout
(packing.py), one model call per micro-batch (forward.py), the loss (loss.py), and metrics.

Normalisation (ARCHITECTURE.md): the NLL is a token mean and the odds-ratio term a pair mean
over the whole optimizer step, so `step_totals` returns both totals for the step and `compute_loss`
divides by them; the Trainer must then not divide by the accumulation steps again. The private
Trainer members this relies on are used only in internals.py.
"""
from __future__ import annotations

import json
import logging
import os

import torch
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerState
from transformers.trainer_utils import TrainOutput, rotate_checkpoints

from orpo.data.images import text_tokenizer
from orpo.data.render import TokenizedPair, ensure_chat_template, longest_pair
from orpo.data.store import pair_lengths
from orpo.data.stream import PairStream
from orpo.errors import OrpoError
from orpo.ops.forward import batch_collator, causal_lm, pair_logps
from orpo.ops.loss import orpo_loss
from orpo.ops.packing import nll_token_count
from orpo.ops.moe import router_balancing, router_token_mask
from orpo.ops.route import choose_route, image_probe_pairs
from orpo.ops.scoring import record_tensor, records_from_tensor, summarize
from orpo.ops.vision import vision_tower
from orpo.train.allocator import keep_freed_memory
from orpo.train.callbacks import (MetricsJsonlCallback, MetricTotals, NonFiniteGuard, ReportCallback,
                                  SelectiveCheckpointing, disable_dropout)
from orpo.train.checkpoints import (completed_step, mark_complete, mark_finished, read_counters, resolve_resume,
                                    save_config_as_json)
from orpo.train.config import ORPOConfig, prepare_data, stream_data
from orpo.train.internals import TrainerAdapter, ensure_trainer_contract
from orpo.train.memory import decoder_shape, estimate_step, plan_checkpointing, plan_head_probs
from orpo.train.models import load_model, load_tokenizer, whole_weights_per_call
from orpo.train.progress import ProgressReporter
from orpo.train.report import METRICS_FILE

logger = logging.getLogger(__name__)


class ORPOTrainer(TrainerAdapter):
    """ORPO trainer. Takes TRL's arguments: `model` (a model or a name/path), `args` (ORPOConfig),
    `train_dataset`/`eval_dataset` (a `datasets.Dataset`, a list of rows in any shape orpo.data reads, a
    file path or hub id, or data already prepared by `prepare_dataset`; read with the config's data
    fields), `processing_class` (the tokenizer; a vision-language model's processor), `peft_config` (LoRA)."""

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
        ensure_trainer_contract()
        args = args if args is not None else ORPOConfig(output_dir="orpo-output")
        if not isinstance(args, ORPOConfig):
            raise OrpoError(f"args must be an orpo.ORPOConfig, got {type(args).__name__}")
        if isinstance(model, str):
            name = model
            model = load_model(name, trust_remote_code=args.trust_remote_code, **(args.model_init_kwargs or {}))
            processing_class = processing_class or load_tokenizer(name, args.trust_remote_code)
        if processing_class is None:
            processing_class = load_tokenizer(model.name_or_path, args.trust_remote_code)
        for warning in ensure_chat_template(processing_class):
            logger.warning(warning)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if args.disable_dropout:
            disable_dropout(model)
        if args.freeze_vision_tower and (tower := vision_tower(causal_lm(model))) is not None:
            tower.requires_grad_(False)  # LoRA adapters inside it too: LoRA trains the language model
        self.prepared = {}
        train_pairs = self._prepare(train_dataset, processing_class, args, "train")
        eval_pairs = self._prepare(eval_dataset, processing_class, args, "eval")
        # the layout and head (route.py), probed with a few of the data's image pairs where it has some
        sized = train_pairs is not None and not isinstance(train_pairs, PairStream)
        images = image_probe_pairs(train_pairs) if sized else []
        with whole_weights_per_call(model):  # ZeRO-3 partitioned them at load; the probe runs before the engine
            self.route = choose_route(model, args.packing, args.packed_attention, images)
        self.router_balancing = router_balancing(causal_lm(model))  # MoE load balancing (moe.py), or None
        pad_id = args.padding_value if args.padding_value is not None else text_tokenizer(processing_class).pad_token_id
        if args.choose_checkpointing:
            self._choose_checkpointing(model, train_pairs, args)
        self.keep_head_probs, self.head_probs_reason = self._choose_head_probs(model, train_pairs, args)
        super().__init__(
            model=model,
            args=args,
            data_collator=batch_collator(model, pad_id, self.route.layout),
            train_dataset=train_pairs,
            eval_dataset=eval_pairs,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            **kwargs,
        )
        logger.info("route: %s", self.route.describe())
        if self.router_balancing is not None:
            logger.info("router load balancing: loss + %g · aux_loss (%d experts, top-%d; each token once)",
                        self.router_balancing.coef, self.router_balancing.num_experts, self.router_balancing.top_k)
        logger.info("precision: %s", getattr(self.args, "precision_reason", "bf16" if self.args.bf16 else "fp32"))
        if hasattr(self, "checkpointing_reason"):
            logger.info("activation checkpointing: %s", self.checkpointing_reason)
        logger.info("output head softmax: %s", self.head_probs_reason)
        if self.args.reuse_cpu_memory and self.args.device.type == "cpu" and not keep_freed_memory():
            logger.info("reuse_cpu_memory: not available here (needs glibc malloc); large tensors use fresh pages")
        if self.args.fsdp and not self.is_fsdp_enabled:
            # accelerate builds its FSDP state only for GPU-type devices; processes on CPU (use_cpu) get DDP
            logger.warning("fsdp is set, but accelerate did not set up FSDP (it does so only on GPUs and other "
                           "accelerators): this run trains with plain data parallelism (DDP) on %s", self.args.device)
        self.add_callback(MetricsJsonlCallback())
        for default in (ProgressCallback, PrinterCallback):  # replaced by one bar / one line per log
            self.remove_callback(default)
        self.add_callback(ProgressReporter())
        self.add_callback(NonFiniteGuard(self))
        self.add_callback(ReportCallback())
        self.add_callback(SelectiveCheckpointing())
        self._train_totals = MetricTotals()  # since the last training log; evaluations never touch them
        self._eval_prefix: str | None = None  # metric_key_prefix of the evaluation under way
        self._eval_records: list[dict] = []  # per-pair records of that evaluation, all ranks
        self._step_rows: list[int] = []  # dataset rows of the current optimizer step (error messages)
        self.nonfinite_skipped = 0
        self._stream_drops_logged = 0  # streamed data: drops counted when the report line was last logged
        self._run_start = (0, 0)  # (global step, nonfinite_skipped) when train() began
        self._run_loss_sum = torch.zeros(())  # this rank's share of the step losses since then

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """Trainer.train, plus: `resume_from_checkpoint` True or "latest" = the newest *complete*
        checkpoint in output_dir (none: start fresh; a finished run: checkpoints.RunFinished);
        half-written checkpoints are deleted; an output_dir with files is refused unless resuming or
        `overwrite_output_dir`. The returned (and logged) `train_loss` is the mean step loss of the
        steps this call trained, over all ranks."""
        resume = resolve_resume(
            self.args.output_dir, resume_from_checkpoint, self.args.overwrite_output_dir,
            self.is_world_process_zero(), os.path.join(self.args.output_dir, METRICS_FILE), self.args.max_steps,
        )
        self.accelerator.wait_for_everyone()  # the main process may have deleted incomplete checkpoints
        self._step_rows = []
        if resume and 0 < self.args.max_steps <= (step := completed_step(resume)):
            # The run is finished; transformers' loop would still train one step past max_steps.
            logger.info("%s is at step %d, max_steps is %d: nothing to train", resume, step, self.args.max_steps)
            self.load_checkpoint(resume)
            self.state = TrainerState.load_from_json(os.path.join(resume, TRAINER_STATE_NAME))
            return TrainOutput(self.state.global_step, 0.0, {})
        self.nonfinite_skipped = read_counters(resume).get("nonfinite_skipped", 0) if resume else 0
        self._run_start = (completed_step(resume) if resume else 0, self.nonfinite_skipped)
        self._run_loss_sum = torch.zeros(())
        output = super().train(resume_from_checkpoint=resume, **kwargs)
        if self.is_world_process_zero():
            mark_finished(self.args.output_dir, self.state.global_step)
        return TrainOutput(output.global_step, output.metrics.get("train_loss", output.training_loss), output.metrics)

    def after_model_saved(self, output_dir: str) -> None:
        if self.args.should_save:
            save_config_as_json(output_dir, self.args.to_json_string())

    def after_checkpoint_saved(self, checkpoint_dir: str, run_dir: str, save_total_limit: int | None) -> None:
        """The completion marker (checkpoints.py), then rotation: a kill at any point leaves the
        previous complete checkpoint in place."""
        self.accelerator.wait_for_everyone()  # every rank has written its part (rng state)
        if self.args.should_save:
            mark_complete(checkpoint_dir, self.state.global_step, {"nonfinite_skipped": self.nonfinite_skipped})
            rotate_checkpoints(run_dir, save_total_limit=save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint)

    def _choose_checkpointing(self, model, pairs, args: ORPOConfig) -> None:
        """Neither activation_checkpointing nor its old name set: choose it for this data on this device
        (memory.py), once per config, before the Trainer reads it."""
        selective = bool(args.selective_checkpointing)  # unless the planner decides: full recompute
        if args.deepspeed or args.fsdp:
            if (args.fsdp_config or {}).get("activation_checkpointing"):
                every, reason = None, "off: FSDP's own activation checkpointing is set (fsdp_config)"
            else:
                every, reason = 1, ("on: the model is sharded (DeepSpeed/FSDP) and orpo does not estimate sharded "
                                    "memory; --activation_checkpointing false turns it off")
        elif isinstance(unsized := self._memory_inputs(model, pairs, args), str):
            every, reason = 1, f"on: {unsized}"
        else:
            every, selective, reason = plan_checkpointing(*unsized, args.selective_checkpointing)
        args.selective_checkpointing = selective and every is not None
        args.activation_checkpointing = args.gradient_checkpointing = every is not None
        if every is not None and every > 1:
            args.activation_checkpointing_kwargs = {**(args.activation_checkpointing_kwargs or {}), "every_n_layers": every}
            args.gradient_checkpointing_kwargs = args.activation_checkpointing_kwargs
        args.choose_checkpointing = False
        self.checkpointing_reason = reason

    def _choose_head_probs(self, model, pairs, args: ORPOConfig) -> tuple[bool, str]:
        """(keep the output head's softmax for backward?, why): `keep_head_probs` if set; else kept where the
        step fits the memory budget without recompute (memory.plan_head_probs)."""
        if args.keep_head_probs is not None:
            return args.keep_head_probs, f"--keep_head_probs {str(args.keep_head_probs).lower()}"
        if args.gradient_checkpointing or args.deepspeed or args.fsdp:
            return False, "recomputed in backward: memory is what this run saves (activation checkpointing or sharding)"
        unsized = self._memory_inputs(model, pairs, args)
        if isinstance(unsized, str):
            return False, f"recomputed in backward: {unsized}"
        return plan_head_probs(*unsized)

    def memory_estimate(self) -> str:
        """One line: the largest micro-batch's step memory as this run is set up (its recompute and kept head
        softmax) against the budget, per device (memory.estimate_step); or why there is none."""
        if self.args.deepspeed or self.args.fsdp:
            return "not estimated: the model is sharded (DeepSpeed/FSDP), and orpo does not estimate sharded memory"
        unsized = self._memory_inputs(self.model, self.train_dataset, self.args)
        if isinstance(unsized, str):
            return f"not estimated: {unsized}"
        kwargs = self.args.activation_checkpointing_kwargs or {}
        every = kwargs.get("every_n_layers", 1) if self.args.gradient_checkpointing else None
        return estimate_step(*unsized, every, bool(self.args.selective_checkpointing), self.keep_head_probs)[2]

    def _memory_inputs(self, model, pairs, args: ORPOConfig) -> tuple | str:
        """The arguments of memory.plan_checkpointing / plan_head_probs for this model, data and config,
        or why the data gives none."""
        if isinstance(pairs, PairStream) and longest_pair(*pairs.limits) is None:
            return "streamed data without max_length to size it by"
        if pairs is None or (not isinstance(pairs, PairStream) and not len(pairs)):
            return "no training data to size it by"
        # a stream is sized by the longest pair its length limits let through, in every micro-batch
        lengths = ([longest_pair(*pairs.limits)] * args.per_device_train_batch_size if isinstance(pairs, PairStream)
                   else [tuple(lengths) for lengths in pair_lengths(pairs).tolist()])
        lm = causal_lm(model)
        shape = decoder_shape(lm, lm.config.get_text_config())
        on_device = next(lm.parameters()).device.type == args.device.type
        return (shape, lengths, args.per_device_train_batch_size, self.route.packing, self.route.attention,
                2 if args.bf16 or args.fp16 else shape.weight_bytes, args.logprob_chunk_size, on_device, args.device,
                int(os.environ.get("LOCAL_WORLD_SIZE", "1")), args.memory_budget_gb)

    def _prepare(self, dataset, tokenizer, args: ORPOConfig, split: str):
        """`dataset` through the one data path with this config's data fields (config.prepare_data);
        a dict of eval datasets (Trainer: one metric prefix per name) is prepared name by name."""
        if dataset is None:
            return None
        if isinstance(dataset, dict):
            return {name: self._prepare(data, tokenizer, args, f"{split}_{name}") for name, data in dataset.items()}
        name = dataset if isinstance(dataset, str) else f"{split} dataset"
        if isinstance(dataset, PairStream) or (split == "train" and args.streaming):
            stream = dataset if isinstance(dataset, PairStream) else stream_data(args, dataset, tokenizer, name=name)
            logger.info("%s data: streaming %s (shuffle buffer %d rows): rows are read, tokenized and counted as "
                        "training takes them", split, stream.name, stream.shuffle_buffer)
            self.prepared[split] = stream
            return stream
        prepared = prepare_data(args, dataset, tokenizer, name=name)  # once per machine (config.prepare_data)
        logger.info("%s data: %s; %s in %.1f s", split, prepared.report(), prepared.origin or "given as pairs",
                    prepared.seconds)
        self.prepared[split] = prepared
        return prepared.pairs

    def length_grouped_sampler(self, dataset):
        if self.args.train_sampling_strategy != "group_by_length":
            return None
        from transformers.trainer_pt_utils import LengthGroupedSampler

        lengths = pair_lengths(dataset).sum(axis=1).tolist()
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=lengths)

    def step_totals(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        """[NLL tokens, pairs, router tokens] of the whole optimizer step, summed over micro-batches and
        ranks (router tokens: those the MoE load-balancing loss counts, moe.router_token_mask; 0 without it)."""
        totals = torch.stack([
            torch.stack([nll_token_count(b["target_kind"], self.args.nll_scope), b["num_pairs"],
                         router_token_mask(b).sum() if self.router_balancing else torch.zeros((), dtype=torch.long)])
            for b in batch_samples
        ]).sum(0).to(device)
        if self.args.world_size > 1:
            totals = self.accelerator.gather(totals).view(-1, 3).sum(0)
        return totals

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self._step_rows += inputs["pair_index"].tolist()
        logps = pair_logps(model, inputs, self.args.logprob_chunk_size, head=self.route.head,
                           keep_probs=self.keep_head_probs)
        batch_nll_tokens = nll_token_count(inputs["target_kind"], self.args.nll_scope)
        if num_items_in_batch is None:  # evaluation: normalise over this batch alone
            nll_tokens, pairs = batch_nll_tokens, inputs["num_pairs"]
        else:
            nll_tokens, pairs = num_items_in_batch[0], num_items_in_batch[1]
        nll_sum = logps.nll_sum(self.args.nll_scope)
        loss, or_loss, log_odds = orpo_loss(
            logps.logps_chosen, logps.logps_rejected, nll_sum, self.args.beta, nll_tokens, pairs
        )
        if logps.router_aux_loss is not None:
            # coef · aux, each micro-batch weighted by its share of the step's counted tokens (all ranks),
            # so the step's term is coef times the token-weighted mean of the micro-batches' aux losses
            step_tokens = logps.router_tokens if num_items_in_batch is None else num_items_in_batch[2]
            loss = loss + self.router_balancing.coef * logps.router_aux_loss * logps.router_tokens / step_tokens
        with torch.no_grad():
            if not model.training:
                # gather_for_metrics drops the pairs that even_batches repeats to fill the last batch
                rows = self.accelerator.gather_for_metrics(record_tensor(logps, inputs["pair_index"], self.args.nll_scope))
                self._eval_records += records_from_tensor(rows)
                return (loss, {"log_odds": log_odds}) if return_outputs else loss
            # this rank's share of the step's loss (the ranks' shares sum to it); a non-finite
            # (skipped) step adds nothing to the run's mean
            share = torch.where(torch.isfinite(loss), loss.detach().float(), 0.0)
            self._run_loss_sum = self._run_loss_sum.to(share.device) + share
            self._train_totals.add(
                nll_sum=nll_sum,
                nll_tokens=batch_nll_tokens,
                or_sum=or_loss.sum(),
                log_odds_sum=log_odds.sum(),
                logps_chosen_sum=logps.logps_chosen.sum(),
                logps_rejected_sum=logps.logps_rejected.sum(),
                correct=(log_odds > 0).sum(),
                pairs=inputs["num_pairs"],
                tokens=inputs["num_tokens"],
                router_aux_sum=(logps.router_aux_loss * logps.router_tokens) if logps.router_aux_loss is not None else 0.0,
                router_tokens=logps.router_tokens if logps.router_tokens is not None else 0,
            )
        if num_items_in_batch is not None and self.accelerator.num_processes > 1:
            # DDP averages gradients over ranks; the loss is already normalised by global totals
            loss = loss * self.accelerator.num_processes
        return (loss, {"log_odds": log_odds}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self.inputs_to_device(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """Trainer.evaluate on the training path without gradients. Metrics (`{prefix}_accuracy`,
        `_log_odds`, `_logps/chosen`, ...; `{prefix}_loss` exact: nll + beta · or_loss over all pairs) come
        from per-pair records (ops/scoring.py), each pair once across ranks; `save_eval_pairs` writes the
        records to OUTPUT_DIR/{prefix}_pairs.jsonl. `eval_dataset` may be any source the constructor takes."""
        named = isinstance(eval_dataset, str) and isinstance(self.eval_dataset, dict) and eval_dataset in self.eval_dataset
        if eval_dataset is not None and not named and not _is_prepared(eval_dataset):
            eval_dataset = self._prepare(eval_dataset, self.processing_class, self.args, metric_key_prefix)
        outer, self._eval_prefix, self._eval_records = self._eval_prefix, metric_key_prefix, []
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._eval_prefix, self._eval_records = outer, []

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._eval_prefix is not None and f"{self._eval_prefix}_runtime" in logs:
            self._log_evaluation(logs)
        elif "train_runtime" in logs:
            # the end-of-training summary: steps since the last log get a step record of their own,
            # so the summary holds only the Trainer's whole-run figures and every step is logged once
            tail = self._train_metrics()
            if tail:
                super().log(tail)
            if "train_loss" in logs:
                logs["train_loss"] = self._run_mean_loss()  # transformers': rank-local steps since the last log
            if self.nonfinite_skipped:
                logs["nonfinite_skipped"] = self.nonfinite_skipped
        else:
            logs.update(self._train_metrics())  # in place: the Trainer keeps using this dict
            if "loss" in logs and isinstance(stream := self.prepared.get("train"), PairStream):
                self._log_stream(stream, logs)
        super().log(logs, start_time)

    def _log_stream(self, stream: PairStream, logs: dict[str, float]) -> None:
        """A streamed run's running data totals into `logs` (every process reads the whole stream, so the
        main process's totals are the job's); the drop report line whenever it counted new drops."""
        logs.update(stream_rows_read=stream.rows, stream_pairs_kept=stream.kept,
                    stream_pairs_dropped=sum(stream.drops.values()))
        if logs["stream_pairs_dropped"] != self._stream_drops_logged and self.is_world_process_zero():
            logger.info("train data: %s", stream.report())
        self._stream_drops_logged = logs["stream_pairs_dropped"]

    def _train_metrics(self) -> dict[str, float]:
        """Exact means of the training micro-batches since the last log (summed over ranks), then reset."""
        reduce = self.accelerator.reduce if self.accelerator.num_processes > 1 else (lambda t: t)
        metrics = self._train_totals.summary(lambda t: reduce(t).cpu())
        self._train_totals.reset()
        if metrics and self.nonfinite_skipped:
            metrics["nonfinite_skipped"] = self.nonfinite_skipped  # steps skipped so far
        return metrics

    def _run_mean_loss(self) -> float:
        """Mean step loss of the steps this train() call applied, summed over ranks."""
        first_step, skipped_before = self._run_start
        total = self._run_loss_sum.to(self.args.device)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        applied = self.state.global_step - first_step - (self.nonfinite_skipped - skipped_before)
        return total.item() / max(applied, 1)

    def _log_evaluation(self, logs: dict[str, float]) -> None:
        """The evaluation's metrics into `logs` (in place: evaluate() returns this dict), and its
        per-pair file if asked."""
        records, prefix = self._eval_records, self._eval_prefix
        if not records:
            return
        summary = summarize(records, self.args.beta)
        logs.update({f"{prefix}_{key}": value for key, value in summary.items()})
        if self.args.save_eval_pairs and self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, f"{prefix}_pairs.jsonl"), "w") as f:
                f.writelines(json.dumps(record) + "\n" for record in sorted(records, key=lambda r: r["index"]))
                f.write(json.dumps({"summary": summary, "step": self.state.global_step}) + "\n")


def _is_prepared(dataset) -> bool:
    if isinstance(dataset, dict):
        return all(_is_prepared(data) for data in dataset.values())
    return isinstance(dataset, list) and all(isinstance(pair, TokenizedPair) for pair in dataset)
