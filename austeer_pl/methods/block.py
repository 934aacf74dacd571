"""Block-level AUSteer: the paper's ablation that steers whole blocks (heads or FFN outputs) ranked by
mean |momentum|, with the same rule ``a + alpha * m * a`` for every unit in them."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    rank_descending,
    require_site,
)


@dataclass(frozen=True)
class BlockRanking:
    """Blocks in rank order (best first): heads at ``attention``, whole layers at other sites.

    Attributes:
        sites: site names; ``site_index`` points into this tuple.
        site_index, layer, head: int64 ``(n_blocks,)``; ``head`` is -1 for whole-layer blocks.
        score: float64 mean ``|m|`` over each block's units.
    """

    sites: tuple[str, ...]
    site_index: torch.Tensor
    layer: torch.Tensor
    head: torch.Tensor
    score: torch.Tensor

    @property
    def n_blocks(self) -> int:
        return int(self.layer.numel())

    def blocks(self) -> list[tuple[str, int, int]]:
        return [
            (self.sites[s], int(l), int(h))
            for s, l, h in zip(self.site_index.tolist(), self.layer.tolist(), self.head.tolist())
        ]


def rank_blocks(acc: MomentumAccumulator, layout: ModelLayout, sites: Sequence[str] = ("attention",)) -> BlockRanking:
    """Every block of ``sites`` ranked by mean ``|m|`` over its units.

    The score is computed from the integer counts (``|m| * N = max(P, Q)``), so it is exact and
    identical on one process or several. Ties: site order as given, then lower layer, lower head.
    """
    sites = tuple(dict.fromkeys(sites))
    if not sites:
        raise AusteerError("no sites selected; choose at least one of attention, ffn")
    n = acc._require_pairs()
    scores, site_idx, layers, heads = [], [], [], []
    for i, site in enumerate(sites):
        require_site(acc, layout, site)
        p, q = acc.counts(site)
        strength = torch.maximum(p, q).cpu()  # (layers, units), |m| * N
        if site == "attention":
            block = strength.view(layout.n_layers, layout.n_heads, layout.head_dim).sum(-1).double()
            score = (block / (layout.head_dim * n)).flatten()
            head = torch.arange(layout.n_heads).repeat(layout.n_layers)
            layer = torch.arange(layout.n_layers).repeat_interleave(layout.n_heads)
        else:
            score = strength.sum(-1).double() / (strength.shape[1] * n)
            head = torch.full((layout.n_layers,), -1, dtype=torch.long)
            layer = torch.arange(layout.n_layers)
        scores.append(score)
        site_idx.append(torch.full((score.numel(),), i, dtype=torch.long))
        layers.append(layer)
        heads.append(head)
    score = torch.cat(scores)
    order = rank_descending([score])
    return BlockRanking(
        sites, torch.cat(site_idx)[order], torch.cat(layers)[order], torch.cat(heads)[order], score[order]
    )


def block_austeer_state(
    acc: MomentumAccumulator,
    layout: ModelLayout,
    *,
    k_blocks: int,
    alpha: float,
    sites: Sequence[str] = ("attention",),
    base_model: str = "",
    token_scope: str = "all",
    metadata: Mapping[str, Any] | None = None,
) -> SteeringState:
    """AUSteer at block granularity: every unit of the ``k_blocks`` best blocks gets ``scale = alpha * m``.

    Blocks are attention heads (``attention``) or whole layers (``ffn``, ``residual``), ranked by
    :func:`rank_blocks`. Each unit keeps AUSteer's adaptive rule with its own signed momentum
    (``a -> a + alpha * m * a``, both signs), so the only difference from AUSteer is granularity.

    Example:
        >>> state = block_austeer_state(acc, layout, k_blocks=2, alpha=4.0, sites=["attention"])
    """
    alpha = check_strength(alpha, "alpha")
    ranking = rank_blocks(acc, layout, sites)
    k_blocks = check_count(k_blocks, "k_blocks", ranking.n_blocks, f"blocks at {', '.join(ranking.sites)}")
    indices: list[torch.Tensor] = []
    layers: list[torch.Tensor] = []
    units: list[torch.Tensor] = []
    for s, l, h in zip(
        ranking.site_index[:k_blocks].tolist(), ranking.layer[:k_blocks].tolist(), ranking.head[:k_blocks].tolist()
    ):
        if h >= 0:
            block = torch.arange(h * layout.head_dim, (h + 1) * layout.head_dim)
        else:
            block = torch.arange(layout.site(ranking.sites[s]).size)
        units.append(block)
        layers.append(torch.full((block.numel(),), l, dtype=torch.long))
        indices.append(torch.full((block.numel(),), s, dtype=torch.long))
    site_index, layer, unit = torch.cat(indices), torch.cat(layers), torch.cat(units)
    momenta = {i: acc.momentum(site).cpu() for i, site in enumerate(ranking.sites)}
    m = torch.empty(unit.numel())
    for i, table in momenta.items():
        rows = site_index == i
        m[rows] = table[layer[rows], unit[rows]]
    blocks = [[site, l, h] for site, l, h in ranking.blocks()[:k_blocks]]
    return block_state(
        layout,
        "austeer_block",
        ranking.sites,
        site_index,
        layer,
        unit,
        momentum=m,
        scale=alpha * m,
        shift=torch.zeros_like(m),
        alpha=alpha,
        base_model=base_model,
        token_scope=token_scope,
        metadata={
            "strength": "alpha",
            "k_blocks": k_blocks,
            "sites": list(ranking.sites),
            "blocks": blocks,
            "scores": [float(x) for x in ranking.score[:k_blocks]],
            "n_pairs": acc.n,
        },
        extra=metadata,
    )


def _block_points(layout: ModelLayout, grid) -> list[dict[str, Any]]:
    out = []
    for sites, k, a in itertools.product(grid.get("sites", [("attention",)]), grid["k_blocks"], grid["alpha"]):
        sites = (sites,) if isinstance(sites, str) else tuple(sites)
        total = sum(layout.n_layers * (layout.n_heads if s == "attention" else 1) for s in sites)
        out.append({"sites": sites, "k_blocks": min(int(k), total), "alpha": float(a)})
    return out


def _build_block(ctx: FitContext, **hyper) -> SteeringState:
    return with_layout(block_austeer_state(ctx.acc, ctx.layout, **hyper, **state_kwargs(ctx)), ctx)


#: Block-level AUSteer: the ``k_blocks`` best heads by mean |m|, AUSteer's rule on all their units.
AUSTEER_BLOCK = register(
    Method(
        "austeer_block",
        ("momentum",),
        ("attention",),
        grid={"sites": [("attention",)], "k_blocks": [1, 2, 4, 8], "alpha": [0.5, 1.0, 2.0, 4.0, 8.0]},
        quick_grid={"sites": [("attention",)], "k_blocks": [1, 4], "alpha": [1.0, 4.0]},
        strength_key="alpha",
        points=_block_points,
        build=_build_block,
        order=40,
    )
)
