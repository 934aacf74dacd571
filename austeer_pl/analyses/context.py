"""What every unit analysis starts from: the model, its momentum statistics from one pass over the
training pairs, the examples scored, and the batched scoring of a steering state on them."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from austeer_pl.cli.runtime import ModelDataOptions
from austeer_pl.core.embedded import DEFAULT_MODEL
from austeer_pl.core.models import load_model, model_name_of
from austeer_pl.core.pairs import accumulate_momentum
from austeer_pl.core.placement import input_device
from austeer_pl.core.reading import padded_logits
from austeer_pl.core.selection import Selection
from austeer_pl.core.sites import locate_units
from austeer_pl.core.state import SteeringState
from austeer_pl.core.tokens import pad_ids, truncate_left
from austeer_pl.errors import AusteerError
from austeer_pl.methods.block import rank_blocks
from austeer_pl.scoring.evaluate import answer_suffixes
from austeer_pl.scoring.loglik import choice_logprobs, decision_statistics
from austeer_pl.tasks.config import DataConfig
from austeer_pl.tasks.prompts import format_prompt, join_answer
from austeer_pl.tasks.splits import make_pairs

SITE_CHOICES = {"attention": ("attention",), "ffn": ("ffn",), "both": ("attention", "ffn")}


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
        task=opts.task,
        seed=opts.seed,
        chat_template=opts.chat_template,
        max_train_pairs=opts.max_train_pairs if opts.max_train_pairs is not None else defaults.max_train_pairs,
        max_val_examples=opts.max_examples
        if opts.split == "val" and opts.max_examples is not None
        else defaults.max_val_examples,
        max_test_examples=opts.max_examples
        if opts.split == "test" and opts.max_examples is not None
        else defaults.max_test_examples,
        max_length=opts.max_length if opts.max_length is not None else defaults.max_length,
    )
    task, splits = config.load()
    model, tokenizer = load_model(model_name, dtype=opts.dtype, device=opts.device, cache_dir=opts.cache_dir)
    layout = locate_units(model)
    started = time.perf_counter()
    pairs = make_pairs(splits["train"], negatives=config.negatives, seed=config.seed, max_pairs=config.max_train_pairs)
    texts = {p.prompt: format_prompt(tokenizer, task, p.prompt, chat_template=config.chat_template) for p in pairs}
    rows = [(join_answer(texts[p.prompt], p.positive), join_answer(texts[p.prompt], p.negative)) for p in pairs]
    acc = accumulate_momentum(
        model,
        tokenizer,
        rows,
        sites=("attention", "ffn"),
        batch_size=opts.batch_size,
        layout=layout,
        max_length=config.max_length,
    )
    fit_seconds = time.perf_counter() - started
    examples = list(splits[opts.split])
    if not examples:
        raise AusteerError(
            f"the {opts.split} split of '{opts.task}' is empty; raise --max_examples or choose another split"
        )
    prompts = [format_prompt(tokenizer, task, ex.prompt, chat_template=config.chat_template) for ex in examples]
    info = {
        "task": opts.task,
        "task_name": task.name,
        "base_model": model_name,
        "seed": opts.seed,
        "split": opts.split,
        "n_examples": len(examples),
        "n_train_pairs": acc.n,
        "fit_seconds": fit_seconds,
        "data": config.to_dict(),
    }
    return AnalysisContext(
        model=model,
        tokenizer=tokenizer,
        layout=layout,
        acc=acc,
        task=task,
        examples=examples,
        prompts=prompts,
        base_model=model_name_of(model) or model_name,
        batch_size=opts.batch_size,
        max_length=config.max_length,
        info=info,
    )


# ============================================================================ scoring
def steering(ctx: AnalysisContext, state: SteeringState | None):
    return state.apply(ctx.model, layout=ctx.layout) if state is not None else nullcontext()


def score(ctx: AnalysisContext, state: SteeringState | None = None) -> dict[str, float]:
    """Accuracy and mean margin (right answer's log-likelihood minus the best wrong one's), steered by ``state``."""

    with steering(ctx, state):
        scores = choice_logprobs(
            ctx.model, ctx.tokenizer, ctx.prompts, ctx.answers, batch_size=ctx.batch_size, max_length=ctx.max_length
        )
    stats = decision_statistics(scores, [ex.answer for ex in ctx.examples])
    return {"accuracy": float(stats[:, 0].mean()), "margin": float(stats[:, 1].mean())}


@torch.inference_mode()
def next_token_logits(ctx: AnalysisContext, state: SteeringState | None = None) -> torch.Tensor:
    """Logits of the next token after each prompt (the answer position), ``(examples, vocab)`` float32 on the CPU."""
    device = input_device(ctx.model)
    pad = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else ctx.tokenizer.eos_token_id
    out = []
    with steering(ctx, state):
        for start in range(0, len(ctx.prompt_ids), ctx.batch_size):
            ids, mask = pad_ids(
                ctx.prompt_ids[start : start + ctx.batch_size], int(pad or 0), side="left", device=device
            )
            logits = padded_logits(ctx.model, ids, mask, 1)
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
        sites=tuple(sites),
        site_index=site_index,
        layer=layer,
        unit=unit,
        momentum=momentum,
        scale=float(alpha) * strength,
        shift=torch.zeros_like(momentum),
        alpha=float(alpha),
        architecture=ctx.layout.architecture,
        n_layers=ctx.layout.n_layers,
        site_sizes={s: ctx.layout.site(s).size for s in sites},
        base_model=ctx.base_model,
        sign_policy="both",
        metadata=dict(metadata or {}),
    )


def selection_state(ctx: AnalysisContext, sel: Selection, alpha: float, sign: str = "both") -> SteeringState:
    return SteeringState.from_selection(sel, ctx.layout, alpha=alpha, base_model=ctx.base_model, sign_policy=sign)


def site_names(site: str) -> tuple[str, ...]:
    if site not in SITE_CHOICES:
        raise AusteerError(f"unknown site '{site}'; choose attention, ffn or both")
    return SITE_CHOICES[site]


def subset(sel: Selection, rows: torch.Tensor) -> Selection:
    return Selection(sel.sites, sel.site_index[rows], sel.layer[rows], sel.unit[rows], sel.momentum[rows])


def concat(a: Selection, b: Selection) -> Selection:
    return Selection(
        a.sites,
        torch.cat([a.site_index, b.site_index]),
        torch.cat([a.layer, b.layer]),
        torch.cat([a.unit, b.unit]),
        torch.cat([a.momentum, b.momentum]),
    )


def coordinates(sel: Selection) -> list[dict[str, Any]]:
    return [
        {"site": s, "layer": l, "unit": u, "momentum": float(m)}
        for (s, l, u), m in zip(sel.coordinates(), sel.momentum.tolist())
    ]


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
        blocks = [
            (l, h, s)
            for (_, l, h), s in zip(ranking.blocks(), ranking.score.tolist())
            if (layer is None or l == layer) and (head is None or h == head)
        ]
        layer, head, block_score = blocks[0]
        units = torch.arange(head * layout.head_dim, (head + 1) * layout.head_dim)
    else:
        if head is not None:
            raise AusteerError("--head is for --site attention; an FFN block is a whole layer")
        ranking = rank_blocks(ctx.acc, layout, ("ffn",))
        blocks = [
            (l, s) for (_, l, _), s in zip(ranking.blocks(), ranking.score.tolist()) if layer is None or l == layer
        ]
        layer, block_score = blocks[0]
        head = None
        units = torch.arange(layout.site("ffn").size)
    return {"site": site, "layer": int(layer), "head": head, "units": units, "mean_abs_momentum": float(block_score)}


__all__ = [
    "SITE_CHOICES",
    "AnalysisContext",
    "AnalysisOptions",
    "concat",
    "coordinates",
    "next_token_logits",
    "prepare",
    "resolve_block",
    "score",
    "selection_state",
    "site_names",
    "steering",
    "subset",
    "units_state",
]
