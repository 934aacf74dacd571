"""The behaviour strength curve: for each state (AUSteer, CAA, ...), sweep the strength with
``state.with_alpha`` over the same held-out prompts, generate, judge, and measure perplexity under
the unsteered model, so that the judge's gain and the fluency cost are read side by side.

Example:
    >>> result = strength_curve(model, tok, {"austeer": state, "caa": caa}, prompts, "vader",
    ...                         alphas=[0, 1, 2, 4], out="docs/behaviour_curve.json", plot="docs/behaviour_curve.png")
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from austeer_pl.analyses.plots import plot_strength_curve
from austeer_pl.core.fileio import json_output, png_output, write_json_output
from austeer_pl.core.output import Output
from austeer_pl.core.state import SteeringState
from austeer_pl.errors import AusteerError
from austeer_pl.fit.judged import DEFAULT_BUDGET
from austeer_pl.scoring.behaviour import judge_info, ratio, text_metrics
from austeer_pl.scoring.generation import generate_new_text
from austeer_pl.scoring.judges import JudgeLike, load_judge

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
    prompted: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Judge score and perplexity against alpha for each state, on the same prompts.

    Each state (e.g. ``{"austeer": s1, "caa": s2}``) is swept with ``state.with_alpha(a)`` over
    ``alphas[label]`` (default: ``multiples`` x its fitted alpha); alpha 0 is the unsteered
    generation, made once and shared. Every point has the :func:`text_metrics` keys and
    ``perplexity_ratio``; the first ``n_examples`` prompts' texts are kept beside the points.
    ``prompted`` (``{label: prompts}``: the same requests with an instruction or demonstrations) adds the
    prompting baselines: the unsteered model's generations from those prompts, judged, their perplexity
    measured as continuations of the plain prompts (as every point's), in ``result["prompts"]``.
    With ``out`` / ``plot`` the result is written as JSON / PNG (each atomically).

    Returns:
        ``{"analysis": "behaviour", "judge", "n_prompts", "max_new_tokens", "budget",
        "unsteered": metrics, "methods": {label: {"method", "k", "fitted_alpha", "points": [...]}},
        "examples": [{"prompt", "unsteered"}], "seconds", **info}``.

    Example:
        >>> result = strength_curve(model, tok, {"austeer": state, "caa": caa}, prompts, "vader",
        ...                         out="docs/behaviour_curve.json", plot="docs/behaviour_curve.png")
    """

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
                metrics = text_metrics(
                    model, tokenizer, prompts, texts, judge, batch_size=batch_size, max_length=max_length
                )
            metrics["perplexity_ratio"] = 1.0 if a == 0.0 else ratio(metrics["perplexity"], base["perplexity"])
            points.append({"alpha": a, **metrics, "texts": texts[:n_examples]})
        methods[label] = {"method": state.method, "k": state.k, "fitted_alpha": state.alpha, "points": points}
    prompting: dict[str, Any] = {}
    for label, variant in dict(prompted or {}).items():
        if len(variant) != len(prompts):
            raise AusteerError(f"prompting baseline {label!r} has {len(variant)} prompts for {len(prompts)} requests")
        texts = generate_new_text(model, tokenizer, list(variant), **gen)
        metrics = text_metrics(model, tokenizer, prompts, texts, judge, batch_size=batch_size, max_length=max_length)
        metrics["perplexity_ratio"] = ratio(metrics["perplexity"], base["perplexity"])
        prompting[label] = {**metrics, "texts": texts[:n_examples]}
    result: dict[str, Any] = {
        "analysis": "behaviour",
        **dict(info or {}),
        "judge": judge_info(judge),
        "n_prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "budget": budget,
        "unsteered": base,
        "methods": methods,
        **({"prompts": prompting} if prompting else {}),
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


__all__ = [
    "DEFAULT_MULTIPLES",
    "strength_curve",
]
