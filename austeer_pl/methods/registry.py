"""The method registry: every steering method in one place.

Each :class:`Method` declares the statistics it needs from the shared pass, its default and quick
validation grids, how one grid point becomes a :class:`~austeer_pl.core.state.SteeringState`, and
which hyperparameter is its strength knob (the state's ``alpha``, swept with ``with_alpha``).
The fitting engine, ``train.py``, ``evaluate.py --compare`` and the analyses read only this table;
adding a method is adding one entry (the conformance test in ``tests/methods/test_registry.py`` then runs
save, load, apply, remove, ``with_alpha`` and the compatibility refusal over it).

Learned-strength variants (``austeer_scalar``, ``austeer_gate``) have no grid of their own: they
start from the chosen state of the method they name in :attr:`Method.starts_from` (AUSteer's) and train its
strength (:class:`~austeer_pl.fit.strength.StrengthTrainer`). :data:`FITTED` names the method ``train.py`` fits
and :data:`UNSTEERED` the baseline every comparison keeps: nothing outside this registry names a method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from austeer_pl.core.sites import ModelLayout
from austeer_pl.core.state import SteeringState
from austeer_pl.errors import AusteerError

#: The statistics a method can ask of the shared pass.
STATISTICS = ("momentum", "head_moments", "probe_accuracy")
#: The baseline every comparison keeps: no steering.
UNSTEERED = "unsteered"
#: The method ``train.py`` fits: its grid is the fit's settings (:class:`~austeer_pl.methods.austeer.AusteerGrid`),
#: its chosen state is the export, and the learned-strength variants start from it.
FITTED = "austeer"


@dataclass
class FitContext:
    """What the shared pass produced, handed to each method's ``build``.

    Attributes:
        layout: the model's located units.
        acc: the reduced :class:`~austeer_pl.core.momentum.MomentumAccumulator`.
        moments: ITI's :class:`~austeer_pl.methods.probes.HeadMoments` (None unless a method needs them).
        probe_accuracy: ITI's validation :class:`~austeer_pl.methods.probes.ProbeAccuracy`.
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
        starts_from: a learned variant's grid method, whose chosen state it starts from.
        order: the method's place in reports (the registry is kept in this order, whatever the
            order the method modules were imported in).
        shares_grid: a control tuned over the fitted method's own ``site``, ``k`` and ``alpha`` (a comparison
            that sets AUSteer's grid sets its grid too).
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
    starts_from: str | None = None
    order: int = 100
    shares_grid: bool = False

    def grid_points(self, layout: ModelLayout, grid: Mapping[str, Sequence[Any]] | None = None) -> list[dict[str, Any]]:
        """The grid (default: :attr:`grid`) resolved for one model, duplicates dropped, in grid order."""
        if self.points is None:
            return []
        unique: list[dict[str, Any]] = []
        for point in self.points(layout, dict(self.grid if grid is None else grid)):
            if point not in unique:
                unique.append(point)
        return unique


# ---------------------------------------------------------------------------- builders
def state_kwargs(ctx: FitContext) -> dict[str, Any]:
    """What every method records in its states: the base model, the token scope, the fit's metadata."""
    return {"base_model": ctx.base_model, "token_scope": ctx.token_scope, "metadata": dict(ctx.metadata)}


def with_layout(state: SteeringState, ctx: FitContext) -> SteeringState:
    """The state with the fit's custom module paths (None when they were located automatically)."""
    state.layout = dict(ctx.layout_spec) if ctx.layout_spec is not None else None
    return state


#: Every method, in report order (the order of registration: ``austeer_pl.methods`` imports each
#: method's module). ``unsteered`` is the baseline every comparison keeps.
METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry: the one call a new method's module makes.

    Example:
        >>> register(Method("mine", ("momentum",), ("attention",), grid={"alpha": [1.0]}, strength_key="alpha",
        ...                 points=my_points, build=my_build))
    """
    if method.name in METHODS:
        raise AusteerError(f"method '{method.name}' is registered twice")
    entries = sorted([*METHODS.values(), method], key=lambda m: m.order)
    METHODS.clear()
    METHODS.update((m.name, m) for m in entries)
    return method


register(Method(UNSTEERED, order=0))

GRID_PRESETS = ("default", "quick")


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise AusteerError(f"unknown method '{name}'; choose from {', '.join(METHODS)}")
    return METHODS[name]


def learned_methods() -> dict[str, str]:
    """``{method: strength kind}`` of the learned-strength variants."""
    return {name: m.learned for name, m in METHODS.items() if m.learned}


def grid_points(
    method: str, layout: ModelLayout, grid: Mapping[str, Sequence[Any]] | None = None
) -> list[dict[str, Any]]:
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
    return method_.build(ctx, **hyper)


def needs(methods: Sequence[str]) -> set[str]:
    """The statistics the shared pass must collect for ``methods``."""
    return {stat for m in methods for stat in get_method(m).statistics}


__all__ = [
    "FITTED",
    "GRID_PRESETS",
    "METHODS",
    "STATISTICS",
    "UNSTEERED",
    "FitContext",
    "Method",
    "build_state",
    "get_method",
    "grid_points",
    "learned_methods",
    "needs",
    "register",
    "state_kwargs",
    "with_layout",
]
