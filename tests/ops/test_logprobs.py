"""logprobs.py: the chunked lm_head + fp32 log-softmax against the naive full-logits computation.

Naive reference: logp = log_softmax((h @ W.T).float(), -1).gather(targets), which materialises
[N × V] logits and keeps them for backward. The chunked function must give the same values and the
same gradients for hidden AND weight, for every chunk size, while saving no [N × V] tensor.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from orpo.ops.logprobs import token_logprobs

N, H, V = 7, 16, 40  # V ≠ H so a [.., V] tensor is never confused with a [.., H] one


def naive(hidden, weight, targets):
    return torch.log_softmax((hidden @ weight.T).float(), -1).gather(1, targets[:, None]).squeeze(1)


def exact(hidden, weight, targets):
    """float64 throughout (call with float64 inputs)."""
    return torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).squeeze(1)


def make(dtype, n=N, h=H, v=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.5  # logits of O(1–3): a non-flat softmax
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g)  # a random upstream gradient, not just .sum()
    return hidden.to(dtype), weight.to(dtype), targets, upstream


def run(fn, hidden, weight, targets, upstream, **kw):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = fn(h, w, targets, **kw)
    (out * upstream).sum().backward()
    return out, h.grad, w.grad


@pytest.mark.parametrize("chunk_size", [1, 3, N, N + 5])
def test_fp32_matches_naive_value_and_gradients(chunk_size):
    hidden, weight, targets, up = make(torch.float32)
    out, gh, gw = run(token_logprobs, hidden, weight, targets, up, chunk_size=chunk_size)
    ref, rh, rw = run(naive, hidden, weight, targets, up)
    assert out.dtype == torch.float32 and out.shape == (N,)
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(gh, rh, rtol=0, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=0, atol=1e-5)
    assert (out < 0).all() and out.min() < -1.0  # a non-trivial distribution


@pytest.mark.parametrize("chunk_size", [1, 3, N, N + 5])
def test_bf16_matches_naive_value_and_gradients(chunk_size):
    """bf16 hidden/weight: logits are rounded to bf16 by the matmul in both paths, so values agree
    tightly; gradients are bf16 (8 significant bits): |Δ| within ~1 bf16 ulp of the largest entry.
    Both paths are also compared with a float64 computation from the same bf16 inputs."""
    hidden, weight, targets, up = make(torch.bfloat16)
    out, gh, gw = run(token_logprobs, hidden, weight, targets, up, chunk_size=chunk_size)
    ref, rh, rw = run(naive, hidden, weight, targets, up)
    ex, eh, ew = run(exact, hidden.double(), weight.double(), targets, up.double())
    assert out.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(gh.float(), rh.float(), rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(gw.float(), rw.float(), rtol=1.6e-2, atol=2e-2)
    # against exact arithmetic on the same inputs: the value error is the bf16 rounding of the logits
    torch.testing.assert_close(out.double(), ex, rtol=0, atol=5e-2)
    torch.testing.assert_close(gh.double(), eh, rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(gw.double(), ew, rtol=1.6e-2, atol=2e-2)


def test_bf16_weight_grad_is_accumulated_in_fp32():
    """With many tokens, the chunked weight gradient (fp32 accumulation, one rounding at the end) is
    at least as close to exact arithmetic as the naive bf16 matmul backward."""
    hidden, weight, targets, up = make(torch.bfloat16, n=257, seed=3)
    _, _, gw = run(token_logprobs, hidden, weight, targets, up, chunk_size=16)
    _, _, rw = run(naive, hidden, weight, targets, up)
    _, _, ew = run(exact, hidden.double(), weight.double(), targets, up.double())
    err_chunked = (gw.double() - ew).abs().max().item()
    err_naive = (rw.double() - ew).abs().max().item()
    assert err_chunked <= err_naive * 1.01 + 1e-6, (err_chunked, err_naive)
    # one bf16 rounding of the result: relative error ≤ 2^-8
    assert err_chunked <= ew.abs().max().item() * 2**-8 * 1.01


def test_zero_targets_returns_empty_fp32():
    hidden = torch.randn(0, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    out = token_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), chunk_size=4)
    assert out.shape == (0,) and out.dtype == torch.float32
    assert out.sum().item() == 0.0


def test_zero_targets_stays_in_the_graph_like_naive():
    hidden = torch.randn(0, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.long)
    ref = naive(hidden, weight, targets)
    ref.sum().backward()  # naive: zero gradients, no error
    assert torch.equal(weight.grad, torch.zeros(V, H))
    weight.grad = None
    token_logprobs(hidden, weight, targets, chunk_size=4).sum().backward()
    assert torch.equal(weight.grad, torch.zeros(V, H))


class _WeightShapedResults(TorchDispatchMode):
    """Records every aten op (forward or backward) that produces a new, non-view [V × H] tensor."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and tuple(t.shape) == (V, H) and not t._is_view():
                self.names.append(str(func))
        return out


@pytest.mark.parametrize("chunk_size", [2, N])
def test_frozen_weight_no_weight_grad_computed(chunk_size):
    hidden, weight, targets, up = make(torch.float32, seed=5)
    h = hidden.clone().requires_grad_(True)
    out = token_logprobs(h, weight, targets, chunk_size=chunk_size)  # weight.requires_grad is False
    assert not weight.requires_grad
    with _WeightShapedResults() as rec:
        (out * up).sum().backward()
    assert weight.grad is None
    assert rec.names == []  # no weight-shaped gradient buffer was ever produced
    _, rh, _ = run(naive, hidden, weight, targets, up)
    torch.testing.assert_close(h.grad, rh, rtol=0, atol=1e-5)

    # control: with a trainable weight the accumulation does run (so the check above can fail)
    w = weight.clone().requires_grad_(True)
    out = token_logprobs(hidden.clone().requires_grad_(True), w, targets, chunk_size=chunk_size)
    with _WeightShapedResults() as rec:
        (out * up).sum().backward()
    assert len(rec.names) > 0 and w.grad is not None


def test_frozen_hidden_only_weight_grad():
    hidden, weight, targets, up = make(torch.float32, seed=6)
    w = weight.clone().requires_grad_(True)
    out = token_logprobs(hidden, w, targets, chunk_size=3)
    (out * up).sum().backward()
    _, _, rw = run(naive, hidden, weight, targets, up)
    torch.testing.assert_close(w.grad, rw, rtol=0, atol=1e-5)


class _TinyTied(torch.nn.Module):
    """Embedding → mixing → output head that reuses the embedding matrix (tied embeddings)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.embed = torch.nn.Embedding(V, H)
        self.mix = torch.nn.Linear(H, H)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(V, H, generator=g) * 0.5)
            self.mix.weight.copy_(torch.randn(H, H, generator=g) * 0.3)
            self.mix.bias.copy_(torch.randn(H, generator=g) * 0.1)

    def forward(self, ids, targets, head):
        hidden = torch.tanh(self.mix(self.embed(ids)))
        return head(hidden, self.embed.weight, targets)


def test_tied_embeddings_gradient_accumulates_from_both_uses():
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, V, (11,), generator=g)
    targets = torch.randint(0, V, (11,), generator=g)
    up = torch.randn(11, generator=g)
    grads = []
    for head in (lambda h, w, t: token_logprobs(h, w, t, chunk_size=4), naive):
        model = _TinyTied()
        out = model(ids, targets, head)
        (out * up).sum().backward()
        grads.append((out.detach(), model.embed.weight.grad.clone(), model.mix.weight.grad.clone()))
    (o1, e1, m1), (o2, e2, m2) = grads
    torch.testing.assert_close(o1, o2, rtol=0, atol=1e-5)
    torch.testing.assert_close(e1, e2, rtol=0, atol=1e-5)
    torch.testing.assert_close(m1, m2, rtol=0, atol=1e-5)
    # the embedding gradient is not only the head's part: rows of input ids get the lookup's gradient too
    head_only = torch.zeros(V, H)
    model = _TinyTied()
    hidden = torch.tanh(model.mix(model.embed(ids))).detach()
    w = model.embed.weight.detach().clone().requires_grad_(True)
    (token_logprobs(hidden, w, targets, chunk_size=4) * up).sum().backward()
    head_only += w.grad
    assert (e1 - head_only)[ids].abs().max() > 1e-4


def _saved_shapes(fn):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, shapes


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_no_tokens_by_vocab_tensor_saved_for_backward(chunk_size):
    n = 64
    hidden, weight, targets, _ = make(torch.float32, n=n, seed=9)
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    out, shapes = _saved_shapes(lambda: token_logprobs(h, w, targets, chunk_size=chunk_size))
    assert shapes, "the hook saw no saved tensors"
    assert sorted(shapes) == sorted([(n, H), (V, H), (n,), (n,)])  # hidden, weight, targets, lse
    assert not [s for s in shapes if len(s) == 2 and s[-1] == V and s[0] > chunk_size]
    assert out.grad_fn is not None
    # control: the naive path does save an [N × V] tensor, so this check can fail
    _, naive_shapes = _saved_shapes(lambda: naive(h, w, targets))
    assert (n, V) in naive_shapes


class _LargestOutput(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_peak_tensor_is_one_chunk_of_logits():
    """No op in forward or backward produces a tensor larger than max(chunk·V, V·H, N·H) elements,
    far below N·V (the naive path's logits)."""
    n, h_dim, v, chunk = 64, 8, 50, 4  # N·V = 3200; chunk·V = 200, V·H = 400, N·H = 512
    hidden, weight, targets, up = make(torch.float32, n=n, h=h_dim, v=v, seed=10)
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    with _LargestOutput() as mode:
        (token_logprobs(h, w, targets, chunk_size=chunk) * up).sum().backward()
    assert mode.largest <= max(chunk * v, v * h_dim, n * h_dim) == 512
    h.grad = w.grad = None
    with _LargestOutput() as naive_mode:
        (naive(h, w, targets) * up).sum().backward()
    assert naive_mode.largest == n * v


def test_under_autocast_forward_and_backward_share_the_bf16_contract():
    """fp32 hidden/weight inside torch.autocast(bf16), as a model under mixed precision hands them over:
    with compute_dtype = autocast_dtype(...) the logits (forward) and the recomputed logits and the
    hidden-state gradient (backward) are bf16 matmuls, whatever autocast state backward runs in, so
    values and gradients are those of explicit bf16 arithmetic (bitwise) and within bf16 rounding of
    the fp32 reference; the weight gradient accumulates in fp32. Without the contract, forward ran in
    bf16 under autocast and backward in fp32 (a 1.2% gradient error in the issue's direct test)."""
    from orpo.ops.logprobs import autocast_dtype

    hidden, weight, targets, up = make(torch.float32, n=40, seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dtype = autocast_dtype(hidden.device, weight.dtype)
        out, gh, gw = run(token_logprobs, hidden, weight, targets, up, chunk_size=16, compute_dtype=dtype)
    assert dtype == torch.bfloat16 and autocast_dtype(hidden.device, weight.dtype) == torch.float32
    explicit, eh, ew = run(token_logprobs, hidden, weight, targets, up, chunk_size=16, compute_dtype=torch.bfloat16)
    assert torch.equal(out, explicit) and torch.equal(gh, eh) and torch.equal(gw, ew)
    ref, rh, rw = run(naive, hidden, weight, targets, up)  # fp32 throughout
    assert (out - ref).abs().max() > 1e-5  # bf16 was really used
    torch.testing.assert_close(out, ref, rtol=0, atol=5e-2)
    torch.testing.assert_close(gh, rh, rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(gw, rw, rtol=1.6e-2, atol=2e-2)
    assert gh.dtype == gw.dtype == torch.float32


# ---- the head's bias, a logit scale and a final softcap: z = c · tanh(k · (h·Wᵀ + u·Bᵀ + bias) / c) ----

R = 3  # rank of the low-rank (LoRA) term
TRANSFORMS = {  # values that matter on logits of O(1–3): a softcap of 2 saturates, a scale of 0.25 flattens
    "bias": dict(bias=True),
    "scale": dict(scale=0.25),
    "softcap": dict(softcap=2.0),
    "all": dict(bias=True, scale=0.25, softcap=2.0),
    "all-low-rank": dict(bias=True, scale=3.0, softcap=2.0, low_rank=True),
}


def naive_head(hidden, weight, targets, bias=None, scale=1.0, softcap=None, low_rank_in=None, low_rank_out=None):
    """The full [N, V] logits of the module docstring's formula, autograd through every step (fp32 after the
    matmuls, which run in the inputs' dtype; float64 inputs stay float64)."""
    wide = torch.promote_types(hidden.dtype, torch.float32)
    a = (hidden @ weight.T).to(wide)
    if low_rank_in is not None:
        a = a + (low_rank_in @ low_rank_out.T).to(wide)
    if bias is not None:
        a = a + bias.to(wide)
    z = a * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return torch.log_softmax(z, -1).gather(1, targets[:, None]).squeeze(1)


def make_transformed(dtype, transform, n=N, seed=11):
    """(inputs: hidden, weight, [bias], [low_rank_in, low_rank_out]; keyword options; targets; upstream)."""
    hidden, weight, targets, up = make(dtype, n=n, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    inputs = {"hidden": hidden, "weight": weight}
    if transform.get("bias"):
        inputs["bias"] = (torch.randn(V, generator=g) * 0.5).to(dtype)
    if transform.get("low_rank"):
        inputs["low_rank_in"] = (torch.randn(n, R, generator=g) * 0.5).to(dtype)
        inputs["low_rank_out"] = (torch.randn(V, R, generator=g) * 0.5).to(dtype)
    options = {k: transform[k] for k in ("scale", "softcap") if k in transform}
    return inputs, options, targets, up


def run_all(fn, inputs, options, targets, upstream, **kw):
    """fn's value and the gradients of Σ upstream · value for every tensor in `inputs`."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    hidden, weight = leaves.pop("hidden"), leaves.pop("weight")
    out = fn(hidden, weight, targets, **leaves, **options, **kw)
    (out * upstream.to(out.dtype)).sum().backward()
    return out, {"hidden": hidden.grad, "weight": weight.grad, **{k: v.grad for k, v in leaves.items()}}


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("chunk_size", [1, 3, N, N + 5])
def test_fp32_bias_scale_softcap_match_naive(transform, chunk_size):
    """Values and gradients (hidden, weight, bias, both low-rank parts) equal autograd through the full
    logits, for chunk sizes that do (1, N) and do not (3, N + 5) divide N = 7."""
    inputs, options, targets, up = make_transformed(torch.float32, TRANSFORMS[transform])
    out, grads = run_all(token_logprobs, inputs, options, targets, up, chunk_size=chunk_size)
    ref, ref_grads = run_all(naive_head, inputs, options, targets, up)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert set(grads) == set(inputs)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and grad.abs().max() > 1e-3, name
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=1e-5, msg=name)
    # the transform matters: the plain head gives other log-probs
    plain = token_logprobs(inputs["hidden"], inputs["weight"], targets, chunk_size=chunk_size)
    assert (plain - out).abs().max() > 0.1


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("chunk_size", [3, N + 5])
def test_bf16_bias_scale_softcap_match_naive(transform, chunk_size):
    """bf16 inputs: the matmuls round the logits to bf16 in both paths and the rest is fp32, so values
    agree tightly; bf16 gradients within ~1 bf16 ulp of the largest entry of the naive and of a float64
    computation from the same inputs."""
    inputs, options, targets, up = make_transformed(torch.bfloat16, TRANSFORMS[transform])
    out, grads = run_all(token_logprobs, inputs, options, targets, up, chunk_size=chunk_size)
    ref, ref_grads = run_all(naive_head, inputs, options, targets, up)
    ex, ex_grads = run_all(naive_head, {k: v.double() for k, v in inputs.items()}, options, targets, up.double())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.double(), ex, rtol=0, atol=5e-2)
    for name, grad in grads.items():
        assert grad.dtype == torch.bfloat16, name
        torch.testing.assert_close(grad.float(), ref_grads[name].float(), rtol=1.6e-2, atol=2e-2, msg=name)
        torch.testing.assert_close(grad.double(), ex_grads[name], rtol=1.6e-2, atol=2e-2, msg=name)


def test_softcap_worked_example():
    """One token, V = 2, W = I, h = [2, 0], softcap c = 1, scale k = 0.5: a = [2, 0], z = tanh([1, 0]) =
    [0.76159, 0]; logp(y=0) = z0 − log(e^z0 + 1) = 0.76159 − 1.14476 = −0.38317; ∂logp/∂z0 = 1 −
    softmax(z)0 = 0.31830 and ∂z0/∂a0 = k · (1 − tanh²(1)) = 0.5 · 0.41997, so ∂logp/∂h0 = 0.31830 ·
    0.20999 = 0.066839 (W = I); ∂/∂h1 = ∂logp/∂z1 · k · (1 − tanh²(0)) = −0.31830 · 0.5 = −0.15915."""
    h = torch.tensor([[2.0, 0.0]], requires_grad=True)
    out = token_logprobs(h, torch.eye(2), torch.tensor([0]), scale=0.5, softcap=1.0)
    out.sum().backward()
    torch.testing.assert_close(out, torch.tensor([-0.38317]), rtol=0, atol=1e-5)
    torch.testing.assert_close(h.grad, torch.tensor([[0.066839, -0.15915]]), rtol=0, atol=1e-5)


def test_neutral_transform_is_the_default_path():
    """scale 1 and no softcap run the untransformed code: bitwise the default call."""
    hidden, weight, targets, up = make(torch.bfloat16, n=20, seed=12)
    default, gh, gw = run(token_logprobs, hidden, weight, targets, up, chunk_size=6)
    neutral, nh, nw = run(token_logprobs, hidden, weight, targets, up, chunk_size=6, scale=1.0, softcap=None)
    assert torch.equal(default, neutral) and torch.equal(gh, nh) and torch.equal(gw, nw)


def test_frozen_bias_gets_no_gradient():
    inputs, options, targets, up = make_transformed(torch.float32, TRANSFORMS["all"])
    h = inputs["hidden"].clone().requires_grad_(True)
    bias = inputs["bias"]  # requires_grad False
    (token_logprobs(h, inputs["weight"], targets, chunk_size=3, bias=bias, **options) * up).sum().backward()
    assert bias.grad is None
    _, ref_grads = run_all(naive_head, inputs, options, targets, up)
    torch.testing.assert_close(h.grad, ref_grads["hidden"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_transformed_head_saves_no_tokens_by_vocab_tensor(chunk_size):
    n = 64
    inputs, options, targets, _ = make_transformed(torch.float32, TRANSFORMS["all"], n=n)
    leaves = {k: v.requires_grad_(True) for k, v in inputs.items()}
    out, shapes = _saved_shapes(lambda: token_logprobs(leaves["hidden"], leaves["weight"], targets,
                                                       chunk_size=chunk_size, bias=leaves["bias"], **options))
    assert sorted(shapes) == sorted([(n, H), (V, H), (n,), (n,), (V,)])  # hidden, weight, targets, lse, bias
    assert out.grad_fn is not None


def test_transformed_peak_tensor_is_one_chunk_of_logits():
    """As test_peak_tensor_is_one_chunk_of_logits, with a bias, a scale and a softcap."""
    n, h_dim, v, chunk = 64, 8, 50, 4
    hidden, weight, targets, up = make(torch.float32, n=n, h=h_dim, v=v, seed=10)
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    bias = torch.randn(v, requires_grad=True)
    with _LargestOutput() as mode:
        (token_logprobs(h, w, targets, chunk_size=chunk, bias=bias, scale=0.5, softcap=2.0) * up).sum().backward()
    assert mode.largest <= max(chunk * v, v * h_dim, n * h_dim) == 512
    assert bias.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transform", [*TRANSFORMS, "low-rank"])
def test_keep_probs_gives_the_recomputed_gradients_bit_for_bit(dtype, transform):
    """keep_probs only moves where the softmax is computed (the forward, kept, instead of backward's
    recompute of the same logits): values and every gradient are identical, for chunk sizes that do
    (1) and do not (3) divide N = 7; with a softcap it is ignored (backward also needs tanh')."""
    inputs, options, targets, up = make_transformed(dtype, TRANSFORMS.get(transform, dict(low_rank=True)))
    for chunk_size in (1, 3):
        out, grads = run_all(token_logprobs, inputs, options, targets, up, chunk_size=chunk_size)
        kept, kept_grads = run_all(token_logprobs, inputs, options, targets, up, chunk_size=chunk_size, keep_probs=True)
        assert torch.equal(out, kept)
        assert set(grads) == set(kept_grads) == set(inputs)
        for name in grads:
            assert torch.equal(grads[name], kept_grads[name]), name


def test_keep_probs_saves_the_softmax_and_skips_the_second_head_matmul():
    """The memory it trades: the forward keeps [N, V] fp32 in chunks; backward then runs two matmuls per
    chunk (hidden and weight gradients) instead of three. A second backward (retain_graph) recomputes."""
    n, chunk = 12, 4
    hidden, weight, targets, up = make(torch.float32, n=n, seed=11)
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    out = token_logprobs(h, w, targets, chunk_size=chunk, keep_probs=True)
    kept = out.grad_fn.probs
    assert [tuple(p.shape) for p in kept] == [(chunk, V)] * (n // chunk)
    with _CountMatmuls() as matmuls:
        (out * up).sum().backward(retain_graph=True)
    assert matmuls.count == 2 * (n // chunk)
    first = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    (out * up).sum().backward()
    assert torch.equal(h.grad, first[0]) and torch.equal(w.grad, first[1])
    with torch.no_grad():  # nothing kept without gradients
        assert token_logprobs(h, w, targets, chunk_size=chunk, keep_probs=True).grad_fn is None


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.count += 1
        return func(*args, **(kwargs or {}))
