"""SADI (Wang et al., 2024), semantics-adaptive dynamic intervention: the top heads (or FFN units) by
``|mean(pos - neg)|``, each masked unit scaled by its input, ``a -> a + delta * mask * a`` (signed per
unit by default, or ``uniform``), as a steering state."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch

from austeer_pl.core.momentum import MomentumAccumulator
from austeer_pl.core.sites import ModelLayout
from austeer_pl.core.state import SteeringState
from austeer_pl.errors import AusteerError
from austeer_pl.methods.registry import (
    FitContext,
    Method,
    register,
    state_kwargs,
    with_layout,
)
from austeer_pl.methods.shared import (
    block_state,
    check_count,
    check_strength,
    head_units,
    rank_descending,
    ranking_key,
    require_site,
)

SADI_SIGNS = ("signed", "uniform")


def sadi_head_scores(acc: MomentumAccumulator, layout: ModelLayout) -> torch.Tensor:
    """SADI's head scores ``(layers, heads)``: the mean over the head's units of ``|mean(pos - neg)|``."""
    require_site(acc, layout, "attention")
    md = acc.mean_difference("attention")
    return md.abs().view(layout.n_layers, layout.n_heads, layout.head_dim).mean(-1)


def _sadi_selection(acc: MomentumAccumulator, layout: ModelLayout, site: str, k: int):
    require_site(acc, layout, site)
    n_layers, size = layout.n_layers, layout.site(site).size
    if site == "attention":
        scores = sadi_head_scores(acc, layout)
        n_heads = layout.n_heads
        k = check_count(k, "k_heads", n_layers * n_heads, "attention heads")
        top = rank_descending([ranking_key(scores)])[:k]
        layers, heads = top // n_heads, top % n_heads
        layer, unit = head_units(layers, heads, layout.head_dim)
        blocks = [[int(l), int(h)] for l, h in zip(layers, heads)]
        block_scores = scores.flatten()[top]
    else:
        scores = acc.mean_difference(site).abs()
        k = check_count(k, "k_units", n_layers * size, f"{site} units")
        top = rank_descending([ranking_key(scores)])[:k]
        layer, unit = top // size, top % size
        blocks = [[int(l), int(u)] for l, u in zip(layer, unit)]
        block_scores = scores.flatten()[top]
    mask = torch.zeros(n_layers, size, dtype=torch.bool)
    mask[layer, unit] = True
    return mask, layer, unit, blocks, block_scores


def sadi_state(
    acc: MomentumAccumulator,
    layout: ModelLayout,
    *,
    delta: float,
    site: str = "attention",
    k_heads: int | None = None,
    k_units: int | None = None,
    sign: str = "signed",
    base_model: str = "",
    token_scope: str = "all",
    metadata: Mapping[str, Any] | None = None,
) -> SteeringState:
    """Semantics-adaptive dynamic intervention (Wang et al., 2024): ``a -> a + delta * (mask * a)``.

    The edit is input-adaptive: it scales the input's own activation on the masked units, so
    ``scale = delta`` there and ``shift = 0``; ``alpha = delta``.

    Sign handling (``sign``). The paper scales by one positive ``delta``, and its code keeps only
    heads whose mean difference is *positive*, where amplifying moves toward the positive
    completions. Because the mask here ranks by ``|mean difference|`` (as the paper describes),
    units whose mean difference is negative are selected too, and amplifying them would push away
    from the positive completions. ``"signed"`` (default) therefore uses, per unit,
    ``scale = delta * sign(mean(pos - neg))`` (``+delta`` on a zero difference): identical to the
    paper on units with a positive difference, attenuating the others, like AUSteer's signed
    momentum. ``"uniform"`` is the literal ``scale = delta`` on every masked unit.

    Args:
        acc: momentum statistics holding ``site``.
        layout: the model's layout.
        delta: strength (the state's ``alpha``).
        site: ``"attention"`` (SADI-head: ``k_heads`` heads) or ``"ffn"`` (``k_units`` units of
            the FFN output; ``residual`` works the same way).
        k_heads, k_units: mask size for the attention site and the other sites respectively.
        sign: ``"signed"`` or ``"uniform"`` (see above).

    Example:
        >>> state = sadi_state(acc, layout, site="attention", k_heads=4, delta=4.0)
    """
    delta = check_strength(delta, "delta")
    if sign not in SADI_SIGNS:
        raise AusteerError(f"unknown SADI sign handling '{sign}'; choose one of {', '.join(SADI_SIGNS)}")
    if site == "attention":
        if k_heads is None:
            raise AusteerError("SADI on the attention site needs k_heads (the number of heads)")
        k = k_heads
    else:
        if k_units is None:
            raise AusteerError(f"SADI on the {site} site needs k_units (the number of units)")
        k = k_units
    _, layer, unit, blocks, block_scores = _sadi_selection(acc, layout, site, k)
    md = acc.mean_difference(site).cpu()[layer, unit]
    direction = torch.where(md >= 0, 1.0, -1.0) if sign == "signed" else torch.ones(md.shape)
    n = unit.numel()
    hyper = {"strength": "delta", "site": site, "sign": sign, "n_pairs": acc.n}
    hyper.update({"k_heads": k} if site == "attention" else {"k_units": k})
    hyper["heads" if site == "attention" else "units"] = blocks
    hyper["scores"] = [float(s) for s in block_scores]
    return block_state(
        layout,
        "sadi",
        (site,),
        site_index=torch.zeros(n, dtype=torch.long),
        layer=layer,
        unit=unit,
        momentum=acc.momentum(site).cpu()[layer, unit],
        scale=delta * direction,
        shift=torch.zeros(n),
        alpha=delta,
        base_model=base_model,
        token_scope=token_scope,
        metadata=hyper,
        extra=metadata,
    )


def _sadi_points(layout: ModelLayout, grid) -> list[dict[str, Any]]:
    out = []
    for site in grid.get("site", ["attention"]):
        if site == "attention":
            total = layout.n_layers * layout.n_heads
            out += [
                {"site": site, "k_heads": min(int(k), total), "delta": float(d)}
                for k, d in itertools.product(grid["k_heads"], grid["delta"])
            ]
        else:
            total = layout.n_layers * layout.site(site).size
            out += [
                {"site": site, "k_units": min(int(k), total), "delta": float(d)}
                for k, d in itertools.product(grid["k_units"], grid["delta"])
            ]
    return out


def _build_sadi(ctx: FitContext, **hyper) -> SteeringState:
    return with_layout(sadi_state(ctx.acc, ctx.layout, **hyper, **state_kwargs(ctx)), ctx)


#: SADI-head (the paper's best) with ``k_heads`` heads, or with ``site="ffn"`` ``k_units`` single FFN
#: units; ``delta`` is the added fraction (``a -> (1 + delta) a``). The official code sweeps 1..10 heads
#: and 1..20 units with strengths 5..80 at the last prompt token only (delta = s - 1); we steer every
#: position, so the grid is lower.
SADI = register(
    Method(
        "sadi",
        ("momentum",),
        ("attention", "ffn"),
        grid={
            "site": ["attention"],
            "k_heads": [1, 2, 4, 6, 8, 10],
            "k_units": [1, 2, 4, 8, 16, 20],
            "delta": [0.5, 1.0, 2.0, 4.0, 9.0, 19.0],
        },
        quick_grid={"site": ["attention"], "k_heads": [2, 8], "k_units": [4, 16], "delta": [1.0, 4.0]},
        strength_key="delta",
        points=_sadi_points,
        build=_build_sadi,
        order=20,
    )
)
