"""Choosing a behaviour state by a judge of generated text: every grid point generates on the
validation prompts, the judge scores them, and the best share of positives within the fluency
budget (perplexity at most ``budget`` times the unsteered) wins, if it beats no steering."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from austeer_pl.core.fileio import jsonable
from austeer_pl.core.state import SteeringState
from austeer_pl.errors import AusteerError
from austeer_pl.fit.config import JudgeConfig
from austeer_pl.methods.registry import UNSTEERED
from austeer_pl.scoring.behaviour import ratio, text_metrics
from austeer_pl.scoring.generation import generate_new_text
from austeer_pl.scoring.judges import JudgeLike, load_judge
from austeer_pl.tasks.prompts import behaviour_prompts

#: The fluency budget (perplexity ratio to the unsteered generations): :class:`~austeer_pl.fit.config.JudgeConfig`'s.
DEFAULT_BUDGET = JudgeConfig.fluency_budget


CHOICE_METRICS = ("share_positive", "mean_score")


def evaluate_candidates(
    model: nn.Module,
    tokenizer,
    candidates: Sequence[tuple[str, SteeringState | None]],
    prompts: Sequence[str],
    judge: JudgeLike | str = "vader",
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    max_length: int | None = None,
    layout=None,
    n_examples: int = 3,
) -> list[dict[str, Any]]:
    """Judge score and fluency of each candidate state on the same prompts.

    Args:
        candidates: ``(label, state)`` pairs; a ``None`` state is no steering. When no candidate
            is ``None``, ``("unsteered", None)`` is put first (no steering is always a candidate).
            The unsteered generations are made once and shared.
        prompts: formatted (validation) prompts.
        judge: a judge or a :func:`~austeer_pl.scoring.judges.load_judge` spec.

    Returns:
        One dict per candidate, in order: ``label``, ``steered`` (bool), the
        :func:`text_metrics` keys, ``perplexity_ratio`` (to the unsteered model's) and
        ``examples`` (the first ``n_examples`` generations).

    Example:
        >>> grid = [(f"k={s.k},alpha={s.alpha:g}", s) for s in states]
        >>> results = evaluate_candidates(model, tok, grid, val_prompts, "vader")
    """
    judge = load_judge(judge)
    prompts = list(prompts)
    if not prompts:
        raise AusteerError("no prompts to generate from; give at least one validation prompt")
    candidates = list(candidates)
    labels = [label for label, _ in candidates]
    if len(set(labels)) != len(labels):
        raise AusteerError("candidate labels must be distinct; give each (label, state) its own label")
    if not any(state is None for _, state in candidates):
        if UNSTEERED in labels:
            raise AusteerError(f"the label '{UNSTEERED}' is kept for no steering; rename that candidate")
        candidates.insert(0, (UNSTEERED, None))
    gen: dict[str, Any] = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length)
    base_texts = generate_new_text(model, tokenizer, prompts, **gen)
    base = text_metrics(model, tokenizer, prompts, base_texts, judge, batch_size=batch_size, max_length=max_length)
    results = []
    for label, state in candidates:
        if state is None:
            texts, metrics = base_texts, dict(base)
        else:
            texts = generate_new_text(model, tokenizer, prompts, state=state, layout=layout, **gen)
            metrics = text_metrics(
                model, tokenizer, prompts, texts, judge, batch_size=batch_size, max_length=max_length
            )
        metrics["perplexity_ratio"] = 1.0 if state is None else ratio(metrics["perplexity"], base["perplexity"])
        extra = {} if state is None else {"method": state.method, "k": state.k, "alpha": state.alpha}
        results.append(
            {
                "label": label,
                "steered": state is not None,
                **extra,
                **metrics,
                "examples": [{"prompt": p, "text": t} for p, t in zip(prompts[:n_examples], texts[:n_examples])],
            }
        )
    return results


@dataclass(frozen=True)
class BudgetChoice:
    """The candidate chosen by judge score among those within the fluency budget.

    Attributes:
        label: the chosen candidate's label (the unsteered one when nothing steered qualifies).
        index: its position in the results.
        budget: the largest allowed perplexity ratio (steered / unsteered).
        metric: the judge score compared (``share_positive`` or ``mean_score``).
        ratios: each label's perplexity ratio.
        eligible: the labels within the budget, in order.
    """

    label: str
    index: int
    budget: float
    metric: str
    ratios: dict[str, float]
    eligible: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "index": self.index,
            "budget": self.budget,
            "metric": self.metric,
            "ratios": dict(self.ratios),
            "eligible": list(self.eligible),
        }


def choose_under_budget(
    grid_results: Sequence[Mapping[str, Any]],
    budget: float = DEFAULT_BUDGET,
    *,
    metric: str = "share_positive",
    unsteered_label: str | None = None,
    steered_only: bool = False,
) -> BudgetChoice:
    """Pick the best judge score among the grid points whose perplexity is within ``budget`` x the unsteered one.

    Each entry needs ``label``, ``perplexity`` and the ``metric`` (``mean_score`` is the first
    tie-break when present). The unsteered entry is the one labelled ``unsteered_label``, else the
    one with ``steered`` false, else the one labelled ``"unsteered"``; it is always eligible (no
    steering is a candidate), and the ratio of every other entry is its perplexity over the
    unsteered entry's. Entries whose ratio is ``nan`` (no perplexity) are not eligible. Ties
    in the metric go to the higher ``mean_score``, then the lower ratio, then no steering, then
    the earlier entry.

    Args:
        grid_results: e.g. the output of :func:`evaluate_candidates`.
        budget: the largest allowed perplexity ratio (default 1.5).
        metric: ``share_positive`` (default) or ``mean_score``.
        unsteered_label: the label of the no-steering entry, if not found as above.
        steered_only: the best *steered* entry by the same rule (what a fit keeps beside a "no
            steering" verdict): no steering is not a candidate, and when no steered entry is
            within the budget every steered entry is.

    Raises:
        AusteerError: a bad budget or metric, or no unsteered entry.

    Example:
        >>> grid = [{"label": "unsteered", "share_positive": 0.4, "perplexity": 10.0},
        ...         {"label": "alpha=2", "share_positive": 0.7, "perplexity": 14.0},
        ...         {"label": "alpha=8", "share_positive": 0.9, "perplexity": 40.0}]
        >>> choose_under_budget(grid).label
        'alpha=2'
    """
    budget = float(budget)
    if not math.isfinite(budget) or budget <= 0:
        raise AusteerError(
            f"the fluency budget must be a positive number (a perplexity ratio such as 1.5), got {budget}"
        )
    if metric not in CHOICE_METRICS:
        raise AusteerError(f"unknown choice metric '{metric}'; choose one of {', '.join(CHOICE_METRICS)}")
    entries = list(grid_results)
    labels = [str(e["label"]) for e in entries]
    if unsteered_label is not None:
        base = [i for i, label in enumerate(labels) if label == unsteered_label]
    else:
        base = [i for i, e in enumerate(entries) if e.get("steered") is False] or [
            i for i, label in enumerate(labels) if label == UNSTEERED
        ]
    if not base:
        raise AusteerError(
            "the grid has no unsteered entry; add one (label 'unsteered') so no steering stays a candidate"
        )
    b = base[0]
    base_ppl = float(entries[b]["perplexity"])
    ratios = {labels[i]: 1.0 if i == b else ratio(float(e["perplexity"]), base_ppl) for i, e in enumerate(entries)}
    eligible = [i for i in range(len(entries)) if i == b or ratios[labels[i]] <= budget]
    if steered_only:
        eligible = [i for i in eligible if i != b] or [i for i in range(len(entries)) if i != b]
        if not eligible:
            raise AusteerError("the grid has no steered entry; give at least one grid point")

    def key(i: int) -> tuple[float, float, float, int]:
        e = entries[i]
        value = float(e[metric])
        tie = float(e.get("mean_score", 0.0)) if metric != "mean_score" else 0.0
        value = value if math.isfinite(value) else -math.inf
        tie = tie if math.isfinite(tie) else -math.inf
        return (value, tie, -ratios[labels[i]], int(i == b))

    best = eligible[0] if steered_only else b
    for i in eligible:
        if key(i) > key(best):
            best = i
    return BudgetChoice(labels[best], best, budget, metric, ratios, [labels[i] for i in eligible])


@dataclass(frozen=True)
class BehaviourChoice:
    """:func:`choose_by_judge`'s answer: the chosen label and state (``None``: no steering), every result, the choice."""

    label: str
    state: SteeringState | None
    results: list[dict[str, Any]]
    choice: BudgetChoice


def choose_by_judge(
    model: nn.Module,
    tokenizer,
    candidates: Sequence[tuple[str, SteeringState | None]],
    prompts: Sequence[str],
    judge: JudgeLike | str = "vader",
    *,
    budget: float = DEFAULT_BUDGET,
    metric: str = "share_positive",
    **kwargs: Any,
) -> BehaviourChoice:
    """Evaluate candidate states on validation prompts and choose by judge score under a fluency budget.

    :func:`evaluate_candidates` then :func:`choose_under_budget`; ``kwargs`` go to the former
    (``max_new_tokens``, ``batch_size``, ``max_length``, ``layout``).

    Example:
        >>> grid = [(f"k={k},alpha={a:g}", states[k].with_alpha(a)) for k in (10, 50) for a in (1.0, 4.0)]
        >>> pick = choose_by_judge(model, tok, grid, val_prompts, "vader", budget=1.5)
        >>> pick.label, pick.choice.ratios[pick.label]
        ('k=50,alpha=4', 1.32)
    """
    # Validate before the (slow) generation, with the same messages as choose_under_budget.
    if not math.isfinite(float(budget)) or float(budget) <= 0:
        raise AusteerError(
            f"the fluency budget must be a positive number (a perplexity ratio such as 1.5), got {budget}"
        )
    if metric not in CHOICE_METRICS:
        raise AusteerError(f"unknown choice metric '{metric}'; choose one of {', '.join(CHOICE_METRICS)}")
    results = evaluate_candidates(model, tokenizer, candidates, prompts, judge, **kwargs)
    choice = choose_under_budget(results, budget, metric=metric)
    states = {label: state for label, state in candidates}
    return BehaviourChoice(choice.label, states.get(choice.label), results, choice)


@dataclass(frozen=True)
class JudgedGrid:
    """What a judged fit chose: the exported candidate and its record, no steering's record, the grid."""

    chosen: Any
    record: dict[str, Any]
    unsteered: dict[str, Any]
    grid: list[dict[str, Any]]
    beats_unsteered: bool
    n_prompts: int


def judge_grid(model: nn.Module, tokenizer, layout, data, candidates: Sequence[Any], config: Any) -> JudgedGrid:
    """AUSteer's grid ``candidates`` judged on greedy generations from the validation prompts of
    ``data`` (a :class:`~austeer_pl.fit.data.FitData`), under ``config``'s fluency budget (a
    :class:`~austeer_pl.fit.config.JudgeConfig`). Every process computes the same choice: generation
    is deterministic and the prompts are few. When no steered point beats no steering within the
    budget, the best steered point is kept (the same rule, steered only) and ``beats_unsteered`` is False."""
    prompts = behaviour_prompts(tokenizer, data.task, data.splits["val"], chat_template=data.config.chat_template)[
        : config.max_judge_prompts
    ]
    if not prompts:
        raise AusteerError("the validation split is empty; raise --data.val_fraction or --data.max_val_examples")
    grid_states = [(f"{c.hyper['site']},k={c.hyper['k']},alpha={c.hyper['alpha']:g}", c.state) for c in candidates]
    choice = choose_by_judge(
        model,
        tokenizer,
        grid_states,
        prompts,
        config.judge,
        budget=config.fluency_budget,
        max_new_tokens=config.max_new_tokens,
        batch_size=data.batching.eval_batch_size,
        max_length=data.config.max_length,
        layout=layout,
    )
    steered = [r for r in choice.results if r["label"] != UNSTEERED]
    base = next(r for r in choice.results if r["label"] == UNSTEERED)
    beats = choice.choice.label != UNSTEERED
    label = (
        choice.choice.label
        if beats
        else choose_under_budget(choice.results, config.fluency_budget, steered_only=True).label
    )
    index = [r["label"] for r in steered].index(label)
    grid = [
        {
            **jsonable(c.hyper),
            "n_steered_activations": c.n_steered,
            **{k: r[k] for k in ("share_positive", "mean_score", "perplexity_ratio", "distinct_2")},
        }
        for c, r in zip(candidates, steered)
    ]
    return JudgedGrid(candidates[index], steered[index], base, grid, beats, len(prompts))
