"""TokenizedPairs → row tensors for one model call, plus the index of every training target.

The layout decides which rows and positions hold which tokens; everything downstream only sees
the *target spec*: for each target token, its id, the flat index (row·T + position) of the
hidden state that predicts it, its pair and its kind (prompt / chosen / rejected). Changing the
layout (padded rows today, prefix-shared [prompt | chosen | rejected] rows next) does not touch
the head, the loss or the trainer.

Padded layout: pair i gives row 2i = prompt+chosen and row 2i+1 = prompt+rejected, right-padded.
Prompt targets (prompt tokens 1..p−1, for nll_scope="full") come from the chosen row only.
"""
from __future__ import annotations

import torch

from .render import TokenizedPair

PROMPT, CHOSEN, REJECTED = 0, 1, 2
KINDS = 3


def collate_padded(pairs: list[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Build a padded batch.

    Returns a dict of tensors:
      input_ids, attention_mask, position_ids: [2·B, T] (T = longest prompt+completion)
      target_ids, target_source, target_pair, target_kind: [N] (int64), one entry per target token
      num_pairs: [] (B)
    """
    sequences, ids, source, pair_of, kind_of = [], [], [], [], []
    width = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    for i, pair in enumerate(pairs):
        p = len(pair.prompt_ids)
        for kind, completion in ((CHOSEN, pair.chosen_ids), (REJECTED, pair.rejected_ids)):
            row = len(sequences)
            sequences.append(pair.prompt_ids + completion)
            # token t of the sequence is predicted by the hidden state at t − 1
            first = 1 if kind == CHOSEN else p  # prompt targets are taken once, from the chosen row
            for t in range(first, p + len(completion)):
                ids.append(sequences[-1][t])
                source.append(row * width + t - 1)
                pair_of.append(i)
                kind_of.append(PROMPT if t < p else kind)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for r, seq in enumerate(sequences):
        input_ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[r, : len(seq)] = 1
    position_ids = torch.arange(width).expand(len(sequences), width).clone()
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "target_ids": torch.tensor(ids, dtype=torch.long),
        "target_source": torch.tensor(source, dtype=torch.long),
        "target_pair": torch.tensor(pair_of, dtype=torch.long),
        "target_kind": torch.tensor(kind_of, dtype=torch.long),
        "num_pairs": torch.tensor(len(pairs)),
    }


def segment_sums(
    token_logps: torch.Tensor, target_pair: torch.Tensor, target_kind: torch.Tensor, num_pairs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum per-token log-probs per (kind, pair).

    token_logps: [N] fp32; target_pair, target_kind: [N].
    Returns (sums [KINDS, B] fp32, counts [KINDS, B] int64), rows indexed by PROMPT/CHOSEN/REJECTED.
    """
    segment = target_kind * num_pairs + target_pair
    sums = token_logps.new_zeros(KINDS * num_pairs).index_add(0, segment, token_logps)
    counts = torch.bincount(segment, minlength=KINDS * num_pairs)
    return sums.view(KINDS, num_pairs), counts.view(KINDS, num_pairs)


def nll_token_count(target_kind: torch.Tensor, nll_scope: str) -> torch.Tensor:
    """Number of NLL targets: chosen tokens, plus prompt tokens when nll_scope == "full"."""
    in_scope = target_kind == CHOSEN
    if nll_scope == "full":
        in_scope |= target_kind == PROMPT
    return in_scope.sum()
