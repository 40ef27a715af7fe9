"""`orpo eval`: per-pair ORPO scores of a model, by the fast path or the reference path.

The fast path (default) is the training path without gradients (orpo.ops.scoring.score_pairs):
prefix-shared packing, the chunked head at target positions only, batches bounded in tokens.
The reference path (`--reference`) shares no code with it on purpose: every sequence
(prompt+chosen, prompt+rejected) goes through a plain, unpacked transformers forward (with its images,
the model computing its own positions; an encoder-decoder model's as `model(input_ids=prompt, labels=completion)`)
and the log-probs come from the full logits in fp32. The tests
hold the fast path to the reference one.
Both give the records of orpo.ops.scoring (same fields, same summary).
"""
from __future__ import annotations

import logging

import torch

from orpo.data.render import TokenizedPair
from orpo.errors import OrpoError
from orpo.ops.forward import is_encoder_decoder
from orpo.ops.loss import log_odds_ratio
from orpo.ops.route import choose_route, image_probe_pairs
from orpo.ops.scoring import score_pairs
from orpo.ops.vision import concat_vision_inputs, reference_inputs, vision_model_inputs

logger = logging.getLogger(__name__)


@torch.no_grad()
def sequence_logps(model, sequences: list[list[int]], pad_token_id: int,
                   vision_inputs: list[dict | None] | None = None) -> list[torch.Tensor]:
    """For each token sequence, [len−1] fp32 log-probs of tokens 1.. given their prefix; `vision_inputs`:
    each sequence's image inputs (None: text), given to the model as its processor would batch them."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention_mask[row, : len(seq)] = 1
    device = next(model.parameters()).device
    images = vision_model_inputs(concat_vision_inputs(vision_inputs or []))
    extra = {key: value.to(device) for key, value in reference_inputs(model, input_ids, images).items()}
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **extra).logits
    out = []
    for row, seq in enumerate(sequences):
        logp = torch.log_softmax(logits[row, : len(seq) - 1].float(), dim=-1)
        out.append(logp.gather(1, input_ids[row, 1 : len(seq), None].to(logp.device)).squeeze(1).cpu())
    return out


@torch.no_grad()
def labelled_logps(model, prompts: list[list[int]], completions: list[list[int]], pad_token_id: int
                   ) -> list[torch.Tensor]:
    """An encoder-decoder model's [len] fp32 log-probs of each completion given its prompt, as the model computes
    them from `labels` (its own shift into the decoder's input): prompts and labels right-padded, padding labels
    -100 (ignored, as the model's loss ignores them)."""
    device = next(model.parameters()).device
    input_ids = torch.full((len(prompts), max(map(len, prompts))), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full((len(completions), max(map(len, completions))), -100, dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        input_ids[row, : len(prompt)] = torch.tensor(prompt)
        attention_mask[row, : len(prompt)] = 1
        labels[row, : len(completion)] = torch.tensor(completion)
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), labels=labels.to(device),
                   use_cache=False).logits
    logp = logits.float().log_softmax(-1)
    return [logp[row, : len(c)].gather(1, labels[row, : len(c), None].to(device)).squeeze(1).cpu()
            for row, c in enumerate(completions)]


def reference_records(
    model, pairs: list[TokenizedPair], pad_token_id: int, nll_scope: str = "full", batch_size: int = 4
) -> list[dict]:
    """One record per pair (orpo.ops.scoring's fields) from plain unpacked forwards, `batch_size`
    pairs (2 × batch_size padded sequences) per call."""
    was_training = model.training
    model.eval()
    records = []
    encoder_decoder = is_encoder_decoder(model)
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        if encoder_decoder:  # the decoder predicts the completions only: logps hold completion tokens
            logps = labelled_logps(model, [p.prompt_ids for p in batch for _ in range(2)],
                                   [c for p in batch for c in (p.chosen_ids, p.rejected_ids)], pad_token_id)
        else:
            sequences = [seq for p in batch for seq in (p.prompt_ids + p.chosen_ids, p.prompt_ids + p.rejected_ids)]
            logps = sequence_logps(model, sequences, pad_token_id, [p.vision_inputs for p in batch for _ in range(2)])
        for i, pair in enumerate(batch):
            p = len(pair.prompt_ids)
            chosen, rejected = logps[2 * i], logps[2 * i + 1]
            first = 0 if encoder_decoder else p - 1  # where the completion's log-probs start
            chosen_mean = chosen[first:].mean()
            rejected_mean = rejected[first:].mean()
            nll_tokens = chosen if nll_scope == "full" else chosen[first:]
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


def evaluate_model(
    model,
    pairs: list[TokenizedPair],
    pad_token_id: int,
    nll_scope: str = "full",
    reference: bool = False,
    batch_size: int = 4,
    packing: bool | None = None,
    attention: str | None = None,
    chunk_size: int = 1024,
    batch_tokens: int = 16384,
    bf16: bool = False,
) -> list[dict]:
    """Records of `pairs` under `model`: the reference path (`batch_size` pairs per call, in the
    model's dtype) or the fast path (`chunk_size`, `bf16` as in training; `batch_tokens` tokens per
    call) on the route `choose_route` picks (`packing`, `attention`: the config fields; None = orpo chooses)."""
    if reference:
        if bf16:
            raise OrpoError("--reference runs the model in its own dtype; --bf16 is for the fast path "
                            "(for a bf16 reference, --dtype bfloat16)")
        return reference_records(model, pairs, pad_token_id, nll_scope, batch_size)
    route = choose_route(model, packing, attention, image_probe_pairs(pairs))
    logger.info("route: %s", route.describe())
    return score_pairs(model, pairs, pad_token_id, nll_scope, route, chunk_size, batch_tokens, bf16)
