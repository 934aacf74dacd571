"""The grid's candidates and the engine's one rule that chooses among them.

:func:`choose` is the pick of every fit (``train.py``, ``--compare``, the benchmarks' replays):
successive halving on a continuous criterion, a harm budget, and a verdict against "no steering"
(candidate 0). :func:`pick` is the one tie rule: the best value, then fewer steered activations,
then the weaker push, then grid order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from austeer_pl.core.fileio import jsonable
from austeer_pl.errors import AusteerError
from austeer_pl.scoring.evaluate import predict
from austeer_pl.scoring.statistics import criterion_values, paired_verdict, reported


# ---------------------------------------------------------------------------- grid scoring and the pick
@dataclass
class Candidate:
    """One grid point of one method, with its state (None for the unsteered model)."""

    method: str
    hyper: dict[str, Any]
    state: Any = None

    @property
    def n_steered(self) -> int:
        return 0 if self.state is None else int(self.state.k)

    @property
    def strength(self) -> float:
        return 0.0 if self.state is None else abs(float(self.state.alpha))


def predictions(
    model,
    tokenizer,
    task,
    state,
    examples,
    prompts,
    *,
    scoring: str,
    batch_size: int,
    max_length: int | None,
    layout=None,
) -> torch.Tensor:
    """Predicted choice per example with ``state`` applied (None: unsteered)."""
    ctx = state.apply(model, layout=layout) if state is not None else nullcontext()
    with ctx:
        return predict(
            model, tokenizer, task, examples, prompts, scoring=scoring, batch_size=batch_size, max_length=max_length
        )


def pick(candidates: Sequence[Candidate], values: Sequence[float], indices: Sequence[int] | None = None) -> int:
    """The index of the best candidate by ``values`` (higher is better).

    The one tie rule of every grid: ties go to fewer steered activations, then the weaker push
    (smaller ``|alpha|``), then grid order.
    """
    indices = list(range(len(candidates))) if indices is None else list(indices)
    if not indices:
        raise AusteerError("no grid point to choose from; give at least one value for each hyperparameter")
    return min(indices, key=lambda i: (-values[i], candidates[i].n_steered, candidates[i].strength, i))


def halving_schedule(n_examples: int, n_candidates: int, *, min_examples: int, eta: int, final: int) -> list[int]:
    """Example counts of successive halving's rounds: ``min_examples * eta**r``, until at most ``final``
    candidates remain (each round keeps ``ceil(alive / eta)``, at least ``final``) or all examples are used."""
    rounds, alive, n = [], n_candidates, min(max(min_examples, 1), n_examples)
    while True:
        if alive <= final or n >= n_examples:
            rounds.append(n_examples)
            return rounds
        rounds.append(n)
        alive = max(final, math.ceil(alive / eta))
        n = min(n_examples, n * eta)


@dataclass
class GridChoice:
    """What :func:`choose` decided: the chosen grid point, the best steered one, and why.

    ``index`` is the exported candidate (0, the unsteered model, when steering did not help);
    ``best`` is the best steered candidate within the harm budget (None when there is none).
    """

    index: int
    best: int | None
    helps: bool
    criterion: str
    values: list[float | None]
    accuracy: list[float | None]
    n_scored: list[int]
    harm: dict[int, float]
    gain: float = 0.0
    gain_se: float = 0.0
    threshold: float = 0.0
    accuracy_gain: float = 0.0
    n_verdict: int = 0
    reason: str = ""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    scored_evaluations: int = 0


def choose(
    candidates: Sequence[Candidate],
    n_examples: int,
    score: Callable[[Sequence[int], int, int], torch.Tensor],
    *,
    criterion: str = "loss",
    halving: bool = True,
    min_examples: int = 16,
    eta: int = 3,
    final: int = 2,
    harm: Callable[[Sequence[int]], torch.Tensor] | None = None,
    harm_budget: float | None = None,
    level: float = 0.05,
    correction: str = "final",
) -> GridChoice:
    """The one grid pick of every fit: successive halving on a continuous criterion, a harm budget,
    and a verdict against "no steering".

    ``candidates[0]`` must be the unsteered model; it is scored on every example reached and is
    never pruned. ``score(indices, lo, hi)`` returns the (already reduced) ``(len(indices), hi - lo,
    3)`` statistics of those candidates on examples ``lo..hi-1`` of a fixed order. With ``halving``
    every steered candidate is scored on the first ``min_examples`` examples, the best ``1/eta``
    by ``criterion`` go on to ``eta`` times as many, and so on until ``final`` remain, which see
    every example (:func:`halving_schedule`); without it every candidate sees every example.

    ``harm(indices)`` gives every steered candidate's KL on ordinary text first; only those within
    ``harm_budget`` are scored at all. The best steered point is the first in the order: more
    examples scored, then the criterion, then :func:`pick`'s tie rule (fewer units, weaker push).
    The verdict is a one-sided paired test of its per-example criterion against the unsteered
    model's on the same examples: steering helps when the mean gain exceeds ``z * se`` with ``z``
    the normal quantile of ``1 - level / m``, and its validation accuracy is not below unsteered.
    ``correction="final"`` (the default) takes ``m`` as the number of points in halving's last round
    (the points whose estimates on every example compete; it does not correct for the earlier
    rounds' pruning); ``"grid"`` takes all G steered points (Bonferroni: stricter, since the best of
    G noisy estimates is biased upward; in ``benchmarks/selection.py`` too strict to find the gains
    that were there). ``level >= 1`` skips the test (the best steered point is always chosen).
    """
    if not candidates or candidates[0].state is not None:
        raise AusteerError("the grid must start with the unsteered model (no steering is a grid point)")
    if n_examples <= 0:
        raise AusteerError("the validation split is empty; raise --data.val_fraction or --data.max_val_examples")
    if eta < 2 or min_examples < 1 or final < 1:
        raise AusteerError("--model.halving_eta >= 2, --model.halving_min_examples >= 1 and final >= 1 are required")
    G = len(candidates)
    stats = torch.full((G, n_examples, 3), float("nan"), dtype=torch.float64)
    reached = [0] * G
    steered = list(range(1, G))
    harms: dict[int, float] = {}
    eligible = steered
    if harm is not None and harm_budget is not None and steered:
        # The harm budget bounds the choice before anything is scored: a state that wrecks ordinary text is not a candidate.
        harms = dict(zip(steered, (float(v) for v in harm(steered))))
        eligible = [i for i in steered if harms[i] <= harm_budget]
    schedule = (
        halving_schedule(n_examples, len(eligible), min_examples=min_examples, eta=eta, final=final)
        if halving and eligible
        else [n_examples]
    )
    alive, lo, rounds, evaluations = eligible, 0, [], 0

    def mean_value(i: int) -> float:
        return float(criterion_values(stats[i, : reached[i]], criterion).mean())

    for hi in schedule:
        # The unsteered model and the live candidates, on the examples not yet scored.
        todo = [0, *alive]
        stats[todo, lo:hi] = score(todo, lo, hi).to(torch.float64)
        evaluations += len(todo) * (hi - lo)
        for i in todo:
            reached[i] = hi
        rounds.append({"examples": hi, "candidates": len(alive)})
        if hi >= n_examples:
            break
        order = sorted(alive, key=lambda i: (-mean_value(i), candidates[i].n_steered, candidates[i].strength, i))
        alive = order[: max(final, math.ceil(len(alive) / eta))]
        lo = hi

    values = [mean_value(i) if reached[i] else None for i in range(G)]
    accuracy = [float(stats[i, : reached[i], 0].mean()) if reached[i] else None for i in range(G)]
    order = sorted(
        eligible,
        key=lambda i: (-reached[i], -(values[i] or 0.0), candidates[i].n_steered, candidates[i].strength, i),
    )
    best = order[0] if order else None
    choice = GridChoice(
        0, best, False, criterion, values, accuracy, reached, harms, rounds=rounds, scored_evaluations=evaluations
    )
    if best is None:
        choice.reason = (
            f"no steered grid point is within the harm budget (KL <= {harm_budget:g} nats per token on ordinary text)"
        )
        return choice
    n = reached[best]
    if level >= 1:
        v = paired_verdict(stats[best, :n], stats[0, :n], criterion, level=level)
        choice.gain, choice.gain_se, choice.accuracy_gain, choice.n_verdict = (
            v["gain"],
            v["gain_se"],
            v["accuracy_gain"],
            n,
        )
        choice.helps, choice.index, choice.reason = (
            True,
            best,
            "verdict off (--model.verdict_level 1): the best steered grid point is chosen",
        )
        return choice
    if correction not in ("grid", "final"):
        raise AusteerError(f"--model.verdict_correction must be grid or final, not '{correction}'")
    tests = len(steered) if correction == "grid" else rounds[-1]["candidates"]
    v = paired_verdict(stats[best, :n], stats[0, :n], criterion, level=level, tests=tests, what="the best grid point")
    choice.gain, choice.gain_se, choice.threshold, choice.accuracy_gain, choice.n_verdict = (
        v["gain"],
        v["gain_se"],
        v["threshold"],
        v["accuracy_gain"],
        n,
    )
    choice.helps, choice.reason = v["helps"], v["reason"]
    if choice.helps:
        choice.index = best
    return choice


@dataclass
class MethodResult:
    """A method's validation grid, its chosen point and (after testing) its test predictions."""

    method: str
    chosen: Candidate
    val_accuracy: float
    grid: list[dict[str, Any]] = field(default_factory=list)
    tuning_seconds: float = 0.0
    training_seconds: float = 0.0
    test_predictions: torch.Tensor | None = None
    test_seconds: float = 0.0


def grid_record(
    choice: GridChoice, cands: Sequence[Candidate]
) -> tuple[str, list[float | None], list[dict[str, Any]], dict[str, Any]]:
    """What a state's metadata records of a method's grid: the criterion's key, its reported value per
    candidate (a loss as a loss: lower is better), one row per steered point, and the verdict."""
    key = f"val_{choice.criterion}"
    value = [None if v is None else reported(choice.criterion, v) for v in choice.values]
    grid = [
        {
            **jsonable(c.hyper),
            "n_steered_activations": c.n_steered,
            "val_accuracy": choice.accuracy[j],
            key: value[j],
            "n_val_scored": choice.n_scored[j],
            **({"harm_kl": choice.harm[j]} if j in choice.harm else {}),
        }
        for j, c in enumerate(cands)
        if j > 0
    ]
    verdict = {
        "helps": choice.helps,
        "reason": choice.reason,
        "criterion_gain": choice.gain,
        "criterion_gain_se": choice.gain_se,
        "threshold": choice.threshold,
        "accuracy_gain": choice.accuracy_gain,
        "n_verdict": choice.n_verdict,
        "best": None if choice.best is None else jsonable(cands[choice.best].hyper),
        "evaluations": choice.scored_evaluations,
        "rounds": choice.rounds,
    }
    return key, value, grid, verdict
