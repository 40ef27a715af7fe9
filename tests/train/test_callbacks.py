"""callbacks.py: exact metric means (MetricTotals) and the non-finite guard, alone.

MetricTotals worked by hand: two micro-batches, (nll_sum 6, 4 tokens, 2 pairs) and (nll_sum 3,
2 tokens, 1 pair): nll = 9 / 6 = 1.5 (a token mean, not the mean of 1.5 and 1.5 by batch), or_loss
= (1.2 + 0.3) / 3 = 0.5, accuracy = (2 + 0) / 3. With router load balancing, aux losses 1.5 over
30 counted tokens and 2.0 over 10: aux_loss = (1.5 · 30 + 2.0 · 10) / 40 = 1.625 (a token-weighted mean).
"""
from types import SimpleNamespace

import pytest
import torch

from orpo.errors import OrpoError
from orpo.train.callbacks import MetricTotals, NonFiniteGuard


def _batch(nll_sum, nll_tokens, or_sum, correct, pairs, aux=0.0, router_tokens=0):
    return dict(router_aux_sum=torch.tensor(aux * router_tokens), router_tokens=torch.tensor(router_tokens),
                nll_sum=torch.tensor(nll_sum), nll_tokens=torch.tensor(nll_tokens), or_sum=torch.tensor(or_sum),
                log_odds_sum=torch.tensor(0.5 * pairs), logps_chosen_sum=torch.tensor(-1.0 * pairs),
                logps_rejected_sum=torch.tensor(-2.0 * pairs), correct=torch.tensor(correct),
                pairs=torch.tensor(pairs), tokens=torch.tensor(10 * pairs))


def test_metric_totals_are_exact_means_kept_on_the_values_device():
    totals = MetricTotals()
    assert totals.summary(lambda t: t) == {}
    totals.add(**_batch(6.0, 4, 1.2, 2, 2))
    totals.add(**_batch(3.0, 2, 0.3, 0, 1))
    assert totals.totals.dtype == torch.float64 and totals.totals.device.type == "cpu"
    summary = totals.summary(lambda t: t)
    assert summary["nll"] == pytest.approx(1.5) and summary["or_loss"] == pytest.approx(0.5)
    assert summary["accuracy"] == pytest.approx(2 / 3) and summary["margin"] == pytest.approx(1.0)
    assert summary["tokens"] == 30
    assert "aux_loss" not in summary  # no MoE load balancing
    # a reduce over ranks (here: two identical ranks) keeps the means
    assert totals.summary(lambda t: 2 * t)["nll"] == pytest.approx(1.5)
    totals.reset()
    assert totals.summary(lambda t: t) == {}
    totals.add(**_batch(6.0, 4, 1.2, 2, 2, aux=1.5, router_tokens=30))
    totals.add(**_batch(3.0, 2, 0.3, 0, 1, aux=2.0, router_tokens=10))
    assert totals.summary(lambda t: t)["aux_loss"] == pytest.approx(1.625)


class _Trainer:
    def __init__(self, scaler):
        self.accelerator = SimpleNamespace(scaler=scaler)
        self._step_rows = [3, 1]
        self.nonfinite_skipped = 0


def _guard_step(scaler, on_nonfinite="skip", grad=float("inf")):
    trainer = _Trainer(scaler)
    model = torch.nn.Linear(2, 1)
    for p in model.parameters():
        p.grad = torch.full_like(p, grad)
    NonFiniteGuard(trainer).on_pre_optimizer_step(SimpleNamespace(on_nonfinite=on_nonfinite),
                                                  SimpleNamespace(global_step=4), None, model=model)
    return trainer, model


def test_guard_skips_and_counts_a_nonfinite_step():
    trainer, model = _guard_step(None)
    assert trainer.nonfinite_skipped == 1 and all(p.grad is None for p in model.parameters())
    with pytest.raises(OrpoError, match=r"step 5: non-finite loss or gradient; dataset rows \[1, 3\]"):
        _guard_step(None, on_nonfinite="stop")
    trainer, model = _guard_step(None, grad=0.5)  # finite: untouched
    assert trainer.nonfinite_skipped == 0 and all(p.grad is not None for p in model.parameters())


def test_guard_leaves_fp16_overflow_to_the_grad_scaler():
    """With a GradScaler an overflow is routine: the scaler skips the step and lowers its scale. The
    guard neither counts nor stops, and keeps the gradients (the scaler must see them: with none,
    it asserts)."""
    for on_nonfinite in ("skip", "stop"):
        trainer, model = _guard_step(torch.amp.GradScaler("cpu"), on_nonfinite=on_nonfinite)
        assert trainer.nonfinite_skipped == 0
        assert all(p.grad is not None and torch.isinf(p.grad).all() for p in model.parameters())
