"""The statistics of every verdict: Wilson intervals, the validation criteria (accuracy, margin,
loss), the paired test of a steered state against no steering, and McNemar's exact test."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from austeer_pl.errors import AusteerError


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> Interval:
    """Wilson score interval for a proportion (95% by default); ``(0, 1)`` when ``n == 0``.

    Example:
        >>> wilson_interval(80, 100)
        Interval(low=0.711..., high=0.866...)
    """
    if n <= 0:
        return Interval(0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(max(0.0, centre - half), min(1.0, centre + half))


#: Validation criteria of the grid: higher is better for each (``loss`` is negated).
CRITERIA = ("accuracy", "margin", "loss")


def reported(criterion: str, value: float) -> float:
    """A criterion's value as a report shows it: a loss as a loss (lower is better); the others as they are.

    :func:`criterion_values` negates the loss so that every criterion is higher-is-better inside the
    choice; exported grids and summaries undo that.
    """
    return -value if criterion == "loss" else value


def criterion_values(stats: torch.Tensor, criterion: str) -> torch.Tensor:
    """Per-example values of ``criterion`` from :class:`~austeer_pl.fit.gridscore.GridScorer` statistics ``(..., 3)``; higher is better."""
    if criterion not in CRITERIA:
        raise AusteerError(f"unknown selection criterion '{criterion}'; choose one of {', '.join(CRITERIA)}")
    column = {"accuracy": 0, "margin": 1, "loss": 2}[criterion]
    values = stats[..., column]
    return -values if criterion == "loss" else values


def _normal_quantile(p: float) -> float:
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(p, dtype=torch.float64)))


def paired_verdict(
    steered: torch.Tensor,
    unsteered: torch.Tensor,
    criterion: str,
    *,
    level: float = 0.05,
    tests: int = 1,
    what: str = "the steered state",
) -> dict[str, Any]:
    """Whether ``steered`` beats ``unsteered`` on the same examples beyond the noise.

    Both are ``(n, 3)`` per-example statistics (:data:`~austeer_pl.scoring.loglik.DECISION_STATISTICS`). The
    per-example criterion gain must exceed ``z * se`` (``z`` the normal quantile of ``1 - level /
    tests``: a one-sided paired test, Bonferroni-corrected for ``tests`` comparisons), and accuracy
    must not drop. Returns ``helps``, ``reason``, ``gain``, ``gain_se``, ``threshold``,
    ``accuracy_gain`` and ``n``.
    """
    n = steered.shape[0]
    d = criterion_values(steered, criterion) - criterion_values(unsteered, criterion)
    gain = float(d.mean()) if n else 0.0
    se = float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("inf")
    acc_gain = float(steered[:, 0].mean() - unsteered[:, 0].mean()) if n else 0.0
    z = _normal_quantile(1.0 - min(level, 1.0) / max(1, tests)) if level < 1 else 0.0
    out = {
        "helps": False,
        "gain": gain,
        "gain_se": se,
        "threshold": z * se,
        "accuracy_gain": acc_gain,
        "n": n,
        "tests": tests,
    }
    if level >= 1:
        out.update(helps=True, reason="verdict off (--model.verdict_level 1)")
    elif gain <= z * se:
        out["reason"] = (
            f"{what}'s validation {criterion} gain {gain:+.4f} is within the noise "
            f"({z:.2f} x se {se:.4f} over {n} examples, {tests} comparisons)"
        )
    elif acc_gain < 0:
        out["reason"] = f"{what} by {criterion} lowers validation accuracy ({acc_gain:+.3f})"
    else:
        out.update(helps=True, reason=f"validation {criterion} gain {gain:+.4f} > {z:.2f} x se {se:.4f} ({n} examples)")
    return out


def mcnemar(base_correct: Sequence[int], new_correct: Sequence[int]) -> dict[str, Any]:
    """McNemar's exact test of two models scored right/wrong on the same examples.

    Only the discordant examples count: ``gained`` (wrong before, right after) and ``lost``; under
    the null hypothesis of equal accuracy each discordant example goes either way with probability
    1/2, so the two-sided p-value is ``min(1, 2 * P(Binomial(gained + lost, 1/2) <= min(gained, lost)))``.

    Example:
        >>> mcnemar([0, 0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1, 0])["p_value"]  # 6 gained, 1 lost
        0.125
    """
    if len(base_correct) != len(new_correct):
        raise ValueError("both models must be scored on the same examples")
    gained = sum(1 for a, b in zip(base_correct, new_correct) if not a and b)
    lost = sum(1 for a, b in zip(base_correct, new_correct) if a and not b)
    m = gained + lost
    tail = sum(math.comb(m, i) for i in range(min(gained, lost) + 1)) / 2**m if m else 1.0
    return {
        "gained": gained,
        "lost": lost,
        "p_value": min(1.0, 2 * tail),
        "significant_at_0.05": m > 0 and min(1.0, 2 * tail) < 0.05,
    }
