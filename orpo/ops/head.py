"""The output head at target positions only, computed as the head module's own call.

Reading `lm_head.weight` outside the head's call is wrong wherever an engine shards the weights:
FSDP2 with the head in a unit of its own (reshard after forward) and DeepSpeed ZeRO-3 hold only
this rank's shard there between calls, and gather the full weight only while the module runs (for
its forward, and again for its backward). So `chunked_head` swaps the head module's `forward`, for
one model call, for the chunked log-prob computation (`logprobs.token_logprobs`): the model calls
its head as always (with `logits_to_keep=0`: hidden states of every position), every engine hook
on the module runs (gather before, reshard after, the gradient reduce in backward), and the head
returns [N] target log-probs in place of [rows, T, vocab] logits, which are never kept.

A peft LoRA adapter on the head (`lora.Linear`) is part of the same computation: for each active
adapter a, the logits gain s_a · B_a · A_a · dropout_a(h), passed as the low-rank term of
`token_logprobs` (u = concat_a s_a · A_a · dropout_a(h), B = concat_a B_a), so the adapter trains.
The peft members read here (`get_base_layer`, `lora_A`, `lora_B`, `scaling`, `lora_dropout`,
`active_adapters`, `merged`, `disable_adapters`, `lora_variant`; `ModulesToSaveWrapper`'s
`modules_to_save` and `original_module`) are checked by tests/ops/test_head.py.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from orpo.errors import OrpoError
from orpo.ops.logprobs import autocast_dtype, token_logprobs


@contextmanager
def chunked_head(head: torch.nn.Module, target_source: torch.Tensor, targets: torch.Tensor, chunk_size: int):
    """While active, calling `head` (the model's `get_output_embeddings()`, possibly wrapped by peft
    or sharded by FSDP2/ZeRO-3) with hidden states [rows, T, H] returns the [N] fp32 log-probs of
    `targets` [N] predicted at the flat positions `target_source` [N] (indices into rows·T)."""

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_source)
        return _chunked_forward(head, selected, targets, chunk_size)

    head.forward = forward  # an instance attribute: nn.Module.__call__ runs it between the hooks
    try:
        yield
    finally:
        del head.forward  # the class's forward again


def _chunked_forward(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int):
    linear, adapters = _head_parts(head)
    weight = linear.weight
    if _is_shard(weight):
        raise OrpoError(
            f"the output head's weight is not gathered while its module runs ({type(weight).__name__} of shape "
            f"{tuple(weight.shape)}); shard lm_head as one unit (FSDP2: fully_shard(lm_head), or leave it in the root)"
        )
    dtype = autocast_dtype(hidden.device, weight.dtype)
    if not adapters:
        return token_logprobs(hidden, weight, targets, chunk_size, compute_dtype=dtype)
    low_rank_in = torch.cat([scaling * (dropout(hidden).to(a.dtype) @ a.T) for a, _, scaling, dropout in adapters], 1)
    low_rank_out = torch.cat([b for _, b, _, _ in adapters], 1)
    return token_logprobs(hidden, weight, targets, chunk_size, low_rank_in, low_rank_out, compute_dtype=dtype)


def _is_shard(weight: torch.Tensor) -> bool:
    """True for a weight that is only this rank's part: ZeRO-3 leaves an empty tensor, FSDP2 a DTensor."""
    if weight.numel() == 0:
        return True
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        return isinstance(weight, DTensor)
    return False


def _head_parts(head: torch.nn.Module):
    """(the bias-free Linear whose weight maps hidden → vocab, [(A [r, H], B [V, r], scaling, dropout)]
    of the active LoRA adapters) of a plain, peft-LoRA or peft modules_to_save head."""
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):  # peft ModulesToSaveWrapper
        active = head.active_adapters
        return (head.modules_to_save[active[0]] if active and not head.disable_adapters else head.original_module), []
    if not hasattr(head, "lora_A"):
        return head, []
    base = head.get_base_layer()
    if head.disable_adapters or head.merged:  # merged: the adapter is inside the base weight
        return base, []
    adapters = []
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        if name in getattr(head, "lora_variant", {}):
            raise OrpoError(f"LoRA variant {type(head.lora_variant[name]).__name__} (e.g. DoRA) on the output head "
                            "is not supported; leave lm_head out of the target modules")
        if head.lora_B[name].bias is not None:
            raise OrpoError("LoRA with a bias on the output head is not supported (lora_bias=False)")
        adapters.append((head.lora_A[name].weight, head.lora_B[name].weight, head.scaling[name], head.lora_dropout[name]))
    return base, adapters
