"""The method registry: every steering method in one place.

Each :class:`Method` declares the statistics it needs from the shared pass, its default and quick
validation grids, how one grid point becomes a :class:`~austeer_pl.core.state.SteeringState`, and
which hyperparameter is its strength knob (the state's ``alpha``, swept with ``with_alpha``).
The fitting engine, ``train.py``, ``evaluate.py --compare`` and the analyses read only this table;
adding a method is adding one entry (the conformance test in ``tests/test_methods.py`` then runs
save, load, apply, remove, ``with_alpha`` and the compatibility refusal over it).

Learned-strength variants (``austeer_scalar``, ``austeer_gate``) have no grid of their own: they
start from AUSteer's chosen state and train its strength (:class:`~austeer_pl.fit.engine.StrengthTrainer`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from austeer_pl.methods import baselines as B
from austeer_pl.methods import iti as I
from austeer_pl.errors import AusteerError
from austeer_pl.core.sites import ModelLayout
from austeer_pl.core.state import SteeringState

#: The statistics a method can ask of the shared pass.
STATISTICS = ("momentum", "head_moments", "probe_accuracy")


@dataclass
class FitContext:
    """What the shared pass produced, handed to each method's ``build``.

    Attributes:
        layout: the model's located units.
        acc: the reduced :class:`~austeer_pl.core.momentum.MomentumAccumulator`.
        moments: ITI's :class:`~austeer_pl.methods.baselines.HeadMoments` (None unless a method needs them).
        probe_accuracy: ITI's validation :class:`~austeer_pl.methods.baselines.ProbeAccuracy`.
        rankings: AUSteer's ranked units per site option (``{"attention": Selection, ...}``).
        base_model, token_scope, sign, layout_spec: recorded in every state.
    """

    layout: ModelLayout
    acc: Any = None
    moments: Any = None
    probe_accuracy: Any = None
    rankings: Mapping[str, Any] = field(default_factory=dict)
    base_model: str = ""
    token_scope: str = "all"
    sign: str = "promote"
    layout_spec: Mapping[str, str | None] | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """One registered method.

    Attributes:
        name: the registry key (and ``state.method`` for block-level methods).
        statistics: what the shared pass must collect (a subset of :data:`STATISTICS`).
        read_sites: the sites the momentum statistics must cover.
        grid: the documented default grid.
        quick_grid: a 4-point grid for quick comparisons (``--grid quick``).
        strength_key: the grid key whose value becomes the state's ``alpha``.
        points: expands a grid into keyword arguments of ``build`` for one model.
        build: ``(FitContext, **point) -> SteeringState``.
        learned: the strength kind a learned variant trains (None for a grid method).
    """

    name: str
    statistics: tuple[str, ...] = ()
    read_sites: tuple[str, ...] = ()
    grid: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    quick_grid: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    strength_key: str | None = None
    points: Callable[[ModelLayout, Mapping[str, Sequence[Any]]], list[dict[str, Any]]] | None = None
    build: Callable[..., SteeringState] | None = None
    learned: str | None = None

    def grid_points(self, layout: ModelLayout, grid: Mapping[str, Sequence[Any]] | None = None) -> list[dict[str, Any]]:
        """The grid (default: :attr:`grid`) resolved for one model, duplicates dropped, in grid order."""
        if self.points is None:
            return []
        unique: list[dict[str, Any]] = []
        for point in self.points(layout, dict(self.grid if grid is None else grid)):
            if point not in unique:
                unique.append(point)
        return unique


# ---------------------------------------------------------------------------- grid expanders
def _iti_points(layout: ModelLayout, grid) -> list[dict[str, Any]]:
    total = layout.n_layers * layout.n_heads
    return [{"k_heads": min(int(k), total), "alpha": float(a)} for k, a in itertools.product(grid["k_heads"], grid["alpha"])]


def _sadi_points(layout: ModelLayout, grid) -> list[dict[str, Any]]:
    out = []
    for site in grid.get("site", ["attention"]):
        if site == "attention":
            total = layout.n_layers * layout.n_heads
            out += [{"site": site, "k_heads": min(int(k), total), "delta": float(d)} for k, d in itertools.product(grid["k_heads"], grid["delta"])]
        else:
            total = layout.n_layers * layout.site(site).size
            out += [{"site": site, "k_units": min(int(k), total), "delta": float(d)} for k, d in itertools.product(grid["k_units"], grid["delta"])]
    return out


def _caa_points(layout: ModelLayout, grid) -> list[dict[str, Any]]:
    layers = grid["layer"] if "layer" in grid else B.caa_candidate_layers(layout.n_layers, grid["layer_fraction"])
    return [{"layer": int(l), "multiplier": float(m)} for l, m in itertools.product(layers, grid["multiplier"])]


def _block_points(layout: ModelLayout, grid) -> list[dict[str, Any]]:
    out = []
    for sites, k, a in itertools.product(grid.get("sites", [("attention",)]), grid["k_blocks"], grid["alpha"]):
        sites = (sites,) if isinstance(sites, str) else tuple(sites)
        total = sum(layout.n_layers * (layout.n_heads if s == "attention" else 1) for s in sites)
        out.append({"sites": sites, "k_blocks": min(int(k), total), "alpha": float(a)})
    return out


def _austeer_points(layout: ModelLayout, grid) -> list[dict[str, Any]]:
    sites = grid.get("site", ["attention"])
    sites = [sites] if isinstance(sites, str) else list(sites)
    return [{"site": s, "k": int(k), "alpha": float(a)} for s in sites for k in grid["k"] for a in grid["alpha"]]


# ---------------------------------------------------------------------------- builders
def _common(ctx: FitContext) -> dict[str, Any]:
    return {"base_model": ctx.base_model, "token_scope": ctx.token_scope, "metadata": dict(ctx.metadata)}


def _with_layout(state: SteeringState, ctx: FitContext) -> SteeringState:
    state.layout = dict(ctx.layout_spec) if ctx.layout_spec is not None else None
    return state


def _build_iti(ctx: FitContext, **hyper) -> SteeringState:
    if ctx.moments is None or ctx.probe_accuracy is None:
        raise AusteerError("ITI needs head moments (training) and a probe accuracy (validation)")
    return _with_layout(I.iti_state(ctx.moments, ctx.probe_accuracy, ctx.layout, **hyper, **_common(ctx)), ctx)


def _build_sadi(ctx: FitContext, **hyper) -> SteeringState:
    return _with_layout(B.sadi_state(ctx.acc, ctx.layout, **hyper, **_common(ctx)), ctx)


def _build_caa(ctx: FitContext, **hyper) -> SteeringState:
    return _with_layout(B.caa_state(ctx.acc, ctx.layout, **hyper, **_common(ctx)), ctx)


def _build_block(ctx: FitContext, **hyper) -> SteeringState:
    return _with_layout(B.block_austeer_state(ctx.acc, ctx.layout, **hyper, **_common(ctx)), ctx)


def _build_austeer(ctx: FitContext, *, site: str, k: int, alpha: float) -> SteeringState:
    if site not in ctx.rankings:
        raise AusteerError(f"AUSteer has no ranking for site option '{site}'; the pass did not read it")
    return SteeringState.from_selection(
        ctx.rankings[site].head(k), ctx.layout, alpha=alpha, base_model=ctx.base_model, sign_policy=ctx.sign,
        token_scope=ctx.token_scope, metadata=dict(ctx.metadata), layout_spec=ctx.layout_spec,
    )


#: Every method, in report order. ``unsteered`` is the baseline every comparison keeps.
METHODS: dict[str, Method] = {
    "unsteered": Method("unsteered"),
    # ITI: ``k_heads`` heads by validation probe accuracy, strength ``alpha`` in units of the head's
    # projected standard deviation (Li et al. 2023 use K=48 of 1024 heads and alpha=15 on LLaMA-7B).
    "iti": Method(
        "iti", ("head_moments", "probe_accuracy"), ("attention",),
        grid={"k_heads": [1, 2, 4, 8, 16, 32, 48], "alpha": [1.0, 2.5, 5.0, 10.0, 15.0, 20.0]},
        quick_grid={"k_heads": [4, 16], "alpha": [5.0, 15.0]},
        strength_key="alpha", points=_iti_points, build=_build_iti,
    ),
    # SADI-head (the paper's best) with ``k_heads`` heads, or with ``site="ffn"`` ``k_units`` single
    # FFN units; ``delta`` is the added fraction (``a -> (1 + delta) a``). The official code sweeps
    # 1..10 heads and 1..20 units with strengths 5..80 at the last prompt token only (delta = s - 1);
    # we steer every position, so the grid is lower.
    "sadi": Method(
        "sadi", ("momentum",), ("attention", "ffn"),
        grid={"site": ["attention"], "k_heads": [1, 2, 4, 6, 8, 10], "k_units": [1, 2, 4, 8, 16, 20], "delta": [0.5, 1.0, 2.0, 4.0, 9.0, 19.0]},
        quick_grid={"site": ["attention"], "k_heads": [2, 8], "k_units": [4, 16], "delta": [1.0, 4.0]},
        strength_key="delta", points=_sadi_points, build=_build_sadi,
    ),
    # CAA: the mean difference at one residual layer; ``layer_fraction`` is the depth (Rimsky et al.
    # find the best layers about a third of the way in), ``multiplier`` scales the vector.
    "caa": Method(
        "caa", ("momentum",), ("residual",),
        grid={"layer_fraction": list(B.CAA_LAYER_FRACTIONS), "multiplier": [0.5, 1.0, 2.0, 4.0, 8.0]},
        quick_grid={"layer_fraction": [0.3, 0.5], "multiplier": [1.0, 4.0]},
        strength_key="multiplier", points=_caa_points, build=_build_caa,
    ),
    # Block-level AUSteer: the ``k_blocks`` best heads by mean |m|, AUSteer's rule on all their units.
    "austeer_block": Method(
        "austeer_block", ("momentum",), ("attention",),
        grid={"sites": [("attention",)], "k_blocks": [1, 2, 4, 8], "alpha": [0.5, 1.0, 2.0, 4.0, 8.0]},
        quick_grid={"sites": [("attention",)], "k_blocks": [1, 4], "alpha": [1.0, 4.0]},
        strength_key="alpha", points=_block_points, build=_build_block,
    ),
    # AUSteer: the top-k units by |m| over the chosen sites, a -> a + alpha * m * a. Its default grid
    # is the fitting module's (--model.site/k/alpha).
    "austeer": Method(
        "austeer", ("momentum",), ("attention",),
        grid={"site": ["attention"], "k": [10, 50], "alpha": [4.0, 16.0, 64.0]},
        quick_grid={"site": ["attention"], "k": [10, 50], "alpha": [1.0, 2.0]},
        strength_key="alpha", points=_austeer_points, build=_build_austeer,
    ),
    "austeer_scalar": Method("austeer_scalar", ("momentum",), learned="scalar"),
    "austeer_gate": Method("austeer_gate", ("momentum",), learned="gate"),
}

GRID_PRESETS = ("default", "quick")


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise AusteerError(f"unknown method '{name}'; choose from {', '.join(METHODS)}")
    return METHODS[name]


def learned_methods() -> dict[str, str]:
    """``{method: strength kind}`` of the learned-strength variants."""
    return {name: m.learned for name, m in METHODS.items() if m.learned}


def grid_points(method: str, layout: ModelLayout, grid: Mapping[str, Sequence[Any]] | None = None) -> list[dict[str, Any]]:
    """``method``'s grid for one model (see :meth:`Method.grid_points`).

    Example:
        >>> grid_points("iti", layout)[0]
        {'k_heads': 1, 'alpha': 1.0}
    """
    method_ = get_method(method)
    if method_.points is None:
        raise AusteerError(f"method '{method}' has no grid of its own")
    return method_.grid_points(layout, grid)


def build_state(method: str, ctx: FitContext, **hyper: Any) -> SteeringState:
    """One grid point of ``method`` as a state."""
    method_ = get_method(method)
    if method_.build is None:
        raise AusteerError(f"method '{method}' is not built from a grid point")
    if "momentum" in method_.statistics and method != "austeer" and ctx.acc is None:
        raise AusteerError(f"{method} needs momentum statistics (acc=...)")
    return method_.build(ctx, **hyper)


def needs(methods: Sequence[str]) -> set[str]:
    """The statistics the shared pass must collect for ``methods``."""
    return {stat for m in methods for stat in get_method(m).statistics}


__all__ = ["FitContext", "GRID_PRESETS", "METHODS", "Method", "STATISTICS", "build_state", "get_method", "grid_points", "learned_methods", "needs"]
