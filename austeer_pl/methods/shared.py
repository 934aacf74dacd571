"""What the block-level methods (ITI, SADI, CAA, block-level AUSteer) share: checks, exact rankings, one state builder.

Every method here produces a :class:`~austeer_pl.core.state.SteeringState` in the same
representation as AUSteer (each steered unit ``a`` becomes ``a + scale * a + shift``), so its
states save, load and apply exactly like AUSteer's. The state's ``alpha`` is the method's strength
knob and both ``scale`` and ``shift`` are proportional to it, so ``state.with_alpha(x)`` is the
same state fitted with strength ``x``.

========================  ===============================  =========================================
method (``state.method``) units edited                     edit per unit
========================  ===============================  =========================================
``caa``                   every residual unit of 1 layer   ``shift = multiplier * mean(pos - neg)``
``sadi``                  top-K heads (all their units)    ``scale = delta * sign(mean(pos - neg))``
                          or top-K single FFN units
``iti``                   top-K heads (all their units)    ``shift = alpha * sigma * direction``
``austeer_block``         top-K heads or FFN layers        ``scale = alpha * m`` (AUSteer's rule)
========================  ===============================  =========================================

Statistics. CAA, SADI and block-level AUSteer read the per-unit sums of the
:class:`~austeer_pl.core.momentum.MomentumAccumulator` (sites ``residual``, ``attention``/``ffn``).
ITI needs per-head second moments and a validation probe accuracy, kept by
:class:`HeadMoments` and :class:`ProbeAccuracy`. Both are streaming (memory independent of the
number of examples), mergeable (merging equals accumulating the union; integer counts are exact
under any order) and sum-reducible across processes with ``reduce_(all_reduce)``.

Rankings are deterministic: scores computed from float64 sums are compared after rounding to
float32 (as in :mod:`austeer_pl.core.selection`), so one process and several rank the same; remaining
ties go to the site order given, then the lower layer, then the lower head or unit.

Hyperparameters. Each method's documented default grid and its strength argument (sweep it with
``state.with_alpha`` instead of refitting) live in the registry, :mod:`austeer_pl.methods.registry`. A state's metadata
records the structural hyperparameters (units, heads, layer, counts) and, under ``"strength"``,
the name of the argument its ``alpha`` stands for; the strength itself is only ``state.alpha``,
because ``with_alpha`` keeps the metadata as it is.

Example:
    >>> acc = accumulate_momentum(model, tok, pairs, sites=["attention", "ffn", "residual"])
    >>> caa = caa_state(acc, layout, layer=12, multiplier=2.0)
    >>> sadi = sadi_state(acc, layout, site="attention", k_heads=4, delta=4.0)
    >>> block = block_austeer_state(acc, layout, k_blocks=2, alpha=4.0, sites=["attention"])
    >>> moments = accumulate_head_moments(model, tok, train_pairs, layout=layout)
    >>> val = accumulate_probe_accuracy(model, tok, val_pairs, fit_probes(moments), layout=layout)
    >>> iti = iti_state(moments, val, layout, k_heads=8, alpha=15.0)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from austeer_pl.core.momentum import MomentumAccumulator
from austeer_pl.core.sites import ModelLayout
from austeer_pl.core.state import SteeringState
from austeer_pl.errors import AusteerError


# ============================================================================ shared helpers
def check_strength(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise AusteerError(f"{name} must be a finite number, got {value}")
    return value


def whole_number(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise AusteerError(f"{name} must be a whole number, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise AusteerError(f"{name} must be a whole number, got {value!r}") from None


def check_count(k: Any, name: str, total: int, what: str) -> int:
    k = whole_number(k, name)
    if not 1 <= k <= total:
        raise AusteerError(f"{name}={k} is out of range: choose 1 <= {name} <= {total} (the number of {what})")
    return k


def require_site(acc: MomentumAccumulator | None, layout: ModelLayout, site: str) -> None:
    if acc is None:
        raise AusteerError("this method needs momentum statistics (FitContext.acc); accumulate them first")
    layout.site(site)
    if site not in acc.site_sizes:
        raise AusteerError(
            f"the momentum statistics hold no '{site}' site (they hold {', '.join(acc.sites)}); "
            f"accumulate them with sites including '{site}'"
        )
    if acc.site_sizes[site] != layout.site(site).size or acc.n_layers != layout.n_layers:
        raise AusteerError(f"the momentum statistics were accumulated on another model (the {site} sizes differ)")


def rank_descending(keys: Sequence[torch.Tensor]) -> torch.Tensor:
    """Indices sorted by ``keys`` (each descending, first key most significant); ties keep index order."""
    order = torch.arange(keys[0].numel())
    for key in reversed(keys):
        order = order[torch.sort(key.flatten()[order], descending=True, stable=True).indices]
    return order


def ranking_key(t: torch.Tensor) -> torch.Tensor:
    """Rounded to float32 for ranking, so sums that differ only in summation order compare equal."""
    return t.detach().float().cpu()


def head_units(layers: torch.Tensor, heads: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every attention unit of the given heads: ``(layer, unit)``, head by head, units ascending."""
    offsets = torch.arange(head_dim)
    unit = (heads.long()[:, None] * head_dim + offsets).flatten()
    layer = layers.long().repeat_interleave(head_dim)
    return layer, unit


def block_state(
    layout: ModelLayout,
    method: str,
    sites: Sequence[str],
    site_index: torch.Tensor,
    layer: torch.Tensor,
    unit: torch.Tensor,
    momentum: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    alpha: float,
    base_model: str,
    token_scope: str,
    metadata: Mapping[str, Any],
    extra: Mapping[str, Any] | None,
) -> SteeringState:
    meta = dict(metadata)
    meta.update(extra or {})
    return SteeringState(
        sites=tuple(sites),
        site_index=site_index.long(),
        layer=layer.long(),
        unit=unit.long(),
        momentum=momentum.float(),
        scale=scale.float(),
        shift=shift.float(),
        alpha=alpha,
        architecture=layout.architecture,
        n_layers=layout.n_layers,
        site_sizes={s: layout.site(s).size for s in sites},
        base_model=base_model,
        sign_policy="both",
        token_scope=token_scope,
        method=method,
        metadata=meta,
    )
