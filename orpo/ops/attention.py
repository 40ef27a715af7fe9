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

Sliding-window layers (Mistral v0.1, Gemma 2/3, Qwen2 with use_sliding_window) keep their window:
transformers passes each layer's `sliding_window` w, and a query at pair position i then sees keys
at positions j with i − w < j ≤ i, as in transformers' own sliding mask; a part longer than w gets
that band as its mask.

It is registered in transformers as the attention implementation `ATTENTION` (with SDPA's mask
function): without `pair_spans` in the call (generation, evaluation, the padded layout) it *is*
transformers' SDPA, so a model trained with it behaves as before everywhere else.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
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
    offset order, each starting where the previous ends (the first at 0); `attention_mask` is then
    unused. Without it: transformers' SDPA."""
    if pair_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise OrpoError("span attention does not support attention logit soft-capping; use --packed_attention mask")
    window = kwargs.get("sliding_window")
    rows, heads, width, head_dim = query.shape
    groups = heads // key.shape[1]
    by_row: list[list[list[int]]] = [[] for _ in range(rows)]
    for span in pair_spans:
        by_row[span[0]].append(span)
    pieces: list[list[torch.Tensor]] = [[] for _ in range(rows)]
    with sdpa_kernel(FUSED_FIRST) if query.is_cuda else nullcontext():  # FUSED_FIRST: read at call time
        for row, (q_row, k_row, v_row) in enumerate(zip(query.split(1), key.split(1), value.split(1))):
            # One split per tensor and row into [prompt | chosen | rejected] per pair and the padded tail:
            # the backward of a split is one concatenation, where a slice per part would fill a row-wide
            # zero gradient per part and add them up.
            sizes = [n for _, _, p, c, r in by_row[row] for n in (p + c, r)]
            if [span[1] for span in by_row[row]] != [sum(sizes[: 2 * i]) for i in range(len(by_row[row]))]:
                raise OrpoError(f"span attention: the pairs of row {row} must follow each other from position 0 "
                                f"(packing.collate_prefix_shared's layout), got {by_row[row]}")
            tail = width - sum(sizes)
            q_parts, k_parts, v_parts = (x.split(sizes + [tail], dim=2) for x in (q_row, k_row, v_row))
            for i, (_, _, p, c, r) in enumerate(by_row[row]):
                q_shared, q_rejected = q_parts[2 * i], q_parts[2 * i + 1]
                k_shared, k_rejected = k_parts[2 * i], k_parts[2 * i + 1]
                v_shared, v_rejected = v_parts[2 * i], v_parts[2 * i + 1]
                # prompt + chosen: causal (within the window, if any)
                band = None if window is None or p + c <= window else causal_mask(0, p + c, p + c, window, query.device)
                pieces[row].append(_sdpa(q_shared, k_shared, v_shared, band, groups, dropout, scaling))
                # rejected (positions p..p+r−1): keys = prompt + rejected (positions 0..p+r−1)
                k_prompt, v_prompt = k_shared[:, :, :p], v_shared[:, :, :p]
                mask = causal_mask(p, r, p + r, window, query.device)
                pieces[row].append(_sdpa(q_rejected, torch.cat([k_prompt, k_rejected], dim=2),
                                    torch.cat([v_prompt, v_rejected], dim=2), mask, groups, dropout, scaling))
            if tail:  # the row's padded tail
                pieces[row].append(query.new_zeros(1, heads, tail, head_dim))
    output = torch.cat([torch.cat(row_pieces, dim=2) for row_pieces in pieces], dim=0)
    return output.transpose(1, 2).contiguous(), None


# cuDNN attention (preferred by SDPA for bf16/fp16 on recent GPUs) builds an execution plan per
# distinct shape, and every pair has its own lengths: 34x slower scoring, measured on an H200
# (benchmarks/gpu_smoke.py).
FUSED_FIRST = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(q, k, v, mask, groups, dropout, scaling):
    """One SDPA call; mask None = causal. Grouped key/value heads are shared through enable_gqa, except
    for a masked call on CUDA: the memory-efficient kernel takes a mask but not enable_gqa, so there
    they are repeated, and no call falls back to the math kernel."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling,
                                              enable_gqa=groups > 1)
    if groups > 1 and q.is_cuda:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                          enable_gqa=groups > 1 and not q.is_cuda)


def causal_mask(first: int, queries: int, keys: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[queries, keys] bool, True = may attend: queries at positions first.., keys at 0..keys−1;
    key j is seen by query i if j ≤ i and, with a sliding `window`, i − j < window."""
    q = torch.arange(first, first + queries, device=device)[:, None]
    k = torch.arange(keys, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= q - k < window
    return allowed


def sliding_window(config) -> int | None:
    """The sliding attention window some layer of a transformers model uses, or None if every layer
    attends globally (Qwen2 configs carry a window that only use_sliding_window turns on)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return window


def use_span_attention(model: torch.nn.Module) -> None:
    """Switch a transformers model's language model from SDPA to span attention (identical without
    `pair_spans`). A vision-language model's vision tower keeps SDPA: the model passes its call's
    keyword arguments, `pair_spans` included, to the vision tower too, whose tokens are patches."""
    config = model.config.get_text_config()
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
    text_only = config is model.config
    model.set_attn_implementation(ATTENTION if text_only else {"text_config": ATTENTION})
