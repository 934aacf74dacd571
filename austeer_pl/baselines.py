"""Block-level baselines as steering states: ITI, SADI, CAA and block-level AUSteer.

Every method here produces a :class:`~austeer_pl.steering.SteeringState` in the same
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
:class:`~austeer_pl.momentum.MomentumAccumulator` (sites ``residual``, ``attention``/``ffn``).
ITI needs per-head second moments and a validation probe accuracy, kept by
:class:`HeadMoments` and :class:`ProbeAccuracy`. Both are streaming (memory independent of the
number of examples), mergeable (merging equals accumulating the union; integer counts are exact
under any order) and sum-reducible across processes with ``reduce_(all_reduce)``.

Rankings are deterministic: scores computed from float64 sums are compared after rounding to
float32 (as in :mod:`austeer_pl.selection`), so one process and several rank the same; remaining
ties go to the site order given, then the lower layer, then the lower head or unit.

Hyperparameters. :data:`METHOD_GRIDS` holds a documented default grid per method that a
comparison runner tunes on validation data; :func:`grid_points` resolves it for one model into
keyword arguments of :func:`baseline_state`, and :data:`STRENGTH_KEY` names each method's
strength argument (sweep it with ``state.with_alpha`` instead of refitting). A state's metadata
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

import itertools
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import AusteerError
from .fit import read_text_pairs
from .momentum import MomentumAccumulator, SummedStatistics
from .sites import LayoutSpec, ModelLayout, locate_units
from .steering import SteeringState

#: Method names, as written into ``SteeringState.method``.
METHODS: tuple[str, ...] = ("iti", "sadi", "caa", "austeer_block")

#: The keyword argument of each method's state function that is the state's ``alpha``.
STRENGTH_KEY: dict[str, str] = {"iti": "alpha", "sadi": "delta", "caa": "multiplier", "austeer_block": "alpha"}

#: Default hyperparameter grids, tuned on validation data by a comparison runner.
#:
#: * ``iti``: ``k_heads`` heads by validation probe accuracy and strength ``alpha`` (in units of
#:   the head's projected standard deviation). Li et al. (2023) use K=48 of 1024 heads and
#:   alpha=15 on LLaMA-7B; the grid spans that for smaller models.
#: * ``sadi``: the head variant (SADI-head, the paper's best) with ``k_heads`` heads, or, with
#:   ``site="ffn"``, ``k_units`` single FFN-output units; ``delta`` is the added fraction
#:   (``a -> (1 + delta) a``): the official code multiplies by a strength ``s`` in 5..80 at the
#:   last prompt token only, i.e. ``delta = s - 1``; we steer every position, so the grid is lower.
#:   The official code sweeps 1..10 heads and 1..20 FFN-output ("hidden") units.
#: * ``caa``: ``layer_fraction`` is the depth ``layer / (n_layers - 1)``, resolved to layers by
#:   :func:`caa_candidate_layers` (Rimsky et al. find the best layers about a third of the way
#:   in); ``multiplier`` scales the mean-difference vector (the paper sweeps about -2..2 on 7B
#:   models; smaller models tolerate and need more).
#: * ``austeer_block``: ``k_blocks`` best blocks (heads) by mean ``|m|`` and AUSteer's ``alpha``.
METHOD_GRIDS: dict[str, dict[str, list[Any]]] = {
    "iti": {"k_heads": [1, 2, 4, 8, 16, 32, 48], "alpha": [1.0, 2.5, 5.0, 10.0, 15.0, 20.0]},
    "sadi": {
        "site": ["attention"],
        "k_heads": [1, 2, 4, 6, 8, 10],
        "k_units": [1, 2, 4, 8, 16, 20],
        "delta": [0.5, 1.0, 2.0, 4.0, 9.0, 19.0],
    },
    "caa": {"layer_fraction": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7], "multiplier": [0.5, 1.0, 2.0, 4.0, 8.0]},
    "austeer_block": {"sites": [("attention",)], "k_blocks": [1, 2, 4, 8], "alpha": [0.5, 1.0, 2.0, 4.0, 8.0]},
}

SADI_SIGNS = ("signed", "uniform")


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


def steered_activations(state: SteeringState) -> int:
    """The number of activation units a state edits (per token): its ``k``.

    This is the count the AUSteer paper compares across methods: ``k_heads * head_dim`` for ITI
    and SADI-head, ``k_units`` for SADI on the FFN, ``hidden_size`` for CAA, the blocks' total size
    for block-level AUSteer and ``k`` for AUSteer itself.

    Example:
        >>> steered_activations(caa_state(acc, layout, layer=3, multiplier=1.0)) == layout.site("residual").size
        True
    """
    return state.k


# ============================================================================ CAA
def caa_candidate_layers(n_layers: int, fractions: Sequence[float] | None = None) -> list[int]:
    """Candidate layers for CAA: each depth fraction ``f`` gives layer ``round(f * (n_layers - 1))``.

    Duplicates (small models) are dropped; the result is ascending. Without ``fractions`` the
    default grid (:data:`METHOD_GRIDS` ``["caa"]["layer_fraction"]``) is used.

    Example:
        >>> caa_candidate_layers(30)
        [6, 9, 12, 15, 17, 20]
    """
    if n_layers <= 0:
        raise AusteerError(f"n_layers must be positive, got {n_layers}")
    fractions = METHOD_GRIDS["caa"]["layer_fraction"] if fractions is None else fractions
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


def sadi_mask(acc: MomentumAccumulator, layout: ModelLayout, *, site: str = "attention", k: int) -> torch.Tensor:
    """SADI's binary mask ``(layers, units)`` (bool) over a site.

    ``attention``: the ``k`` heads with the largest :func:`sadi_head_scores` (over all layers), all
    their units. ``ffn`` (or ``residual``): the ``k`` single units with the largest
    ``|mean(pos - neg)|``. Ties: lower layer, then lower head/unit.
    """
    return _sadi_selection(acc, layout, site, k)[0]


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


# ============================================================================ ITI: statistics
def _acts(value: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    if isinstance(value, Mapping):
        if "attention" not in value:
            raise AusteerError("ITI reads the attention site; read activations with sites including 'attention'")
        value = value["attention"]
    return value


class HeadMoments(SummedStatistics):
    """Per-head first and second moments of the attention site, per class, streaming and mergeable.

    For each class ``c`` (0 = positive completions, 1 = negative ones) it keeps the example count
    ``n_c`` (int64; every example contributes to every head), and per ``(layer, head)`` the float64
    sums ``sum_c = sum x`` (``head_dim``) and ``outer_c = sum x x^T`` (``head_dim x head_dim``),
    ``x`` the head's slice of the attention site at the last token. Memory is
    ``2 * layers * heads * head_dim * (head_dim + 1)`` float64 values, independent of the data.

    Args:
        n_layers, n_heads, head_dim: the layout (or use :meth:`from_layout`).
        device: where the statistics live.

    Example:
        >>> moments = HeadMoments.from_layout(layout)
        >>> moments.update(pos_acts, neg_acts)  # each (batch, layers, n_heads * head_dim)
        >>> moments.mean(0).shape
        torch.Size([layers, heads, head_dim])
    """

    _what = "head-moment"
    _plural = "head moments"
    _shape_hint = "; it was saved for another model"

    KEYS = ("count", "sum", "outer")

    def __init__(self, n_layers: int, n_heads: int, head_dim: int, device: torch.device | str | None = None) -> None:
        self.n_layers, self.n_heads, self.head_dim = int(n_layers), int(n_heads), int(head_dim)
        shape = (2, self.n_layers, self.n_heads, self.head_dim)
        with torch.inference_mode(False):
            self.tensors: dict[str, torch.Tensor] = {
                "count": torch.zeros(2, dtype=torch.int64, device=device),
                "sum": torch.zeros(shape, dtype=torch.float64, device=device),
                "outer": torch.zeros(*shape, self.head_dim, dtype=torch.float64, device=device),
            }

    @classmethod
    def from_layout(cls, layout: ModelLayout, device: torch.device | str | None = None) -> HeadMoments:
        if layout.site("attention").size != layout.n_heads * layout.head_dim:
            raise AusteerError("the attention site does not split into n_heads x head_dim units on this model")
        return cls(layout.n_layers, layout.n_heads, layout.head_dim, device=device)

    @property
    def counts(self) -> tuple[int, int]:
        """``(n_pos, n_neg)``."""
        c = self.tensors["count"].tolist()
        return int(c[0]), int(c[1])

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        x = _acts(x)
        width = self.n_heads * self.head_dim
        if x.dim() != 3 or x.shape[1:] != (self.n_layers, width):
            raise ValueError(f"expected attention activations (batch, {self.n_layers}, {width}), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise AusteerError(
                "non-finite activations at the attention site (NaN or inf); load the model in float32 "
                "or bfloat16 instead of float16, and check the inputs"
            )
        return x.to(self.tensors["sum"].device, torch.float64).view(x.shape[0], self.n_layers, self.n_heads, self.head_dim)

    def update_class(self, acts: torch.Tensor | Mapping[str, torch.Tensor], label: int) -> None:
        """Add a batch ``(batch, layers, n_heads * head_dim)`` of one class (0 positive, 1 negative)."""
        if label not in (0, 1):
            raise ValueError(f"label must be 0 (positive) or 1 (negative), got {label!r}")
        x = self._heads(acts)
        if x.shape[0] == 0:
            return
        self.tensors["sum"][label].add_(x.sum(0))
        self.tensors["outer"][label].add_(torch.einsum("blhi,blhj->lhij", x, x))
        self.tensors["count"][label].add_(x.shape[0])

    def update(self, pos: torch.Tensor | Mapping[str, torch.Tensor], neg: torch.Tensor | Mapping[str, torch.Tensor]) -> None:
        """Add a batch of positive and one of negative activations (sizes may differ; mappings use ``"attention"``)."""
        xp, xn = self._heads(pos), self._heads(neg)  # validate both before changing anything
        for label, x in ((0, xp), (1, xn)):
            if x.shape[0]:
                self.tensors["sum"][label].add_(x.sum(0))
                self.tensors["outer"][label].add_(torch.einsum("blhi,blhj->lhij", x, x))
                self.tensors["count"][label].add_(x.shape[0])

    def _require_both(self) -> tuple[int, int]:
        n_pos, n_neg = self.counts
        if n_pos == 0 or n_neg == 0:
            raise AusteerError(
                f"ITI needs activations of both classes (have {n_pos} positive, {n_neg} negative); give it training pairs"
            )
        return n_pos, n_neg

    def mean(self, label: int) -> torch.Tensor:
        """Class mean ``(layers, heads, head_dim)``, float64 (0 positive, 1 negative)."""
        n = self.counts[label]
        if n == 0:
            raise AusteerError(f"no {'positive' if label == 0 else 'negative'} activations were accumulated")
        return self.tensors["sum"][label] / n

    def scatter(self, label: int) -> torch.Tensor:
        """``sum (x - mean)(x - mean)^T`` of one class, ``(layers, heads, head_dim, head_dim)``."""
        n = self.counts[label]
        mu = self.mean(label)
        return self.tensors["outer"][label] - n * mu.unsqueeze(-1) * mu.unsqueeze(-2)

    def covariance(self, label: int, ddof: int = 1) -> torch.Tensor:
        """Class covariance with ``ddof`` (denominator ``max(n - ddof, 1)``)."""
        return self.scatter(label) / max(self.counts[label] - ddof, 1)

    def pooled_covariance(self) -> torch.Tensor:
        """Within-class covariance pooled over both classes: ``(S_pos + S_neg) / max(n_pos + n_neg - 2, 1)``."""
        n_pos, n_neg = self._require_both()
        return (self.scatter(0) + self.scatter(1)) / max(n_pos + n_neg - 2, 1)

    def mass_mean_shift(self) -> torch.Tensor:
        """``mean_pos - mean_neg`` per head, ``(layers, heads, head_dim)``."""
        self._require_both()
        return self.mean(0) - self.mean(1)


@dataclass
class HeadProbe:
    """One linear probe per head: ``score = w . x + b``, positive class iff ``score > 0``.

    Attributes:
        weight: float64 ``(layers, heads, head_dim)``.
        bias: float64 ``(layers, heads)``.
        separation: float64 ``(layers, heads)``, ``w . (mean_pos - mean_neg)`` (the regularised
            squared Mahalanobis distance between the class means): the training-set tie-breaker
            of :func:`select_heads`.
        ridge: the relative ridge the probes were fitted with.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    separation: torch.Tensor
    ridge: float

    @property
    def n_layers(self) -> int:
        return int(self.weight.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.weight.shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.weight.shape[2])

    def scores(self, acts: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Probe scores ``(batch, layers, heads)`` (float64) of attention activations ``(batch, layers, units)``."""
        x = _acts(acts)
        b, width = x.shape[0], self.n_heads * self.head_dim
        if x.dim() != 3 or x.shape[1:] != (self.n_layers, width):
            raise ValueError(f"expected attention activations (batch, {self.n_layers}, {width}), got {tuple(x.shape)}")
        x = x.to(self.weight.device, torch.float64).view(b, self.n_layers, self.n_heads, self.head_dim)
        return torch.einsum("blhd,lhd->blh", x, self.weight) + self.bias

    def predict(self, acts: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """True where a head's probe calls the example positive, ``(batch, layers, heads)``."""
        return self.scores(acts) > 0


def fit_probes(moments: HeadMoments, ridge: float = 0.1) -> HeadProbe:
    """Closed-form per-head probes: regularised Fisher linear discriminant analysis.

    ``w = (Sigma + ridge * tr(Sigma) / head_dim * I)^-1 (mean_pos - mean_neg)`` with ``Sigma`` the
    pooled within-class covariance (:meth:`HeadMoments.pooled_covariance`), and the bias puts the
    boundary at the midpoint of the class means: ``b = -w . (mean_pos + mean_neg) / 2``. The ridge
    is relative to the head's mean variance, so it does not depend on the activations' scale (a head
    with zero variance uses ``ridge * I``, i.e. a nearest-class-mean probe). ITI's original
    probes are logistic regressions; LDA is their closed-form, streaming counterpart. All heads of
    all layers are solved in one batched call.
    """
    ridge = float(ridge)
    if not (math.isfinite(ridge) and ridge > 0):
        raise AusteerError(f"ridge must be a positive number, got {ridge}")
    delta = moments.mass_mean_shift()
    midpoint = (moments.mean(0) + moments.mean(1)) / 2
    sigma = moments.pooled_covariance()
    mean_var = torch.diagonal(sigma, dim1=-2, dim2=-1).mean(-1)
    reg = ridge * torch.where(mean_var > 0, mean_var, torch.ones_like(mean_var))
    eye = torch.eye(moments.head_dim, dtype=sigma.dtype, device=sigma.device)
    weight = torch.linalg.solve(sigma + reg[..., None, None] * eye, delta.unsqueeze(-1)).squeeze(-1)
    bias = -(weight * midpoint).sum(-1)
    separation = (weight * delta).sum(-1)
    return HeadProbe(weight, bias, separation, ridge)


class ProbeAccuracy(SummedStatistics):
    """Streaming per-head probe accuracy: integer ``correct`` and ``total`` counts per ``(layer, head)``.

    A positive example is correct when its score is ``> 0``, a negative one when it is ``<= 0``.
    The probe is fixed at construction (fit it on the reduced training moments so every process
    holds the same probe); only the counts are merged, reduced and saved.

    Example:
        >>> val = ProbeAccuracy(fit_probes(moments))
        >>> val.update(pos_acts, neg_acts)
        >>> val.accuracy().shape
        torch.Size([layers, heads])
    """

    _what = "probe-accuracy"
    _plural = "probe accuracies"

    def __init__(self, probe: HeadProbe) -> None:
        self.probe = probe
        shape = (probe.n_layers, probe.n_heads)
        with torch.inference_mode(False):
            self.tensors: dict[str, torch.Tensor] = {
                "correct": torch.zeros(shape, dtype=torch.int64, device=probe.weight.device),
                "total": torch.zeros(shape, dtype=torch.int64, device=probe.weight.device),
            }

    def update(self, pos: torch.Tensor | Mapping[str, torch.Tensor], neg: torch.Tensor | Mapping[str, torch.Tensor]) -> None:
        """Count a batch of positive and one of negative validation activations."""
        sp, sn = self.probe.scores(pos), self.probe.scores(neg)
        for s in (sp, sn):
            if not torch.isfinite(s).all():
                raise AusteerError("non-finite activations at the attention site (NaN or inf); check the model dtype and inputs")
        self.tensors["correct"].add_((sp > 0).sum(0) + (sn <= 0).sum(0))
        self.tensors["total"].add_(sp.shape[0] + sn.shape[0])

    def accuracy(self) -> torch.Tensor:
        """``correct / total`` per head, float64 ``(layers, heads)``."""
        total = self.tensors["total"]
        if int(total.min()) == 0:
            raise AusteerError("no validation activations were counted; give ITI validation pairs")
        return self.tensors["correct"].double() / total.double()


def select_heads(
    accuracy: torch.Tensor | ProbeAccuracy, k: int, separation: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` heads with the best validation probe accuracy: ``(layers, heads)`` int64, best first.

    Ties, in order: larger training ``separation`` (taken from the probe when ``accuracy`` is a
    :class:`ProbeAccuracy`; compared after rounding to float32), then lower layer, then lower head.
    """
    if isinstance(accuracy, ProbeAccuracy):
        if separation is None:
            separation = accuracy.probe.separation
        accuracy = accuracy.accuracy()
    accuracy = accuracy.detach().cpu().double()
    n_layers, n_heads = accuracy.shape
    k = _check_k(k, "k_heads", n_layers * n_heads, "attention heads")
    keys = [accuracy]
    if separation is not None:
        keys.append(_f32(separation).nan_to_num(0.0))
    top = _rank(keys)[:k]
    return top // n_heads, top % n_heads


def iti_directions(moments: HeadMoments) -> tuple[torch.Tensor, torch.Tensor]:
    """ITI's mass-mean-shift directions and their activation spread, per head.

    Returns:
        ``direction``: ``(mean_pos - mean_neg) / ||mean_pos - mean_neg||``, float64
        ``(layers, heads, head_dim)`` (zero where the means coincide); ``sigma``: the population
        standard deviation (``ddof = 0``, as ITI's ``np.std``) of the head's training activations
        of both classes projected on the direction, float64 ``(layers, heads)``.
    """
    shift = moments.mass_mean_shift()
    norm = shift.norm(dim=-1, keepdim=True)
    direction = torch.where(norm > 0, shift / norm.clamp(min=1e-300), torch.zeros_like(shift))
    n = sum(moments.counts)
    total_sum = moments.tensors["sum"].sum(0)
    total_outer = moments.tensors["outer"].sum(0)
    mean_proj = (direction * total_sum).sum(-1) / n
    second = torch.einsum("lhi,lhij,lhj->lh", direction, total_outer, direction) / n
    sigma = (second - mean_proj.square()).clamp(min=0.0).sqrt()
    return direction, sigma


def iti_state(
    moments: HeadMoments,
    accuracy: ProbeAccuracy | torch.Tensor,
    layout: ModelLayout,
    *,
    k_heads: int,
    alpha: float,
    base_model: str = "",
    token_scope: str = "all",
    metadata: Mapping[str, Any] | None = None,
) -> SteeringState:
    """Inference-time intervention (Li et al., 2023) on the ``k_heads`` heads with the best validation probes.

    Each selected head ``(l, h)`` gets, on its attention units ``h * head_dim .. (h + 1) * head_dim - 1``,
    ``shift = alpha * sigma[l, h] * direction[l, h]`` (:func:`iti_directions`, from the training
    moments) and ``scale = 0``; ``alpha`` is the state's alpha. Heads are chosen by
    :func:`select_heads` on the validation accuracy of :func:`fit_probes` probes. ``momentum`` is
    zero (ITI has no momentum statistics).

    Example:
        >>> state = iti_state(moments, val_accuracy, layout, k_heads=8, alpha=15.0)
    """
    alpha = _check_alpha(alpha, "alpha")
    if (moments.n_layers, moments.n_heads, moments.head_dim) != (layout.n_layers, layout.n_heads, layout.head_dim):
        raise AusteerError("the head moments were accumulated on another model (layers, heads or head_dim differ)")
    acc_table = accuracy.accuracy() if isinstance(accuracy, ProbeAccuracy) else accuracy
    layers, heads = select_heads(accuracy, k_heads)
    direction, sigma = iti_directions(moments)
    direction, sigma = direction.cpu(), sigma.cpu()
    layer, unit = _head_units(layers, heads, layout.head_dim)
    shift = (alpha * sigma[layers, heads, None] * direction[layers, heads]).flatten()
    n = unit.numel()
    n_pos, n_neg = moments.counts
    return _state(
        layout, "iti", ("attention",),
        site_index=torch.zeros(n, dtype=torch.long), layer=layer, unit=unit,
        momentum=torch.zeros(n), scale=torch.zeros(n), shift=shift,
        alpha=alpha, base_model=base_model, token_scope=token_scope,
        metadata={
            "strength": "alpha", "k_heads": int(layers.numel()),
            "heads": [[int(l), int(h)] for l, h in zip(layers, heads)],
            "val_accuracy": [float(acc_table[l, h]) for l, h in zip(layers, heads)],
            "sigma": [float(sigma[l, h]) for l, h in zip(layers, heads)],
            "probe": "ridge-regularised Fisher LDA",
            "ridge": accuracy.probe.ridge if isinstance(accuracy, ProbeAccuracy) else None,
            "n_train": [n_pos, n_neg],
            "n_val": int(accuracy.tensors["total"][0, 0]) if isinstance(accuracy, ProbeAccuracy) else None,
        },
        extra=metadata,
    )


# ============================================================================ ITI: reading text
def _read_pairs(model, tokenizer, pairs, layout, batch_size, max_length, consume) -> None:
    for pos, neg in read_text_pairs(model, tokenizer, pairs, layout, ["attention"], batch_size=batch_size, max_length=max_length):
        consume(pos, neg)


def _layout(model: nn.Module, layout: ModelLayout | LayoutSpec | None) -> ModelLayout:
    return layout if isinstance(layout, ModelLayout) else locate_units(model, layout)


@torch.inference_mode()
def accumulate_head_moments(
    model: nn.Module,
    tokenizer,
    pairs: Iterable[tuple[str, str]],
    *,
    batch_size: int = 16,
    layout: ModelLayout | LayoutSpec | None = None,
    moments: HeadMoments | None = None,
    max_length: int | None = None,
) -> HeadMoments:
    """ITI's training statistics over ``(positive_text, negative_text)`` pairs (last-token attention heads)."""
    layout = _layout(model, layout)
    if moments is None:
        moments = HeadMoments.from_layout(layout, device=next(model.parameters()).device)
    _read_pairs(model, tokenizer, pairs, layout, batch_size, max_length, moments.update)
    return moments


@torch.inference_mode()
def accumulate_probe_accuracy(
    model: nn.Module,
    tokenizer,
    pairs: Iterable[tuple[str, str]],
    probe: HeadProbe,
    *,
    batch_size: int = 16,
    layout: ModelLayout | LayoutSpec | None = None,
    counter: ProbeAccuracy | None = None,
    max_length: int | None = None,
) -> ProbeAccuracy:
    """Validation accuracy of each head's probe over ``(positive_text, negative_text)`` pairs (both classes)."""
    layout = _layout(model, layout)
    counter = ProbeAccuracy(probe) if counter is None else counter
    _read_pairs(model, tokenizer, pairs, layout, batch_size, max_length, counter.update)
    return counter


# ============================================================================ grids and dispatch
def grid_points(method: str, layout: ModelLayout, grid: Mapping[str, Sequence[Any]] | None = None) -> list[dict[str, Any]]:
    """The hyperparameter grid of ``method`` for one model, as keyword arguments of :func:`baseline_state`.

    Counts larger than the model has are clipped to the maximum (and duplicates dropped); CAA's
    ``layer_fraction`` becomes ``layer`` (:func:`caa_candidate_layers`); SADI uses ``k_heads`` for
    the attention site and ``k_units`` for the others.

    Example:
        >>> grid_points("iti", layout)[0]
        {'k_heads': 1, 'alpha': 1.0}
    """
    if method not in METHOD_GRIDS:
        raise AusteerError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    grid = dict(METHOD_GRIDS[method] if grid is None else grid)
    n_heads_total = layout.n_layers * layout.n_heads
    points: list[dict[str, Any]] = []
    if method == "iti":
        for k, a in itertools.product(grid["k_heads"], grid["alpha"]):
            points.append({"k_heads": min(int(k), n_heads_total), "alpha": float(a)})
    elif method == "sadi":
        for site in grid.get("site", ["attention"]):
            if site == "attention":
                for k, d in itertools.product(grid["k_heads"], grid["delta"]):
                    points.append({"site": site, "k_heads": min(int(k), n_heads_total), "delta": float(d)})
            else:
                size = layout.n_layers * layout.site(site).size
                for k, d in itertools.product(grid["k_units"], grid["delta"]):
                    points.append({"site": site, "k_units": min(int(k), size), "delta": float(d)})
    elif method == "caa":
        layers = grid["layer"] if "layer" in grid else caa_candidate_layers(layout.n_layers, grid["layer_fraction"])
        for layer, mult in itertools.product(layers, grid["multiplier"]):
            points.append({"layer": int(layer), "multiplier": float(mult)})
    else:
        for sites, k, a in itertools.product(grid.get("sites", [("attention",)]), grid["k_blocks"], grid["alpha"]):
            sites = (sites,) if isinstance(sites, str) else tuple(sites)
            n_blocks = sum(layout.n_layers * (layout.n_heads if s == "attention" else 1) for s in sites)
            points.append({"sites": sites, "k_blocks": min(int(k), n_blocks), "alpha": float(a)})
    unique: list[dict[str, Any]] = []
    for p in points:
        if p not in unique:
            unique.append(p)
    return unique


def baseline_state(
    method: str,
    layout: ModelLayout,
    *,
    acc: MomentumAccumulator | None = None,
    moments: HeadMoments | None = None,
    accuracy: ProbeAccuracy | torch.Tensor | None = None,
    **hyper: Any,
) -> SteeringState:
    """Build one method's state from its statistics and hyperparameters (a :func:`grid_points` entry).

    ``iti`` needs ``moments`` and ``accuracy``; the others need ``acc`` (the momentum statistics).
    Remaining keyword arguments (``base_model``, ``token_scope``, ``metadata``) pass through.
    """
    if method == "iti":
        if moments is None or accuracy is None:
            raise AusteerError("ITI needs head moments (training) and a probe accuracy (validation)")
        return iti_state(moments, accuracy, layout, **hyper)
    if method not in METHODS:
        raise AusteerError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    if acc is None:
        raise AusteerError(f"{method} needs momentum statistics (acc=...)")
    if method == "caa":
        return caa_state(acc, layout, **hyper)
    if method == "sadi":
        return sadi_state(acc, layout, **hyper)
    return block_austeer_state(acc, layout, **hyper)


__all__ = [
    "METHODS",
    "METHOD_GRIDS",
    "STRENGTH_KEY",
    "BlockRanking",
    "HeadMoments",
    "HeadProbe",
    "ProbeAccuracy",
    "accumulate_head_moments",
    "accumulate_probe_accuracy",
    "baseline_state",
    "block_austeer_state",
    "caa_candidate_layers",
    "caa_state",
    "caa_vector",
    "fit_probes",
    "grid_points",
    "iti_directions",
    "iti_state",
    "rank_blocks",
    "sadi_head_scores",
    "sadi_mask",
    "sadi_state",
    "select_heads",
    "steered_activations",
]
