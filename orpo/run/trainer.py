"""`ORPOTrainer`: ORPO on top of `transformers.Trainer`, executing a run's plan.

A run is: set up (run/setup.py: every input checked, then the tokenizer, the model and the data loaded),
planned (run/plan.py: every choice made once, with its reason), trained here, and finished (run/finish.py:
the final evaluation, the saved model, its card, the export). This class is the Trainer adapter in the
middle: checkpoints, resume, schedulers, `report_to`, DeepSpeed and FSDP come from the Trainer; what it adds
is the batch layout of the plan's route (packing.py), one model call per micro-batch (forward.py), the loss
(loss.py; a reward model's rewards and Bradley-Terry loss with --objective reward: ops/reward.py) and exact
metrics. It never changes the config it was given: the Trainer runs the plan's copy
(`self.args`), with orpo's decisions written in. A subclass changes the loss in `batch_loss` and logs its own
values with `add_metric` (docs/migrating-from-trl.md: what replaces each member of TRL's trainer).

Normalisation (ARCHITECTURE.md): the NLL is a token mean and the odds-ratio term a pair mean
over the whole optimizer step, so `step_totals` returns both totals for the step and `compute_loss`
divides by them; the Trainer must then not divide by the accumulation steps again. The private
Trainer members this relies on are used only in train/internals.py.
"""
from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerState
from transformers.trainer_utils import TrainOutput, rotate_checkpoints

from orpo.data.store import pair_lengths
from orpo.data.stream import PairStream
from orpo.errors import OrpoError
from orpo.ops.forward import PairLogps, batch_collator, pair_logps
from orpo.ops.loss import bradley_terry_loss, orpo_loss
from orpo.ops.moe import router_token_mask
from orpo.ops.packing import nll_token_count
from orpo.ops.reward import pair_rewards, reward_record_tensor, reward_records, summarize_rewards
from orpo.ops.scoring import record_tensor, records_from_tensor, summarize
from orpo.run.finish import FinalEvaluation, finish_run
from orpo.run.launch import launched_processes
from orpo.run.plan import plan_run
from orpo.run.setup import is_tokenized, prepare_source, set_up, trainer_data
from orpo.train.allocator import keep_freed_memory
from orpo.train.callbacks import (AddedMetrics, MetricsJsonlCallback, MetricTotals, NonFiniteGuard, ReportCallback,
                                  RewardTotals, RunLoss, SelectiveCheckpointing)
from orpo.train.checkpoints import (check_stamp, completed_step, mark_complete, read_counters, resolve_resume,
                                    save_config_as_json)
from orpo.train.config import ORPOConfig
from orpo.train.internals import TrainerAdapter, ensure_trainer_contract
from orpo.train.progress import ProgressReporter
from orpo.train.report import PLAN_FILE, write_pair_records

logger = logging.getLogger(__name__)


class StepTotals(NamedTuple):
    """The normalisers of a micro-batch's loss (`ORPOTrainer.batch_loss`): in training, the whole optimizer
    step's NLL tokens, pairs and MoE router tokens, summed over its micro-batches and ranks (`step_totals`); in
    evaluation, the batch's own. 0-dim tensors; router_tokens is None in evaluation without MoE balancing."""

    nll_tokens: torch.Tensor
    pairs: torch.Tensor
    router_tokens: torch.Tensor | None


class ORPOTrainer(TrainerAdapter):
    """ORPO trainer. Takes TRL's arguments: `model` (a model or a name/path), `args` (ORPOConfig),
    `train_dataset`/`eval_dataset` (a `datasets.Dataset`, a list of rows in any shape orpo.data reads, a
    file path or hub id, or data already prepared by `prepare_dataset`; read with the config's data
    fields), `processing_class` (the tokenizer; a vision-language model's processor), `peft_config` (LoRA).

    `trainer.plan` holds every choice made for the run (`plan.lines()`); `trainer.train()` trains and then
    finishes the run as `orpo train` does (final evaluation, saved model, model card, export)."""

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
        if model is None:
            raise OrpoError("ORPOTrainer needs a model: its hub id or path, or a model object")
        if kwargs.pop("data_collator", None) is not None:  # TRL's argument (None: its default, the same as orpo's)
            raise OrpoError("ORPOTrainer takes no data_collator: it batches pairs in the layout of the model's route "
                            "(trainer.data_collator, orpo/ops/packing.py)")
        setup = set_up(model, args, train_dataset, eval_dataset, processing_class, peft_config)
        self.plan = plan_run(args, setup, launched_processes(args))
        self.setup = setup
        super().__init__(
            model=setup.model,
            args=self.plan.training_args,
            data_collator=batch_collator(setup.model, self.plan.pad_id, self.plan.route.layout),
            train_dataset=trainer_data(setup.train),
            eval_dataset=trainer_data(setup.eval),
            processing_class=setup.processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            **kwargs,
        )
        for line in self.plan.lines():
            logger.info("%s", line)
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
        if self.plan.finish.final_eval:
            self.add_callback(FinalEvaluation())
        self._reward = self.args.objective == "reward"  # a Bradley-Terry reward model (ops/reward.py)
        # since the last training log; evaluations never touch them
        self._train_totals = RewardTotals() if self._reward else MetricTotals()
        self._eval_prefix: str | None = None  # metric_key_prefix of the evaluation under way
        self._eval_records: list[dict] = []  # per-pair records of that evaluation, all ranks
        self._added_metrics = {"train": AddedMetrics(), "eval": AddedMetrics()}  # add_metric's, since the last log
        self._step_rows: list[int] = []  # dataset rows of the current optimizer step (error messages)
        self.nonfinite_skipped = 0
        self._stream_drops_logged = 0  # streamed data: drops counted when the report line was last logged
        self.run_loss = RunLoss()  # the loss of the steps of the train() call under way
        self.add_callback(self.run_loss)

    @property
    def prepared(self) -> dict:
        """"train" / "eval" → the run's prepared data (PreparedData, a PairStream, or name → PreparedData)."""
        return {"train": self.setup.train, "eval": self.setup.eval}

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """Trainer.train on the plan, then the finishing steps (run/finish.py). `resume_from_checkpoint` None:
        the config's; True or "latest" = the newest *complete* checkpoint in output_dir (none: start fresh; a
        finished run: checkpoints.RunFinished); half-written checkpoints are deleted; a checkpoint another run
        made (other settings, model or data) is refused unless force_resume; a new run in an output_dir with
        files needs `overwrite_output_dir`, and removes (or moves aside) the previous run as it starts. The
        returned (and logged) `train_loss` is the mean step loss of the steps this call trained, over all ranks."""
        args = self.args
        resume = args.resume_from_checkpoint if resume_from_checkpoint is None else resume_from_checkpoint
        resume = resolve_resume(args.output_dir, resume, args.overwrite_output_dir, args.previous_run,
                                self.is_world_process_zero(), args.max_steps)
        self.accelerator.wait_for_everyone()  # the main process may have removed the previous run's files
        for difference in check_stamp(resume, self.plan.stamp, args.force_resume) if resume else []:
            logger.warning("--force_resume: resuming %s although it was made with %s", resume, difference)
        if self.is_world_process_zero():
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, PLAN_FILE), "w") as f:
                f.write(self.plan.to_json())
        if self.plan.reuse_cpu_memory:
            keep_freed_memory()
        self._step_rows = []
        self.nonfinite_skipped = read_counters(resume).get("nonfinite_skipped", 0) if resume else 0
        if resume and 0 < args.max_steps <= (step := completed_step(resume)):
            # The run reached its last step before it was stopped; transformers' loop would train one step past
            # max_steps. Its state is loaded and the run finished.
            logger.info("%s is at step %d, max_steps is %d: nothing to train", resume, step, args.max_steps)
            self.load_checkpoint(resume)
            self.state = TrainerState.load_from_json(os.path.join(resume, TRAINER_STATE_NAME))
            return finish_run(self, TrainOutput(self.state.global_step, 0.0, {}))
        self.run_loss.reset(completed_step(resume) if resume else 0, self.nonfinite_skipped)
        output = super().train(resume_from_checkpoint=resume, **kwargs)
        output = TrainOutput(output.global_step, output.metrics.get("train_loss", output.training_loss), output.metrics)
        return finish_run(self, output)

    def after_model_saved(self, output_dir: str) -> None:
        if self.args.should_save:
            save_config_as_json(output_dir, self.args.to_json_string())

    def after_checkpoint_saved(self, checkpoint_dir: str, run_dir: str, save_total_limit: int | None) -> None:
        """The completion marker (checkpoints.py, with the run's stamp), then rotation: a kill at any point leaves
        the previous complete checkpoint in place."""
        self.accelerator.wait_for_everyone()  # every rank has written its part (rng state)
        if self.args.should_save:
            mark_complete(checkpoint_dir, self.state.global_step, {"nonfinite_skipped": self.nonfinite_skipped},
                          self.plan.stamp)
            rotate_checkpoints(run_dir, save_total_limit=save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint)

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
                         router_token_mask(b).sum() if self.plan.router_balancing else torch.zeros((), dtype=torch.long)])
            for b in batch_samples
        ]).sum(0).to(device)
        if self.args.world_size > 1:
            totals = self.accelerator.gather(totals).view(-1, 3).sum(0)
        return totals

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self._step_rows += inputs["pair_index"].tolist()
        if self._reward:
            return self._reward_loss(model, inputs, return_outputs, num_items_in_batch)
        logps = pair_logps(model, inputs, self.args.logprob_chunk_size, head=self.plan.route.head,
                           keep_probs=self.plan.keep_head_probs)
        batch_nll_tokens = nll_token_count(inputs["target_kind"], self.args.nll_scope)
        if num_items_in_batch is None:  # evaluation: normalise over this batch alone
            step = StepTotals(batch_nll_tokens, inputs["num_pairs"], logps.router_tokens)
        else:
            step = StepTotals(*num_items_in_batch)
        loss, or_loss, log_odds = self.batch_loss(model, inputs, logps, step)
        # per pair: log_odds [pairs], logps [pairs, 2] (chosen, rejected), which prediction_step returns
        outputs = {"log_odds": log_odds, "logps": torch.stack([logps.logps_chosen, logps.logps_rejected], dim=1)} \
            if return_outputs else None
        with torch.no_grad():
            if not model.training:
                # gather_for_metrics drops the pairs that even_batches repeats to fill the last batch
                rows = self.accelerator.gather_for_metrics(record_tensor(logps, inputs["pair_index"], self.args.nll_scope))
                self._eval_records += records_from_tensor(rows)
                return (loss, outputs) if return_outputs else loss
            self.run_loss.add(loss)
            self._train_totals.add_batch(logps, logps.nll_sum(self.args.nll_scope), batch_nll_tokens, or_loss, log_odds,
                                         inputs["num_pairs"], inputs["num_tokens"])
        if num_items_in_batch is not None and self.accelerator.num_processes > 1:
            # DDP averages gradients over ranks; the loss is already normalised by global totals
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _reward_loss(self, model, inputs, return_outputs: bool, num_items_in_batch):
        """compute_loss of a reward model (--objective reward): the Bradley-Terry loss of the batch's rewards (one
        model call, ops/reward.py), normalised by the step's pairs (`step_totals`; in evaluation the batch's);
        outputs {"rewards": [pairs, 2]} (chosen, rejected)."""
        rewards = pair_rewards(model, inputs)
        pairs = inputs["num_pairs"] if num_items_in_batch is None else num_items_in_batch[1]
        loss, _, margin = bradley_terry_loss(rewards.chosen, rewards.rejected, pairs)
        outputs = {"rewards": torch.stack([rewards.chosen, rewards.rejected], dim=1)} if return_outputs else None
        with torch.no_grad():
            if not model.training:
                rows = self.accelerator.gather_for_metrics(reward_record_tensor(rewards, inputs))
                self._eval_records += reward_records(rows)
                return (loss, outputs) if return_outputs else loss
            self.run_loss.add(loss)
            self._train_totals.add_batch(rewards, margin, inputs["num_pairs"], inputs["num_tokens"])
        if num_items_in_batch is not None and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages over ranks; the loss has global totals
        return (loss, outputs) if return_outputs else loss

    def batch_loss(self, model, inputs: dict, logps: PairLogps, step: StepTotals
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One micro-batch's share of its optimizer step's loss: the ORPO loss (ops/loss.orpo_loss, Eq. 6)
        nll_sum / step.nll_tokens + beta · Σ or_loss / step.pairs and, for a MoE model loaded with
        output_router_logits, coef · aux_loss weighted by the batch's share of step.router_tokens. `logps` holds
        the batch's per-pair log-prob sums from its one model call (ops/forward.PairLogps); `inputs` is the
        batch (ops/packing.py). Returns (loss [], or_loss [pairs], log_odds [pairs]) as orpo_loss does; the
        logged metrics (`nll`, `or_loss`, `log_odds`, `logps/*`, ...) are computed from `logps` and these.

        The hook for subclasses: override it to add a term or change a reduction, calling
        super().batch_loss(...) for ORPO's terms. A term added here is this batch's share of the step's term:
        normalise its sum by `step`'s totals, not by this batch's counts, and the step's loss stays the same
        however the step is split into micro-batches and ranks. It runs in training and, without gradients,
        in evaluation (`model.training` is False there; `eval_loss` stays the ORPO loss of the per-pair
        records); `add_metric` logs a value of the subclass's own."""
        nll_sum = logps.nll_sum(self.args.nll_scope)
        loss, or_loss, log_odds = orpo_loss(logps.logps_chosen, logps.logps_rejected, nll_sum, self.args.beta,
                                            step.nll_tokens, step.pairs)
        if logps.router_aux_loss is not None:
            # coef · aux, each micro-batch weighted by its share of the step's counted tokens (all ranks),
            # so the step's term is coef times the token-weighted mean of the micro-batches' aux losses
            coef = self.plan.router_balancing.coef
            loss = loss + coef * logps.router_aux_loss * logps.router_tokens / step.router_tokens
        return loss, or_loss, log_odds

    def add_metric(self, name: str, total: torch.Tensor | float, count: torch.Tensor | float = 1) -> None:
        """Log `name` as total / count, each summed over the micro-batches (and ranks) since the last log: the
        exact mean of a per-pair value `v` [pairs] is add_metric(name, v.sum(), len(v)). Called from
        `batch_loss`, training logs it with the step's metrics (metrics.jsonl, report_to), an evaluation as
        `{prefix}_{name}` (across ranks, the pairs that fill the last evaluation batch by repeating count again: orpo's
        own eval metrics drop them). Every rank must add the same names; a name already logged is refused."""
        self._added_metrics["train" if self._eval_prefix is None else "eval"].add(name, total, count)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """(loss, predictions, labels) of one eval batch, as the Trainer's evaluation loop gathers them for
        `compute_metrics` (an EvalPrediction): predictions [pairs, 2] the mean completion log-probs (chosen,
        rejected) of each pair (a reward model: their rewards), labels [pairs] 0, the column of the preferred completion (so `argmax ==
        label` is the pair's accuracy). Nothing but the loss when `prediction_loss_only` (Trainer.evaluate's
        choice where no compute_metrics is given)."""
        inputs = self.inputs_to_device(inputs)
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        scores = outputs["rewards"] if self._reward else outputs["logps"]
        return loss.detach(), scores, torch.zeros(len(scores), dtype=torch.long, device=scores.device)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """Trainer.evaluate on the training path without gradients. Metrics (`{prefix}_accuracy`,
        `_log_odds`, `_logps/chosen`, ...; `{prefix}_loss` exact: nll + beta · or_loss over all pairs) come
        from per-pair records (ops/scoring.py), each pair once across ranks; `save_eval_pairs` writes the
        records to OUTPUT_DIR/{prefix}_pairs.jsonl. `eval_dataset` may be any source the constructor takes. A reward
        model's (--objective reward, ops/reward.py): `{prefix}_accuracy` (the held-out pair accuracy: share of pairs
        with r_chosen > r_rejected), `_margin`, `_rewards/chosen`, `_rewards/rejected`, `_loss` (Bradley-Terry)."""
        named = isinstance(eval_dataset, str) and isinstance(self.eval_dataset, dict) and eval_dataset in self.eval_dataset
        if eval_dataset is not None and not named and not is_tokenized(eval_dataset):
            eval_dataset = trainer_data(prepare_source(eval_dataset, self.processing_class, self.args, metric_key_prefix))
        outer, self._eval_prefix, self._eval_records = self._eval_prefix, metric_key_prefix, []
        outer_added, self._added_metrics["eval"] = self._added_metrics["eval"], AddedMetrics()
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._eval_prefix, self._eval_records, self._added_metrics["eval"] = outer, [], outer_added

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._eval_prefix is not None and f"{self._eval_prefix}_runtime" in logs:
            self._log_evaluation(logs)
        elif "train_runtime" in logs:
            # the end-of-training summary: steps since the last log get a step record of their own,
            # so the summary holds only the Trainer's whole-run figures and every step is logged once
            tail = self._train_metrics({})
            if tail:
                super().log(tail)
            if "train_loss" in logs:  # transformers': rank-local steps since the last log
                logs["train_loss"] = self.run_loss.mean(self.state.global_step, self.nonfinite_skipped, self._sum)
            if self.nonfinite_skipped:
                logs["nonfinite_skipped"] = self.nonfinite_skipped
        else:
            logs.update(self._train_metrics(logs))  # in place: the Trainer keeps using this dict
            if "loss" in logs and isinstance(stream := self.setup.train, PairStream):
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

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over ranks, on this process's device."""
        tensor = tensor.to(self.args.device)
        return self.accelerator.reduce(tensor, reduction="sum") if self.accelerator.num_processes > 1 else tensor

    def _train_metrics(self, logs: dict[str, float]) -> dict[str, float]:
        """Exact means of the training micro-batches since the last log (summed over ranks), with the metrics
        `add_metric` added (a name already in `logs` or orpo's refused), then reset."""
        metrics = self._train_totals.summary(lambda t: self._sum(t).cpu())
        self._train_totals.reset()
        if metrics and self.nonfinite_skipped:
            metrics["nonfinite_skipped"] = self.nonfinite_skipped  # steps skipped so far
        added = self._added_metrics["train"].summary(lambda t: self._sum(t).cpu())
        self._added_metrics["train"].reset()
        if metrics:
            metrics.update(_without_clash(added, {**logs, **metrics}, "training"))
        return metrics

    def applied_steps(self) -> int:
        """Optimizer steps of the whole run (resumed ones included) that updated the weights."""
        return self.state.global_step - self.nonfinite_skipped

    def _log_evaluation(self, logs: dict[str, float]) -> None:
        """The evaluation's metrics into `logs` (in place: evaluate() returns this dict), and its
        per-pair file if asked."""
        records, prefix = self._eval_records, self._eval_prefix
        if not records:
            return
        summary = summarize_rewards(records) if self._reward else summarize(records, self.args.beta)
        logs.update({f"{prefix}_{key}": value for key, value in summary.items()})
        added = self._added_metrics["eval"].summary(lambda t: self._sum(t).cpu())
        logs.update(_without_clash({f"{prefix}_{key}": value for key, value in added.items()}, logs, "evaluation"))
        if self.args.save_eval_pairs and self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            write_pair_records(os.path.join(self.args.output_dir, f"{prefix}_pairs.jsonl"),
                               sorted(records, key=lambda r: r["index"]), summary, step=self.state.global_step)


def _without_clash(added: dict[str, float], logged: dict[str, float], where: str) -> dict[str, float]:
    """`added` (add_metric's means), refused in one line if a name is already `logged` (orpo's or the Trainer's)."""
    if clash := sorted(set(added) & set(logged)):
        raise OrpoError(f"add_metric: {', '.join(clash)} is logged in {where} already (by orpo or the Trainer); "
                        "give yours another name")
    return added
