"""CAA (Rimsky et al., 2024), contrastive activation addition: the mean residual-stream difference
between the positive and negative completions at one layer, added with a multiplier, as a steering state."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
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
    check_strength,
    require_site,
    whole_number,
)

#: CAA's candidate depths ``layer / (n_layers - 1)``: Rimsky et al. find the best layers about a third of the way in.
CAA_LAYER_FRACTIONS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def caa_candidate_layers(n_layers: int, fractions: Sequence[float] | None = None) -> list[int]:
    """Candidate layers for CAA: each depth fraction ``f`` gives layer ``round(f * (n_layers - 1))``.

    Duplicates (small models) are dropped; the result is ascending. Without ``fractions`` the
    default, :data:`CAA_LAYER_FRACTIONS` (the registry's CAA grid), is used.

    Example:
        >>> caa_candidate_layers(30)
        [6, 9, 12, 15, 17, 20]
    """
    if n_layers <= 0:
        raise AusteerError(f"n_layers must be positive, got {n_layers}")
    fractions = CAA_LAYER_FRACTIONS if fractions is None else fractions
    layers = set()
    for f in fractions:
        f = float(f)
        if not 0.0 <= f <= 1.0:
            raise AusteerError(f"CAA layer fractions must lie in [0, 1], got {f}")
        layers.add(math.floor(f * (n_layers - 1) + 0.5))
    return sorted(layers)


def caa_vector(acc: MomentumAccumulator, layer: int) -> torch.Tensor:
    """CAA's steering vector: the mean over pairs of ``residual(pos) - residual(neg)`` at ``layer`` (float64)."""
    if "residual" not in acc.site_sizes:
        raise AusteerError("CAA needs the residual site; accumulate the momentum with sites including 'residual'")
    if not 0 <= layer < acc.n_layers:
        raise AusteerError(f"layer={layer} is out of range: choose 0 <= layer <= {acc.n_layers - 1}")
    return acc.mean_difference("residual")[layer]


def caa_state(
    acc: MomentumAccumulator,
    layout: ModelLayout,
    layer: int,
    multiplier: float,
    *,
    base_model: str = "",
    token_scope: str = "all",
    metadata: Mapping[str, Any] | None = None,
) -> SteeringState:
    """Contrastive activation addition (Rimsky et al., 2024) at one layer's residual stream.

    Every residual unit ``u`` of ``layer`` gets ``shift = multiplier * v[u]`` with ``v`` the mean
    residual difference between the positive and negative completions at the last token
    (:func:`caa_vector`); ``scale = 0``. ``alpha = multiplier``. ``momentum`` holds each unit's
    activation momentum at the residual site (informative only).

    Example:
        >>> state = caa_state(acc, layout, layer=4, multiplier=2.0)
    """
    require_site(acc, layout, "residual")
    layer = whole_number(layer, "layer")
    multiplier = check_strength(multiplier, "multiplier")
    vector = caa_vector(acc, layer)
    size = vector.numel()
    return block_state(
        layout,
        "caa",
        ("residual",),
        site_index=torch.zeros(size, dtype=torch.long),
        layer=torch.full((size,), layer, dtype=torch.long),
        unit=torch.arange(size),
        momentum=acc.momentum("residual")[layer].cpu(),
        scale=torch.zeros(size),
        shift=(multiplier * vector).cpu(),
        alpha=multiplier,
        base_model=base_model,
        token_scope=token_scope,
        metadata={"strength": "multiplier", "layer": layer, "n_pairs": acc.n, "vector_norm": float(vector.norm())},
        extra=metadata,
    )


def _caa_points(layout: ModelLayout, grid) -> list[dict[str, Any]]:
    layers = grid["layer"] if "layer" in grid else caa_candidate_layers(layout.n_layers, grid["layer_fraction"])
    return [{"layer": int(l), "multiplier": float(m)} for l, m in itertools.product(layers, grid["multiplier"])]


def _build_caa(ctx: FitContext, **hyper) -> SteeringState:
    return with_layout(caa_state(ctx.acc, ctx.layout, **hyper, **state_kwargs(ctx)), ctx)


#: CAA: the mean difference at one residual layer; ``layer_fraction`` is the depth (Rimsky et al. find
#: the best layers about a third of the way in), ``multiplier`` scales the vector.
CAA = register(
    Method(
        "caa",
        ("momentum",),
        ("residual",),
        grid={"layer_fraction": list(CAA_LAYER_FRACTIONS), "multiplier": [0.5, 1.0, 2.0, 4.0, 8.0]},
        quick_grid={"layer_fraction": [0.3, 0.5], "multiplier": [1.0, 4.0]},
        strength_key="multiplier",
        points=_caa_points,
        build=_build_caa,
        order=30,
    )
)
