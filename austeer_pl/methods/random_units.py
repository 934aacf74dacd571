"""The random-unit control: k units drawn uniformly from the same sites, steered by AUSteer's own rule.

What does momentum selection add? This method answers it: it draws ``k`` units at random from every
unit of the site option (all layers), gives each the AUSteer edit ``a -> a + alpha * m * a`` with its
own momentum ``m``, and is tuned on validation over AUSteer's own grid (site option x k x alpha) and
several draws, by the same choice rule. A draw is a seed: the same draw gives the same units in any
process, and a draw's units are nested in ``k`` (its first 3 are among its first 10), like AUSteer's.
"""

from __future__ import annotations

from typing import Any

import torch

from austeer_pl.core.selection import Selection
from austeer_pl.core.sites import ModelLayout
from austeer_pl.core.state import SteeringState
from austeer_pl.errors import AusteerError
from austeer_pl.methods.austeer import SITE_OPTIONS, AusteerGrid
from austeer_pl.methods.registry import FitContext, Method, register

__all__ = ["DRAWS", "RANDOM_UNITS", "random_selection"]

#: The draws of the default grid (each a seed).
DRAWS = (0, 1, 2)
#: Added to a draw to seed its generator, so that draw 0 is not torch's default seed.
SEED_OFFSET = 9157


def random_selection(layout: ModelLayout, sites: tuple[str, ...], k: int, draw: int, momentum: Any = None) -> Selection:
    """``k`` units drawn uniformly without replacement from every unit of ``sites`` in every layer
    (seeded by ``draw``), with their momentum from ``momentum(site)`` (zeros without it)."""
    sizes = [layout.site(site).size for site in sites]
    per_site = [layout.n_layers * size for size in sizes]
    total = sum(per_site)
    if not 0 < k <= total:
        raise AusteerError(f"k={k} is out of range for random units: choose 1 <= k <= {total}")
    generator = torch.Generator().manual_seed(SEED_OFFSET + int(draw))
    flat = torch.randperm(total, generator=generator)[:k]
    starts = torch.tensor([0, *per_site]).cumsum(0)[:-1]
    site_index = torch.bucketize(flat, starts, right=True) - 1
    within = flat - starts[site_index]
    width = torch.tensor(sizes)[site_index]
    layer, unit = within // width, within % width
    m = torch.zeros(k)
    if momentum is not None:
        for i, site in enumerate(sites):  # each site's momentum matrix once, read at its drawn units
            rows = site_index == i
            m[rows] = momentum(site).float().cpu()[layer[rows], unit[rows]]
    return Selection(tuple(sites), site_index.long(), layer.long(), unit.long(), m.float())


def _points(layout: ModelLayout, grid) -> list[dict[str, Any]]:
    sites = grid.get("site", ["attention"])
    sites = [sites] if isinstance(sites, str) else list(sites)

    def units(option: str) -> int:  # a k above the sites' units steers them all (as AUSteer's ranking caps it)
        return layout.n_layers * sum(layout.site(site).size for site in SITE_OPTIONS[option])

    return [
        {"site": s, "k": min(int(k), units(s)), "alpha": float(a), "draw": int(d)}
        for s in sites
        for k in grid["k"]
        for a in grid["alpha"]
        for d in grid.get("draw", DRAWS)
    ]


def _build(ctx: FitContext, *, site: str, k: int, alpha: float, draw: int) -> SteeringState:
    sites = SITE_OPTIONS[site]
    selection = random_selection(ctx.layout, sites, k, draw, ctx.acc.momentum if ctx.acc is not None else None)
    state = SteeringState.from_selection(
        selection,
        ctx.layout,
        alpha=alpha,
        base_model=ctx.base_model,
        sign_policy="both",
        token_scope=ctx.token_scope,
        metadata={**ctx.metadata, "random_draw": int(draw)},
        layout_spec=ctx.layout_spec,
    )
    state.method = "random_units"
    return state


RANDOM_UNITS = register(
    Method(
        "random_units",
        ("momentum",),
        ("attention",),
        grid={**AusteerGrid().as_grid(), "draw": list(DRAWS)},
        quick_grid={"site": ["attention"], "k": [10, 50], "alpha": [1.0, 2.0], "draw": list(DRAWS)},
        strength_key="alpha",
        points=_points,
        build=_build,
        order=55,
        shares_grid=True,
    )
)
