"""scoring.py: the training path without gradients gives the reference path's records.

The reference (orpo.commands.evaluate.reference_records) runs plain unpacked forwards with full
fp32 logits; every layout of the fast path must give the same per-pair records (log_odds within
1e-4 in fp32), in the order of the pairs, however the pairs are batched.

summarize, worked by hand for two pairs with log_odds ln 4 and −ln 4:
    or_loss = (log(1 + 1/4) + log(1 + 4)) / 2 = (0.22314 + 1.60944) / 2 = 0.91629
    accuracy = 1/2; nll = (3 + 5) / (2 + 2) = 2.0; loss = 2.0 + 0.1 · 0.91629
    logps/chosen = (−1 − 3) / 2 = −2, logps/rejected = (−2 − 1) / 2 = −1.5, margin = −0.5
"""
import math

import pytest
import torch

from orpo.commands.evaluate import reference_records
from orpo.ops.route import choose_route
from orpo.ops.scoring import RECORD_FIELDS, score_pairs, summarize, token_batches
from ops.test_forward import make_pairs, tiny_model


def test_summarize_hand_worked():
    records = [
        {"log_odds": math.log(4), "chosen_logp_mean": -1.0, "rejected_logp_mean": -2.0, "nll_sum": 3.0, "nll_tokens": 2},
        {"log_odds": -math.log(4), "chosen_logp_mean": -3.0, "rejected_logp_mean": -1.0, "nll_sum": 5.0, "nll_tokens": 2},
    ]
    summary = summarize(records, beta=0.1)
    or_loss = (math.log(1.25) + math.log(5)) / 2
    assert summary["or_loss"] == pytest.approx(or_loss)
    assert summary["accuracy"] == 0.5 and summary["pairs"] == 2
    assert summary["log_odds"] == pytest.approx(0.0)
    assert summary["nll"] == 2.0
    assert summary["loss"] == pytest.approx(2.0 + 0.1 * or_loss)
    assert summary["logps/chosen"] == -2.0 and summary["logps/rejected"] == -1.5 and summary["margin"] == -0.5


def test_summarize_does_not_overflow_for_very_negative_log_odds():
    record = {"log_odds": -1000.0, "chosen_logp_mean": -9.0, "rejected_logp_mean": -0.1, "nll_sum": 1.0, "nll_tokens": 1}
    assert summarize([record], beta=1.0)["or_loss"] == pytest.approx(1000.0)


def test_token_batches_bound_the_tokens_and_keep_every_index_once():
    lengths = [5, 30, 7, 12, 12, 1]
    batches = token_batches(lengths, batch_tokens=20)
    # longest first: 30 > 20 gets a batch of its own; 12 + 12 > 20; 12 + 7 fits; then 5 + 1
    assert batches == [[1], [3], [4, 2], [0, 5]]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))


@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False)])
@pytest.mark.parametrize("layout", ["spans", "mask", "padded"])
@pytest.mark.parametrize("nll_scope", ["full", "completion"])
def test_fast_path_records_equal_the_reference(arch, tied, layout, nll_scope):
    model = tiny_model(arch, tied)
    pairs = make_pairs() + make_pairs(seed=1)[:3]
    route = choose_route(model, packing=layout != "padded", attention=None if layout == "padded" else layout)
    assert route.layout == layout
    expected = reference_records(model, pairs, pad_token_id=0, nll_scope=nll_scope, batch_size=3)
    # batches of ~2 pairs: the records must come back in the pairs' order, whatever the batching
    fast = score_pairs(model, pairs, 0, nll_scope, route, chunk_size=5, batch_tokens=30)
    assert len(fast) == len(expected)
    for got, want in zip(fast, expected):
        assert set(got) == set(RECORD_FIELDS)
        for key in ("index", "prompt_tokens", "chosen_tokens", "rejected_tokens", "nll_tokens"):
            assert got[key] == want[key] and isinstance(got[key], int), key
        assert got["log_odds"] == pytest.approx(want["log_odds"], abs=1e-4)
        for key in ("chosen_logp_mean", "rejected_logp_mean", "nll_sum"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), key


def test_scoring_leaves_the_model_mode_and_builds_no_graph():
    model = tiny_model("llama", True).train()
    records = score_pairs(model, make_pairs(), 0)
    assert model.training
    assert all(isinstance(r["log_odds"], float) and math.isfinite(r["log_odds"]) for r in records)
    assert all(p.grad is None for p in model.parameters())


def test_records_count_tokens_and_respect_nll_scope():
    """Pair 0: prompt 5, chosen 1, rejected 13 → NLL tokens: full 4 + 1 = 5, completion 1."""
    model = tiny_model("llama", True)
    full = score_pairs(model, make_pairs(), 0, "full")
    completion = score_pairs(model, make_pairs(), 0, "completion")
    assert [(r["prompt_tokens"], r["chosen_tokens"], r["rejected_tokens"]) for r in full] == [
        (5, 1, 13), (1, 9, 1), (3, 4, 2), (7, 3, 3)]
    assert [r["nll_tokens"] for r in full] == [5, 9, 6, 9]
    assert [r["nll_tokens"] for r in completion] == [1, 9, 4, 3]
    for f, c in zip(full, completion):
        assert c["nll_sum"] == pytest.approx(-c["chosen_logp_mean"] * c["chosen_tokens"], rel=1e-5)
        assert f["log_odds"] == c["log_odds"]
