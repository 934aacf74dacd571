"""The paper's analyses of activation units, as functions of an :class:`~austeer_pl.analyses.context.AnalysisContext`
(the command line is :mod:`austeer_pl.analyses.main`: ``python analyze.py NAME [options]``).

Each analysis fits the momentum statistics with the engine's pass over the training pairs, directly
(one process, no Lightning: :func:`~austeer_pl.analyses.context.prepare`), then probes the frozen model on the validation split (or ``--split test``) with batched forward
passes, and writes a JSON result and a PNG plot (and logs both to W&B unless ``--wandb_mode disabled``).

==================  ==============================================================================
``sweep``           dimension sweep: steer one AU at a time within one block (an attention head or
                    a layer's FFN output; every unit or every n-th) with ``a -> a + alpha * m * a``,
                    against steering the whole block with the same rule, and the unsteered model:
                    validation accuracy and the mean log-likelihood margin of the right answer.
``combinations``    the top-n positive-momentum AUs steered together (n growing), then the best
                    positive set with the top-j negative-momentum ("harmful") AUs added.
``strength``        strength convergence: mean KL(steered || unsteered) of the next-token
                    distribution at the answer position for alpha on a log grid (10 .. 1e5).
``tokens``          token promotion: which vocabulary tokens steering one AU raises and lowers at
                    the answer position (top-n by mean logit change over the examples, decoded).
``sign``            promotion vs. suppression: the same k with the ``promote`` and ``both`` sign
                    policies, over k (and alpha).
==================  ==============================================================================

The margin of an example is ``loglik(right answer) - max loglik(wrong answers)`` (positive when it is
answered correctly); accuracy compares the same log-likelihoods, so both come from one pass.

Example:
    >>> from austeer_pl.analyses.context import AnalysisOptions, prepare
    >>> from austeer_pl.analyses.plots import plot_sweep
    >>> ctx = prepare(AnalysisOptions(model="smollm2-135m-instruct", max_train_pairs=200, max_examples=50))
    >>> result = dimension_sweep(ctx, site="attention", stride=4, alpha=2.0)
    >>> plot_sweep(result, "sweep.png")
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch

from austeer_pl.analyses.context import (
    AnalysisContext,
    concat,
    coordinates,
    next_token_logits,
    resolve_block,
    score,
    selection_state,
    site_names,
    subset,
    units_state,
)
from austeer_pl.core.selection import rank_units, select_units
from austeer_pl.errors import AusteerError


def dimension_sweep(
    ctx: AnalysisContext,
    *,
    site: str = "attention",
    layer: int | None = None,
    head: int | None = None,
    stride: int | None = None,
    max_units: int = 64,
    alpha: float = 2.0,
    progress=None,
) -> dict[str, Any]:
    """Steer each unit of one block alone, the whole block, and nothing; score each on the examples."""
    block = resolve_block(ctx, site, layer, head)
    units = block.pop("units")
    if stride is None:
        stride = max(1, math.ceil(units.numel() / max(1, max_units)))
    if stride <= 0:
        raise AusteerError(f"--stride must be positive, got {stride}")
    swept = units[::stride]
    zero = lambda n: torch.zeros(n, dtype=torch.long)  # noqa: E731
    lay = lambda n: torch.full((n,), block["layer"], dtype=torch.long)  # noqa: E731
    unsteered = score(ctx)
    whole = score(ctx, units_state(ctx, (site,), zero(units.numel()), lay(units.numel()), units, alpha))
    momentum = ctx.acc.momentum(site).cpu()[block["layer"]]
    rows = []
    for i, u in enumerate(swept.tolist()):
        result = score(ctx, units_state(ctx, (site,), zero(1), lay(1), torch.tensor([u]), alpha))
        rows.append({"unit": u, "momentum": float(momentum[u]), **result})
        if progress is not None:
            progress(i + 1, len(swept))
    best = max(rows, key=lambda r: (r["accuracy"], r["margin"]))
    block.update(n_units=int(units.numel()), stride=int(stride), n_swept=len(rows))
    return {
        "analysis": "sweep",
        **ctx.info,
        "block": block,
        "alpha": float(alpha),
        "rule": "a -> a + alpha * m * a on the steered units (m: the unit's signed activation momentum)",
        "unsteered": unsteered,
        "whole_block": {**whole, "n_units": int(units.numel())},
        "units": rows,
        "summary": {
            "best_unit": best["unit"],
            "best_unit_accuracy": best["accuracy"],
            "best_unit_margin": best["margin"],
            "n_units_beating_block_accuracy": sum(r["accuracy"] > whole["accuracy"] for r in rows),
            "n_units_beating_block_margin": sum(r["margin"] > whole["margin"] for r in rows),
            "n_units_beating_unsteered_accuracy": sum(r["accuracy"] > unsteered["accuracy"] for r in rows),
        },
    }


# ============================================================================ (b) combinations
def combinations(
    ctx: AnalysisContext,
    *,
    site: str = "attention",
    sizes: Sequence[int] = (1, 2, 4, 8, 16, 32),
    negatives: Sequence[int] = (0, 1, 2, 4, 8, 16, 32),
    base: int | None = None,
    alpha: float = 2.0,
    negative_rule: str = "signed",
) -> dict[str, Any]:
    """Top-n positive AUs together, then the best positive set plus the top-j negative-momentum AUs.

    Units are ranked as AUSteer ranks them (``|m|``, then effect size). ``negative_rule`` sets how the
    added negative AUs are steered: ``signed`` (AUSteer's ``a + alpha * m * a``, i.e. attenuated) or
    ``amplify`` (``a + alpha * |m| * a``, pushed as if they were positive).
    """
    if negative_rule not in ("signed", "amplify"):
        raise AusteerError(f"--negative_rule must be signed or amplify, not '{negative_rule}'")
    sites = site_names(site)
    ranked = rank_units(ctx.acc, sites, "both")
    pos, neg = subset(ranked, ranked.momentum > 0), subset(ranked, ranked.momentum < 0)
    sizes = sorted({int(n) for n in sizes})
    negatives = sorted({int(j) for j in negatives})
    if not sizes or sizes[0] <= 0 or (negatives and negatives[0] < 0):
        raise AusteerError("--sizes must be positive and --negatives non-negative whole numbers")
    if sizes[-1] > pos.k:
        raise AusteerError(f"--sizes asks for {sizes[-1]} positive units but only {pos.k} {site} units have m > 0")
    if negatives and negatives[-1] > neg.k:
        raise AusteerError(
            f"--negatives asks for {negatives[-1]} negative units but only {neg.k} {site} units have m < 0"
        )
    base = sizes[-1] if base is None else int(base)
    if not 0 < base <= pos.k:
        raise AusteerError(f"--base must be between 1 and {pos.k}")
    unsteered = score(ctx)
    positive = []
    for n in sizes:
        positive.append({"n_positive": n, "n_negative": 0, **score(ctx, selection_state(ctx, pos.head(n), alpha))})
    with_negative = []
    for j in negatives:
        if j == 0:
            sel, amplify = pos.head(base), None
        else:
            sel = concat(pos.head(base), neg.head(j))
            amplify = (
                torch.cat([torch.zeros(base, dtype=torch.bool), torch.ones(j, dtype=torch.bool)])
                if negative_rule == "amplify"
                else None
            )
        state = units_state(ctx, sel.sites, sel.site_index, sel.layer, sel.unit, alpha, amplify=amplify)
        with_negative.append({"n_positive": base, "n_negative": j, **score(ctx, state)})
    return {
        "analysis": "combinations",
        **ctx.info,
        "site": site,
        "alpha": float(alpha),
        "negative_rule": negative_rule,
        "unsteered": unsteered,
        "positive": positive,
        "with_negative": with_negative,
        "units": {
            "positive": coordinates(pos.head(sizes[-1])),
            "negative": coordinates(neg.head(negatives[-1])) if negatives and negatives[-1] else [],
        },
    }


# ============================================================================ (c) strength convergence
def kl_divergence(steered_logits: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(steered || unsteered)`` in nats, from steered logits and unsteered log-probabilities (float64)."""
    logp = torch.log_softmax(steered_logits.double(), dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1).clamp(min=0.0)


def strength_convergence(
    ctx: AnalysisContext,
    *,
    site: str = "attention",
    k: int = 10,
    sign: str = "promote",
    alphas: Sequence[float] | None = None,
    alpha_min: float = 10.0,
    alpha_max: float = 1e5,
    n_alpha: int = 9,
) -> dict[str, Any]:
    """Mean KL(steered || unsteered) of the next-token distribution at the answer position as alpha grows."""

    if alphas is None:
        if not (0 < alpha_min < alpha_max) or n_alpha < 2:
            raise AusteerError("need 0 < --alpha_min < --alpha_max and --n_alpha >= 2")
        alphas = torch.logspace(math.log10(alpha_min), math.log10(alpha_max), n_alpha, dtype=torch.float64).tolist()
    sel = select_units(ctx.acc, int(k), site_names(site), sign)
    state = selection_state(ctx, sel, 1.0, sign)
    base_logits = next_token_logits(ctx)
    ref = torch.log_softmax(base_logits.double(), dim=-1)
    ref_top = base_logits.argmax(-1)
    rows = []
    for a in alphas:
        logits = next_token_logits(ctx, state.with_alpha(float(a)))
        finite = bool(torch.isfinite(logits).all())
        kl = kl_divergence(logits, ref) if finite else None
        logp = torch.log_softmax(logits.double(), dim=-1) if finite else None
        rows.append(
            {
                "alpha": float(a),
                "kl_mean": float(kl.mean()) if finite else None,
                "kl_median": float(kl.median()) if finite else None,
                "top1_agreement": float(logits.argmax(-1).eq(ref_top).double().mean()),
                "entropy": float(-(logp.exp() * logp).sum(-1).mean()) if finite else None,
                "finite": finite,
            }
        )
    kls = [r["kl_mean"] for r in rows if r["kl_mean"] is not None]
    rel = [abs(b - a) / max(abs(a), 1e-12) for a, b in itertools.pairwise(kls)]
    return {
        "analysis": "strength",
        **ctx.info,
        "site": site,
        "k": int(k),
        "sign": sign,
        "units": coordinates(sel),
        "kl": "KL(steered || unsteered) of the next-token distribution at the answer position, nats, mean over examples",
        "unsteered_entropy": float(-(ref.exp() * ref).sum(-1).mean()),
        "points": rows,
        "relative_change": rel,
        "converged": bool(rel) and rel[-1] < 0.05,
    }


# ============================================================================ (d) token promotion
def token_promotion(
    ctx: AnalysisContext,
    *,
    site: str = "attention",
    layer: int | None = None,
    unit: int | None = None,
    alpha: float = 20.0,
    top_n: int = 10,
) -> dict[str, Any]:
    """Tokens whose next-token logit steering one AU raises and lowers most (mean over the examples)."""
    if site not in ("attention", "ffn"):
        raise AusteerError(f"--site must be attention or ffn, not '{site}'")
    layout = ctx.layout
    if (layer is None) != (unit is None):
        raise AusteerError("give both --layer and --unit, or neither (the unit with the largest momentum)")
    if layer is None:
        best = rank_units(ctx.acc, (site,), "both")
        layer, unit = int(best.layer[0]), int(best.unit[0])
    if not 0 <= layer < layout.n_layers or not 0 <= unit < layout.site(site).size:
        raise AusteerError(
            f"--layer/--unit out of range: layers 0..{layout.n_layers - 1}, units 0..{layout.site(site).size - 1}"
        )
    if top_n <= 0:
        raise AusteerError(f"--top_n must be positive, got {top_n}")
    state = units_state(ctx, (site,), torch.zeros(1), torch.tensor([layer]), torch.tensor([unit]), alpha)
    base, steered = next_token_logits(ctx), next_token_logits(ctx, state)
    change = (steered.double() - base.double()).mean(0)
    logp_change = (torch.log_softmax(steered.double(), -1) - torch.log_softmax(base.double(), -1)).mean(0)
    n = min(top_n, change.numel())

    def entries(values: torch.Tensor, ids: torch.Tensor) -> list[dict[str, Any]]:
        return [
            {
                "token": ctx.tokenizer.decode([int(i)]),
                "id": int(i),
                "logit_change": float(v),
                "logprob_change": float(logp_change[i]),
            }
            for v, i in zip(values, ids)
        ]

    up = torch.topk(change, n)
    down = torch.topk(-change, n)
    raised = [e for e in entries(up.values, up.indices) if e["logit_change"] > 0]
    lowered = [e for e in entries(-down.values, down.indices) if e["logit_change"] < 0]
    # How the task's answers move: the first token of each distinct answer, as it follows the prompt when scored.
    suffixes: dict[str, str] = {}
    for ex, answers in zip(ctx.examples, ctx.answers):
        for choice, suffix in zip(ex.choices, answers):
            suffixes.setdefault(choice, suffix)
    answer_tokens = []
    texts = sorted(suffixes)[:20]
    for text, ids in (
        zip(texts, ctx.tokenizer([suffixes[t] for t in texts], add_special_tokens=False)["input_ids"]) if texts else ()
    ):
        if ids:
            answer_tokens.append(
                {
                    "choice": text,
                    "token": ctx.tokenizer.decode([ids[0]]),
                    "id": int(ids[0]),
                    "logit_change": float(change[ids[0]]),
                    "logprob_change": float(logp_change[ids[0]]),
                }
            )
    return {
        "analysis": "tokens",
        **ctx.info,
        "unit": {
            "site": site,
            "layer": int(layer),
            "unit": int(unit),
            "momentum": float(ctx.acc.momentum(site).cpu()[layer, unit]),
        },
        "alpha": float(alpha),
        "top_n": int(top_n),
        "change": "steered minus unsteered next-token logit at the answer position, mean over examples",
        "raised": raised,
        "lowered": lowered,
        "answer_tokens": answer_tokens,
        "mean_abs_change": float(change.abs().mean()),
    }


# ============================================================================ (e) promotion vs. suppression
def sign_policies(
    ctx: AnalysisContext,
    *,
    site: str = "attention",
    ks: Sequence[int] = (5, 10, 20, 50, 100),
    alphas: Sequence[float] = (1.0, 2.0),
) -> dict[str, Any]:
    """The same k with ``promote`` (m > 0 only) and ``both`` (either sign) selections, scored on the examples."""
    sites = site_names(site)
    ranked = {sign: rank_units(ctx.acc, sites, sign) for sign in ("promote", "both")}
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] <= 0:
        raise AusteerError("--ks must be positive whole numbers")
    if ks[-1] > ranked["promote"].k:
        raise AusteerError(f"k={ks[-1]} but only {ranked['promote'].k} {site} units have m > 0; lower --ks")
    unsteered = score(ctx)
    rows = []
    for k in ks:
        for sign in ("promote", "both"):
            sel = ranked[sign].head(k)
            for a in alphas:
                rows.append(
                    {
                        "sign": sign,
                        "k": k,
                        "alpha": float(a),
                        "n_negative": int((sel.momentum < 0).sum()),
                        **score(ctx, selection_state(ctx, sel, a, sign)),
                    }
                )
    best = {
        sign: max((r for r in rows if r["sign"] == sign), key=lambda r: (r["accuracy"], r["margin"]))
        for sign in ("promote", "both")
    }
    return {"analysis": "sign", **ctx.info, "site": site, "unsteered": unsteered, "points": rows, "best": best}


__all__ = [
    "combinations",
    "dimension_sweep",
    "kl_divergence",
    "sign_policies",
    "strength_convergence",
    "token_promotion",
]
