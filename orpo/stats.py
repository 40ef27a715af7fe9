"""The statistics of comparing two models: a sign test, a bootstrap CI over groups, and the win rate of A against B.

Pure functions of numbers and plain records: no models, no files. `orpo eval --compare` (commands/compare.py) uses the
sign test and the bootstrap; `win_stats` is the summary of a head-to-head of two models' sampled answers.

Records (one per prompt, JSON-ready; the keys below are read, any others, e.g. the answers and the scores or
verdicts, are kept by the caller and ignored here):

    {"prompt": 17, "comparisons": [{"outcome": 1, "length_a": 412, "length_b": 230}, ...]}   (k comparisons)

One comparison is one answer of A against one answer of B to the prompt (the ORPO paper's Table 2 samples k = 3
answers per prompt at temperature 1.0 and judges them with a reward model). Its `outcome`, for A:
    1 = A wins, 0.5 = tie, 0 = B wins
  - a reward model (`reward_outcome`): 1 if score_A > score_B, 0 if score_A < score_B, 0.5 if equal;
  - a pairwise judge asked in both orders (`pairwise_outcome`): each order's verdict is read as an outcome for A;
    the two orders agreeing give that outcome, disagreeing (including one tie against one preference) give 0.5,
    so a judge that prefers whichever answer it sees first gives ties, not wins.
`length_a`, `length_b`: the answers' lengths in CHARACTERS (`comparison_record`; AlpacaEval's choice): comparable
between two models whatever their tokenizers.

`win_stats(records)` → `WinStats`, with n comparisons over G prompts, o_ij the outcome of comparison j of prompt i:
  - wins, ties, losses: counts of outcomes 1, 0.5, 0 over all comparisons;
  - win_rate = Σ o_ij / n = (wins + ties / 2) / n (ties count half: the AlpacaEval convention);
  - win_rate_ci: percentile bootstrap over PROMPTS (`bootstrap_mean_ci`): G prompts drawn with replacement, each with
    all its k comparisons (the prompt, not the sample, is the unit of independence: k answers to one prompt share
    its difficulty), the win rate of each resample, its (1 ∓ confidence)/2 quantiles; seeded, so reruns are equal;
  - sign_test_p: exact two-sided sign test (`sign_test_p`) of prompts won against prompts lost: a prompt is won
    when its mean outcome is > 1/2, lost when < 1/2, tied otherwise (ties excluded). On prompts, not comparisons,
    for the same independence; with k = 1 it is the sign test of wins against losses;
  - lc_win_rate: the length-controlled win rate of AlpacaEval 2 (Dubois, Galambosi, Liang, Hashimoto 2024,
    "Length-Controlled AlpacaEval: A Simple Way to Debias Automatic Evaluators", arXiv 2404.04475, Sec. 3).
    Their GLM predicts the preference from a model term, a length term and an instruction term,
        P(A wins | x) = σ( (θ_A − θ_B) + φ · tanh(Δlen / sd(Δlen)) + (ψ_A − ψ_B) · γ_x ),
    fitted by logistic regression to the (soft) preferences, and reports the preference it predicts with the length
    difference set to zero, averaged over instructions. γ_x, an instruction's difficulty, is estimated in AlpacaEval
    from the leaderboard's many models; two models cannot estimate it, so the instruction term is left out:
        logit P(o_ij = 1) = θ + φ · t_ij,   t_ij = tanh(Δ_ij / sd(Δ)),   Δ_ij = length_a − length_b (chars),
    sd the sample standard deviation over all comparisons (t = 0 when sd = 0: a constant difference cannot be told
    from θ), fitted by maximum likelihood with the outcome as a soft label (a tie is half a win and half a loss, as
    AlpacaEval fits its soft preferences):
        minimise  Σ_ij [ softplus(z_ij) − o_ij · z_ij ] + ½ · λ · φ²,  z_ij = θ + φ · t_ij,
    by Newton's method; then lc_win_rate = mean_ij σ(θ + φ · 0) = σ(θ). The ridge term (λ = 1e-2: sklearn's
    C = 100, AlpacaEval's value where it does not cross-validate) keeps φ finite when length separates wins from
    losses; θ is not penalised, so with no length signal (all Δ equal) the fit gives σ(θ) = win_rate exactly, and
    when A wins only with its longer answers φ takes the wins and σ(θ) moves toward 1/2. All outcomes equal (all
    wins, all losses) leave θ infinite: lc_win_rate = win_rate, φ = 0. Also reported: `length_coef` (φ, per unit
    of t). Left out besides γ_x, for want of the data: AlpacaEval penalises all its weights (L1, its strength
    chosen by 5-fold cross-validation) and pulls them toward a fit on verbose and concise versions of its
    baseline's answers;
  - mean_length_a, mean_length_b: the answers' mean lengths over all comparisons (characters).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from orpo.errors import OrpoError

CONFIDENCE = 0.95
RESAMPLES = 10_000
LENGTH_RIDGE = 1e-2  # λ of the length-controlled fit: ½·λ·φ² (sklearn's C = 1/λ = 100)
OUTCOMES = {1: "A wins", 0.5: "tie", 0: "B wins"}
VERDICTS = ("first", "second", "tie")


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign test: P(a split at least as uneven as wins:losses | p = 1/2).

    p = min(1, 2 · Σ_{k ≤ min(wins, losses)} C(n, k) / 2^n), n = wins + losses; 1.0 when n = 0.
    Example: 5 wins, 0 losses → 2 · 1/32 = 0.0625.
    """
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2**n)


def bootstrap_mean_ci(groups: list[list[float]], seed: int = 0, resamples: int = RESAMPLES,
                      confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of all values, resampling whole GROUPS (e.g. a prompt's k comparisons).

    `groups`: G non-empty lists of values (one value per group: the plain bootstrap of those values). Each resample
    draws G groups with replacement (a seeded generator), its mean is Σ of the drawn groups' values / their count;
    the CI is the (1 ∓ confidence)/2 quantiles (linear interpolation) of the `resamples` means.
    """
    sums = torch.tensor([sum(g) for g in groups], dtype=torch.float64)
    sizes = torch.tensor([len(g) for g in groups], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randint(len(groups), (resamples, len(groups)), generator=generator)
    means = sums[drawn].sum(dim=1) / sizes[drawn].sum(dim=1)
    q = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
    low, high = torch.quantile(means, q).tolist()
    return low, high


def reward_outcome(score_a: float, score_b: float) -> float:
    """A reward model's scores of A's and B's answers → A's outcome: 1 if score_a > score_b, 0 if <, 0.5 if equal."""
    if not (math.isfinite(score_a) and math.isfinite(score_b)):
        raise OrpoError(f"reward scores {score_a!r} (A) and {score_b!r} (B): a comparison needs two finite scores")
    return 1.0 if score_a > score_b else 0.0 if score_a < score_b else 0.5


def pairwise_outcome(verdict_a_first: str, verdict_b_first: str) -> float:
    """A pairwise judge asked twice, A's answer shown first then B's → A's outcome (1, 0.5, 0).

    Each verdict names the answer the judge preferred by its position: "first", "second" or "tie". A wins an order
    where its answer is the one preferred; the two orders agreeing give that outcome, disagreeing give a tie (0.5).
    """
    for verdict in (verdict_a_first, verdict_b_first):
        if verdict not in VERDICTS:
            raise OrpoError(f"judge verdict {verdict!r}: expected one of {', '.join(VERDICTS)}")
    as_a = {"first": 1.0, "second": 0.0, "tie": 0.5}
    first, second = as_a[verdict_a_first], 1.0 - as_a[verdict_b_first]  # B first: "second" is A
    return first if first == second else 0.5


def comparison_record(outcome: float, answer_a: str, answer_b: str) -> dict:
    """One comparison as `win_stats` reads it: the outcome for A and both answers with their lengths in characters."""
    return {"outcome": outcome, "answer_a": answer_a, "answer_b": answer_b,
            "length_a": len(answer_a), "length_b": len(answer_b)}


@dataclass(frozen=True)
class WinStats:
    """A against B over `prompts` prompts and `comparisons` comparisons (the module docstring gives each formula)."""

    prompts: int
    comparisons: int
    wins: int
    ties: int
    losses: int
    win_rate: float
    win_rate_ci: tuple[float, float]
    confidence: float
    prompts_won: int
    prompts_tied: int
    prompts_lost: int
    sign_test_p: float
    lc_win_rate: float
    length_coef: float
    mean_length_a: float
    mean_length_b: float

    def as_dict(self) -> dict:
        return asdict(self)


def win_stats(records: list[dict], seed: int = 0, resamples: int = RESAMPLES,
              confidence: float = CONFIDENCE) -> WinStats:
    """Per-prompt records (module docstring) → WinStats. Bad records are one OrpoError line naming the record."""
    outcomes, deltas, lengths_a, lengths_b = _read_records(records)
    flat = [o for prompt in outcomes for o in prompt]
    n = len(flat)
    wins, ties = flat.count(1.0), flat.count(0.5)
    # a prompt's mean outcome against 1/2, in integers: 2·Σo (half-points) against its k
    won = sum(2 * sum(p) > len(p) for p in outcomes)
    lost = sum(2 * sum(p) < len(p) for p in outcomes)
    low, high = bootstrap_mean_ci(outcomes, seed, resamples, confidence)
    win_rate = sum(flat) / n
    lc_win_rate, length_coef = length_controlled_win_rate(flat, deltas)
    return WinStats(
        prompts=len(outcomes), comparisons=n, wins=wins, ties=ties, losses=n - wins - ties,
        win_rate=win_rate, win_rate_ci=(low, high), confidence=confidence,
        prompts_won=won, prompts_tied=len(outcomes) - won - lost, prompts_lost=lost,
        sign_test_p=sign_test_p(won, lost),
        lc_win_rate=lc_win_rate, length_coef=length_coef,
        mean_length_a=sum(lengths_a) / n, mean_length_b=sum(lengths_b) / n,
    )


def length_controlled_win_rate(outcomes: list[float], length_deltas: list[float],
                               ridge: float = LENGTH_RIDGE) -> tuple[float, float]:
    """(σ(θ), φ) of the fit logit P(A wins) = θ + φ · tanh(Δ / sd(Δ)) (module docstring: AlpacaEval 2's LC).

    `outcomes`: o in {0, 0.5, 1} per comparison; `length_deltas`: length_a − length_b per comparison, same order.
    Newton's method on the penalised soft-label log-loss (convex; strictly, with the ridge on φ and 0 < mean o < 1),
    each step halved until the loss does not rise, in float64.
    """
    y = torch.tensor(outcomes, dtype=torch.float64)
    mean = y.mean().item()
    if mean in (0.0, 1.0):  # no loss or no win: θ = ±∞, nothing for length to explain
        return mean, 0.0
    delta = torch.tensor(length_deltas, dtype=torch.float64)
    sd = delta.std().item() if len(length_deltas) > 1 else 0.0
    t = torch.tanh(delta / sd) if sd > 0 else torch.zeros_like(delta)
    features = torch.stack([torch.ones_like(t), t], dim=1)  # [n, 2]: θ, φ
    penalty = torch.tensor([0.0, ridge], dtype=torch.float64)

    def loss(beta):
        z = features @ beta
        return (torch.nn.functional.softplus(z) - y * z).sum() + 0.5 * (penalty * beta**2).sum()

    beta = torch.tensor([math.log(mean / (1 - mean)), 0.0], dtype=torch.float64)  # the fit without length
    current = loss(beta)
    for _ in range(100):
        p = torch.sigmoid(features @ beta)
        grad = features.T @ (p - y) + penalty * beta
        hessian = (features * (p * (1 - p))[:, None]).T @ features + torch.diag(penalty)
        step = torch.linalg.solve(hessian, grad)
        scale = 1.0
        while scale > 1e-10:
            candidate = beta - scale * step
            value = loss(candidate)
            if value <= current:
                break
            scale /= 2
        else:
            break  # no step lowers the loss: at the minimum to float precision
        beta, current = candidate, value
        if (scale * step).abs().max().item() < 1e-12:
            break
    theta, phi = beta.tolist()
    return 1 / (1 + math.exp(-theta)), phi


def _read_records(records: list[dict]) -> tuple[list[list[float]], list[float], list[int], list[int]]:
    """(outcomes per prompt, length deltas, lengths of A, lengths of B), the last three per comparison in order."""
    if not records:
        raise OrpoError("win statistics: no records (one record per prompt, each with a non-empty 'comparisons' list)")
    outcomes, deltas, lengths_a, lengths_b = [], [], [], []
    for i, record in enumerate(records):
        where = f"record {i}" + (f" (prompt {record['prompt']!r})" if isinstance(record, dict) and "prompt" in record
                                 else "")
        comparisons = record.get("comparisons") if isinstance(record, dict) else None
        if not isinstance(comparisons, list) or not comparisons:
            raise OrpoError(f"{where}: 'comparisons' must be a non-empty list of "
                            "{'outcome': 1 | 0.5 | 0, 'length_a': int, 'length_b': int}")
        prompt = []
        for j, comparison in enumerate(comparisons):
            if not isinstance(comparison, dict):
                raise OrpoError(f"{where}, comparison {j}: {comparison!r} is not an object with 'outcome', "
                                "'length_a', 'length_b'")
            outcome = comparison.get("outcome")
            if isinstance(outcome, bool) or outcome not in OUTCOMES:
                accepted = ", ".join(f"{k} ({v})" for k, v in OUTCOMES.items())
                raise OrpoError(f"{where}, comparison {j}: outcome {outcome!r}; accepted: {accepted}")
            for key in ("length_a", "length_b"):
                value = comparison.get(key)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise OrpoError(f"{where}, comparison {j}: {key} {value!r}; accepted: an answer's length in "
                                    "characters, an integer >= 0")
            prompt.append(float(outcome))
            lengths_a.append(comparison["length_a"])
            lengths_b.append(comparison["length_b"])
            deltas.append(comparison["length_a"] - comparison["length_b"])
        outcomes.append(prompt)
    return outcomes, deltas, lengths_a, lengths_b
