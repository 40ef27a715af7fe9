"""loss.py: the ORPO objective against hand-worked numbers and a naive float64 reference.

Hand-worked example (one pair, beta = 0.1, nll_sum = 3.0 over 2 NLL tokens):

    ℓ_w = log 0.5  ⇒ P_w = 0.5, odds_w = 0.5 / 0.5 = 1,    log odds_w = 0
    ℓ_l = log 0.2  ⇒ P_l = 0.2, odds_l = 0.2 / 0.8 = 0.25, log odds_l = −ln 4
    log_odds_ratio = 0 − (−ln 4) = ln 4 ≈ 1.386294
    σ(ln 4) = 4 / (4 + 1) = 0.8  ⇒  or_loss = −log 0.8 = log 1.25 ≈ 0.223144
    loss = 3.0 / 2 + 0.1 · log 1.25 / 1 ≈ 1.522314

Gradients of the same example, using d log odds / dℓ = 1 / (1 − e^ℓ) and
d(−log σ(z))/dz = −(1 − σ(z)) = −0.2:

    ∂loss/∂ℓ_w     = 0.1 · (−0.2) · 1/(1 − 0.5)  = −0.04
    ∂loss/∂ℓ_l     = 0.1 · (−0.2) · −1/(1 − 0.2) = +0.025
    ∂loss/∂nll_sum = 1 / 2 = 0.5
"""
import decimal
import math

import pytest
import torch
import torch.nn.functional as F

from orpo.ops.loss import MAX_LOGP, bradley_terry_loss, log1mexp, log_odds_ratio, orpo_loss


# ---------------------------------------------------------------------------------------------
# naive reference, straight from the paper's equations, float64
# ---------------------------------------------------------------------------------------------
def naive_orpo(lw, ll, nll_sum, beta, nll_tokens, pairs):
    """L = NLL token mean + beta · mean over pairs of −log σ(log odds_w − log odds_l)."""
    pw, pl = torch.exp(lw), torch.exp(ll)  # P(y|x) = exp(ℓ)
    odds_w, odds_l = pw / (1 - pw), pl / (1 - pl)  # Eq. 4
    log_or = torch.log(odds_w) - torch.log(odds_l)
    l_or = -torch.log(torch.sigmoid(log_or))  # Eq. 7
    return nll_sum / nll_tokens + beta * l_or.sum() / pairs, l_or, log_or


def _leaf(values, dtype):
    return torch.tensor(values, dtype=dtype).requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# hand-worked values
# ---------------------------------------------------------------------------------------------
def test_hand_worked_values_and_gradients():
    lw = _leaf([math.log(0.5)], torch.float32)
    ll = _leaf([math.log(0.2)], torch.float32)
    nll = _leaf(3.0, torch.float32)
    loss, or_loss, log_odds = orpo_loss(lw, ll, nll, beta=0.1, nll_tokens_in_step=2, pairs_in_step=1)

    assert log_odds.shape == (1,) and or_loss.shape == (1,) and loss.shape == ()
    assert log_odds.item() == pytest.approx(math.log(4.0), rel=1e-6)
    assert or_loss.item() == pytest.approx(math.log(1.25), rel=1e-6)
    assert loss.item() == pytest.approx(1.5 + 0.1 * math.log(1.25), rel=1e-6)
    assert loss.item() == pytest.approx(1.522314355, rel=1e-6)

    loss.backward()
    assert lw.grad.item() == pytest.approx(-0.04, rel=1e-5)
    assert ll.grad.item() == pytest.approx(0.025, rel=1e-5)
    assert nll.grad.item() == pytest.approx(0.5, rel=1e-6)


def test_log_odds_of_each_side_by_hand():
    """log odds(ℓ) = ℓ − log1mexp(ℓ): log 0.5 → 0, log 0.2 → −ln 4, log 0.8 → ln 4."""
    lo = log_odds_ratio(torch.tensor([math.log(0.5), math.log(0.8)]), torch.tensor([math.log(0.2), math.log(0.5)]))
    torch.testing.assert_close(lo, torch.tensor([math.log(4.0), math.log(4.0)]), rtol=1e-6, atol=1e-6)


def test_equal_logps_give_ln2_per_pair():
    """ℓ_w = ℓ_l ⇒ log odds ratio 0 ⇒ or_loss = −log σ(0) = ln 2, whatever ℓ is."""
    l = torch.tensor([-0.3, -2.0, -7.5])
    loss, or_loss, log_odds = orpo_loss(l, l.clone(), torch.tensor(0.0), beta=1.0, nll_tokens_in_step=1, pairs_in_step=3)
    assert torch.equal(log_odds, torch.zeros(3))
    torch.testing.assert_close(or_loss, torch.full((3,), math.log(2.0)), rtol=1e-7, atol=0)
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_pairs_and_tokens_normalisers_can_be_tensors():
    lw = torch.tensor([math.log(0.5), math.log(0.5)])
    ll = torch.tensor([math.log(0.2), math.log(0.2)])
    loss_f, _, _ = orpo_loss(lw, ll, torch.tensor(6.0), 0.1, 4.0, 2.0)
    loss_t, _, _ = orpo_loss(lw, ll, torch.tensor(6.0), 0.1, torch.tensor(4), torch.tensor(2))
    # two identical pairs: 6/4 + 0.1 · (2 · log 1.25) / 2
    assert loss_f.item() == pytest.approx(1.5 + 0.1 * math.log(1.25), rel=1e-6)
    assert loss_t.item() == pytest.approx(loss_f.item(), rel=1e-7)


# ---------------------------------------------------------------------------------------------
# naive reference parity, value and gradient
# ---------------------------------------------------------------------------------------------
def _random_inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    lw = -0.01 - 7.99 * torch.rand(n, generator=g, dtype=torch.float64)  # ℓ ∈ [−8, −0.01]
    ll = -0.01 - 7.99 * torch.rand(n, generator=g, dtype=torch.float64)
    nll = 50.0 * torch.rand((), generator=g, dtype=torch.float64)
    return lw, ll, nll


def _parity(dtype, n, seed, beta):
    lw64, ll64, nll64 = _random_inputs(n, seed)
    # the fast path sees `dtype` values; the reference sees the same values, exactly, in float64
    lw, ll, nll = (t.to(dtype).requires_grad_(True) for t in (lw64, ll64, nll64))
    rw, rl, rn = (t.detach().double().requires_grad_(True) for t in (lw, ll, nll))
    tokens, pairs = 37, n

    loss, or_loss, log_odds = orpo_loss(lw, ll, nll, beta, tokens, pairs)
    loss.backward()
    ref, ref_or, ref_lo = naive_orpo(rw, rl, rn, beta, tokens, pairs)
    ref.backward()
    assert loss.dtype == or_loss.dtype == log_odds.dtype == torch.float32
    assert lw.grad.dtype == dtype
    return (loss, or_loss, log_odds, lw.grad, ll.grad, nll.grad), (ref, ref_or, ref_lo, rw.grad, rl.grad, rn.grad)


@pytest.mark.parametrize("n,seed", [(1, 0), (7, 1), (64, 2)])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_matches_naive_reference_fp32(n, seed, beta):
    got, ref = _parity(torch.float32, n, seed, beta)
    for name, g, r in zip(("loss", "or_loss", "log_odds", "grad_w", "grad_l", "grad_nll"), got, ref):
        # log_odds is a difference of two O(10) fp32 log-odds: allow its cancellation error (~1e-6) near 0
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=2e-6 if name == "log_odds" else 1e-7, msg=name)


@pytest.mark.parametrize("n,seed", [(1, 3), (7, 4), (64, 5)])
def test_matches_naive_reference_bf16(n, seed):
    """bf16 inputs are upcast exactly, so the values stay fp32-accurate; gradients are rounded to bf16
    (8 significant bits, relative error ≤ 2^-8 ≈ 3.9e-3)."""
    got, ref = _parity(torch.bfloat16, n, seed, beta=0.1)
    for name, g, r in zip(("loss", "or_loss", "log_odds"), got[:3], ref[:3]):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=2e-6 if name == "log_odds" else 1e-7, msg=name)
    for name, g, r in zip(("grad_w", "grad_l", "grad_nll"), got[3:], ref[3:]):
        torch.testing.assert_close(g.double(), r, rtol=4e-3, atol=1e-9, msg=name)


# ---------------------------------------------------------------------------------------------
# log1mexp
# ---------------------------------------------------------------------------------------------
def _log1mexp_ref(x):
    """log(1 − e^x) and its derivative −e^x / (1 − e^x), in 50-digit decimal arithmetic.

    (Plain float64 log(−expm1(x)) is not a valid reference: for x < −37, expm1(x) rounds to −1.)
    """
    values, grads = [], []
    with decimal.localcontext() as ctx:
        ctx.prec = 50
        for v in x.double().tolist():
            e = decimal.Decimal(v).exp()
            values.append(float((1 - e).ln()))
            grads.append(float(-e / (1 - e)))
    return torch.tensor(values, dtype=torch.float64), torch.tensor(grads, dtype=torch.float64)


def _x_grid():
    ln2 = math.log(2.0)
    around = torch.tensor([-ln2, -ln2 + 1e-3, -ln2 - 1e-3, -ln2 + 1e-6, -ln2 - 1e-6], dtype=torch.float64)
    grid = -torch.logspace(-5, math.log10(50.0), 3001, dtype=torch.float64)
    return torch.cat([grid, around])


def test_log1mexp_matches_float64_fp32_value_and_gradient():
    x = _x_grid().float().requires_grad_(True)
    y = log1mexp(x)
    y.sum().backward()
    ref, ref_grad = _log1mexp_ref(x.detach())  # the exact same points
    assert x.detach().min().item() == pytest.approx(-50.0) and x.detach().max().item() == pytest.approx(-1e-5)
    assert ((x.detach() > -math.log(2.0)).any() and (x.detach() < -math.log(2.0)).any())  # both branches
    torch.testing.assert_close(y.double(), ref, rtol=2e-6, atol=0)
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=2e-6, atol=0)


def test_log1mexp_bf16_value():
    x = _x_grid().bfloat16()
    y = log1mexp(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), _log1mexp_ref(x)[0], rtol=8e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log1mexp_finite_value_and_gradient_at_extremes(dtype):
    pts = [0.0, -1e-12, -1e-7, -1e-6, -1e-4, -math.log(2.0), -30.0, -1e4]
    x = torch.tensor(pts, dtype=dtype).requires_grad_(True)
    y = log1mexp(x)
    y.sum().backward()
    assert torch.isfinite(y).all(), y
    assert torch.isfinite(x.grad).all(), x.grad
    # the far tail: log(1 − e^−1e4) = −e^−1e4 underflows to exactly 0, and so does its gradient
    assert y[-1].item() == 0.0 and x.grad[-1].item() == 0.0


def test_log1mexp_clamps_near_zero_with_zero_gradient():
    """x > −1e-6 is clamped to −1e-6: the value is log(1 − e^−1e-6) ≈ log 1e-6 ≈ −13.8155 and the
    gradient is exactly 0 (not NaN, not inf)."""
    x = torch.tensor([0.0, -1e-12, -1e-7], requires_grad=True)
    y = log1mexp(x)
    y.sum().backward()
    expected = math.log(-math.expm1(MAX_LOGP))
    assert expected == pytest.approx(-13.81551, abs=1e-4)
    torch.testing.assert_close(y, torch.full((3,), expected), rtol=1e-6, atol=0)
    assert torch.equal(x.grad, torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orpo_loss_finite_at_extreme_logps(dtype):
    """A certain completion (ℓ = 0) or a hopeless one (ℓ = −1e4) never gives inf or NaN."""
    lw = torch.tensor([0.0, -1e-9, -1e4, 0.0, -1e4], dtype=dtype, requires_grad=True)
    ll = torch.tensor([-1e4, 0.0, 0.0, 0.0, -1e4], dtype=dtype, requires_grad=True)
    nll = torch.tensor(1.0, dtype=dtype, requires_grad=True)
    loss, or_loss, log_odds = orpo_loss(lw, ll, nll, 0.1, 3, 5)
    loss.backward()
    for t in (loss, or_loss, log_odds, lw.grad, ll.grad, nll.grad):
        assert torch.isfinite(t).all(), t
    # ℓ_w = 0 vs ℓ_l = −1e4 (−9984 in bf16): log odds ratio = (−1e-6 − log(1 − e^−1e-6)) − (ℓ_l − 0)
    #                                                       ≈ −ℓ_l + 13.8155
    assert log_odds[0].item() == pytest.approx(-ll[0].item() + 13.81551, rel=1e-6)
    assert or_loss[0].item() == 0.0


# ---------------------------------------------------------------------------------------------
# beta = 0, micro-batch splitting
# ---------------------------------------------------------------------------------------------
def test_beta_zero_is_exactly_the_nll_token_mean():
    lw, ll, nll = (t.float().requires_grad_(True) for t in _random_inputs(5, 11))
    loss, or_loss, _ = orpo_loss(lw, ll, nll, beta=0.0, nll_tokens_in_step=13, pairs_in_step=5)
    assert torch.equal(loss, nll.detach() / 13)
    assert (or_loss > 0).all()  # the OR term is still computed and reported
    loss.backward()
    assert torch.equal(lw.grad, torch.zeros(5)) and torch.equal(ll.grad, torch.zeros(5))
    assert nll.grad.item() == pytest.approx(1 / 13, rel=1e-7)


@pytest.mark.parametrize("split", [1, 3, 5])
def test_micro_batches_sum_to_the_whole_step(split):
    """Loss over 6 pairs in one call == Σ over two micro-batches given the step totals."""
    lw64, ll64, _ = _random_inputs(6, 21)
    tokens, pairs, beta = 41, 6, 0.25
    nll_a, nll_b = 17.5, 30.25

    lw, ll = lw64.float().requires_grad_(True), ll64.float().requires_grad_(True)
    nll = torch.tensor(nll_a + nll_b, requires_grad=True)
    whole, _, _ = orpo_loss(lw, ll, nll, beta, tokens, pairs)
    whole.backward()

    lw2, ll2 = lw64.float().requires_grad_(True), ll64.float().requires_grad_(True)
    na, nb = torch.tensor(nll_a, requires_grad=True), torch.tensor(nll_b, requires_grad=True)
    part_a, _, _ = orpo_loss(lw2[:split], ll2[:split], na, beta, tokens, pairs)
    part_b, _, _ = orpo_loss(lw2[split:], ll2[split:], nb, beta, tokens, pairs)
    (part_a + part_b).backward()

    torch.testing.assert_close(part_a + part_b, whole, rtol=1e-6, atol=0)
    torch.testing.assert_close(lw2.grad, lw.grad, rtol=1e-6, atol=0)
    torch.testing.assert_close(ll2.grad, ll.grad, rtol=1e-6, atol=0)
    assert na.grad.item() == pytest.approx(nll.grad.item(), rel=1e-7)
    assert nb.grad.item() == pytest.approx(1 / tokens, rel=1e-7)
    # and it is the naive whole-step value
    ref, _, _ = naive_orpo(lw64.float().double(), ll64.float().double(), torch.tensor(nll_a + nll_b, dtype=torch.float64),
                           beta, tokens, pairs)
    assert whole.item() == pytest.approx(ref.item(), rel=1e-6)


def test_or_loss_is_minus_logsigmoid_of_log_odds():
    lw, ll, nll = (t.float() for t in _random_inputs(9, 31))
    _, or_loss, log_odds = orpo_loss(lw, ll, nll, 0.1, 1, 9)
    torch.testing.assert_close(or_loss, -F.logsigmoid(log_odds), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# bradley_terry_loss: a reward model's loss
# ---------------------------------------------------------------------------------------------
def test_bradley_terry_loss_hand_worked_value_and_gradient():
    """r_c = 1, r_r = 0: margin 1, −log σ(1) = log(1 + e^−1) ≈ 0.313262; d/dr_c = −(1 − σ(1)) = −σ(−1) ≈
    −0.268941, d/dr_r = +0.268941. A second pair, r_c = r_r = 2: log 2, gradients ∓0.5. Over 2 pairs of the step
    the loss is their mean and each gradient halves."""
    chosen = torch.tensor([1.0, 2.0], requires_grad=True)
    rejected = torch.tensor([0.0, 2.0], requires_grad=True)
    loss, bt_loss, margin = bradley_terry_loss(chosen, rejected, 2)
    assert bt_loss.tolist() == pytest.approx([math.log1p(math.exp(-1)), math.log(2)], abs=1e-7)
    assert margin.tolist() == [1.0, 0.0]
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log(2)) / 2, abs=1e-7)
    loss.backward()
    s = 1 / (1 + math.e)  # σ(−1)
    assert chosen.grad.tolist() == pytest.approx([-s / 2, -0.25], abs=1e-7)
    assert rejected.grad.tolist() == pytest.approx([s / 2, 0.25], abs=1e-7)


def test_bradley_terry_loss_is_fp32_and_finite_at_extreme_margins():
    chosen = torch.tensor([100.0, -100.0], dtype=torch.bfloat16, requires_grad=True)
    rejected = torch.tensor([-100.0, 100.0], dtype=torch.bfloat16, requires_grad=True)
    loss, bt_loss, _ = bradley_terry_loss(chosen, rejected, 2)
    assert bt_loss.dtype == torch.float32
    assert bt_loss.tolist() == pytest.approx([0.0, 200.0], abs=1e-6)  # −log σ(−200) = 200 (softplus)
    loss.backward()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


def test_bradley_terry_loss_summed_over_micro_batches_is_the_step_mean():
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(6, generator=g), torch.randn(6, generator=g)
    whole = bradley_terry_loss(chosen, rejected, 6)[0]
    split = sum(bradley_terry_loss(chosen[i:i + 2], rejected[i:i + 2], 6)[0] for i in (0, 2, 4))
    assert split.item() == pytest.approx(whole.item(), rel=1e-6)
    naive = torch.log1p(torch.exp(-(chosen.double() - rejected.double()))).mean()
    assert whole.item() == pytest.approx(naive.item(), rel=1e-6)
