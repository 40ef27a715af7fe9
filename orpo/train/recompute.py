"""Selective activation checkpointing: the layers recomputed in backward keep their matmul and attention outputs.

Full activation checkpointing keeps only a layer's input and runs the whole layer's forward again in
backward: every matmul twice. Selective checkpointing (torch's `create_selective_checkpoint_contexts`)
decides op by op instead: the outputs of the ops in `KEPT_OPS` (the linear layers' matmuls, the fused
attention kernels, MoE's grouped matmul) are kept from the forward, and backward recomputes only the
rest (norms, activation functions, rotary embeddings, residual adds, autocast's casts), which is cheap
to compute but as large to keep. A Llama-shaped layer then keeps about half its activations
(train/memory.py, `layer_activation_bytes(selective=True)`) and its recompute skips every matmul.

Attention scores of an eager (unfused) attention come from `bmm`, which is not kept: they are a
`T x T` tensor per head, the largest thing such a layer makes, and cheaper to recompute than to hold.
The gradients are those of no recompute: kept outputs are the forward's own, recomputed ones are the
same ops on the same inputs (tests/train/test_recompute.py).
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts


def _aten_ops(*names: str) -> frozenset:
    """The default overloads of the aten ops `names` that this torch build has (some are CUDA-only)."""
    return frozenset(getattr(torch.ops.aten, name).default for name in names if hasattr(torch.ops.aten, name))


KEPT_OPS = _aten_ops(
    "mm", "addmm", "_grouped_mm",  # linear layers (nn.Linear dispatches to these) and MoE experts
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_flash_attention_forward", "_efficient_attention_forward",  # fused attention (SDPA, flash varlen)
)


def keep_matmul_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """The policy (create_selective_checkpoint_contexts): keep the outputs of `KEPT_OPS`, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint_kwargs(checkpoint_kwargs: dict | None = None) -> dict:
    """`torch.utils.checkpoint.checkpoint` keyword arguments for selective recompute: `checkpoint_kwargs`
    (the user's activation_checkpointing_kwargs without transformers' own keys) with the policy's
    context and the non-reentrant checkpoint it needs."""
    return {**(checkpoint_kwargs or {}), "use_reentrant": False,
            "context_fn": functools.partial(create_selective_checkpoint_contexts, keep_matmul_outputs)}
