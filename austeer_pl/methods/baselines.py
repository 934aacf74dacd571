"""Block-level baselines as steering states: ITI, SADI, CAA and block-level AUSteer.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from austeer_pl.errors import AusteerError
from austeer_pl.core.pairs import read_text_pairs
from austeer_pl.core.momentum import MomentumAccumulator, SummedStatistics
from austeer_pl.core.sites import LayoutSpec, ModelLayout, locate_units
from austeer_pl.core.state import SteeringState

SADI_SIGNS = ("signed", "uniform")
#: CAA's candidate depths ``layer / (n_layers - 1)``: Rimsky et al. find the best layers about a third of the way in.
CAA_LAYER_FRACTIONS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


# ============================================================================ shared helpers
def _check_alpha(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise AusteerError(f"{name} must be a finite number, got {value}")
    return value


def _whole(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise AusteerError(f"{name} must be a whole number, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise AusteerError(f"{name} must be a whole number, got {value!r}") from None


def _check_k(k: Any, name: str, total: int, what: str) -> int:
    k = _whole(k, name)
    if not 1 <= k <= total:
        raise AusteerError(f"{name}={k} is out of range: choose 1 <= {name} <= {total} (the number of {what})")
    return k


def _require_site(acc: MomentumAccumulator, layout: ModelLayout, site: str) -> None:
    layout.site(site)
    if site not in acc.site_sizes:
        raise AusteerError(
            f"the momentum statistics hold no '{site}' site (they hold {', '.join(acc.sites)}); "
            f"accumulate them with sites including '{site}'"
        )
    if acc.site_sizes[site] != layout.site(site).size or acc.n_layers != layout.n_layers:
        raise AusteerError(f"the momentum statistics were accumulated on another model (the {site} sizes differ)")


def _rank(keys: Sequence[torch.Tensor]) -> torch.Tensor:
    """Indices sorted by ``keys`` (each descending, first key most significant); ties keep index order."""
    order = torch.arange(keys[0].numel())
    for key in reversed(keys):
        order = order[torch.sort(key.flatten()[order], descending=True, stable=True).indices]
    return order


def _f32(t: torch.Tensor) -> torch.Tensor:
    """Rounded to float32 for ranking, so sums that differ only in summation order compare equal."""
    return t.detach().float().cpu()


def _head_units(layers: torch.Tensor, heads: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every attention unit of the given heads: ``(layer, unit)``, head by head, units ascending."""
    offsets = torch.arange(head_dim)
    unit = (heads.long()[:, None] * head_dim + offsets).flatten()
    layer = layers.long().repeat_interleave(head_dim)
    return layer, unit


def _state(
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


# ============================================================================ CAA
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
        layers.add(int(math.floor(f * (n_layers - 1) + 0.5)))
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
    _require_site(acc, layout, "residual")
    layer = _whole(layer, "layer")
    multiplier = _check_alpha(multiplier, "multiplier")
    vector = caa_vector(acc, layer)
    size = vector.numel()
    return _state(
        layout, "caa", ("residual",),
        site_index=torch.zeros(size, dtype=torch.long),
        layer=torch.full((size,), layer, dtype=torch.long),
        unit=torch.arange(size),
        momentum=acc.momentum("residual")[layer].cpu(),
        scale=torch.zeros(size),
        shift=(multiplier * vector).cpu(),
        alpha=multiplier, base_model=base_model, token_scope=token_scope,
        metadata={"strength": "multiplier", "layer": layer, "n_pairs": acc.n, "vector_norm": float(vector.norm())},
        extra=metadata,
    )


# ============================================================================ SADI
def sadi_head_scores(acc: MomentumAccumulator, layout: ModelLayout) -> torch.Tensor:
    """SADI's head scores ``(layers, heads)``: the mean over the head's units of ``|mean(pos - neg)|``."""
    _require_site(acc, layout, "attention")
    md = acc.mean_difference("attention")
    return md.abs().view(layout.n_layers, layout.n_heads, layout.head_dim).mean(-1)


def _sadi_selection(acc: MomentumAccumulator, layout: ModelLayout, site: str, k: int):
    _require_site(acc, layout, site)
    n_layers, size = layout.n_layers, layout.site(site).size
    if site == "attention":
        scores = sadi_head_scores(acc, layout)
        n_heads = layout.n_heads
        k = _check_k(k, "k_heads", n_layers * n_heads, "attention heads")
        top = _rank([_f32(scores)])[:k]
        layers, heads = top // n_heads, top % n_heads
        layer, unit = _head_units(layers, heads, layout.head_dim)
        blocks = [[int(l), int(h)] for l, h in zip(layers, heads)]
        block_scores = scores.flatten()[top]
    else:
        scores = acc.mean_difference(site).abs()
        k = _check_k(k, "k_units", n_layers * size, f"{site} units")
        top = _rank([_f32(scores)])[:k]
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
    delta = _check_alpha(delta, "delta")
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
    return _state(
        layout, "sadi", (site,),
        site_index=torch.zeros(n, dtype=torch.long), layer=layer, unit=unit,
        momentum=acc.momentum(site).cpu()[layer, unit],
        scale=delta * direction, shift=torch.zeros(n),
        alpha=delta, base_model=base_model, token_scope=token_scope, metadata=hyper, extra=metadata,
    )


# ============================================================================ block-level AUSteer
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
        return [(self.sites[s], int(l), int(h)) for s, l, h in zip(self.site_index.tolist(), self.layer.tolist(), self.head.tolist())]


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
        _require_site(acc, layout, site)
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
    order = _rank([score])
    return BlockRanking(sites, torch.cat(site_idx)[order], torch.cat(layers)[order], torch.cat(heads)[order], score[order])


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
    alpha = _check_alpha(alpha, "alpha")
    ranking = rank_blocks(acc, layout, sites)
    k_blocks = _check_k(k_blocks, "k_blocks", ranking.n_blocks, f"blocks at {', '.join(ranking.sites)}")
    site_index, layers, units = [], [], []
    for s, l, h in zip(ranking.site_index[:k_blocks].tolist(), ranking.layer[:k_blocks].tolist(), ranking.head[:k_blocks].tolist()):
        if h >= 0:
            unit = torch.arange(h * layout.head_dim, (h + 1) * layout.head_dim)
        else:
            unit = torch.arange(layout.site(ranking.sites[s]).size)
        units.append(unit)
        layers.append(torch.full((unit.numel(),), l, dtype=torch.long))
        site_index.append(torch.full((unit.numel(),), s, dtype=torch.long))
    site_index, layer, unit = torch.cat(site_index), torch.cat(layers), torch.cat(units)
    momenta = {i: acc.momentum(site).cpu() for i, site in enumerate(ranking.sites)}
    m = torch.empty(unit.numel())
    for i, table in momenta.items():
        rows = site_index == i
        m[rows] = table[layer[rows], unit[rows]]
    blocks = [[site, l, h] for site, l, h in ranking.blocks()[:k_blocks]]
    return _state(
        layout, "austeer_block", ranking.sites, site_index, layer, unit,
        momentum=m, scale=alpha * m, shift=torch.zeros_like(m),
        alpha=alpha, base_model=base_model, token_scope=token_scope,
        metadata={"strength": "alpha", "k_blocks": k_blocks, "sites": list(ranking.sites),
                  "blocks": blocks, "scores": [float(x) for x in ranking.score[:k_blocks]], "n_pairs": acc.n},
        extra=metadata,
    )


__all__ = [

    "CAA_LAYER_FRACTIONS",
    "BlockRanking",
    "block_austeer_state",
    "caa_candidate_layers",
    "caa_state",
    "caa_vector",
    "rank_blocks",
    "sadi_head_scores",
    "sadi_state",
]
