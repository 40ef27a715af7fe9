"""callbacks.py: exact metric means (MetricTotals, and AddedMetrics of a subclass's own) and the non-finite guard,
alone.

MetricTotals worked by hand: two micro-batches, (nll_sum 6, 4 tokens, 2 pairs) and (nll_sum 3,
2 tokens, 1 pair): nll = 9 / 6 = 1.5 (a token mean, not the mean of 1.5 and 1.5 by batch), or_loss
= (1.2 + 0.3) / 3 = 0.5, accuracy = (2 + 0) / 3. With router load balancing, aux losses 1.5 over
30 counted tokens and 2.0 over 10: aux_loss = (1.5 · 30 + 2.0 · 10) / 40 = 1.625 (a token-weighted mean).
"""
from types import SimpleNamespace

import pytest
import torch

from orpo.errors import OrpoError
from orpo.train.callbacks import AddedMetrics, MetricTotals, NonFiniteGuard, RunLoss


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


def test_added_metrics_are_total_over_count_of_every_micro_batch_and_rank():
    """A subclass's metric (ORPOTrainer.add_metric): hinge sums 3.0 over 2 pairs and 0.5 over 1 pair give
    3.5 / 3, not the mean of the batch means (1.5 and 0.5); a name counted 0 times is left out."""
    added = AddedMetrics()
    assert added.summary(lambda t: t) == {}
    added.add("hinge", torch.tensor(3.0), 2)
    added.add("hinge", torch.tensor(0.5), torch.tensor(1))
    added.add("never", 0.0, 0)
    assert added.totals["hinge"].dtype == torch.float64
    assert added.summary(lambda t: t) == {"hinge": pytest.approx(3.5 / 3)}
    assert added.summary(lambda t: 2 * t) == {"hinge": pytest.approx(3.5 / 3)}  # two identical ranks
    added.reset()
    assert added.summary(lambda t: t) == {}


class _Trainer:
    def __init__(self, scaler):
        self.accelerator = SimpleNamespace(scaler=scaler)
        self._step_rows = [3, 1]
        self.nonfinite_skipped = 0
        self.run_loss = RunLoss()


def _guard_step(scaler, on_nonfinite="skip", grad=float("inf")):
    trainer = _Trainer(scaler)
    model = torch.nn.Linear(2, 1)
    for p in model.parameters():
        p.grad = torch.full_like(p, grad)
    NonFiniteGuard(trainer).on_pre_optimizer_step(SimpleNamespace(on_nonfinite=on_nonfinite),
                                                  SimpleNamespace(global_step=4, is_world_process_zero=True), None, model=model)
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


def test_guard_takes_the_verdict_of_all_ranks(monkeypatch):
    """Several processes: each rank's verdict is all-reduced (here a stand-in reduce that adds another rank's
    non-finite verdict), so a rank whose own gradients are finite stops (or skips) with the others, naming the rows
    of all ranks (gathered)."""
    from orpo.train import callbacks

    trainer = _Trainer(None)
    trainer.accelerator = SimpleNamespace(scaler=None, num_processes=2, device=torch.device("cpu"),
                                          reduce=lambda t, reduction: t + 1.0)
    monkeypatch.setattr(callbacks, "gather_object", lambda parts: parts + [[7, 3]])  # the other rank's rows
    model = torch.nn.Linear(2, 1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # finite here
    with pytest.raises(OrpoError, match=r"^step 1: non-finite loss or gradient; dataset rows \[1, 3, 7\] \(--on_nonfinite"):
        NonFiniteGuard(trainer).on_pre_optimizer_step(SimpleNamespace(on_nonfinite="stop"), SimpleNamespace(
            global_step=0, is_world_process_zero=False), None, model=model)


class _Engine:
    """The DeepSpeed engine's public surface the guard reads."""

    def __init__(self, applied=True, norm=1.0, fp16=False, optimizer=None):
        self.applied, self.norm, self.fp16, self.optimizer = applied, norm, fp16, optimizer or SimpleNamespace(overflow=False)

    def was_step_applied(self):
        return self.applied

    def get_global_grad_norm(self):
        return self.norm

    def fp16_enabled(self):
        return self.fp16


def _deepspeed_trainer(engine):
    from accelerate.utils import DistributedType

    trainer = _Trainer(None)
    trainer.accelerator = SimpleNamespace(scaler=None, distributed_type=DistributedType.DEEPSPEED,
                                          deepspeed_engine_wrapped=SimpleNamespace(engine=engine))
    return trainer


def _deepspeed_step(engine, on_nonfinite="skip", caplog=None):
    trainer = _deepspeed_trainer(engine)
    guard = NonFiniteGuard(trainer)
    args, state = SimpleNamespace(on_nonfinite=on_nonfinite), SimpleNamespace(global_step=4, is_world_process_zero=True)
    guard.on_train_begin(args, state, None)
    guard.on_pre_optimizer_step(args, state, None, model=torch.nn.Linear(2, 1))  # p.grad: None, as under ZeRO
    return trainer


def test_guard_under_deepspeed_reads_the_engines_verdict():
    """DeepSpeed steps inside the last backward, before the guard: a step its check skipped (was_step_applied
    false) is counted or stops; under fp16 it is the loss scaler's routine; an applied step is left alone, unless
    its gradient norm is non-finite (DeepSpeed's check off): then the weights are gone, and the run stops."""
    assert _deepspeed_step(_Engine(applied=False, norm=float("inf"))).nonfinite_skipped == 1
    with pytest.raises(OrpoError, match=r"^step 5: non-finite loss or gradient; dataset rows \[1, 3\] \(--on_nonfinite"):
        _deepspeed_step(_Engine(applied=False), on_nonfinite="stop")
    assert _deepspeed_step(_Engine(applied=False, fp16=True), on_nonfinite="stop").nonfinite_skipped == 0
    assert _deepspeed_step(_Engine(applied=True, norm=0.5)).nonfinite_skipped == 0
    assert _deepspeed_step(_Engine(applied=True, norm=None)).nonfinite_skipped == 0  # compute_grad_norm false
    for norm in (float("nan"), -1.0):  # -1: the sentinel DeepSpeed's norm helpers return for inf/NaN
        with pytest.raises(OrpoError, match=r"^step 5: non-finite gradient, and DeepSpeed applied it"):
            _deepspeed_step(_Engine(applied=True, norm=norm))


def test_guard_warns_when_deepspeed_checks_nothing(caplog):
    unchecked = SimpleNamespace(overflow=False, check_grad_overflow=False, compute_grad_norm=False)
    with caplog.at_level("WARNING"):
        _deepspeed_step(_Engine(optimizer=unchecked))
    assert "DeepSpeed checks no gradients in this configuration" in caplog.text


def test_guard_hooks_the_plain_optimizer_deepspeed_steps_itself(monkeypatch):
    """DeepSpeed stage 0 in fp32 steps the torch optimizer itself, with no check: the guard's step pre-hook drops
    non-finite gradients before that step (weights untouched), and the guard then counts it. Hooked once."""
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = _Engine(optimizer=optimizer)
    trainer = _deepspeed_trainer(engine)
    guard = NonFiniteGuard(trainer)
    args, state = SimpleNamespace(on_nonfinite="skip"), SimpleNamespace(global_step=0, is_world_process_zero=True)
    guard.on_train_begin(args, state, None)
    guard.on_train_begin(args, state, None)  # a second train() on the same engine
    from orpo.train import callbacks

    checks, check = [], callbacks.nonfinite_gradients
    monkeypatch.setattr(callbacks, "nonfinite_gradients", lambda *a: checks.append(1) or check(*a))
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    optimizer.step()  # what the engine does inside the last backward
    assert len(checks) == 1  # one hook
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    guard.on_pre_optimizer_step(args, state, None, model=model)
    assert trainer.nonfinite_skipped == 1
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # finite: stepped
    guard.on_pre_optimizer_step(args, state, None, model=model)
    assert trainer.nonfinite_skipped == 1 and not torch.equal(next(model.parameters()), before[0])


def test_the_run_loss_counts_a_step_once_it_ends_and_never_a_skipped_one():
    """Each rank's share of a step counts when the step ends; a step the guard skipped counts on no rank, even
    where this rank's own share was finite (another rank's was NaN); the mean is over the applied steps."""
    run = RunLoss()
    run.reset(first_step=10, skipped_before=1)
    run.add(torch.tensor(1.0))
    run.add(torch.tensor(0.5))  # a second micro-batch of the same step
    run.on_step_end(None, None, None)
    run.add(torch.tensor(4.0))  # finite here, NaN on another rank: the guard skips the step everywhere
    run.skip_step()
    run.on_step_end(None, None, None)
    run.add(torch.tensor(float("nan")))  # NaN here: adds nothing (and the guard skips it)
    run.skip_step()
    run.on_step_end(None, None, None)
    run.add(torch.tensor(2.5))
    run.on_step_end(None, None, None)
    assert run.mean(global_step=14, skipped=3, reduce=lambda t: t) == pytest.approx((1.5 + 2.5) / 2)
    guarded, _ = _guard_step(None)  # the guard's skip reaches the run loss
    assert guarded.nonfinite_skipped == 1 and guarded.run_loss.pending.item() == 0.0
