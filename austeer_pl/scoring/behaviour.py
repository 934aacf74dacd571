"""The behaviour report: a judge's share of positives with its interval, perplexity under the
unsteered model and distinct-n, for the unsteered and steered generations of the same prompts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from austeer_pl.core.state import SteeringState
from austeer_pl.errors import AusteerError
from austeer_pl.scoring.fluency import distinct_n, mean_perplexity, perplexity
from austeer_pl.scoring.generation import GenerationPairs, generate_pairs
from austeer_pl.scoring.judges import JudgeLike, load_judge
from austeer_pl.scoring.statistics import wilson_interval


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


def ratio(value: float, base: float) -> float:
    """``value / base`` when both are finite and ``base`` is positive, else NaN (a perplexity ratio)."""
    return value / base if math.isfinite(value) and math.isfinite(base) and base > 0 else math.nan


def judge_info(judge: JudgeLike) -> dict[str, Any]:
    describe = getattr(judge, "describe", None)
    return (
        describe()
        if callable(describe)
        else {"name": judge.name, "score_name": judge.score_name, "threshold": judge.threshold}
    )


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
            model,
            tokenizer,
            state,
            prompts,
            alpha=alpha,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            max_length=max_length,
            layout=layout,
        )
    metrics = {
        side: text_metrics(
            model,
            tokenizer,
            generations.prompts,
            getattr(generations, side),
            judge,
            batch_size=batch_size,
            max_length=max_length,
        )
        for side in ("unsteered", "steered")
    }
    return {
        "n_prompts": len(generations.prompts),
        "judge": judge_info(judge),
        "method": state.method,
        "k": state.k,
        "alpha": state.alpha if alpha is None else float(alpha),
        "max_new_tokens": max_new_tokens,
        "unsteered": metrics["unsteered"],
        "steered": metrics["steered"],
        "perplexity_ratio": ratio(metrics["steered"]["perplexity"], metrics["unsteered"]["perplexity"]),
        "share_positive_change": metrics["steered"]["share_positive"] - metrics["unsteered"]["share_positive"],
        "examples": generations.rows()[:n_examples],
    }
