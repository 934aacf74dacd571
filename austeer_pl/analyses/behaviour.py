"""Behaviour steering: states that change what a model *writes*, judged on free generation.

A behaviour data set is the ``prompt, positive, negative`` schema of :mod:`austeer_pl.tasks.sources`: a
prompt and two continuations, one with the behaviour (a positive review, a refusal, a formal
reply, a persona's voice) and one without. Steering states are fitted on it as on any task; what
changes is how they are judged: generate from held-out prompts with and without the state, score
the new text with a :class:`~austeer_pl.scoring.judges.Judge`, and keep the fluency in view (perplexity
under the unsteered model, distinct-2).

Pieces:

* :func:`sentiment_task`: the embedded behaviour task ``sentiment`` (no hub needed), built from
  the Rotten Tomatoes sentences; see its docstring for the construction.
* :func:`generate_pairs`: batched unsteered and steered generation of the same prompts.
* :func:`text_metrics` / :func:`behaviour_report`: judge score (share positive with a Wilson 95%
  interval, mean score: VADER's compound by default) and fluency, unsteered vs. steered.
* :func:`evaluate_candidates`, :func:`choose_under_budget`, :func:`choose_by_judge`: choose among
  candidate states (and no steering) by the judge score under a fluency budget (default:
  perplexity at most 1.5x the unsteered model's).
* :func:`strength_curve`: judge score and perplexity against alpha for several states (AUSteer
  and CAA) on the same prompts, written as JSON and PNG; :func:`behaviour_main` is the
  ``analyze.py behaviour`` command.

Example:
    >>> model, tok = load_model("smollm2-135m-instruct")
    >>> task = sentiment_task()
    >>> parts = split_examples(task.examples, seed=0, max_train=128, max_val=32)
    >>> state = fit_state(model, tok, pair_texts(tok, task, make_pairs(parts["train"])), k=20, alpha=2.0)
    >>> prompts = behaviour_prompts(tok, task, parts["val"])
    >>> report = behaviour_report(model, tok, state, prompts, load_judge("vader"))
    >>> report["unsteered"]["share_positive"], report["steered"]["share_positive"]
    (0.41, 0.78)

Why one module of this size: generation, judging, the budgeted choice and the strength curve share the same candidate records and are read together; the judges themselves are in :mod:`austeer_pl.scoring.judges`.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import random
import re
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from austeer_pl.errors import AusteerError
from austeer_pl.core.fileio import Output
from austeer_pl.cli.runtime import OneLineParser
from austeer_pl.scoring.judges import JudgeLike, distinct_n, load_judge, mean_perplexity, perplexity
from austeer_pl.core.tokens import check_generation_length, encode_segments, pad_id_of, pad_ids, truncate_left
from austeer_pl.scoring.loglik import wilson_interval
from austeer_pl.core.state import SteeringState
from austeer_pl.tasks.sources import ContrastivePair, Task, TaskExample, format_prompt, join_answer

# The embedded task lives in austeer_pl.tasks.sources (standard library only); re-exported here.
from austeer_pl.tasks.sources import (  # noqa: E402
    SENTIMENT_ANSWER_PREFIX,
    SENTIMENT_FILMS,
    SENTIMENT_MAX_WORDS,
    SENTIMENT_MIN_WORDS,
    SENTIMENT_OCCASIONS,
    SENTIMENT_REQUESTS,
    SENTIMENT_TASK,
    detokenize_review,
    sentiment_prompts,
    sentiment_task,
)


def load_behaviour_task(spec: str, *, seed: int = 0) -> Task:
    """``sentiment`` or any :func:`~austeer_pl.tasks.sources.load_task` spec (a ``prompt, positive, negative`` file)."""
    from austeer_pl.tasks.sources import load_task

    if str(spec).strip().lower() == SENTIMENT_TASK:
        return sentiment_task()
    return load_task(spec, seed=seed)


def behaviour_prompts(tokenizer, task: Task, examples: Sequence[TaskExample], *, chat_template: bool | None = None) -> list[str]:
    """The distinct formatted prompts of ``examples``, in first-seen order (what generation starts from).

    Example:
        >>> behaviour_prompts(tok, task, parts["val"])[0]
        '<|im_start|>user\\nGive a short review of ...<|im_end|>\\n<|im_start|>assistant\\n'
    """
    seen = dict.fromkeys(format_prompt(tokenizer, task, ex.prompt, chat_template=chat_template) for ex in examples)
    return list(seen)


def pair_texts(tokenizer, task: Task, pairs: Sequence[ContrastivePair], *, chat_template: bool | None = None) -> list[tuple[str, str]]:
    """``(prompt + positive, prompt + negative)`` texts of pairs, formatted as in fitting, for :func:`~austeer_pl.core.pairs.fit_state`."""
    out = []
    for p in pairs:
        text = format_prompt(tokenizer, task, p.prompt, chat_template=chat_template)
        out.append((join_answer(text, p.positive), join_answer(text, p.negative)))
    return out


# ============================================================================ generation
@dataclass(frozen=True)
class GenerationPairs:
    """The same prompts generated from without and with steering (the new text only)."""

    prompts: list[str]
    unsteered: list[str]
    steered: list[str]

    def rows(self) -> list[dict[str, str]]:
        return [{"prompt": p, "unsteered": u, "steered": s} for p, u, s in zip(self.prompts, self.unsteered, self.steered)]


def _generation_config(model: nn.Module, tokenizer, *, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float):
    from transformers import GenerationConfig

    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_id_of(tokenizer), eos_token_id=eos)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    return GenerationConfig(**kwargs)


def _check_generation_args(max_new_tokens: int, batch_size: int, temperature: float, top_p: float) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise AusteerError(f"max_new_tokens must be a positive whole number, got {max_new_tokens!r}")
    if batch_size < 1:
        raise AusteerError(f"batch_size must be positive, got {batch_size}")
    if not temperature > 0 or not 0 < top_p <= 1:
        raise AusteerError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")


@torch.inference_mode()
def generate_new_text(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    state: SteeringState | None = None,
    alpha: float | None = None,
    layout=None,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    max_length: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """The new text generated after each prompt, steered by ``state`` when given (greedy by default).

    One ``generate`` call per batch of ``batch_size`` prompts, left-padded, with the KV cache. The
    prompt is tokenized with the tokenizer's special tokens (the formatted text is used as is) and
    keeps its last ``max_length`` ids. The hooks of ``state`` are registered once for all batches
    and removed on return. With ``do_sample`` each batch is drawn from its own seed
    (``seed + batch index``), so steered and unsteered calls with the same seed share their draws.

    Example:
        >>> generate_new_text(model, tok, ["Review:"], state=state, max_new_tokens=8)
        [' A delightful film.']
    """
    _check_generation_args(max_new_tokens, batch_size, temperature, top_p)
    device = next(model.parameters()).device
    config = _generation_config(model, tokenizer, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p)
    ids_all = encode_segments(tokenizer, list(prompts), special=True)
    if any(len(ids) == 0 for ids in ids_all):
        raise AusteerError("a prompt tokenizes to nothing; give every prompt some text")
    ids_all = [truncate_left(list(p), max_length) for p in ids_all]
    check_generation_length(model, ids_all, max_new_tokens)
    texts: list[str] = []
    steer = state.apply(model, alpha=alpha, layout=layout) if state is not None else nullcontext()
    with steer:
        for b, start in enumerate(range(0, len(ids_all), batch_size)):
            chunk = ids_all[start : start + batch_size]
            ids, mask = pad_ids(chunk, config.pad_token_id, side="left", device=device)
            rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) if do_sample else nullcontext()
            with rng:
                if do_sample:
                    torch.manual_seed(seed + b)
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            texts.extend(tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True))
    return texts


def generate_pairs(
    model: nn.Module,
    tokenizer,
    state: SteeringState,
    prompts: Sequence[str],
    *,
    alpha: float | None = None,
    unsteered: Sequence[str] | None = None,
    **kwargs: Any,
) -> GenerationPairs:
    """Unsteered and steered new text of the same prompts (see :func:`generate_new_text` for ``kwargs``).

    Args:
        model: the base model (left without hooks on return).
        tokenizer: its tokenizer.
        state: the steering state (any method's).
        prompts: formatted prompt texts.
        alpha: strength override of the state.
        unsteered: generations of the same prompts and settings made before (skips that pass).
        **kwargs: ``max_new_tokens``, ``batch_size``, ``max_length``, ``do_sample``,
            ``temperature``, ``top_p``, ``seed``, ``layout``.

    Example:
        >>> pairs = generate_pairs(model, tok, state, ["Review:"], max_new_tokens=16)
        >>> pairs.unsteered[0], pairs.steered[0]
        (' It was fine.', ' A wonderful, moving film.')
    """
    prompts = list(prompts)
    if unsteered is None:
        unsteered = generate_new_text(model, tokenizer, prompts, **kwargs)
    elif len(unsteered) != len(prompts):
        raise AusteerError(f"{len(unsteered)} unsteered generations for {len(prompts)} prompts; pass one per prompt")
    steered = generate_new_text(model, tokenizer, prompts, state=state, alpha=alpha, **kwargs)
    return GenerationPairs(prompts, list(unsteered), steered)


# ============================================================================ metrics
def text_metrics(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    texts: Sequence[str],
    judge: JudgeLike,
    *,
    batch_size: int = 16,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Judge score and fluency of generated ``texts`` (the model must carry no steering hooks).

    Returns:
        ``n``; ``n_positive``, ``share_positive`` and its Wilson 95% interval ``ci_low``,
        ``ci_high``; ``mean_score`` (``score_name`` says what it is: VADER's compound by default);
        ``perplexity`` (geometric mean over non-empty generations of ``exp(mean token NLL)`` under
        the model, see :mod:`austeer_pl.scoring.judges`); ``n_empty``; ``distinct_2``; ``mean_words``.

    Example:
        >>> text_metrics(model, tok, prompts, texts, load_judge("vader"))["share_positive"]
        0.75
    """
    texts = [str(t) for t in texts]
    result = judge.judge(texts)
    n = len(texts)
    ci = wilson_interval(result.n_positive, n)
    ppl = perplexity(model, tokenizer, prompts, texts, batch_size=batch_size, max_length=max_length)
    return {
        "n": n,
        "n_positive": result.n_positive,
        "share_positive": result.n_positive / n if n else math.nan,
        # min/max: the interval's float rounding can leave its end a hair beyond the share (5e-17 > 0).
        "ci_low": min(ci.low, result.n_positive / n) if n else ci.low,
        "ci_high": max(ci.high, result.n_positive / n) if n else ci.high,
        "mean_score": sum(result.scores) / n if n else math.nan,
        "score_name": judge.score_name,
        "perplexity": mean_perplexity(ppl),
        "n_empty": int(torch.isnan(ppl).sum()),
        "distinct_2": distinct_n(texts, 2),
        "mean_words": sum(len(t.split()) for t in texts) / n if n else math.nan,
    }


def _ratio(value: float, base: float) -> float:
    return value / base if math.isfinite(value) and math.isfinite(base) and base > 0 else math.nan


def _judge_info(judge: JudgeLike) -> dict[str, Any]:
    describe = getattr(judge, "describe", None)
    return describe() if callable(describe) else {"name": judge.name, "score_name": judge.score_name, "threshold": judge.threshold}


def behaviour_report(
    model: nn.Module,
    tokenizer,
    state: SteeringState,
    prompts: Sequence[str],
    judge: JudgeLike | str = "vader",
    *,
    alpha: float | None = None,
    generations: GenerationPairs | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    max_length: int | None = None,
    layout=None,
    n_examples: int = 5,
) -> dict[str, Any]:
    """Judge score and fluency on held-out prompts, unsteered vs. steered.

    Generates (unless ``generations`` are given) with :func:`generate_pairs`, then scores both
    sides with :func:`text_metrics` under the unsteered model.

    Returns:
        ``{"n_prompts", "judge", "method", "k", "alpha", "max_new_tokens", "unsteered": metrics,
        "steered": metrics, "perplexity_ratio" (steered / unsteered), "share_positive_change",
        "examples": the first n_examples {"prompt", "unsteered", "steered"}}``.

    Example:
        >>> r = behaviour_report(model, tok, state, prompts, "vader")
        >>> r["steered"]["share_positive"], r["perplexity_ratio"]
        (0.78, 1.21)
    """
    judge = load_judge(judge)
    prompts = list(prompts)
    if not prompts:
        raise AusteerError("no prompts to generate from; give at least one held-out prompt")
    if generations is None:
        generations = generate_pairs(
            model, tokenizer, state, prompts, alpha=alpha, max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length, layout=layout
        )
    metrics = {
        side: text_metrics(model, tokenizer, generations.prompts, getattr(generations, side), judge, batch_size=batch_size, max_length=max_length)
        for side in ("unsteered", "steered")
    }
    return {
        "n_prompts": len(generations.prompts),
        "judge": _judge_info(judge),
        "method": state.method,
        "k": state.k,
        "alpha": state.alpha if alpha is None else float(alpha),
        "max_new_tokens": max_new_tokens,
        "unsteered": metrics["unsteered"],
        "steered": metrics["steered"],
        "perplexity_ratio": _ratio(metrics["steered"]["perplexity"], metrics["unsteered"]["perplexity"]),
        "share_positive_change": metrics["steered"]["share_positive"] - metrics["unsteered"]["share_positive"],
        "examples": generations.rows()[:n_examples],
    }


# ============================================================================ choice under a fluency budget
UNSTEERED = "unsteered"
DEFAULT_BUDGET = 1.5
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
    gen = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length)
    base_texts = generate_new_text(model, tokenizer, prompts, **gen)
    base = text_metrics(model, tokenizer, prompts, base_texts, judge, batch_size=batch_size, max_length=max_length)
    results = []
    for label, state in candidates:
        if state is None:
            texts, metrics = base_texts, dict(base)
        else:
            texts = generate_new_text(model, tokenizer, prompts, state=state, layout=layout, **gen)
            metrics = text_metrics(model, tokenizer, prompts, texts, judge, batch_size=batch_size, max_length=max_length)
        metrics["perplexity_ratio"] = 1.0 if state is None else _ratio(metrics["perplexity"], base["perplexity"])
        extra = {} if state is None else {"method": state.method, "k": state.k, "alpha": state.alpha}
        results.append({"label": label, "steered": state is not None, **extra, **metrics,
                        "examples": [{"prompt": p, "text": t} for p, t in zip(prompts[:n_examples], texts[:n_examples])]})
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
        return {"label": self.label, "index": self.index, "budget": self.budget, "metric": self.metric, "ratios": dict(self.ratios), "eligible": list(self.eligible)}


def choose_under_budget(
    grid_results: Sequence[Mapping[str, Any]],
    budget: float = DEFAULT_BUDGET,
    *,
    metric: str = "share_positive",
    unsteered_label: str | None = None,
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
        raise AusteerError(f"the fluency budget must be a positive number (a perplexity ratio such as 1.5), got {budget}")
    if metric not in CHOICE_METRICS:
        raise AusteerError(f"unknown choice metric '{metric}'; choose one of {', '.join(CHOICE_METRICS)}")
    entries = list(grid_results)
    labels = [str(e["label"]) for e in entries]
    if unsteered_label is not None:
        base = [i for i, label in enumerate(labels) if label == unsteered_label]
    else:
        base = [i for i, e in enumerate(entries) if e.get("steered") is False] or [i for i, label in enumerate(labels) if label == UNSTEERED]
    if not base:
        raise AusteerError("the grid has no unsteered entry; add one (label 'unsteered') so no steering stays a candidate")
    b = base[0]
    base_ppl = float(entries[b]["perplexity"])
    ratios = {labels[i]: 1.0 if i == b else _ratio(float(e["perplexity"]), base_ppl) for i, e in enumerate(entries)}
    eligible = [i for i in range(len(entries)) if i == b or ratios[labels[i]] <= budget]

    def key(i: int) -> tuple[float, float, float, int]:
        e = entries[i]
        value = float(e[metric])
        tie = float(e.get("mean_score", 0.0)) if metric != "mean_score" else 0.0
        value = value if math.isfinite(value) else -math.inf
        tie = tie if math.isfinite(tie) else -math.inf
        return (value, tie, -ratios[labels[i]], int(i == b))

    best = b
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
        raise AusteerError(f"the fluency budget must be a positive number (a perplexity ratio such as 1.5), got {budget}")
    if metric not in CHOICE_METRICS:
        raise AusteerError(f"unknown choice metric '{metric}'; choose one of {', '.join(CHOICE_METRICS)}")
    results = evaluate_candidates(model, tokenizer, candidates, prompts, judge, **kwargs)
    choice = choose_under_budget(results, budget, metric=metric)
    states = {label: state for label, state in candidates}
    return BehaviourChoice(choice.label, states.get(choice.label), results, choice)


# ============================================================================ strength curve
#: Default sweep: these multiples of each state's fitted alpha (0 is no steering).
DEFAULT_MULTIPLES: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)


def strength_curve(
    model: nn.Module,
    tokenizer,
    states: Mapping[str, SteeringState],
    prompts: Sequence[str],
    judge: JudgeLike | str = "vader",
    *,
    alphas: Mapping[str, Sequence[float]] | None = None,
    multiples: Sequence[float] = DEFAULT_MULTIPLES,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    max_length: int | None = None,
    layout=None,
    budget: float = DEFAULT_BUDGET,
    out: str | os.PathLike | Output | None = None,
    plot: str | os.PathLike | Output | None = None,
    info: Mapping[str, Any] | None = None,
    n_examples: int = 3,
) -> dict[str, Any]:
    """Judge score and perplexity against alpha for each state, on the same prompts.

    Each state (e.g. ``{"austeer": s1, "caa": s2}``) is swept with ``state.with_alpha(a)`` over
    ``alphas[label]`` (default: ``multiples`` x its fitted alpha); alpha 0 is the unsteered
    generation, made once and shared. Every point has the :func:`text_metrics` keys and
    ``perplexity_ratio``; the first ``n_examples`` prompts' texts are kept beside the points.
    With ``out`` / ``plot`` the result is written as JSON / PNG (each atomically).

    Returns:
        ``{"analysis": "behaviour", "judge", "n_prompts", "max_new_tokens", "budget",
        "unsteered": metrics, "methods": {label: {"method", "k", "fitted_alpha", "points": [...]}},
        "examples": [{"prompt", "unsteered"}], "seconds", **info}``.

    Example:
        >>> result = strength_curve(model, tok, {"austeer": state, "caa": caa}, prompts, "vader",
        ...                         out="docs/behaviour_curve.json", plot="docs/behaviour_curve.png")
    """
    from austeer_pl.core.fileio import json_output, png_output, write_json_output

    if out is not None and not isinstance(out, Output):
        out = json_output(out, "strength curve").check()
    if plot is not None and not isinstance(plot, Output):
        plot = png_output(plot, "strength curve plot").check()
    judge = load_judge(judge)
    prompts = list(prompts)
    if not prompts:
        raise AusteerError("no prompts to generate from; give at least one held-out prompt")
    if not states:
        raise AusteerError("no states to sweep; give at least one (label, state)")
    started = time.perf_counter()
    gen = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length)
    base_texts = generate_new_text(model, tokenizer, prompts, **gen)
    base = text_metrics(model, tokenizer, prompts, base_texts, judge, batch_size=batch_size, max_length=max_length)
    methods: dict[str, Any] = {}
    for label, state in states.items():
        grid = list(alphas[label]) if alphas is not None and label in alphas else [m * state.alpha for m in multiples]
        points = []
        for a in grid:
            a = float(a)
            if a == 0.0:
                texts, metrics = base_texts, dict(base)
            else:
                texts = generate_new_text(model, tokenizer, prompts, state=state.with_alpha(a), layout=layout, **gen)
                metrics = text_metrics(model, tokenizer, prompts, texts, judge, batch_size=batch_size, max_length=max_length)
            metrics["perplexity_ratio"] = 1.0 if a == 0.0 else _ratio(metrics["perplexity"], base["perplexity"])
            points.append({"alpha": a, **metrics, "texts": texts[:n_examples]})
        methods[label] = {"method": state.method, "k": state.k, "fitted_alpha": state.alpha, "points": points}
    result: dict[str, Any] = {
        "analysis": "behaviour",
        **dict(info or {}),
        "judge": _judge_info(judge),
        "n_prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "budget": budget,
        "unsteered": base,
        "methods": methods,
        "examples": [{"prompt": p, "unsteered": t} for p, t in zip(prompts[:n_examples], base_texts[:n_examples])],
        "seconds": time.perf_counter() - started,
    }
    if plot is not None:
        result["plot"] = str(plot.path)
    if out is not None:
        write_json_output(out, result)
    if plot is not None:
        plot_strength_curve(result, plot)
    return result


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_strength_curve(result: Mapping[str, Any], path: str | os.PathLike | Output) -> Path:
    """Judge score (share positive with its 95% interval, mean score) and perplexity against alpha, one column per state."""
    from austeer_pl.core.fileio import png_output, save_figure

    plt = _pyplot()
    import matplotlib.ticker as mticker

    methods = result["methods"]
    base = result["unsteered"]
    fig, axes = plt.subplots(2, len(methods), figsize=(5.2 * len(methods), 7), squeeze=False, sharey="row")
    for col, (label, m) in enumerate(methods.items()):
        pts = sorted(m["points"], key=lambda p: p["alpha"])
        x = [p["alpha"] for p in pts]
        ax = axes[0][col]
        ax.fill_between(x, [p["ci_low"] for p in pts], [p["ci_high"] for p in pts], color="tab:green", alpha=0.2, label="95% interval")
        ax.plot(x, [p["share_positive"] for p in pts], "o-", color="tab:green", label="share positive")
        ax.plot(x, [p["mean_score"] for p in pts], "s--", color="tab:blue", label=f"mean {base.get('score_name', 'score')}")
        ax.axhline(base["share_positive"], color="black", ls=":", lw=1, label="unsteered share")
        ax.set_ylim(-1.05, 1.05)
        ax.set_title(f"{label} (k={m['k']})" if label == m["method"] else f"{label} ({m['method']}, k={m['k']})", fontsize=10)
        ax.grid(alpha=0.3)
        if col == 0:
            ax.set_ylabel(f"judge: {result['judge']['name']}")
            ax.legend(fontsize=7, loc="lower right")
        ax = axes[1][col]
        ax.plot(x, [p["perplexity"] for p in pts], "o-", color="tab:red", label="perplexity (unsteered model)")
        ax.axhline(base["perplexity"], color="black", ls=":", lw=1, label="unsteered")
        if math.isfinite(base["perplexity"]):
            ax.axhline(result.get("budget", DEFAULT_BUDGET) * base["perplexity"], color="tab:gray", ls="--", lw=1, label=f"budget ({result.get('budget', DEFAULT_BUDGET):g}x)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(mticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(mticker.FormatStrFormatter("%.3g"))
        ax.set_xlabel("alpha")
        ax.grid(alpha=0.3)
        if col == 0:
            ax.set_ylabel("perplexity of the generations")
            ax.legend(fontsize=7, loc="upper left")
    title = f"Behaviour strength curve - {result.get('task', '')} {result.get('base_model', '')} (n={result['n_prompts']} prompts, {result['max_new_tokens']} new tokens)"
    fig.suptitle(title.replace("  ", " "), fontsize=10)
    try:
        return save_figure(fig, path if isinstance(path, Output) else png_output(path))
    finally:
        plt.close(fig)


# ============================================================================ analyze.py behaviour
def add_behaviour_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every option of ``analyze.py behaviour`` (a complete set: do not add the other analyses' common options)."""
    p.add_argument("--steering", required=True, help="steering state folder (the state to sweep, e.g. written by train.py)")
    p.add_argument("--caa", default=None, help="a CAA state folder to sweep beside it (default: fit CAA on the same training pairs)")
    p.add_argument("--iti", default=None, help="an ITI state folder to sweep beside them (e.g. from evaluate.py --compare --methods iti --export_dir)")
    p.add_argument("--iti_alphas", default=None, help="ITI strengths, e.g. 0,5,15 (default: 0, 0.5, 1, 2, 4 x its alpha)")
    p.add_argument("--task", "--data.task", dest="task", default=None, help="behaviour task (default: the one the state was fitted on; sentiment or a prompt,positive,negative file)")
    p.add_argument("--model", "--model.model_name", dest="model", default=None, help="base model (default: the one the state names)")
    p.add_argument("--judge", default="vader", help="vader, vader:negative or a local sequence-classification model folder")
    p.add_argument("--split", default="val", choices=["val", "test"], help="prompts to generate from (default: validation)")
    p.add_argument("--seed", type=int, default=None, help="split seed (default: the fit's)")
    p.add_argument("--max_prompts", type=int, default=32, help="distinct held-out prompts to generate from")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--alphas", default=None, help="alphas of the state, e.g. 0,1,2,4 (default: 0, 0.5, 1, 2, 4 x its alpha)")
    p.add_argument("--caa_multipliers", default=None, help="CAA multipliers, e.g. 0,1,2,4 (default: 0, 0.5, 1, 2, 4 x its multiplier)")
    p.add_argument("--caa_layer", type=int, default=None, help="layer of a fitted CAA (default: a third of the way in)")
    p.add_argument("--max_train_pairs", type=int, default=None, help="pairs of a fitted CAA (default: the fit's, else 128)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="fluency budget drawn on the plot (perplexity ratio)")
    p.add_argument("--allow_changed_inputs", action="store_true", help="go on even if the state's task file or base model changed since the fit (a warning)")
    from austeer_pl.cli.runtime import add_output_options

    add_output_options(p, name="behaviour")
    return p


def _float_list(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise AusteerError(f"{what} {text!r} is not a comma-separated list of numbers; e.g. 0,1,2,4") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise AusteerError(f"{what} {text!r} needs at least one finite number; e.g. 0,1,2,4")
    return values


def fit_caa(
    model: nn.Module, tokenizer, texts: Sequence[tuple[str, str]], *, layer: int | None = None, multiplier: float = 1.0,
    layout=None, batch_size: int = 16, base_model: str = "",
) -> SteeringState:
    """A CAA state from ``(positive_text, negative_text)`` pairs (residual mean difference at ``layer``, default a third in)."""
    from austeer_pl.methods.baselines import caa_candidate_layers, caa_state
    from austeer_pl.core.pairs import accumulate_momentum
    from austeer_pl.core.sites import ModelLayout, locate_units

    if not isinstance(layout, ModelLayout):
        layout = locate_units(model, layout)
    acc = accumulate_momentum(model, tokenizer, texts, sites=["residual"], batch_size=batch_size, layout=layout)
    if layer is None:
        layer = caa_candidate_layers(layout.n_layers, [1 / 3])[0]
    return caa_state(acc, layout, layer=layer, multiplier=multiplier, base_model=base_model)


def behaviour_main(args: argparse.Namespace) -> dict[str, Any]:
    """``analyze.py behaviour``: sweep alpha for a state and CAA on the same held-out prompts; JSON + PNG.

    ``args`` holds the options of :func:`add_behaviour_arguments`. The prompts are the distinct
    formatted prompts of the first ``--max_prompts`` examples of the split (the split the state's
    fit recorded). Without ``--caa`` a CAA state is fitted on the training pairs of the same
    split (multiplier 1). Output paths are checked before any work.

    Example:
        >>> parser = add_behaviour_arguments(argparse.ArgumentParser())
        >>> behaviour_main(parser.parse_args(["--steering", "runs/sentiment/state"]))
    """
    from austeer_pl.fit import pins as inputs
    from austeer_pl.tasks.config import DataConfig
    from austeer_pl.core.fileio import json_output, png_output
    from austeer_pl.core.models import load_model
    from austeer_pl.cli.runtime import quiet, task_stem
    from austeer_pl.core.sites import locate_units
    from austeer_pl.tasks.sources import make_pairs

    for key in ("max_prompts", "max_new_tokens", "batch_size", "max_train_pairs", "max_length"):
        value = getattr(args, key, None)
        if value is not None and value <= 0:
            raise AusteerError(f"--{key} must be positive, got {value}")
    state = SteeringState.from_pretrained(args.steering)
    caa = SteeringState.from_pretrained(args.caa) if args.caa else None
    # The fit's recorded data config rebuilds its splits (as evaluate.py does); another task keeps its fractions.
    config = DataConfig.of_state(state.metadata, task=args.task, seed=args.seed)
    data = config.to_dict()
    task_spec = config.task
    stem = task_stem(str(task_spec))
    out = Path(args.out or Path("runs") / "analyses" / f"behaviour-{stem}.json")
    png = Path(args.plot or out.with_suffix(".png"))
    model_name = args.model or state.base_model
    if not model_name:
        raise AusteerError("the state does not name its base model; pass --model")
    reads = [args.steering, args.caa, getattr(args, "iti", None), task_spec, model_name, args.judge]
    out_file = json_output(out, "strength curve", overwrite=args.overwrite).check(inputs=reads)
    png_file = png_output(png, "strength curve plot", overwrite=args.overwrite).check(inputs=reads)
    alphas = _float_list(args.alphas, "--alphas")
    multipliers = _float_list(args.caa_multipliers, "--caa_multipliers")
    judge = load_judge(args.judge)
    quiet()
    inputs.check_task(state.metadata.get("inputs"), config, allow=args.allow_changed_inputs)
    seed = config.seed
    task, splits = config.load()
    examples = splits[args.split][: args.max_prompts]
    if not examples:
        raise AusteerError(f"the {args.split} split of '{task_spec}' is empty; choose another split or task")
    model, tokenizer = load_model(model_name, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir)
    layout = locate_units(model)
    state.check_compatible(layout)
    inputs.check_model(state.metadata.get("inputs"), model_name, model, allow=args.allow_changed_inputs, cache_dir=args.cache_dir)
    chat = {"on": True, "off": False, "auto": None, None: data.get("chat_template")}[args.chat_template]
    prompts = behaviour_prompts(tokenizer, task, examples, chat_template=chat)
    max_length = args.max_length or data.get("max_length")
    caa_info: dict[str, Any] = {"source": str(args.caa)} if caa is not None else {}
    if caa is None and state.method != "caa":
        n_pairs = args.max_train_pairs or data.get("max_train_pairs") or 128
        pairs = make_pairs(splits["train"], seed=seed, max_pairs=n_pairs)
        started = time.perf_counter()
        caa = fit_caa(model, tokenizer, pair_texts(tokenizer, task, pairs, chat_template=chat), layer=args.caa_layer,
                      layout=layout, batch_size=args.batch_size, base_model=model_name)
        caa_info = {"source": "fitted", "n_pairs": len(pairs), "layer": caa.metadata.get("layer"), "fit_seconds": time.perf_counter() - started}
    states = {state.method: state}
    sweep: dict[str, list[float]] = {}
    if alphas is not None:
        sweep[state.method] = alphas
    if caa is not None and state.method != "caa":
        states["caa"] = caa
        if multipliers is not None:
            sweep["caa"] = multipliers
    if getattr(args, "iti", None):
        states["iti"] = SteeringState.from_pretrained(args.iti)
        iti_alphas = _float_list(getattr(args, "iti_alphas", None), "--iti_alphas")
        if iti_alphas is not None:
            sweep["iti"] = iti_alphas
    info = {"task": str(task_spec), "task_name": task.name, "base_model": model_name, "split": args.split, "seed": seed,
            "steering": str(args.steering), "caa": caa_info}
    result = strength_curve(
        model, tokenizer, states, prompts, judge, alphas=sweep or None, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, max_length=max_length, layout=layout, budget=args.budget, out=out_file, plot=png_file, info=info,
    )
    if getattr(args, "wandb_mode", "disabled") != "disabled":
        from austeer_pl.cli.runtime import log_result_wandb

        from austeer_pl.cli.runtime import claim_run_dir

        run = claim_run_dir("analyze-behaviour", str(task_spec), args.run_dir)
        try:
            log_result_wandb({"analysis": "behaviour", **result}, png, out, mode=args.wandb_mode, project=args.wandb_project, run_dir=run.path)
        finally:
            run.release()
    print(f"behaviour: wrote {out} and {png}")
    return result


def behaviour_cli(argv: Sequence[str] | None = None) -> int:
    """``analyze.py behaviour`` on its own: 0 on success, 2 with a one-line ``error: ...`` on bad input."""
    from austeer_pl.cli.runtime import run_main

    parser = add_behaviour_arguments(OneLineParser(prog="analyze.py behaviour", description="Judge score and perplexity against alpha (AUSteer and CAA)."))
    return run_main(lambda: behaviour_main(parser.parse_args(argv)))



__all__ = [
    "BehaviourChoice",
    "BudgetChoice",
    "DEFAULT_BUDGET",
    "DEFAULT_MULTIPLES",
    "GenerationPairs",
    "SENTIMENT_TASK",
    "add_behaviour_arguments",
    "behaviour_cli",
    "behaviour_main",
    "behaviour_prompts",
    "behaviour_report",
    "choose_by_judge",
    "choose_under_budget",
    "detokenize_review",
    "evaluate_candidates",
    "fit_caa",
    "generate_new_text",
    "generate_pairs",
    "load_behaviour_task",
    "pair_texts",
    "plot_strength_curve",
    "sentiment_prompts",
    "sentiment_task",
    "strength_curve",
    "text_metrics",
]
