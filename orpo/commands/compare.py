"""`orpo eval --compare`: two models on the same preference pairs, pair by pair.

A model "gets a pair right" when its log_odds > 0 (it gives the chosen completion higher odds
than the rejected one). For models A (`--model`) and B (`--compare`), per pair:
    Δlog_odds = log_odds_A − log_odds_B, Δlogp_chosen = ℓ_chosen,A − ℓ_chosen,B, Δlogp_rejected alike
(ℓ: mean log-prob per completion token; the quantities of the paper's Fig. 3). The summary:
  - each model's accuracy and mean log_odds;
  - fixed = pairs B has wrong and A right, broken = the reverse;
  - sign_test_p: exact two-sided binomial test (orpo/stats.py) of fixed vs broken (the pairs both get right or
    both wrong carry no information on which model is better), H0: a changed pair is as likely
    fixed as broken;
  - mean Δlog_odds with a percentile bootstrap 95% CI over pairs (orpo/stats.py; seeded, so reproducible);
  - mean Δlogp_chosen and Δlogp_rejected.
"""
from __future__ import annotations

from orpo.stats import bootstrap_mean_ci, sign_test_p


def compare_records(records_a: list[dict], records_b: list[dict], seed: int = 0) -> tuple[list[dict], dict]:
    """(per-pair comparison records, summary) of two models' records of the same pairs, same order."""
    if [r["index"] for r in records_a] != [r["index"] for r in records_b]:
        raise ValueError("the two models' records are not of the same pairs in the same order")
    pairs = []
    for a, b in zip(records_a, records_b):
        pairs.append({
            "index": a["index"],
            "log_odds_a": a["log_odds"],
            "log_odds_b": b["log_odds"],
            "delta_log_odds": a["log_odds"] - b["log_odds"],
            "delta_logp_chosen": a["chosen_logp_mean"] - b["chosen_logp_mean"],
            "delta_logp_rejected": a["rejected_logp_mean"] - b["rejected_logp_mean"],
            "change": _change(a["log_odds"] > 0, b["log_odds"] > 0),
        })
    n = len(pairs)
    fixed = sum(p["change"] == "fixed" for p in pairs)
    broken = sum(p["change"] == "broken" for p in pairs)
    deltas = [p["delta_log_odds"] for p in pairs]
    low, high = bootstrap_mean_ci([[d] for d in deltas], seed)  # each pair its own group
    summary = {
        "pairs": n,
        "accuracy_a": sum(r["log_odds"] > 0 for r in records_a) / n,
        "accuracy_b": sum(r["log_odds"] > 0 for r in records_b) / n,
        "log_odds_a": sum(r["log_odds"] for r in records_a) / n,
        "log_odds_b": sum(r["log_odds"] for r in records_b) / n,
        "fixed": fixed,
        "broken": broken,
        "sign_test_p": sign_test_p(fixed, broken),
        "delta_log_odds": sum(deltas) / n,
        "delta_log_odds_ci95": [low, high],
        "delta_logp_chosen": sum(p["delta_logp_chosen"] for p in pairs) / n,
        "delta_logp_rejected": sum(p["delta_logp_rejected"] for p in pairs) / n,
    }
    return pairs, summary


def _change(right_a: bool, right_b: bool) -> str:
    if right_a == right_b:
        return "both right" if right_a else "both wrong"
    return "fixed" if right_a else "broken"


def format_comparison(summary: dict, name_a: str, name_b: str) -> str:
    """The summary as a small plain-text table."""
    low, high = summary["delta_log_odds_ci95"]
    lines = [
        f"{summary['pairs']} pairs; A = {name_a}, B = {name_b}",
        f"{'':>22} {'A':>9} {'B':>9}",
        f"{'accuracy':>22} {summary['accuracy_a']:>9.3f} {summary['accuracy_b']:>9.3f}",
        f"{'mean log_odds':>22} {summary['log_odds_a']:>9.3f} {summary['log_odds_b']:>9.3f}",
        f"pairs B had wrong and A gets right: {summary['fixed']}; the reverse: {summary['broken']}; "
        f"sign test p = {summary['sign_test_p']:.3g}",
        f"mean Δlog_odds (A − B) {summary['delta_log_odds']:+.4f}, 95% bootstrap CI [{low:+.4f}, {high:+.4f}]",
        f"mean Δlogp per token (A − B): chosen {summary['delta_logp_chosen']:+.4f}, "
        f"rejected {summary['delta_logp_rejected']:+.4f}",
    ]
    return "\n".join(lines)
