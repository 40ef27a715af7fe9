"""Span attention: the prefix-shared layout's attention as per-pair SDPA calls, with no dense mask.

The dense route passes a boolean [rows, 1, T, T] mask (`packing.prefix_shared_mask`) to SDPA,
which then computes every query/key block of a row, also the ones the mask hides (the causal
upper half, the chosen/rejected cross blocks and, when a row holds several pairs, every block
between pairs), and costs T² bytes of mask. Span attention instead gets the layout as
`pair_spans` ([pairs, 5] = row, offset, prompt, chosen, rejected lengths; `packing`) and, for
each pair at offset o with lengths p, c, r, makes two SDPA calls:

    [prompt | chosen]  attends causally to itself                     (is_causal: no mask)
    rejected           attends to the prompt and causally to itself   (an r × (p + r) mask)

so the work is what the layout allows and a row can hold all pairs of a micro-batch without
padding. Padding positions get zeros (they predict nothing).

It is registered in transformers as the attention implementation `ATTENTION` (with SDPA's mask
function): without `pair_spans` in the call (generation, evaluation, the padded layout) it *is*
transformers' SDPA, so a model trained with it behaves as before everywhere else.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from orpo.errors import OrpoError

ATTENTION = "orpo_span_sdpa"


def span_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    pair_spans: list[list[int]] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function. query [rows, heads, T, d], key/value [rows, kv_heads, T, d]
    → ([rows, T, heads, d], None). `pair_spans`: rows of (row, offset, p, c, r), pairs of a row in
    offset order; `attention_mask` is then unused. Without it: transformers' SDPA."""
    if pair_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise OrpoError("span attention does not support attention logit soft-capping; use --packed_attention mask")
    window = kwargs.get("sliding_window")
    if window is not None and any(max(p + c, p + r) > window for _, _, p, c, r in pair_spans):
        raise OrpoError(
            f"a pair is longer than the model's sliding attention window ({window} tokens), which the "
            "prefix-shared layout does not apply; use --packing false"
        )
    rows, heads, width, head_dim = query.shape
    sdpa = dict(dropout_p=dropout, scale=scaling, enable_gqa=key.shape[1] != heads)
    pieces: list[list[torch.Tensor]] = [[] for _ in range(rows)]
    filled = [0] * rows
    for row, offset, p, c, r in pair_spans:
        q, k, v = (x[row : row + 1] for x in (query, key, value))
        shared = slice(offset, offset + p + c)  # prompt + chosen: plain causal attention
        pieces[row].append(F.scaled_dot_product_attention(q[:, :, shared], k[:, :, shared], v[:, :, shared], is_causal=True, **sdpa))
        start = offset + p + c  # rejected: keys = prompt + rejected, lower-right aligned causal mask
        k_rejected = torch.cat([k[:, :, offset : offset + p], k[:, :, start : start + r]], dim=2)
        v_rejected = torch.cat([v[:, :, offset : offset + p], v[:, :, start : start + r]], dim=2)
        mask = torch.ones(r, p + r, dtype=torch.bool, device=query.device).tril(diagonal=p)
        pieces[row].append(
            F.scaled_dot_product_attention(q[:, :, start : start + r], k_rejected, v_rejected, attn_mask=mask, **sdpa)
        )
        filled[row] = start + r
    for row in range(rows):
        if filled[row] < width:  # the row's padded tail
            pieces[row].append(query.new_zeros(1, heads, width - filled[row], head_dim))
    output = torch.cat([torch.cat(row_pieces, dim=2) for row_pieces in pieces], dim=0)
    return output.transpose(1, 2).contiguous(), None


def use_span_attention(model: torch.nn.Module) -> None:
    """Switch a transformers model from SDPA to span attention (identical without `pair_spans`)."""
    config = model.config
    current = config._attn_implementation
    if current == ATTENTION:
        return
    if current != "sdpa":
        raise OrpoError(
            f"packed_attention='spans' replaces SDPA attention, but the model uses {current!r}; "
            "load it with attn_implementation='sdpa' or use --packed_attention mask"
        )
    AttentionInterface.register(ATTENTION, span_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)
