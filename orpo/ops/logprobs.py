"""Per-token log-probs from hidden states, without materialising [tokens × vocab] logits.

Only the hidden states that predict a target token are passed in (the caller gathers them), and
the lm_head matmul + fp32 log-softmax run over chunks of those tokens. The autograd function
keeps only the inputs and the per-token log-sum-exp; backward recomputes each chunk's logits, so
peak memory is one chunk of logits, not the whole batch's.

    logp_i = h_i · W[y_i] − logsumexp_v(h_i · W[v])
    ∂logp_i/∂(h_i·W[v]) = 1[v = y_i] − softmax_v
"""
from __future__ import annotations

import torch

DEFAULT_CHUNK_SIZE = 1024


class _ChunkedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logps)
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logits = (hidden[start:end] @ weight.T).float()
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            logps[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1) - lse[start:end]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size = chunk_size
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            h = hidden[start:end]
            g = grad_logps[start:end].float()
            probs = torch.exp((h @ weight.T).float() - lse[start:end, None])
            grad_logits = probs.mul_(-g[:, None])
            grad_logits.scatter_add_(1, targets[start:end, None], g[:, None])
            if need_hidden:
                grad_hidden[start:end] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight.addmm_(grad_logits.T, h.float())
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """log p(targets | hidden) under the output head `weight`, in fp32.

    hidden: [N, H] hidden states at the positions that predict a target (model dtype).
    weight: [V, H] lm_head weight (tied embeddings work: gradients flow to the shared tensor).
    targets: [N] int64 token ids.
    Returns [N] float32 log-probs. No weight gradient is computed when `weight` is frozen.
    """
    return _ChunkedTokenLogprobs.apply(hidden, weight, targets, chunk_size)
