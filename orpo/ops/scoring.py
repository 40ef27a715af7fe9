"""Per-pair ORPO scores without gradients, on the training path, and their summary.

`score_pairs` is what `orpo eval` runs by default and what evaluation during training computes:
the same layout (packing.py), model call (forward.py) and output head (logprobs.py) as a training
step, under `torch.no_grad`, in batches of at most `batch_tokens` tokens (bounded memory however
many pairs). `pair_records` turns one batch's `PairLogps` into one record per pair, and
`summarize` turns records into the logged means, so `orpo eval`, evaluation during training and
the reference path (orpo.commands.evaluate) report the same quantities computed the same way.

Record fields: index (the pair's dataset row), prompt/chosen/rejected token counts,
chosen_logp_mean and rejected_logp_mean (ℓ, mean log-prob per completion token), log_odds
(loss.log_odds_ratio), nll_sum and nll_tokens (the NLL term's tokens under `nll_scope`).
"""
from __future__ import annotations

import math

import torch

from orpo.data.render import TokenizedPair
from orpo.ops.forward import PairLogps, batch_collator, batch_to, input_device, pair_logps
from orpo.ops.loss import log_odds_ratio
from orpo.ops.route import Route, choose_route


def token_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices of `lengths` in batches of at most `batch_tokens` tokens (a longer item gets a batch
    of its own), longest first so that similar lengths share a batch. Deterministic."""
    batches, current, used = [], [], 0
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if current and used + lengths[i] > batch_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    return batches + ([current] if current else [])


RECORD_FIELDS = ("index", "prompt_tokens", "chosen_tokens", "rejected_tokens", "chosen_logp_mean",
                 "rejected_logp_mean", "log_odds", "nll_sum", "nll_tokens")
_COUNTS = {"index", "prompt_tokens", "chosen_tokens", "rejected_tokens", "nll_tokens"}


def record_tensor(logps: PairLogps, pair_index: torch.Tensor, nll_scope: str) -> torch.Tensor:
    """[pairs, len(RECORD_FIELDS)] float32 on the batch's device: one row of record fields per pair (a
    tensor, so that ranks can gather it; float32 because the values are fp32 already, counts and row
    indices are exact below 2^24, and not every device has float64). `pair_index` [pairs]: dataset rows."""
    log_odds = log_odds_ratio(logps.logps_chosen, logps.logps_rejected)
    nll_sum = -logps.chosen_sum
    nll_tokens = logps.chosen_tokens
    if nll_scope == "full":
        nll_sum = nll_sum - logps.prompt_sum
        nll_tokens = nll_tokens + logps.prompt_targets
    columns = (pair_index, logps.prompt_targets + 1,  # every prompt token but the first is a target
               logps.chosen_tokens, logps.rejected_tokens, logps.logps_chosen, logps.logps_rejected,
               log_odds, nll_sum, nll_tokens)
    return torch.stack([c.detach().to(torch.float32) for c in columns], dim=1)


def records_from_tensor(rows: torch.Tensor) -> list[dict]:
    """The records of a `record_tensor` (counts back to int)."""
    return [{name: int(v) if name in _COUNTS else v for name, v in zip(RECORD_FIELDS, row)}
            for row in rows.cpu().tolist()]


def pair_records(logps: PairLogps, pair_index: torch.Tensor, nll_scope: str) -> list[dict]:
    """One record per pair of a batch (fields in the module docstring)."""
    return records_from_tensor(record_tensor(logps, pair_index, nll_scope))


@torch.no_grad()
def score_pairs(
    model: torch.nn.Module,
    pairs: list[TokenizedPair],
    pad_token_id: int,
    nll_scope: str = "full",
    route: Route | None = None,
    chunk_size: int = 1024,
    batch_tokens: int = 16384,
    bf16: bool = False,
) -> list[dict]:
    """Records of `pairs` (in their order) from the training path without gradients.

    route: the layout and head, as in training (route.py; None: `choose_route(model)`, which also sets
    the model up for it). batch_tokens bounds the tokens
    of one model call (a pair's shared length counts; padding of the "mask" and padded layouts
    comes on top). bf16: matmuls in bf16 under torch.autocast (weights stay as they are; the
    log-softmax and the odds ratio stay fp32), as training with `bf16=True` computes them. The model
    is put in eval mode for the call and restored after.
    """
    device = input_device(model)
    was_training = model.training
    model.eval()
    records: list[dict | None] = [None] * len(pairs)
    route = route if route is not None else choose_route(model)
    collate = batch_collator(model, pad_token_id, route.layout)
    try:
        for batch in token_batches([pair.shared_length for pair in pairs], batch_tokens):
            chunk = [pairs[i] for i in batch]
            inputs = batch_to(collate(chunk), device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logps = pair_logps(model, inputs, chunk_size, head=route.head)
            for i, record in zip(batch, pair_records(logps, inputs["pair_index"], nll_scope)):
                records[i] = record
    finally:
        model.train(was_training)
    return records


def summarize(records: list[dict], beta: float) -> dict:
    """Means over pairs (the NLL: a token mean) and the ORPO loss they give, in the metric names of
    training logs: accuracy (share of pairs with log_odds > 0), log_odds, logps/chosen,
    logps/rejected (ℓ), margin (ℓ_chosen − ℓ_rejected), nll, or_loss (−log σ(log_odds)),
    loss = nll + beta · or_loss (Eq. 6), pairs."""
    n = len(records)
    nll = sum(r["nll_sum"] for r in records) / max(sum(r["nll_tokens"] for r in records), 1)
    # −log σ(x) = softplus(−x), written to not overflow for very negative x
    or_loss = sum(max(-r["log_odds"], 0.0) + math.log1p(math.exp(-abs(r["log_odds"]))) for r in records) / n
    chosen = sum(r["chosen_logp_mean"] for r in records) / n
    rejected = sum(r["rejected_logp_mean"] for r in records) / n
    return {
        "pairs": n,
        "accuracy": sum(r["log_odds"] > 0 for r in records) / n,
        "log_odds": sum(r["log_odds"] for r in records) / n,
        "logps/chosen": chosen,
        "logps/rejected": rejected,
        "margin": chosen - rejected,
        "nll": nll,
        "or_loss": or_loss,
        "loss": nll + beta * or_loss,
    }
