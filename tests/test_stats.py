"""stats.py: the sign test, the bootstrap over groups and the win statistics, worked by hand.

FOUR (k = 1, four prompts): outcomes 1, 1, 1, 0 → wins 3, ties 0, losses 1; win rate 3/4.
    sign test: n = 4, p = 2 · (C(4,0) + C(4,1)) / 2^4 = 2 · 5 / 16 = 0.625.
    bootstrap: a resample draws 4 prompts; its win rate is 1 − (losses drawn)/4, losses drawn ~ Binomial(4, 1/4):
      P(0) = 1/256 = 0.004, P(0.25) = 12/256 = 0.047, P(0.5) = 54/256 = 0.211, P(0.75) = 108/256 = 0.422,
      P(1) = 81/256 = 0.316; cumulative 0.004, 0.051, 0.262, 0.684, 1: the 2.5% quantile falls inside the atom 0.25
      and the 97.5% one inside the atom 1 (far from their edges for 10,000 resamples) → CI = [0.25, 1].

TABLE2 (k = 3 comparisons per prompt, as the ORPO paper's Table 2 samples three answers per prompt):
    prompt  outcomes        mean   prompt is
    0       1, 1, 0.5       5/6    won
    1       1, 0, 0.5       1/2    tied
    2       0, 0, 1         1/3    lost
    3       1, 1, 1         1      won
    4       1, 0.5, 0.5     2/3    won
    wins 2+1+1+3+1 = 8, ties 1+1+0+0+2 = 4, losses 0+1+2+0+0 = 3, n = 15; win rate = (8 + 4/2) / 15 = 2/3.
    sign test on prompts: 3 won, 1 lost (1 tied, excluded): p = 0.625 as above. (On comparisons, 8 against 3, it
    would be 2 · (1 + 11 + 55 + 165) / 2^11 = 0.227: three answers to one prompt are not three independent trials.)
"""
import json
import math
import warnings

import pytest
import torch

from orpo.errors import OrpoError
from orpo.stats import (
    bootstrap_mean_ci, comparison_record, length_controlled_win_rate, pairwise_outcome, reward_outcome, sign_test_p,
    win_stats,
)

TABLE2 = [[1, 1, 0.5], [1, 0, 0.5], [0, 0, 1], [1, 1, 1], [1, 0.5, 0.5]]


def records(outcomes, lengths=lambda i, j: (100, 100)):
    """Per-prompt records of a table of outcomes; `lengths(prompt, sample)` → (length_a, length_b)."""
    return [{"prompt": f"p{i}", "comparisons": [
        {"outcome": o, "length_a": lengths(i, j)[0], "length_b": lengths(i, j)[1]} for j, o in enumerate(row)]}
        for i, row in enumerate(outcomes)]


def test_sign_test_p_exact_values():
    assert sign_test_p(3, 1) == pytest.approx(0.625)
    assert sign_test_p(6, 1) == pytest.approx(0.125)  # 2 · (1 + 7) / 128
    assert sign_test_p(1, 6) == pytest.approx(0.125)  # two-sided: symmetric
    assert sign_test_p(5, 0) == pytest.approx(0.0625)  # 2 / 2^5
    assert sign_test_p(3, 3) == 1.0 and sign_test_p(0, 0) == 1.0
    assert sign_test_p(20, 0) == pytest.approx(2 / 2**20)


def test_bootstrap_ci_matches_the_normal_approximation_and_is_reproducible():
    """0/1 values, half each, each its own group: mean 0.5, standard error 0.5 / √100 = 0.05, so the 95% CI is about
    0.5 ± 1.96 · 0.05 = [0.402, 0.598]."""
    groups = [[0.0], [1.0]] * 50
    low, high = bootstrap_mean_ci(groups, seed=3)
    assert low == pytest.approx(0.402, abs=0.02) and high == pytest.approx(0.598, abs=0.02)
    assert bootstrap_mean_ci(groups, seed=3) == (low, high)
    assert bootstrap_mean_ci([[0.25]] * 7) == pytest.approx((0.25, 0.25))


def test_the_seed_makes_the_bootstrap_reproducible_and_only_the_seed_changes_it():
    values = [[x] for x in torch.rand(40, generator=torch.Generator().manual_seed(0)).tolist()]
    assert bootstrap_mean_ci(values, seed=7) == bootstrap_mean_ci(values, seed=7)
    assert bootstrap_mean_ci(values, seed=7) != bootstrap_mean_ci(values, seed=8)
    stats = win_stats(records(TABLE2), seed=7)
    assert win_stats(records(TABLE2), seed=7) == stats


def test_bootstrap_resamples_prompts_not_samples():
    """10 prompts of 10 comparisons each: 5 prompts A wins all 10, 5 it loses all 10; win rate 1/2.
    Resampling prompts: a resample's win rate is (won prompts drawn) / 10, ~ Binomial(10, 1/2) / 10; cumulative
    P(≤ 1) = 0.011, P(≤ 2) = 0.055, P(≤ 7) = 0.945, P(≤ 8) = 0.989 → CI = [0.2, 0.8]. Resampling the 100
    comparisons independently would give 0.5 ± 1.96 · 0.5/√100 ≈ [0.4, 0.6]."""
    stats = win_stats(records([[1] * 10] * 5 + [[0] * 10] * 5))
    assert stats.win_rate == 0.5 and stats.comparisons == 100 and stats.prompts == 10
    assert stats.win_rate_ci == pytest.approx((0.2, 0.8))


def test_prompts_of_different_sizes_weigh_by_their_comparisons():
    """Prompt 0: [1] (k = 1), prompt 1: [0, 0, 0] (k = 3): win rate = 1/4 (each comparison once). Resamples: both
    prompts 0 (p = 1/4) → 1, both prompts 1 (1/4) → 0, one of each (1/2) → 1/4; so the CI is [0, 1]."""
    stats = win_stats(records([[1], [0, 0, 0]]))
    assert stats.win_rate == 0.25 and stats.wins == 1 and stats.losses == 3
    assert stats.win_rate_ci == pytest.approx((0.0, 1.0))
    assert bootstrap_mean_ci([[1.0], [0.0, 0.0, 0.0]], resamples=20_000, confidence=0.4) == pytest.approx((0.25, 0.25))


def test_win_stats_four_prompts_by_hand():
    stats = win_stats(records([[1], [1], [1], [0]]))
    assert (stats.wins, stats.ties, stats.losses, stats.prompts, stats.comparisons) == (3, 0, 1, 4, 4)
    assert stats.win_rate == 0.75
    assert stats.sign_test_p == pytest.approx(0.625)
    assert stats.win_rate_ci == pytest.approx((0.25, 1.0)) and stats.confidence == 0.95


def test_win_stats_three_samples_per_prompt_by_hand():
    stats = win_stats(records(TABLE2))
    assert (stats.wins, stats.ties, stats.losses, stats.comparisons, stats.prompts) == (8, 4, 3, 15, 5)
    assert stats.win_rate == pytest.approx(2 / 3)
    assert (stats.prompts_won, stats.prompts_tied, stats.prompts_lost) == (3, 1, 1)
    assert stats.sign_test_p == pytest.approx(0.625)
    low, high = stats.win_rate_ci
    # a resample's win rate is a mean of prompt means, each in [1/3, 1]; 2/3 is the median prompt's
    assert 1 / 3 <= low < 2 / 3 < high <= 1
    assert stats.lc_win_rate == pytest.approx(2 / 3, abs=1e-12) and stats.length_coef == 0  # equal lengths


def test_mean_lengths():
    """Lengths (A, B) = (10·(i+1) + j, 5) for prompt i, sample j of TABLE2: A's mean = 10 · mean(1..5) + mean(0..2) =
    30 + 1 = 31; B's 5."""
    stats = win_stats(records(TABLE2, lambda i, j: (10 * (i + 1) + j, 5)))
    assert stats.mean_length_a == pytest.approx(31.0) and stats.mean_length_b == 5.0


def test_length_controlled_equals_raw_when_lengths_do_not_differ():
    """No length signal: Δ all equal (0, or a constant +40 that θ cannot be told from): t = 0, and the fit's
    θ-equation Σ (σ(θ) − o) = 0 gives σ(θ) = mean o, the raw win rate."""
    for lengths in (lambda i, j: (100, 100), lambda i, j: (140, 100)):
        stats = win_stats(records(TABLE2, lengths))
        assert stats.lc_win_rate == pytest.approx(stats.win_rate, abs=1e-12) and stats.length_coef == 0


def test_length_controlled_moves_toward_half_when_wins_come_with_longer_answers():
    """20 prompts, k = 1: A's answer is 50 characters longer on 12 and wins all 12, 50 shorter on 8 and loses all 8:
    raw win rate 0.6, all of it explained by length. t = ±tanh(50/sd) = ±c for wins / losses; φ grows until the
    ridge holds it, and θ's equation 12 · (1 − σ(θ + φc)) = 8 · σ(θ − φc) becomes, for φc ≫ 1,
    12 · e^(−θ−φc) = 8 · e^(θ−φc): e^(2θ) = 12/8, σ(θ) = √1.5 / (1 + √1.5) = 0.5505."""
    stats = win_stats(records([[1]] * 12 + [[0]] * 8, lambda i, j: (150, 100) if i < 12 else (50, 100)))
    assert stats.win_rate == 0.6
    assert stats.lc_win_rate == pytest.approx(math.sqrt(1.5) / (1 + math.sqrt(1.5)), abs=0.01)
    assert stats.length_coef > 3
    # the same outcomes with lengths unrelated to them keep the raw rate
    assert win_stats(records([[1]] * 12 + [[0]] * 8)).lc_win_rate == pytest.approx(0.6, abs=1e-12)


def test_length_controlled_fit_recovers_the_generating_model():
    """4000 comparisons drawn from the model itself, logit P(A wins) = θ + φ · tanh(Δ/sd(Δ)) with θ = 0.4,
    φ = 1.5 and A's answers longer on average (Δ ~ N(150, 200²)): the raw win rate is biased up by length, the fit
    finds θ and φ (standard errors 0.04 and 0.07) and lc_win_rate ≈ σ(0.4) = 0.599."""
    generator = torch.Generator().manual_seed(0)
    delta = 150 + 200 * torch.randn(4000, generator=generator, dtype=torch.float64)
    t = torch.tanh(delta / delta.std())
    outcomes = (torch.rand(4000, generator=generator, dtype=torch.float64) < torch.sigmoid(0.4 + 1.5 * t)).double()
    lc, phi = length_controlled_win_rate(outcomes.tolist(), delta.tolist())
    assert phi == pytest.approx(1.5, abs=0.2)
    assert lc == pytest.approx(torch.sigmoid(torch.tensor(0.4)).item(), abs=0.025)
    assert outcomes.mean().item() > lc + 0.05  # what the length-controlled rate removes


@pytest.mark.parametrize("table, win_rate, p", [
    ([[0.5, 0.5]] * 3, 0.5, 1.0),  # all ties: no prompt won or lost
    ([[1, 1]] * 3, 1.0, 2 / 2**3),  # all wins
    ([[0]] * 2, 0.0, 2 / 2**2),  # all losses
    ([[0]], 0.0, 1.0),  # one prompt, one comparison: 2 · 1/2
    ([[1, 0, 0.5]], 0.5, 1.0),  # one prompt, tied
])
def test_edge_cases_are_finite_and_quiet(table, win_rate, p):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = win_stats(records(table, lambda i, j: (10 * i + 7 * j + 3, 20)))
    assert stats.win_rate == win_rate and stats.sign_test_p == pytest.approx(p)
    assert all(math.isfinite(x) for x in (*stats.win_rate_ci, stats.lc_win_rate, stats.length_coef))
    # one prompt, or every prompt alike: every resample is the data itself
    assert stats.win_rate_ci == pytest.approx((win_rate, win_rate))
    assert 0 <= stats.lc_win_rate <= 1
    if len({x for row in table for x in row}) == 1:  # one outcome throughout: nothing for length to explain
        assert stats.lc_win_rate == win_rate and stats.length_coef == 0


def test_records_round_trip_through_jsonl(tmp_path):
    """The records a command writes (answers, extra keys) → JSONL → read back → the same statistics."""
    rows = []
    for i, row in enumerate(TABLE2):
        comparisons = [comparison_record(o, "a" * (40 + 30 * i + j), "b" * (60 - 5 * j)) for j, o in enumerate(row)]
        rows.append({"prompt": i, "text": f"question {i}", "comparisons": comparisons})
    path = tmp_path / "winstats_records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = [json.loads(line) for line in path.read_text().splitlines()]
    assert win_stats(read, seed=5) == win_stats(rows, seed=5)
    reported = json.loads(json.dumps(win_stats(rows, seed=5).as_dict()))
    assert reported == json.loads(json.dumps(win_stats(read, seed=5).as_dict()))
    assert reported["comparisons"] == 15 and reported["mean_length_b"] == pytest.approx(55.0)


def test_comparison_record_lengths_are_characters():
    assert comparison_record(0.5, "héllo", "hi") == {
        "outcome": 0.5, "answer_a": "héllo", "answer_b": "hi", "length_a": 5, "length_b": 2}


def test_reward_outcome():
    assert reward_outcome(1.2, 0.3) == 1.0 and reward_outcome(-1.0, 0.0) == 0.0 and reward_outcome(0.5, 0.5) == 0.5
    with pytest.raises(OrpoError, match="finite scores"):
        reward_outcome(math.nan, 0.0)


@pytest.mark.parametrize("a_first, b_first, outcome", [
    ("first", "second", 1.0),  # A preferred in both orders
    ("second", "first", 0.0),  # B preferred in both orders
    ("first", "first", 0.5),  # the judge prefers whatever it sees first: a tie
    ("second", "second", 0.5),
    ("tie", "tie", 0.5),
    ("first", "tie", 0.5),  # one preference against one tie: a tie
    ("tie", "first", 0.5),
])
def test_pairwise_outcome_both_orders(a_first, b_first, outcome):
    assert pairwise_outcome(a_first, b_first) == outcome


def test_pairwise_outcome_refuses_unknown_verdicts():
    with pytest.raises(OrpoError, match="'A'.*first, second, tie"):
        pairwise_outcome("A", "first")


@pytest.mark.parametrize("bad, message", [
    ([], "no records"),
    ([{"prompt": "q1", "comparisons": []}], r"record 0 \(prompt 'q1'\): 'comparisons' must be a non-empty list"),
    ([{"prompt": 3}], r"record 0 \(prompt 3\): 'comparisons'"),
    (records([[1], [2]]), r"record 1 \(prompt 'p1'\), comparison 0: outcome 2; accepted: 1 \(A wins\)"),
    (records([[1], [True]]), r"record 1 .*outcome True"),
    (records([[math.nan]]), "outcome nan"),
    (records([[1]], lambda i, j: (-1, 3)), "length_a -1; accepted: an answer's length in characters"),
    (records([[1]], lambda i, j: (1, 2.5)), "length_b 2.5"),
    (["not a record"], "record 0: 'comparisons'"),
])
def test_bad_records_are_one_line(bad, message):
    with pytest.raises(OrpoError, match=message) as error:
        win_stats(bad)
    assert "\n" not in str(error.value)
