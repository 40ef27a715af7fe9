"""compare.py: paired comparison of two models' records, worked by hand.

Fixture (9 pairs), log_odds of A and B and what changes from B to A:
    pair   A      B      change
    0     0.5   −1.0    fixed          Δ = 1.5
    1     0.4   −0.5    fixed              0.9
    2     0.3   −0.2    fixed              0.5
    3     1.0   −1.0    fixed              2.0
    4     0.2   −0.1    fixed              0.3
    5     0.6   −0.4    fixed              1.0
    6    −0.1    0.3    broken            −0.4
    7     0.8    0.7    both right         0.1
    8    −2.0   −1.9    both wrong        −0.1
fixed 6, broken 1: sign test n = 7, two-sided p = 2 · (C(7,0) + C(7,1)) / 2^7 = 2 · 8 / 128 = 0.125.
mean Δlog_odds = (1.5 + 0.9 + 0.5 + 2.0 + 0.3 + 1.0 − 0.4 + 0.1 − 0.1) / 9 = 5.8 / 9 = 0.6444.
accuracy A = 7/9 (pairs 0–5, 7), B = 2/9 (pairs 6, 7).
ℓ_chosen: A −1.0 everywhere, B −1.5 everywhere → Δlogp_chosen = +0.5;
ℓ_rejected: A −2.0, B −1.75 → Δlogp_rejected = −0.25.
"""
import pytest

from orpo.commands.compare import compare_records, format_comparison

A = [0.5, 0.4, 0.3, 1.0, 0.2, 0.6, -0.1, 0.8, -2.0]
B = [-1.0, -0.5, -0.2, -1.0, -0.1, -0.4, 0.3, 0.7, -1.9]


def records(log_odds, chosen, rejected):
    return [{"index": 10 + i, "log_odds": x, "chosen_logp_mean": chosen, "rejected_logp_mean": rejected}
            for i, x in enumerate(log_odds)]


def test_compare_records_hand_worked():
    per_pair, summary = compare_records(records(A, -1.0, -2.0), records(B, -1.5, -1.75))
    assert [p["change"] for p in per_pair] == ["fixed"] * 6 + ["broken", "both right", "both wrong"]
    assert [p["index"] for p in per_pair] == list(range(10, 19))
    assert per_pair[3]["delta_log_odds"] == pytest.approx(2.0)
    assert summary["fixed"] == 6 and summary["broken"] == 1 and summary["pairs"] == 9
    assert summary["sign_test_p"] == pytest.approx(0.125)
    assert summary["accuracy_a"] == pytest.approx(7 / 9) and summary["accuracy_b"] == pytest.approx(2 / 9)
    assert summary["delta_log_odds"] == pytest.approx(5.8 / 9)
    assert summary["log_odds_a"] - summary["log_odds_b"] == pytest.approx(5.8 / 9)
    assert summary["delta_logp_chosen"] == pytest.approx(0.5)
    assert summary["delta_logp_rejected"] == pytest.approx(-0.25)
    low, high = summary["delta_log_odds_ci95"]
    assert low < 5.8 / 9 < high
    text = format_comparison(summary, "orpo-run", "sft-run")
    assert "A = orpo-run, B = sft-run" in text and "A gets right: 6; the reverse: 1" in text and "p = 0.125" in text


def test_compare_refuses_records_of_different_pairs():
    with pytest.raises(ValueError, match="same pairs"):
        compare_records(records(A, -1.0, -2.0), records(B, -1.0, -2.0)[::-1])
