"""Trainer callbacks and metric bookkeeping: exact metric means, metrics.jsonl, the report at the
end of training, and the guard against non-finite steps."""
from __future__ import annotations

import json
import logging
import os
import time

import torch
from transformers import TrainerCallback

from orpo.errors import OrpoError
from orpo.train.recompute import selective_checkpoint_kwargs
from orpo.train.report import METRICS_FILE, write_report

logger = logging.getLogger(__name__)


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
        device = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        dtype = torch.float32 if device.type == "mps" else torch.float64
        row = torch.stack([torch.as_tensor(values[key], device=device).detach().to(dtype) for key in self.KEYS])
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
        """Means of the totals after `reduce` (e.g. a sum over ranks); {} if nothing was added."""
        if self.totals is None:
            return {}
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
            # MoE load balancing (moe.py): token-weighted mean over the micro-batches, unscaled by its coef
            **({"aux_loss": t["router_aux_sum"] / t["router_tokens"]} if t["router_tokens"] else {}),
        }


class RunLoss:
    """The mean step loss of the steps one train() call applied: `first_step` and `skipped_before` are the run's
    global step and skipped (non-finite) steps when the call began; each rank adds its share of each step's loss
    (the ranks' shares sum to it), a non-finite step adds nothing."""

    def __init__(self, first_step: int = 0, skipped_before: int = 0):
        self.first_step, self.skipped_before = first_step, skipped_before
        self.total = torch.zeros(())

    def add(self, loss: torch.Tensor) -> None:
        share = torch.where(torch.isfinite(loss), loss.detach().float(), 0.0)
        self.total = self.total.to(share.device) + share

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
    """Before each optimizer step: if the (clipped, all-reduced) gradient has a NaN or inf, skip
    the update or stop, per `on_nonfinite`, naming the step and the dataset rows of its pairs.
    Skipping drops every gradient, so the optimizer leaves the weights and its state untouched.

    Under fp16 with a GradScaler, an overflowing step is the scaler's routine (it skips the update
    and lowers its scale), so the guard leaves it to the scaler: not counted, never a stop. A
    non-finite gradient is non-finite before and after unscaling alike (division by a finite
    scale), so the check needs no unscale of its own."""

    def __init__(self, trainer: "ORPOTrainer"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer
        rows, trainer._step_rows = trainer._step_rows, []
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads or torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            return
        if getattr(trainer.accelerator, "scaler", None) is not None:
            logger.info("step %d: fp16 gradient overflow; the GradScaler skips it", state.global_step + 1)
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
