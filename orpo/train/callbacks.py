"""Trainer callbacks and metric bookkeeping: exact metric means, metrics.jsonl, the report at the
end of training, and the guard against non-finite steps."""
from __future__ import annotations

import json
import logging
import math
import os
import time

import accelerate
import torch
from accelerate.utils import DistributedType, gather_object
from transformers import TrainerCallback

from orpo.errors import OrpoError
from orpo.train.recompute import selective_checkpoint_kwargs
from orpo.train.report import METRICS_FILE, write_report

logger = logging.getLogger(__name__)


def totals_row(values: list) -> torch.Tensor:
    """`values` (0-dim tensors or numbers) as one detached row on the device of the first tensor among them
    (CPU if none), in float64 where the device has it (not MPS: float32 there): sums that stay exact."""
    device = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
    dtype = torch.float32 if device.type == "mps" else torch.float64
    return torch.stack([torch.as_tensor(v, device=device).detach().to(dtype) for v in values])


class MetricTotals:
    """Sums over the micro-batches since the last log, so logged values are exact means. They stay
    on the device of the values added (no host sync per micro-batch), in float64 where the device
    has it (not MPS: float32 there)."""

    KEYS = ("nll_sum", "nll_tokens", "or_sum", "log_odds_sum", "logps_chosen_sum", "logps_rejected_sum",
            "correct", "pairs", "tokens", "router_aux_sum", "router_tokens")

    def __init__(self):
        self.reset()

    def reset(self):
        self.totals: torch.Tensor | None = None
        self.since = time.perf_counter()

    def add(self, **values: torch.Tensor):
        """One micro-batch: a value (0-dim tensor or number) for every key of KEYS."""
        row = totals_row([values[key] for key in self.KEYS])
        self.totals = row if self.totals is None else self.totals + row

    def add_batch(self, logps, nll_sum: torch.Tensor, nll_tokens: torch.Tensor, or_loss: torch.Tensor,
                  log_odds: torch.Tensor, num_pairs: torch.Tensor, num_tokens: torch.Tensor) -> None:
        """One training micro-batch: its PairLogps (ops/forward.py), NLL sum and token count, per-pair odds-ratio
        losses and log-odds, and the batch's pair and token counts."""
        aux, tokens = logps.router_aux_loss, logps.router_tokens
        self.add(nll_sum=nll_sum, nll_tokens=nll_tokens, or_sum=or_loss.sum(), log_odds_sum=log_odds.sum(),
                 logps_chosen_sum=logps.logps_chosen.sum(), logps_rejected_sum=logps.logps_rejected.sum(),
                 correct=(log_odds > 0).sum(), pairs=num_pairs, tokens=num_tokens,
                 router_aux_sum=aux * tokens if aux is not None else 0.0,
                 router_tokens=tokens if tokens is not None else 0)

    def summary(self, reduce) -> dict[str, float]:
        """Means of the totals after `reduce` (e.g. a sum over ranks), with the tokens and tokens/s since the last
        reset; {} if nothing was added."""
        if self.totals is None:
            return {}
        t = dict(zip(self.KEYS, reduce(self.totals).tolist()))
        if t["pairs"] == 0:
            return {}
        elapsed = max(time.perf_counter() - self.since, 1e-9)
        return {**self.means(t), "tokens": t["tokens"], "tokens_per_second": t["tokens"] / elapsed}

    def means(self, t: dict[str, float]) -> dict[str, float]:
        """The logged means of the reduced totals `t` (KEYS → value)."""
        return {
            "nll": t["nll_sum"] / max(t["nll_tokens"], 1),
            "or_loss": t["or_sum"] / t["pairs"],
            "log_odds": t["log_odds_sum"] / t["pairs"],
            "logps/chosen": t["logps_chosen_sum"] / t["pairs"],
            "logps/rejected": t["logps_rejected_sum"] / t["pairs"],
            "accuracy": t["correct"] / t["pairs"],
            "margin": (t["logps_chosen_sum"] - t["logps_rejected_sum"]) / t["pairs"],
            # MoE load balancing (moe.py): token-weighted mean over the micro-batches, unscaled by its coef
            **({"aux_loss": t["router_aux_sum"] / t["router_tokens"]} if t["router_tokens"] else {}),
        }


class RewardTotals(MetricTotals):
    """MetricTotals of a reward model's training (--objective reward): its accuracy, margin and mean rewards
    (ops/reward.summarize_rewards' names), exact means since the last log."""

    KEYS = ("margin_sum", "chosen_sum", "rejected_sum", "correct", "pairs", "tokens")

    def add_batch(self, rewards, margin: torch.Tensor, num_pairs: torch.Tensor,
                  num_tokens: torch.Tensor) -> None:
        """One training micro-batch: its PairRewards (ops/reward.py), per-pair margins, pair and token counts (the
        loss is the Trainer's own `loss`)."""
        self.add(margin_sum=margin.sum(), chosen_sum=rewards.chosen.sum(),
                 rejected_sum=rewards.rejected.sum(), correct=(margin > 0).sum(), pairs=num_pairs, tokens=num_tokens)

    def means(self, t: dict[str, float]) -> dict[str, float]:
        return {
            "accuracy": t["correct"] / t["pairs"],
            "margin": t["margin_sum"] / t["pairs"],
            "rewards/chosen": t["chosen_sum"] / t["pairs"],
            "rewards/rejected": t["rejected_sum"] / t["pairs"],
        }


class AddedMetrics:
    """The metrics a subclass of ORPOTrainer adds (`ORPOTrainer.add_metric`): name → [total, count], summed over
    the micro-batches since the last log, on the device of the values added; logged as total / count."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.totals: dict[str, torch.Tensor] = {}

    def add(self, name: str, total, count) -> None:
        row = totals_row([total, count])
        self.totals[name] = self.totals[name] + row.to(self.totals[name].device) if name in self.totals else row

    def summary(self, reduce) -> dict[str, float]:
        """{name: total / count} after `reduce` (a sum over ranks: every rank must have added the same names),
        names in sorted order; a name whose count is 0 is left out."""
        names = sorted(self.totals)
        if not names:
            return {}
        device = self.totals[names[0]].device
        rows = reduce(torch.stack([self.totals[name].to(device) for name in names])).tolist()
        return {name: total / count for name, (total, count) in zip(names, rows) if count}


class RunLoss(TrainerCallback):
    """The mean step loss of the steps one train() call applied. Each rank adds its share of each micro-batch's
    loss (the ranks' shares of a step sum to its loss); a step's shares count once it ends, unless the
    non-finite guard skipped it (`skip_step`), on every rank alike, so a step one rank made NaN adds nothing
    from the others either. `reset` at the start of a train() call: the run's global step and skipped steps then."""

    def __init__(self):
        self.reset(0, 0)

    def reset(self, first_step: int, skipped_before: int) -> None:
        self.first_step, self.skipped_before = first_step, skipped_before
        self.total, self.pending = torch.zeros(()), torch.zeros(())

    def add(self, loss: torch.Tensor) -> None:
        share = torch.where(torch.isfinite(loss), loss.detach().float(), 0.0)
        self.pending = self.pending.to(share.device) + share

    def skip_step(self) -> None:
        self.pending = torch.zeros(())

    def on_step_end(self, args, state, control, **kwargs):
        self.total = self.total.to(self.pending.device) + self.pending
        self.pending = torch.zeros(())

    def mean(self, global_step: int, skipped: int, reduce) -> float:
        """Over the steps applied since the call began; `reduce` sums a tensor over ranks."""
        applied = global_step - self.first_step - (skipped - self.skipped_before)
        return reduce(self.total).item() / max(applied, 1)


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
    """Every optimizer step whose (clipped, all-reduced) gradient has a NaN or inf is skipped or stops
    the run, per `on_nonfinite`, on every rank alike, with one line naming the step and the dataset rows
    of its pairs (all ranks' rows). Skipping leaves the weights and the optimizer's state untouched:
    weights are never updated with non-finite values. How the step is skipped depends on the engine:

    - one process, DDP, FSDP2 (`on_pre_optimizer_step`, after clipping, before `optimizer.step()`): every
      rank checks its own gradients (FSDP2: its shards, the DTensors' local parts) and the verdict is
      all-reduced over the ranks (one scalar), so all ranks decide alike even when only one rank's shard
      holds the NaN; a skip drops every gradient (`p.grad = None`), so `optimizer.step()` updates nothing.
      The learning-rate schedule advances as the Trainer steps it (the step counts).
    - DeepSpeed ZeRO-1/2/3 (and its bf16/fp16 optimizers): the engine steps inside the last micro-batch's
      backward, before this callback runs, with the gradients in its own partitioned buffers (`p.grad` is
      empty). DeepSpeed's own check skips the update there: a step whose all-reduced gradient norm is NaN/inf
      is an overflow to it, so it clears the gradients and leaves the weights, the optimizer state and its
      learning-rate schedule as they were (DeepSpeed 0.19.8: in fp32, in fp16, and in bf16 unless the config
      sets `bf16.check_grad_overflow` false). The guard reads that verdict (`engine.was_step_applied()`), the
      same on every rank, and counts the step or stops. A step the engine applied although its gradient norm
      is non-finite (its check off, or a DeepSpeed release without it) stops the run whatever `on_nonfinite`
      says: the weights are no longer finite.
    - DeepSpeed without ZeRO or mixed precision (stage 0, fp32): the engine steps a plain torch
      optimizer; a step pre-hook on it (`register_step_pre_hook`, set at train begin) makes the check above
      and drops the gradients before that optimizer steps.

    Under fp16 (the Trainer's GradScaler, or DeepSpeed's loss scaler) an overflowing step is the
    scaler's routine (it skips the update and lowers its scale), so the guard leaves it to the scaler:
    not counted, never a stop. A non-finite gradient is non-finite before and after unscaling alike
    (division by a finite scale), so the check needs no unscale of its own."""

    def __init__(self, trainer: "ORPOTrainer"):
        self.trainer = trainer
        self._hooked = None  # the plain torch optimizer of a DeepSpeed engine this guard hooked
        self._dropped_by_hook = False  # that hook dropped the current step's gradients

    def on_train_begin(self, args, state, control, **kwargs):
        engine = deepspeed_engine(self.trainer.accelerator)
        if engine is None:
            return
        optimizer = engine.optimizer
        if isinstance(optimizer, torch.optim.Optimizer) and optimizer is not self._hooked:
            # stage 0 without mixed precision: DeepSpeed steps the torch optimizer itself, unchecked
            optimizer.register_step_pre_hook(self._before_engine_step)
            self._hooked = optimizer
        elif getattr(optimizer, "check_grad_overflow", None) is False and getattr(optimizer, "compute_grad_norm", None) is False:
            logger.warning("DeepSpeed checks no gradients in this configuration (zero_optimization.compute_grad_norm "
                           "false, no overflow check): a non-finite step would be applied and --on_nonfinite cannot act")

    def _before_engine_step(self, optimizer, args, kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if nonfinite_gradients(params, self.trainer.accelerator):
            for p in params:
                p.grad = None
            self._dropped_by_hook = True

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        rows, trainer._step_rows = trainer._step_rows, []
        step = state.global_step + 1
        engine = deepspeed_engine(trainer.accelerator)
        if engine is not None:
            if not self._engine_skipped(engine, step, rows):
                return
        else:
            if not nonfinite_gradients(model.parameters(), trainer.accelerator):
                return
            if getattr(trainer.accelerator, "scaler", None) is not None:
                logger.info("step %d: fp16 gradient overflow; the GradScaler skips it", step)
                return
            for p in model.parameters():
                p.grad = None
        where = f"step {step}: non-finite loss or gradient; dataset rows {step_rows(rows, trainer.accelerator)}"
        if args.on_nonfinite == "stop":
            raise OrpoError(f"{where} (--on_nonfinite skip skips such steps)")
        if state.is_world_process_zero:  # every rank skips; one line for the job
            logger.warning("%s: optimizer step skipped", where)
        trainer.nonfinite_skipped += 1
        trainer.run_loss.skip_step()  # the step's loss is no part of the run's mean on any rank

    def _engine_skipped(self, engine, step: int, rows: list[int]) -> bool:
        """Whether the DeepSpeed engine's step that just ran skipped a non-finite update (not an fp16
        overflow, the loss scaler's routine); stops if it applied one."""
        if self._dropped_by_hook:
            self._dropped_by_hook = False
            return True
        if engine.was_step_applied():
            norm = engine.get_global_grad_norm()
            if norm is not None and not (math.isfinite(float(norm)) and float(norm) >= 0):
                raise OrpoError(
                    f"step {step}: non-finite gradient, and DeepSpeed applied it (its check is off: "
                    f"bf16.check_grad_overflow false, or a DeepSpeed release that applies such steps; 0.19.8 skips "
                    f"them); the weights are no longer finite; dataset rows {step_rows(rows, self.trainer.accelerator)}")
            return False
        if engine.fp16_enabled():
            logger.info("step %d: fp16 gradient overflow; DeepSpeed's loss scaler skips it", step)
            return False
        return True


def deepspeed_engine(accelerator):
    """The DeepSpeed engine accelerate prepared, or None when the run does not use DeepSpeed."""
    if getattr(accelerator, "distributed_type", None) != DistributedType.DEEPSPEED:
        return None
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is None:
        raise OrpoError(f"accelerate {accelerate.__version__} runs DeepSpeed without Accelerator.deepspeed_engine_wrapped; "
                        "orpo's non-finite guard (orpo/train/callbacks.py) reads the engine from it")
    return wrapped.engine


def nonfinite_gradients(parameters, accelerator) -> bool:
    """Whether any of `parameters`' gradients on any rank has a NaN or inf. Each rank checks what it holds
    (a DTensor's local shard), then one scalar is all-reduced, so every rank returns the same."""
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in parameters if p.grad is not None]
    bad = (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).float() if grads else torch.zeros(())
    if getattr(accelerator, "num_processes", 1) > 1:
        bad = accelerator.reduce(bad.to(accelerator.device), reduction="sum")
    return bool(bad > 0)


def step_rows(rows: list[int], accelerator) -> list[int]:
    """The dataset rows of a step on all ranks, sorted, each once (a collective where there are several)."""
    if getattr(accelerator, "num_processes", 1) > 1:
        rows = gather_object([rows])
        rows = [row for part in rows for row in part]
    return sorted(set(rows))


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


class SelectiveCheckpointing(TrainerCallback):
    """With `selective_checkpointing`, the layers the Trainer checkpoints keep their matmul and attention
    outputs (train/recompute.py). The Trainer enables checkpointing from `activation_checkpointing_kwargs`,
    which must stay JSON (it is saved with the config) and so cannot hold the policy's function: this enables
    it again, through the same public model method, with that function, before the first step."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not (args.activation_checkpointing and args.selective_checkpointing):
            return
        checkpoint_kwargs = dict(args.activation_checkpointing_kwargs or {})
        every_n_layers = checkpoint_kwargs.pop("every_n_layers", 1)
        offload = checkpoint_kwargs.pop("offload", False)
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=selective_checkpoint_kwargs(checkpoint_kwargs),
            every_n_layers=every_n_layers, offload=offload)
