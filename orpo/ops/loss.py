"""The ORPO objective: per-pair completion log-probs and NLL sums in, scalar loss and metrics out; and the
Bradley-Terry loss of a reward model (`bradley_terry_loss`), normalised over the step the same way.

Hong, Lee & Thorne 2024 (arXiv 2403.07691), Section 3:

    L      = L_SFT + λ · L_OR                                             (Eq. 6)
    L_OR   = −log σ( log odds(y_w|x) − log odds(y_l|x) )                   (Eq. 7)
    odds(y|x) = P(y|x) / (1 − P(y|x))                                      (Eq. 4)
    log P(y|x) = ℓ = (1/|y|) Σ_t log p(y_t | x, y_<t)   (length-normalised, Section 3)

so `log odds = ℓ − log(1 − exp(ℓ)) = ℓ − log1mexp(ℓ)`. λ is `beta` (TRL's name).

Normalisation (ARCHITECTURE.md): the NLL is a token mean over all NLL tokens of the optimizer
step and the OR term a mean over all pairs of the step. A micro-batch therefore contributes
`nll_sum / nll_tokens_in_step + beta * or_sum / pairs_in_step`; summing the micro-batches of a
step gives exactly the loss of the whole step, however it is split.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# log(1 − e^ℓ) → −inf as ℓ → 0; a completion the model predicts with certainty would give an
# infinite log-odds. Clamping ℓ keeps value and gradient finite (the OR term saturates there).
MAX_LOGP = -1e-6
_LN2 = math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, stable in value and gradient (Mächler 2012).

    x > −ln 2: log(−expm1(x)); x ≤ −ln 2: log1p(−exp(x)). x is first clamped to ≤ −1e-6, and each
    branch's input is clamped to its own domain before it is evaluated, so the branch that
    `torch.where` discards never produces inf/NaN (which would poison the gradient).
    """
    x = x.clamp(max=MAX_LOGP)
    near_zero = x > -_LN2
    x_near = x.clamp(min=-_LN2)
    x_far = x.clamp(max=-_LN2)
    return torch.where(near_zero, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def log_odds_ratio(logps_chosen: torch.Tensor, logps_rejected: torch.Tensor) -> torch.Tensor:
    """log odds(y_w|x) − log odds(y_l|x), in fp32.

    logps_chosen, logps_rejected: [pairs], mean log-prob per completion token (ℓ ≤ 0).
    Returns [pairs].
    """
    chosen = logps_chosen.float()
    rejected = logps_rejected.float()
    return (chosen - log1mexp(chosen)) - (rejected - log1mexp(rejected))


def orpo_loss(
    logps_chosen: torch.Tensor,
    logps_rejected: torch.Tensor,
    nll_sum: torch.Tensor,
    beta: float,
    nll_tokens_in_step: torch.Tensor | float,
    pairs_in_step: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO loss contribution of one micro-batch.

    logps_chosen, logps_rejected: [pairs] mean completion log-probs (fp32).
    nll_sum: scalar, Σ −log p over this micro-batch's NLL tokens (chosen completion, plus the
        prompt when nll_scope == "full").
    nll_tokens_in_step, pairs_in_step: totals over the whole optimizer step (all micro-batches and
        ranks), the normalisers of the NLL token mean and of the OR pair mean.
    Returns (loss scalar, or_loss [pairs] = −log σ(log_odds), log_odds [pairs]).
    """
    log_odds = log_odds_ratio(logps_chosen, logps_rejected)
    or_loss = -F.logsigmoid(log_odds)
    loss = nll_sum.float() / nll_tokens_in_step + beta * or_loss.sum() / pairs_in_step
    return loss, or_loss, log_odds


def bradley_terry_loss(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor, pairs_in_step: torch.Tensor | float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A reward model's loss contribution of one micro-batch (Bradley-Terry; InstructGPT, Ouyang et al. 2022, Eq. 1):

        L = mean over the optimizer step's pairs of −log σ(r_chosen − r_rejected)

    rewards_chosen, rewards_rejected: [pairs] the model's scalar rewards of each pair's two answers (any dtype;
    computed in fp32, with logsigmoid, which neither overflows nor underflows at any margin).
    pairs_in_step: the pairs of the whole optimizer step (all micro-batches and ranks), as for the OR term.
    Returns (loss scalar, bt_loss [pairs] = −log σ(margin), margin [pairs] = r_chosen − r_rejected)."""
    margin = rewards_chosen.float() - rewards_rejected.float()
    bt_loss = -F.logsigmoid(margin)
    return bt_loss.sum() / pairs_in_step, bt_loss, margin
