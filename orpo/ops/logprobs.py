"""Per-token log-probs from hidden states, without materialising [tokens × vocab] logits.

Only the hidden states that predict a target token are passed in (the caller gathers them), and
the lm_head matmul + fp32 log-softmax run over chunks of those tokens. The autograd function
keeps only the inputs and the per-token log-sum-exp; backward recomputes each chunk's logits, so
peak memory is one chunk of logits, not the whole batch's. With `keep_probs` (where memory allows:
train/memory.py decides) the forward keeps each chunk's fp32 softmax instead ([N, V] in all), and
backward starts from it: no second head matmul and log-softmax, the same gradients (bit for bit in
the tests and in bf16; in fp32 at large sizes the GEMM's rounding can depend on where its buffers lie
in memory: ≤ 3e-5 apart on log-probs of a random 2,500 × 49,152 head).

    a_i    = h_i · Wᵀ + u_i · Bᵀ + bias     (u, B: an optional low-rank term, e.g. LoRA: u = s·A·drop(h);
                                             bias: the head's optional bias, [V])
    z_i    = c · tanh(k · a_i / c)          with a softcap c (Gemma 2/3), else z_i = k · a_i (k: `scale`)
    logp_i = z_i[y_i] − logsumexp_v(z_i[v])
    ∂logp_i/∂z_i[v] = 1[v = y_i] − softmax_v(z_i)
    ∂z_i/∂a_i      = k · (1 − tanh²(k · a_i / c))   (= k without a softcap)

Precision is an explicit argument, not autocast's choice: the logits and the hidden-state
gradient are computed in `compute_dtype` (forward and backward alike, autocast switched off
inside); the weight and bias gradients accumulate in fp32 and are rounded once; the bias (rounded to
`compute_dtype`, as the model's own Linear would) is added, and the scale, softcap and log-softmax
applied, in fp32. `autocast_dtype` gives the dtype an enclosing `torch.autocast` region
asks for, so a caller under autocast gets bf16 matmuls in both directions.
"""
from __future__ import annotations

import torch

DEFAULT_CHUNK_SIZE = 1024


def _chunk_logits(h, weight, u, b, bias=None) -> torch.Tensor:
    """fp32 [chunk, V] logits a of one chunk: h·Wᵀ (+ u·Bᵀ) (+ bias), matmuls in the dtype of `weight`."""
    logits = (h.to(weight.dtype) @ weight.T).float()
    if u is not None:
        logits += (u.to(b.dtype) @ b.T).float()
    if bias is not None:
        logits += bias.float()
    return logits


def _post_head(logits: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """z = softcap · tanh(scale · a / softcap) (or scale · a), in place on the fp32 logits a."""
    if scale != 1.0:
        logits.mul_(scale)
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def _post_head_with_derivative(logits: torch.Tensor, scale: float, softcap: float | None):
    """(z, ∂z/∂a) of `_post_head` from the fp32 logits a (overwritten); ∂z/∂a is a float without a softcap."""
    if softcap is None:
        return logits.mul_(scale), scale
    t = _post_head(logits, scale, None).div_(softcap).tanh_()  # the forward's operations, in its order
    z = t * softcap
    return z, t.square_().neg_().add_(1.0).mul_(scale)  # scale · (1 − tanh²): reuses t's memory


def autocast_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The dtype an enclosing torch.autocast region on `device` computes matmuls in, else `default`."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return default


class _ChunkedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, low_rank_in, low_rank_out, compute_dtype, bias, scale,
                softcap, keep_probs):
        with torch.autocast(hidden.device.type, enabled=False):
            return _ChunkedTokenLogprobs._forward(
                ctx, hidden, weight, targets, chunk_size, low_rank_in, low_rank_out, compute_dtype, bias, scale, softcap,
                keep_probs,
            )

    @staticmethod
    def _forward(ctx, hidden, weight, targets, chunk_size, low_rank_in, low_rank_out, compute_dtype, bias, scale,
                 softcap, keep_probs):
        w = weight.to(compute_dtype)
        b = low_rank_out.to(compute_dtype) if low_rank_out is not None else None
        c = bias.to(compute_dtype) if bias is not None else None  # rounded as the model's own Linear would
        transformed = scale != 1.0 or softcap is not None
        # the softmax is kept only where backward needs nothing else from the logits (no softcap derivative)
        keep = keep_probs and softcap is None and any(ctx.needs_input_grad)
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logps)
        probs = []
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            u = low_rank_in[start:end] if low_rank_in is not None else None
            logits = _chunk_logits(hidden[start:end], w, u, b, c)
            if transformed:
                logits = _post_head(logits, scale, softcap)
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            logps[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1) - lse[start:end]
            if keep:  # what backward would compute from the same logits: exp(z − lse), in place
                probs.append(logits.sub_(lse[start:end, None]).exp_())
        ctx.save_for_backward(hidden, weight, targets, lse, low_rank_in, low_rank_out, bias)
        ctx.chunk_size, ctx.compute_dtype, ctx.scale, ctx.softcap = chunk_size, compute_dtype, scale, softcap
        ctx.probs = probs if keep else None
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        with torch.autocast(grad_logps.device.type, enabled=False):
            return _ChunkedTokenLogprobs._backward(ctx, grad_logps)

    @staticmethod
    def _backward(ctx, grad_logps):
        hidden, weight, targets, lse, u_all, b_in, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_hidden = torch.empty_like(hidden) if need[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need[1] else None
        grad_u = torch.empty_like(u_all) if u_all is not None and need[4] else None
        grad_b = torch.zeros(b_in.shape, dtype=torch.float32, device=b_in.device) if b_in is not None and need[5] else None
        need_bias = bias is not None and need[7]
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        w = weight.to(ctx.compute_dtype)
        b = b_in.to(ctx.compute_dtype) if b_in is not None else None
        c = bias.to(ctx.compute_dtype) if bias is not None else None
        transformed = ctx.scale != 1.0 or ctx.softcap is not None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            h = hidden[start:end]
            u = u_all[start:end] if u_all is not None else None
            g = grad_logps[start:end].float()
            dz_da = None
            kept = ctx.probs[start // ctx.chunk_size] if ctx.probs else None
            if kept is not None:  # the forward's softmax (kept only without a softcap: dz/da is the scale)
                probs, dz_da = kept, (ctx.scale if transformed else None)
                ctx.probs[start // ctx.chunk_size] = None  # freed as backward goes (a second backward recomputes)
            elif transformed:
                logits = _chunk_logits(h, w, u, b, c)
                z, dz_da = _post_head_with_derivative(logits, ctx.scale, ctx.softcap)
                probs = z.sub_(lse[start:end, None]).exp_()
            else:
                logits = _chunk_logits(h, w, u, b, c)
                probs = logits.sub_(lse[start:end, None]).exp_()  # in place: no second [chunk, V] buffer
            grad_logits = probs.mul_(-g[:, None])
            grad_logits.scatter_add_(1, targets[start:end, None], g[:, None])
            if dz_da is not None:
                grad_logits.mul_(dz_da)  # ∂/∂z → ∂/∂a
            grad_logits_c = grad_logits.to(w.dtype)  # the matmuls' operand (no copy in fp32)
            if grad_hidden is not None:
                grad_hidden[start:end] = (grad_logits_c @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, h.float())  # fp32: one rounding of the sum, at the end
            if grad_u is not None:
                grad_u[start:end] = (grad_logits_c @ b).to(u.dtype)
            if grad_b is not None:
                grad_b.addmm_(grad_logits.T, u.float())
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(b_in.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        ctx.probs = None
        return grad_hidden, grad_weight, None, None, grad_u, grad_b, None, grad_bias, None, None, None


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    low_rank_in: torch.Tensor | None = None,
    low_rank_out: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
    keep_probs: bool = False,
) -> torch.Tensor:
    """log p(targets | hidden) under the output head `weight` (plus a low-rank term and a bias), in fp32.

    hidden: [N, H] hidden states at the positions that predict a target (model dtype).
    weight: [V, H] lm_head weight (tied embeddings work: gradients flow to the shared tensor).
    targets: [N] int64 token ids.
    low_rank_in: [N, R] and low_rank_out: [V, R], both or neither: logits gain low_rank_in · low_rank_outᵀ
      (a LoRA adapter on the head: low_rank_in = scaling · dropout(hidden) · Aᵀ, low_rank_out = B).
    compute_dtype: the matmuls' dtype (default: `weight`'s); the log-softmax is fp32 regardless.
    bias: [V] the head's bias, added to the logits (gets its gradient).
    scale, softcap: the logits a become z = softcap · tanh(scale · a / softcap), or z = scale · a when
      softcap is None (Cohere's logit_scale, Granite's 1 / logits_scaling, Gemma's final softcap).
    keep_probs: keep the fp32 softmax of every chunk ([N, V] · 4 bytes) from the forward for backward,
      instead of recomputing the logits there (same gradients; ignored without gradients or with a softcap).
    Returns [N] float32 log-probs. No gradient is computed for an input that does not require one.
    """
    if (low_rank_in is None) != (low_rank_out is None):
        raise ValueError("low_rank_in and low_rank_out go together")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    dtype = compute_dtype or weight.dtype
    return _ChunkedTokenLogprobs.apply(hidden, weight, targets, chunk_size, low_rank_in, low_rank_out, dtype, bias,
                                       float(scale), None if softcap is None else float(softcap),
                                       keep_probs and torch.is_grad_enabled())  # (forward runs without grad mode)
