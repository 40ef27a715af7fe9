"""ORPO metrics of a model on preference pairs, without training: the reference path.

Every sequence (prompt+chosen, prompt+rejected) goes through a plain, unpacked transformers
forward; log-probs come from the full logits in fp32. Nothing here shares code with the fast
training path (packing / chunked head) on purpose: `orpo eval` is what the fast path must agree
with.
"""
from __future__ import annotations

import math

import torch

from orpo.ops.loss import log_odds_ratio
from orpo.data.render import TokenizedPair


@torch.no_grad()
def sequence_logps(model, sequences: list[list[int]], pad_token_id: int) -> list[torch.Tensor]:
    """For each token sequence, [len−1] fp32 log-probs of tokens 1.. given their prefix."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention_mask[row, : len(seq)] = 1
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    out = []
    for row, seq in enumerate(sequences):
        logp = torch.log_softmax(logits[row, : len(seq) - 1].float(), dim=-1)
        out.append(logp.gather(1, input_ids[row, 1 : len(seq), None].to(device)).squeeze(1).cpu())
    return out


def evaluate_pairs(
    model, pairs: list[TokenizedPair], pad_token_id: int, nll_scope: str = "full", batch_size: int = 4
) -> list[dict]:
    """One record per pair: index, token counts, mean completion log-probs, log_odds, nll_sum."""
    was_training = model.training
    model.eval()
    records = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        sequences = [seq for p in batch for seq in (p.prompt_ids + p.chosen_ids, p.prompt_ids + p.rejected_ids)]
        logps = sequence_logps(model, sequences, pad_token_id)
        for i, pair in enumerate(batch):
            p = len(pair.prompt_ids)
            chosen, rejected = logps[2 * i], logps[2 * i + 1]
            chosen_mean = chosen[p - 1 :].mean()
            rejected_mean = rejected[p - 1 :].mean()
            nll_tokens = chosen if nll_scope == "full" else chosen[p - 1 :]
            records.append(
                {
                    "index": pair.index,
                    "prompt_tokens": p,
                    "chosen_tokens": len(pair.chosen_ids),
                    "rejected_tokens": len(pair.rejected_ids),
                    "chosen_logp_mean": chosen_mean.item(),
                    "rejected_logp_mean": rejected_mean.item(),
                    "log_odds": log_odds_ratio(chosen_mean[None], rejected_mean[None]).item(),
                    "nll_sum": -nll_tokens.sum().item(),
                    "nll_tokens": len(nll_tokens),
                }
            )
    model.train(was_training)
    return records


def summarize(records: list[dict], beta: float) -> dict:
    """Means over pairs (NLL: token mean), and the ORPO loss they give."""
    n = len(records)
    nll = sum(r["nll_sum"] for r in records) / sum(r["nll_tokens"] for r in records)
    # −log σ(x) = softplus(−x), written to not overflow for very negative x
    or_loss = sum(max(-r["log_odds"], 0.0) + math.log1p(math.exp(-abs(r["log_odds"]))) for r in records) / n
    return {
        "pairs": n,
        "accuracy": sum(r["log_odds"] > 0 for r in records) / n,
        "log_odds": sum(r["log_odds"] for r in records) / n,
        "logps/chosen": sum(r["chosen_logp_mean"] for r in records) / n,
        "logps/rejected": sum(r["rejected_logp_mean"] for r in records) / n,
        "nll": nll,
        "or_loss": or_loss,
        "loss": nll + beta * or_loss,
    }
