"""Steering states compose as LoRA adapters do: weighted edits add.

``w1 * a + w2 * b`` (or ``combine([a, b], [w1, w2])``) is one state over the union of the two
states' units whose edits are the weighted sums of theirs: a unit in both gets
``(w1 g_a + w2 g_b) x`` added, a unit in one only its own weighted edit. That is exactly what
loading two LoRA adapters at scales ``w1`` and ``w2`` does (their updates add), so the hooked,
merged and adapter forms of a combination agree. ``-a`` steers the other way; ``a - b`` is
``a + (-1) * b``.

A combination has ``alpha = 1`` (its edits are stored as they act; ``with_alpha(s)`` scales all of
them by ``s``) and its ``momentum`` equals its ``scale``. States of different base models,
architectures, site sizes, token scopes or layouts are refused in one line, and so are learned
gates, whose strengths depend on the input and do not add.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from austeer_pl.errors import AusteerError

__all__ = ["StateArithmetic", "combine"]


def _check_together(states: Sequence[Any]) -> None:
    first = states[0]
    for other in states[1:]:
        for field, what in (
            ("architecture", "architecture"),
            ("n_layers", "number of layers"),
            ("token_scope", "token scope"),
            ("layout", "module layout"),
        ):
            if getattr(first, field) != getattr(other, field):
                raise AusteerError(
                    f"cannot combine states of a different {what} ({getattr(first, field)!r} and {getattr(other, field)!r}); "
                    "combine states fitted on the same base model"
                )
        if first.base_model and other.base_model and first.base_model != other.base_model:
            raise AusteerError(
                f"cannot combine states of different base models ('{first.base_model}' and '{other.base_model}'); "
                "combine states fitted on the same base model"
            )
        for site in set(first.site_sizes) & set(other.site_sizes):
            if first.site_sizes[site] != other.site_sizes[site]:
                raise AusteerError(
                    f"cannot combine states whose '{site}' site has {first.site_sizes[site]} and {other.site_sizes[site]} units; "
                    "combine states fitted on the same base model"
                )
    for state in states:
        if state.strength.get("kind") == "gate":
            raise AusteerError(
                "a learned gate computes its strengths from each input, so it does not add to another state; "
                "combine its fixed rule (state.momentum_rule()) instead"
            )


def combine(states: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    """One state whose edits are ``sum(w * state)`` over the union of the states' units.

    Example:
        >>> both = combine([formal, positive], [1.0, 0.5])   # = formal + 0.5 * positive
        >>> with both.apply(model): ...
    """
    states = list(states)
    if not states:
        raise AusteerError("nothing to combine: pass at least one steering state")
    weights = [1.0] * len(states) if weights is None else [float(w) for w in weights]
    if len(weights) != len(states):
        raise AusteerError(f"{len(states)} states but {len(weights)} weights; pass one weight per state")
    if not all(math.isfinite(w) for w in weights):
        raise AusteerError(f"the weights must be finite numbers, got {weights}")
    _check_together(states)
    sites = tuple(dict.fromkeys(site for state in states for site in state.sites))
    sizes = {site: size for state in states for site, size in state.site_sizes.items() if site in sites}
    width = max(sizes.values(), default=0) + 1
    keys, scales, shifts = [], [], []
    for state, w in zip(states, weights):
        where = torch.tensor([sites.index(s) for s in state.sites], dtype=torch.long)[state.site_index]
        keys.append((where * state.n_layers + state.layer) * width + state.unit)
        scales.append(state.scale.double() * w)
        shifts.append(state.shift.double() * w)
    key, inverse = torch.cat(keys).unique(sorted=True, return_inverse=True)
    scale = torch.zeros(key.numel(), dtype=torch.float64).index_add_(0, inverse, torch.cat(scales)).float()
    shift = torch.zeros(key.numel(), dtype=torch.float64).index_add_(0, inverse, torch.cat(shifts)).float()
    n_layers = states[0].n_layers
    first = states[0]
    return type(first)(
        sites=sites,
        site_index=key // width // n_layers,
        layer=key // width % n_layers,
        unit=key % width,
        momentum=scale.clone(),
        scale=scale,
        shift=shift,
        alpha=1.0,
        architecture=first.architecture,
        n_layers=n_layers,
        site_sizes=sizes,
        base_model=next((s.base_model for s in states if s.base_model), ""),
        sign_policy="both",
        token_scope=first.token_scope,
        method="+".join(dict.fromkeys(s.method for s in states)),
        metadata={
            "combination": [
                {"method": s.method, "k": s.k, "alpha": s.alpha, "weight": w, "base_model": s.base_model}
                for s, w in zip(states, weights)
            ]
        },
        strength={"kind": "scalar" if any(s.strength.get("kind") == "scalar" for s in states) else "momentum"},
        layout=first.layout,
    )


class StateArithmetic:
    """``a + b``, ``a - b``, ``w * a``, ``-a`` and ``sum(states)`` for steering states (:func:`combine`)."""

    def __add__(self, other: Any) -> Any:
        if not isinstance(other, StateArithmetic):
            return NotImplemented
        return combine([self, other])

    def __radd__(self, other: Any) -> Any:
        if isinstance(other, (int, float)) and other == 0:  # sum(states) starts from 0
            return self
        return NotImplemented

    def __sub__(self, other: Any) -> Any:
        if not isinstance(other, StateArithmetic):
            return NotImplemented
        return combine([self, other], [1.0, -1.0])

    def __mul__(self, weight: Any) -> Any:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            return NotImplemented
        return combine([self], [float(weight)])

    __rmul__ = __mul__

    def __neg__(self) -> Any:
        return combine([self], [-1.0])
