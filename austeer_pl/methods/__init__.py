"""Steering methods: one registry, one module per method.

Each method module declares a :class:`~austeer_pl.methods.registry.Method` (the statistics it needs
from the shared pass, its default and quick grids, how one grid point becomes a
:class:`~austeer_pl.core.state.SteeringState`, its strength knob) and registers it with one call of
:func:`~austeer_pl.methods.registry.register`. Importing this package registers them all (kept in each
method's report ``order``); the conformance suite (``tests/methods/test_registry.py``) runs save, load, apply, remove and ``with_alpha``
over every entry.
"""

from austeer_pl.methods import austeer, block, caa, iti, random_units, sadi  # noqa: F401 - each module registers its method
from austeer_pl.methods.austeer import AusteerGrid
from austeer_pl.methods.registry import (
    FITTED,
    GRID_PRESETS,
    METHODS,
    STATISTICS,
    UNSTEERED,
    FitContext,
    Method,
    build_state,
    get_method,
    grid_points,
    learned_methods,
    needs,
    register,
)

__all__ = [
    "FITTED",
    "GRID_PRESETS",
    "METHODS",
    "STATISTICS",
    "UNSTEERED",
    "AusteerGrid",
    "FitContext",
    "Method",
    "build_state",
    "get_method",
    "grid_points",
    "learned_methods",
    "needs",
    "register",
]
