"""The paper's analyses of activation units: ``python analyze.py NAME [options]``.

Each analysis fits the momentum statistics with the engine's pass over the training pairs, directly
(one process, no Lightning: :func:`prepare`), then probes the frozen model on the validation split (or ``--split test``) with batched forward
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
    >>> ctx = prepare(AnalysisOptions(model="smollm2-135m-instruct", max_train_pairs=200, max_examples=50))
    >>> result = dimension_sweep(ctx, site="attention", stride=4, alpha=2.0)
    >>> plot_sweep(result, "sweep.png")

Why one module of this size: five analyses, each an experiment function and its plot, share one context, one parser and one writer; a module per analysis would repeat all three.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from austeer_pl.analyses.behaviour import add_behaviour_arguments, behaviour_main
from austeer_pl.cli.runtime import (
    ModelDataOptions,
    OneLineParser,
    add_output_options,
    claim_run_dir,
    log_result_wandb,
    parse_list,
    quiet,
    resolve_wandb_mode,
    run_main,
)
from austeer_pl.cli.runtime import task_stem as _task_stem
from austeer_pl.core.fileio import (
    Output,
    json_output,
    png_output,
    save_figure,
    write_json_output,
)
from austeer_pl.core.models import DEFAULT_MODEL, load_model, model_name_of
from austeer_pl.core.pairs import accumulate_momentum
from austeer_pl.core.reading import position_ids_from_mask
from austeer_pl.core.selection import Selection, rank_units, select_units
from austeer_pl.core.sites import locate_units
from austeer_pl.core.state import SteeringState
from austeer_pl.core.tokens import pad_ids, truncate_left
from austeer_pl.errors import AusteerError
from austeer_pl.fit.gridscore import decision_statistics
from austeer_pl.methods.block import rank_blocks
from austeer_pl.scoring.evaluate import answer_suffixes
from austeer_pl.scoring.loglik import choice_logprobs
from austeer_pl.tasks.config import DataConfig
from austeer_pl.tasks.prompts import format_prompt, join_answer
from austeer_pl.tasks.splits import make_pairs

ANALYSES: tuple[str, ...] = ("sweep", "combinations", "strength", "tokens", "sign")
ALIASES = {
    "dimension_sweep": "sweep", "dimensions": "sweep", "combination": "combinations", "strength_convergence": "strength",
    "kl": "strength", "token_promotion": "tokens", "promotion": "tokens", "promotion_vs_suppression": "sign", "sign_policy": "sign",
}
SITE_CHOICES = {"attention": ("attention",), "ffn": ("ffn",), "both": ("attention", "ffn")}


# ============================================================================ context
@dataclass
class AnalysisOptions(ModelDataOptions):
    """Model, data and output settings shared by every analysis (``None``: the pipeline's default)."""

    split: str = "val"
    max_examples: int | None = None


@dataclass
class AnalysisContext:
    """A loaded model, its fitted momentum statistics and the examples the analyses score."""

    model: Any
    tokenizer: Any
    layout: Any
    acc: Any
    task: Any
    examples: list
    prompts: list[str]
    base_model: str
    batch_size: int = 16
    max_length: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    _answers: list[list[str]] | None = None
    _prompt_ids: list[list[int]] | None = None

    @property
    def answers(self) -> list[list[str]]:
        if self._answers is None:
            self._answers = [answer_suffixes(p, ex.choices) for p, ex in zip(self.prompts, self.examples)]
        return self._answers

    @property
    def prompt_ids(self) -> list[list[int]]:
        if self._prompt_ids is None:
            ids = self.tokenizer(list(self.prompts), add_special_tokens=True)["input_ids"]
            self._prompt_ids = [truncate_left(list(x), self.max_length) for x in ids]
        return self._prompt_ids


def prepare(opts: AnalysisOptions) -> AnalysisContext:
    """Load the model, run the engine's momentum pass over the training pairs (one process, no
    Lightning), collect the examples the analyses score."""

    if opts.split not in ("val", "test"):
        raise AusteerError(f"--split must be val or test, not '{opts.split}'")
    model_name = opts.model or DEFAULT_MODEL
    defaults = DataConfig()
    config = DataConfig(
        task=opts.task, seed=opts.seed, chat_template=opts.chat_template,
        max_train_pairs=opts.max_train_pairs if opts.max_train_pairs is not None else defaults.max_train_pairs,
        max_val_examples=opts.max_examples if opts.split == "val" and opts.max_examples is not None else defaults.max_val_examples,
        max_test_examples=opts.max_examples if opts.split == "test" and opts.max_examples is not None else defaults.max_test_examples,
        max_length=opts.max_length if opts.max_length is not None else defaults.max_length,
    )
    task, splits = config.load()
    model, tokenizer = load_model(model_name, dtype=opts.dtype, device=opts.device, cache_dir=opts.cache_dir)
    layout = locate_units(model)
    started = time.perf_counter()
    pairs = make_pairs(splits["train"], negatives=config.negatives, seed=config.seed, max_pairs=config.max_train_pairs)
    texts = {p.prompt: format_prompt(tokenizer, task, p.prompt, chat_template=config.chat_template) for p in pairs}
    rows = [(join_answer(texts[p.prompt], p.positive), join_answer(texts[p.prompt], p.negative)) for p in pairs]
    acc = accumulate_momentum(model, tokenizer, rows, sites=("attention", "ffn"), batch_size=opts.batch_size, layout=layout, max_length=config.max_length)
    fit_seconds = time.perf_counter() - started
    examples = list(splits[opts.split])
    if not examples:
        raise AusteerError(f"the {opts.split} split of '{opts.task}' is empty; raise --max_examples or choose another split")
    prompts = [format_prompt(tokenizer, task, ex.prompt, chat_template=config.chat_template) for ex in examples]
    info = {
        "task": opts.task, "task_name": task.name, "base_model": model_name, "seed": opts.seed, "split": opts.split,
        "n_examples": len(examples), "n_train_pairs": acc.n, "fit_seconds": fit_seconds, "data": config.to_dict(),
    }
    return AnalysisContext(
        model=model, tokenizer=tokenizer, layout=layout, acc=acc, task=task, examples=examples, prompts=prompts,
        base_model=model_name_of(model) or model_name, batch_size=opts.batch_size, max_length=config.max_length, info=info,
    )


# ============================================================================ scoring
def _steer(ctx: AnalysisContext, state: SteeringState | None):
    return state.apply(ctx.model, layout=ctx.layout) if state is not None else nullcontext()


def score(ctx: AnalysisContext, state: SteeringState | None = None) -> dict[str, float]:
    """Accuracy and mean margin (right answer's log-likelihood minus the best wrong one's), steered by ``state``."""

    with _steer(ctx, state):
        scores = choice_logprobs(ctx.model, ctx.tokenizer, ctx.prompts, ctx.answers, batch_size=ctx.batch_size, max_length=ctx.max_length)
    stats = decision_statistics(scores, [ex.answer for ex in ctx.examples])
    return {"accuracy": float(stats[:, 0].mean()), "margin": float(stats[:, 1].mean())}


@torch.inference_mode()
def next_token_logits(ctx: AnalysisContext, state: SteeringState | None = None) -> torch.Tensor:
    """Logits of the next token after each prompt (the answer position), ``(examples, vocab)`` float32 on the CPU."""
    device = next(ctx.model.parameters()).device
    pad = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else ctx.tokenizer.eos_token_id
    out = []
    with _steer(ctx, state):
        for start in range(0, len(ctx.prompt_ids), ctx.batch_size):
            ids, mask = pad_ids(ctx.prompt_ids[start : start + ctx.batch_size], int(pad or 0), side="left", device=device)
            logits = ctx.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), logits_to_keep=1, use_cache=False).logits
            out.append(logits[:, -1].float().cpu())
    return torch.cat(out)


# ============================================================================ states of chosen units
def units_state(
    ctx: AnalysisContext,
    sites: Sequence[str],
    site_index: torch.Tensor,
    layer: torch.Tensor,
    unit: torch.Tensor,
    alpha: float,
    *,
    amplify: torch.Tensor | None = None,
    metadata: dict[str, Any] | None = None,
) -> SteeringState:
    """An AUSteer-rule state on the given units: ``scale = alpha * m`` (``alpha * |m|`` where ``amplify``)."""
    site_index, layer, unit = site_index.long(), layer.long(), unit.long()
    momentum = torch.empty(unit.numel())
    for i, site in enumerate(sites):
        rows = site_index == i
        momentum[rows] = ctx.acc.momentum(site).cpu()[layer[rows], unit[rows]]
    strength = momentum if amplify is None else torch.where(amplify, momentum.abs(), momentum)
    return SteeringState(
        sites=tuple(sites), site_index=site_index, layer=layer, unit=unit, momentum=momentum,
        scale=float(alpha) * strength, shift=torch.zeros_like(momentum), alpha=float(alpha),
        architecture=ctx.layout.architecture, n_layers=ctx.layout.n_layers, site_sizes={s: ctx.layout.site(s).size for s in sites},
        base_model=ctx.base_model, sign_policy="both", metadata=dict(metadata or {}),
    )


def selection_state(ctx: AnalysisContext, sel: Selection, alpha: float, sign: str = "both") -> SteeringState:
    return SteeringState.from_selection(sel, ctx.layout, alpha=alpha, base_model=ctx.base_model, sign_policy=sign)


def _sites(site: str) -> tuple[str, ...]:
    if site not in SITE_CHOICES:
        raise AusteerError(f"unknown site '{site}'; choose attention, ffn or both")
    return SITE_CHOICES[site]


def _subset(sel: Selection, rows: torch.Tensor) -> Selection:
    return Selection(sel.sites, sel.site_index[rows], sel.layer[rows], sel.unit[rows], sel.momentum[rows])


def _cat(a: Selection, b: Selection) -> Selection:
    return Selection(a.sites, torch.cat([a.site_index, b.site_index]), torch.cat([a.layer, b.layer]), torch.cat([a.unit, b.unit]), torch.cat([a.momentum, b.momentum]))


def _coords(sel: Selection) -> list[dict[str, Any]]:
    return [{"site": s, "layer": l, "unit": u, "momentum": float(m)} for (s, l, u), m in zip(sel.coordinates(), sel.momentum.tolist())]


# ============================================================================ (a) dimension sweep
def resolve_block(ctx: AnalysisContext, site: str, layer: int | None = None, head: int | None = None) -> dict[str, Any]:
    """The block to sweep: an attention head or a layer's FFN output (default: the best by mean ``|m|``)."""

    layout = ctx.layout
    if site not in ("attention", "ffn"):
        raise AusteerError(f"the sweep runs within one block: --site attention (a head) or ffn (a layer), not '{site}'")
    if layer is not None and not 0 <= layer < layout.n_layers:
        raise AusteerError(f"--layer {layer} is out of range: choose 0..{layout.n_layers - 1}")
    if site == "attention":
        if head is not None and not 0 <= head < layout.n_heads:
            raise AusteerError(f"--head {head} is out of range: choose 0..{layout.n_heads - 1}")
        ranking = rank_blocks(ctx.acc, layout, ("attention",))
        blocks = [(l, h, s) for (_, l, h), s in zip(ranking.blocks(), ranking.score.tolist()) if (layer is None or l == layer) and (head is None or h == head)]
        layer, head, block_score = blocks[0]
        units = torch.arange(head * layout.head_dim, (head + 1) * layout.head_dim)
    else:
        if head is not None:
            raise AusteerError("--head is for --site attention; an FFN block is a whole layer")
        ranking = rank_blocks(ctx.acc, layout, ("ffn",))
        blocks = [(l, s) for (_, l, _), s in zip(ranking.blocks(), ranking.score.tolist()) if layer is None or l == layer]
        layer, block_score = blocks[0]
        head = None
        units = torch.arange(layout.site("ffn").size)
    return {"site": site, "layer": int(layer), "head": head, "units": units, "mean_abs_momentum": float(block_score)}


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
    sites = _sites(site)
    ranked = rank_units(ctx.acc, sites, "both")
    pos, neg = _subset(ranked, ranked.momentum > 0), _subset(ranked, ranked.momentum < 0)
    sizes = sorted({int(n) for n in sizes})
    negatives = sorted({int(j) for j in negatives})
    if not sizes or sizes[0] <= 0 or (negatives and negatives[0] < 0):
        raise AusteerError("--sizes must be positive and --negatives non-negative whole numbers")
    if sizes[-1] > pos.k:
        raise AusteerError(f"--sizes asks for {sizes[-1]} positive units but only {pos.k} {site} units have m > 0")
    if negatives and negatives[-1] > neg.k:
        raise AusteerError(f"--negatives asks for {negatives[-1]} negative units but only {neg.k} {site} units have m < 0")
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
            sel = _cat(pos.head(base), neg.head(j))
            amplify = torch.cat([torch.zeros(base, dtype=torch.bool), torch.ones(j, dtype=torch.bool)]) if negative_rule == "amplify" else None
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
        "units": {"positive": _coords(pos.head(sizes[-1])), "negative": _coords(neg.head(negatives[-1])) if negatives and negatives[-1] else []},
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
    sel = select_units(ctx.acc, int(k), _sites(site), sign)
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
        rows.append({
            "alpha": float(a),
            "kl_mean": float(kl.mean()) if finite else None,
            "kl_median": float(kl.median()) if finite else None,
            "top1_agreement": float(logits.argmax(-1).eq(ref_top).double().mean()),
            "entropy": float(-(logp.exp() * logp).sum(-1).mean()) if finite else None,
            "finite": finite,
        })
    kls = [r["kl_mean"] for r in rows if r["kl_mean"] is not None]
    rel = [abs(b - a) / max(abs(a), 1e-12) for a, b in zip(kls, kls[1:])]
    return {
        "analysis": "strength",
        **ctx.info,
        "site": site,
        "k": int(k),
        "sign": sign,
        "units": _coords(sel),
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
        raise AusteerError(f"--layer/--unit out of range: layers 0..{layout.n_layers - 1}, units 0..{layout.site(site).size - 1}")
    if top_n <= 0:
        raise AusteerError(f"--top_n must be positive, got {top_n}")
    state = units_state(ctx, (site,), torch.zeros(1), torch.tensor([layer]), torch.tensor([unit]), alpha)
    base, steered = next_token_logits(ctx), next_token_logits(ctx, state)
    change = (steered.double() - base.double()).mean(0)
    logp_change = (torch.log_softmax(steered.double(), -1) - torch.log_softmax(base.double(), -1)).mean(0)
    n = min(top_n, change.numel())

    def entries(values: torch.Tensor, ids: torch.Tensor) -> list[dict[str, Any]]:
        return [{"token": ctx.tokenizer.decode([int(i)]), "id": int(i), "logit_change": float(v), "logprob_change": float(logp_change[i])} for v, i in zip(values, ids)]

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
    for text, ids in zip(texts, ctx.tokenizer([suffixes[t] for t in texts], add_special_tokens=False)["input_ids"]) if texts else ():
        if ids:
            answer_tokens.append({"choice": text, "token": ctx.tokenizer.decode([ids[0]]), "id": int(ids[0]), "logit_change": float(change[ids[0]]), "logprob_change": float(logp_change[ids[0]])})
    return {
        "analysis": "tokens",
        **ctx.info,
        "unit": {"site": site, "layer": int(layer), "unit": int(unit), "momentum": float(ctx.acc.momentum(site).cpu()[layer, unit])},
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
    sites = _sites(site)
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
                rows.append({"sign": sign, "k": k, "alpha": float(a), "n_negative": int((sel.momentum < 0).sum()), **score(ctx, selection_state(ctx, sel, a, sign))})
    best = {sign: max((r for r in rows if r["sign"] == sign), key=lambda r: (r["accuracy"], r["margin"])) for sign in ("promote", "both")}
    return {"analysis": "sign", **ctx.info, "site": site, "unsteered": unsteered, "points": rows, "best": best}


# ============================================================================ plots
def _pyplot():
    import matplotlib  # noqa: PLC0415 - plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - plots only

    return plt


def _save(fig, path: str | os.PathLike | Output) -> Path:
    output = path if isinstance(path, Output) else png_output(path)
    try:
        return save_figure(fig, output)
    finally:
        _pyplot().close(fig)


def _title(result: dict[str, Any]) -> str:
    return f"{result.get('task_name', result.get('task'))} - {result.get('base_model')} ({result.get('split')}, n={result.get('n_examples')})"


def plot_sweep(result: dict[str, Any], path) -> Path:
    plt = _pyplot()
    rows = result["units"]
    x = [r["unit"] for r in rows]
    colors = ["tab:green" if r["momentum"] > 0 else "tab:red" for r in rows]
    b = result["block"]
    name = f"L{b['layer']} head {b['head']}" if b["site"] == "attention" else f"L{b['layer']} FFN"
    fig, axes = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for ax, key, label in ((axes[0], "accuracy", "accuracy"), (axes[1], "margin", "mean margin (nats)")):
        base = result["unsteered"][key]
        values = [r[key] for r in rows]
        ax.vlines(x, base, values, colors=colors, lw=2)
        ax.scatter(x, values, c=colors, s=18, zorder=3, label="one unit (green m>0, red m<0)")
        ax.axhline(result["whole_block"][key], color="tab:blue", ls="--", label=f"whole block ({result['whole_block']['n_units']} units)")
        ax.axhline(base, color="black", ls=":", label="unsteered")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8, loc="best")
    axes[1].set_xlabel(f"unit index within the {b['site']} site (every {b['stride']})")
    fig.suptitle(f"Dimension sweep, {name}, alpha={result['alpha']:g}\n{_title(result)}", fontsize=10)
    return _save(fig, path)


def plot_combinations(result: dict[str, Any], path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharey="row")
    pos, neg = result["positive"], result["with_negative"]
    for row, key in enumerate(("accuracy", "margin")):
        axes[row, 0].plot([p["n_positive"] for p in pos], [p[key] for p in pos], "o-", color="tab:green")
        axes[row, 0].set_xscale("log", base=2)
        axes[row, 0].set_xticks([p["n_positive"] for p in pos], [str(p["n_positive"]) for p in pos])
        axes[row, 1].plot([p["n_negative"] for p in neg], [p[key] for p in neg], "o-", color="tab:red")
        axes[row, 1].set_xscale("symlog", base=2, linthresh=1)
        axes[row, 1].set_xticks([p["n_negative"] for p in neg], [str(p["n_negative"]) for p in neg])
        for ax in axes[row]:
            ax.axhline(result["unsteered"][key], color="black", ls=":", label="unsteered")
        axes[row, 0].set_ylabel(key if key == "accuracy" else "mean margin (nats)")
    axes[1, 0].set_xlabel("positive-momentum AUs steered together")
    base = neg[0]["n_positive"] if neg else 0
    axes[1, 1].set_xlabel(f"negative-momentum AUs added to the best {base} ({result['negative_rule']})")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"AU combinations ({result['site']}, alpha={result['alpha']:g})\n{_title(result)}", fontsize=10)
    return _save(fig, path)


def plot_strength(result: dict[str, Any], path) -> Path:
    plt = _pyplot()
    pts = [p for p in result["points"] if p["kl_mean"] is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([p["alpha"] for p in pts], [p["kl_mean"] for p in pts], "o-", label="mean KL")
    ax.plot([p["alpha"] for p in pts], [p["kl_median"] for p in pts], "s--", alpha=0.7, label="median KL")
    ax.set_xscale("log")
    ax.set_xlabel("alpha")
    ax.set_ylabel("KL(steered || unsteered), nats")
    ax2 = ax.twinx()
    ax2.plot([p["alpha"] for p in result["points"]], [p["top1_agreement"] for p in result["points"]], "^:", color="tab:gray", label="top-1 agreement")
    ax2.set_ylabel("top-1 agreement with unsteered")
    ax2.set_ylim(-0.02, 1.02)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [l.get_label() for l in lines], fontsize=8, loc="center right")
    fig.suptitle(f"Strength convergence (top-{result['k']} {result['site']} AUs, {result['sign']})\n{_title(result)}", fontsize=10)
    return _save(fig, path)


def plot_tokens(result: dict[str, Any], path) -> Path:
    plt = _pyplot()
    rows = sorted(result["raised"] + result["lowered"], key=lambda r: r["logit_change"])
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.3 * len(rows) + 1.5)))
    ax.barh(range(len(rows)), [r["logit_change"] for r in rows], color=["tab:green" if r["logit_change"] > 0 else "tab:red" for r in rows])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([ascii(r["token"]) for r in rows], fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("mean next-token logit change at the answer position")
    u = result["unit"]
    fig.suptitle(f"Tokens moved by {u['site']} L{u['layer']} unit {u['unit']} (m={u['momentum']:+.2f}, alpha={result['alpha']:g})\n{_title(result)}", fontsize=10)
    return _save(fig, path)


def plot_sign(result: dict[str, Any], path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    alphas = sorted({p["alpha"] for p in result["points"]})
    for ax, key in zip(axes, ("accuracy", "margin")):
        for sign, color in (("promote", "tab:green"), ("both", "tab:purple")):
            for i, a in enumerate(alphas):
                pts = [p for p in result["points"] if p["sign"] == sign and p["alpha"] == a]
                ax.plot([p["k"] for p in pts], [p[key] for p in pts], "o-" if i == 0 else "s--", color=color, alpha=1.0 - 0.5 * i / max(1, len(alphas) - 1), label=f"{sign}, alpha={a:g}")
        ax.axhline(result["unsteered"][key], color="black", ls=":", label="unsteered")
        ax.set_xscale("log")
        ks = sorted({p["k"] for p in result["points"]})
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("k (steered AUs)")
        ax.set_ylabel(key if key == "accuracy" else "mean margin (nats)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Promotion vs. suppression ({result['site']})\n{_title(result)}", fontsize=10)
    return _save(fig, path)


PLOTS = {"sweep": plot_sweep, "combinations": plot_combinations, "strength": plot_strength, "tokens": plot_tokens, "sign": plot_sign}


# ============================================================================ W&B
def _scalars(result: dict[str, Any]) -> dict[str, float]:
    name = result["analysis"]
    out: dict[str, float] = {}
    if name == "sweep":
        out = {"sweep/unsteered_accuracy": result["unsteered"]["accuracy"], "sweep/block_accuracy": result["whole_block"]["accuracy"],
               "sweep/best_unit_accuracy": result["summary"]["best_unit_accuracy"], "sweep/n_units_beating_block": result["summary"]["n_units_beating_block_accuracy"]}
    elif name == "combinations":
        out = {"combinations/best_positive_accuracy": max(p["accuracy"] for p in result["positive"])}
    elif name == "strength":
        kls = [p["kl_mean"] for p in result["points"] if p["kl_mean"] is not None]
        out = {"strength/kl_at_max_alpha": kls[-1] if kls else float("nan")}
    elif name == "tokens":
        out = {"tokens/mean_abs_change": result["mean_abs_change"]}
    elif name == "sign":
        out = {f"sign/best_{s}_accuracy": r["accuracy"] for s, r in result["best"].items()}
    return out


def log_wandb(result: dict[str, Any], png: Path, json_path: Path, *, mode: str, project: str, run_dir: Path) -> str | None:
    """Log an analysis's plot, headline numbers and JSON to a W&B run (see :func:`~austeer_pl.cli.runtime.log_result_wandb`)."""

    return log_result_wandb(result, png, json_path, mode=mode, project=project, run_dir=run_dir, scalars=_scalars(result))


# ============================================================================ command line

def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model, data and output")

    g.add_argument("--model", "--model.model_name", dest="model", default=None, help="base model (default: smollm2-135m-instruct)")
    g.add_argument("--task", "--data.task", dest="task", default="rotten_tomatoes", help="task spec (see README)")
    g.add_argument("--seed", "--data.seed", dest="seed", type=int, default=0, help="split seed")
    g.add_argument("--split", default="val", choices=["val", "test"], help="examples to score (default: validation)")
    g.add_argument("--max_train_pairs", "--data.max_train_pairs", dest="max_train_pairs", type=int, default=None, help="training pairs of the momentum pass (default: the data module's)")
    g.add_argument("--max_examples", type=int, default=None, help="examples to score (default: the data module's cap)")
    add_output_options(g, name="NAME")


def _ints(text: str) -> list[int]:

    return parse_list(text, "list", int)


def _floats(text: str) -> list[float]:

    return parse_list(text, "list", float)


def _typed(fn, what: str):
    def convert(text: str):
        try:
            return fn(text)
        except AusteerError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}") from None

    convert.__name__ = what
    return convert


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="analyze.py", description="The AUSteer paper's activation-unit analyses; each writes JSON and a PNG plot.")
    sub = p.add_subparsers(dest="name", metavar="NAME", parser_class=OneLineParser)
    ints, floats = _typed(_ints, "whole numbers"), _typed(_floats, "numbers")

    s = sub.add_parser("sweep", aliases=["dimension_sweep"], help="one AU at a time within a block vs. the whole block")
    s.add_argument("--site", default="attention", choices=["attention", "ffn"])
    s.add_argument("--layer", type=int, default=None, help="block layer (default: the best block by mean |m|)")
    s.add_argument("--head", type=int, default=None, help="attention head (default: the best head of --layer)")
    s.add_argument("--stride", type=int, default=None, help="sweep every n-th unit (default: at most --max_units units)")
    s.add_argument("--max_units", type=int, default=64)
    s.add_argument("--alpha", type=float, default=2.0)

    s = sub.add_parser("combinations", help="positive AUs together, then with negative-momentum AUs added")
    s.add_argument("--site", default="attention", choices=list(SITE_CHOICES))
    s.add_argument("--sizes", type=ints, default=[1, 2, 4, 8, 16, 32])
    s.add_argument("--negatives", type=ints, default=[0, 1, 2, 4, 8, 16, 32])
    s.add_argument("--base", type=int, default=None, help="positive set the negatives join (default: the largest size)")
    s.add_argument("--alpha", type=float, default=2.0)
    s.add_argument("--negative_rule", default="signed", choices=["signed", "amplify"])

    s = sub.add_parser("strength", aliases=["strength_convergence"], help="KL(steered || unsteered) as alpha grows")
    s.add_argument("--site", default="attention", choices=list(SITE_CHOICES))
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--sign", default="promote", choices=["promote", "both"])
    s.add_argument("--alpha_min", type=float, default=10.0)
    s.add_argument("--alpha_max", type=float, default=1e5)
    s.add_argument("--n_alpha", type=int, default=9)

    s = sub.add_parser("tokens", aliases=["token_promotion"], help="tokens one AU raises and lowers at the answer position")
    s.add_argument("--site", default="attention", choices=["attention", "ffn"])
    s.add_argument("--layer", type=int, default=None)
    s.add_argument("--unit", type=int, default=None)
    s.add_argument("--alpha", type=float, default=20.0)
    s.add_argument("--top_n", type=int, default=10)

    s = sub.add_parser("sign", aliases=["promotion_vs_suppression"], help="promote vs. both sign policies at the same k")
    s.add_argument("--site", default="attention", choices=list(SITE_CHOICES))
    s.add_argument("--ks", type=ints, default=[5, 10, 20, 50, 100])
    s.add_argument("--alpha", type=floats, default=[1.0, 2.0])

    for action in {id(a): a for a in sub.choices.values()}.values():  # aliases share their parser
        _common(action)
    # Behaviour in free text: judge score and perplexity against alpha (its own options; no momentum pass here).

    add_behaviour_arguments(sub.add_parser("behaviour", help="judge score and perplexity vs. alpha in free text, AUSteer and CAA"))
    return p


def run_analysis(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one analysis from parsed arguments: prepare, analyse, write JSON and PNG, log to W&B."""

    name = ALIASES.get(name, name)
    if name not in ANALYSES:
        raise AusteerError(f"unknown analysis '{name}'; choose one of {', '.join(ANALYSES)}")
    for key in ("max_train_pairs", "max_examples", "batch_size", "max_length"):
        value = getattr(args, key)
        if value is not None and value <= 0:
            raise AusteerError(f"--{key} must be positive, got {value}")
    stem = _task_stem(args.task)
    out = Path(args.out or Path("runs") / "analyses" / f"{name}-{stem}.json")
    png = Path(args.plot or out.with_suffix(".png"))
    if out.absolute() == png.absolute():
        raise AusteerError(f"--out and --plot are the same file {out}; give the plot its own path")
    reads = [args.task, args.model]
    out_file = json_output(out, "analysis JSON", overwrite=args.overwrite).check(inputs=reads)
    png_file = png_output(png, "analysis plot", overwrite=args.overwrite).check(inputs=reads)
    if args.wandb_mode not in ("offline", "online", "disabled"):
        raise AusteerError(f"--wandb_mode must be offline, online or disabled, not '{args.wandb_mode}'")
    if args.wandb_mode == "online":

        args.wandb_mode = resolve_wandb_mode("online", "offline")
    quiet()
    opts = AnalysisOptions(
        model=args.model, task=args.task, seed=args.seed, split=args.split, max_train_pairs=args.max_train_pairs,
        max_examples=args.max_examples, batch_size=args.batch_size, max_length=args.max_length,
        chat_template={"on": True, "off": False, "auto": None, None: None}[args.chat_template], dtype=args.dtype,
        device=args.device, cache_dir=args.cache_dir,
    )
    ctx = prepare(opts)
    started = time.perf_counter()
    if name == "sweep":
        result = dimension_sweep(ctx, site=args.site, layer=args.layer, head=args.head, stride=args.stride, max_units=args.max_units, alpha=args.alpha)
    elif name == "combinations":
        result = combinations(ctx, site=args.site, sizes=args.sizes, negatives=args.negatives, base=args.base, alpha=args.alpha, negative_rule=args.negative_rule)
    elif name == "strength":
        result = strength_convergence(ctx, site=args.site, k=args.k, sign=args.sign, alpha_min=args.alpha_min, alpha_max=args.alpha_max, n_alpha=args.n_alpha)
    elif name == "tokens":
        result = token_promotion(ctx, site=args.site, layer=args.layer, unit=args.unit, alpha=args.alpha, top_n=args.top_n)
    else:
        result = sign_policies(ctx, site=args.site, ks=args.ks, alphas=args.alpha)
    result["analysis_seconds"] = time.perf_counter() - started
    result["plot"] = str(png)
    write_json_output(out_file, result)
    PLOTS[name](result, png_file)
    if args.wandb_mode != "disabled":
        run = claim_run_dir(f"analyze-{name}", args.task, args.run_dir)
        try:
            log_wandb(result, png, out, mode=args.wandb_mode, project=args.wandb_project, run_dir=run.path)
        finally:
            run.release()
    print(f"{name}: wrote {out} and {png}")
    return result


def analyze(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.name:
        parser.error(f"name an analysis: one of {', '.join((*ANALYSES, 'behaviour'))}")
    if args.name == "behaviour":

        return behaviour_main(args)
    return run_analysis(args.name, args)


def analyze_main(argv: Sequence[str] | None = None) -> int:
    """``analyze.py``: 0 on success, 2 with a one-line ``error: ...`` on bad input."""

    return run_main(lambda: analyze(argv))


__all__ = [
    "ALIASES",
    "ANALYSES",
    "AnalysisContext",
    "AnalysisOptions",
    "PLOTS",
    "SITE_CHOICES",
    "analyze",
    "analyze_main",
    "build_parser",
    "combinations",
    "dimension_sweep",
    "kl_divergence",
    "log_wandb",
    "next_token_logits",
    "plot_combinations",
    "plot_sign",
    "plot_strength",
    "plot_sweep",
    "plot_tokens",
    "prepare",
    "resolve_block",
    "run_analysis",
    "score",
    "selection_state",
    "sign_policies",
    "strength_convergence",
    "token_promotion",
    "units_state",
]
