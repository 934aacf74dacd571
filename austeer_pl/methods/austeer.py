"""AUSteer: the top-k activation units by |momentum| over the chosen sites, each ``a -> a + alpha * m * a``.

The grid :class:`AusteerGrid` is the one source of AUSteer's defaults: ``train.py``'s
``--model.site/k/alpha/sign/token_scope``, ``configs/default.yaml``, ``evaluate.py --compare`` and
the registry entry below all read it. The learned-strength variants (``austeer_scalar``,
``austeer_gate``) start from AUSteer's chosen point and train its strength.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from austeer_pl.core.hooks import TOKEN_SCOPES
from austeer_pl.core.selection import SIGN_POLICIES
from austeer_pl.core.sites import ModelLayout
from austeer_pl.core.state import SteeringState
from austeer_pl.errors import AusteerError, SettingError
from austeer_pl.methods.registry import FITTED, FitContext, Method, register

#: The site options a grid chooses among, and the sites each reads.
SITE_OPTIONS = {"attention": ("attention",), "ffn": ("ffn",), "both": ("attention", "ffn"), "residual": ("residual",)}


def _values(value: Any, name: str, kind: type) -> tuple:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise SettingError(name, "is empty; give at least one value")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise SettingError(name, f"value {v!r} is not a number")
        if kind is int and (float(v) != int(v) or int(v) <= 0):
            raise SettingError(name, f"value {v!r} must be a positive whole number")
        if kind is float and not math.isfinite(float(v)):
            raise SettingError(name, f"value {v!r} must be finite")
        out.append(kind(v))
    return tuple(sorted(set(out), key=out.index))


def parse_sites(site: str | Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    """Site options as ``[(name, sites), ...]`` (``"both"`` reads attention and FFN), duplicates dropped."""
    options = [site] if isinstance(site, str) else list(site)
    out: list[tuple[str, tuple[str, ...]]] = []
    for opt in options:
        key = str(opt).strip().lower()
        if key not in SITE_OPTIONS:
            raise SettingError(
                "site", f"'{opt}' is unknown; choose attention, ffn, both or residual (or a list of them)"
            )
        if key not in [o for o, _ in out]:
            out.append((key, SITE_OPTIONS[key]))
    if not out:
        raise SettingError("site", "is empty; choose attention, ffn or both")
    return out


@dataclass(frozen=True)
class AusteerGrid:
    """AUSteer's validation grid: every site option x k x alpha is a candidate.

    Args:
        site: ``attention``, ``ffn``, ``both``, ``residual`` (the decoder layer output, which the paper code also steers), or a list of them to choose from on validation.
        k: number of units, or a list to choose from on validation.
        alpha: strength, or a list to choose from on validation.
        sign: ``promote`` (only m > 0) or ``both``.
        token_scope: ``all``, ``prompt`` or ``generated`` (recorded in the state).
    """

    site: str | list[str] = ("attention", "ffn")  # type: ignore[assignment]
    k: int | list[int] = (3, 10, 30, 100)  # type: ignore[assignment]
    alpha: float | list[float] = (4.0, 8.0, 16.0)  # type: ignore[assignment]
    sign: str = "promote"
    token_scope: str = "all"

    def __post_init__(self) -> None:
        self.site_options  # noqa: B018 - validates
        _values(self.k, "k", int)
        _values(self.alpha, "alpha", float)
        if self.sign not in SIGN_POLICIES:
            raise SettingError("sign", f"'{self.sign}' is unknown; choose promote or both")
        if self.token_scope not in TOKEN_SCOPES:
            raise SettingError(
                "token_scope", f"'{self.token_scope}' is unknown; choose one of {', '.join(TOKEN_SCOPES)}"
            )

    @property
    def site_options(self) -> list[tuple[str, tuple[str, ...]]]:
        return parse_sites(self.site)

    @property
    def k_values(self) -> tuple[int, ...]:
        return _values(self.k, "k", int)

    @property
    def alpha_values(self) -> tuple[float, ...]:
        return _values(self.alpha, "alpha", float)

    def as_grid(self, *, sign: bool = False) -> dict[str, list[Any]]:
        """The registry's form: ``{"site": [...], "k": [...], "alpha": [...]}`` (with ``sign``, the sign
        policy the units are ranked with, recorded in every point)."""
        grid: dict[str, list[Any]] = {
            "site": [name for name, _ in self.site_options],
            "k": list(self.k_values),
            "alpha": list(self.alpha_values),
        }
        return {**grid, "sign": [self.sign]} if sign else grid

    def points(self) -> list[tuple[str, int, float]]:
        """Every ``(site option, k, alpha)`` in grid order."""
        return [(name, k, alpha) for name, _ in self.site_options for k in self.k_values for alpha in self.alpha_values]


def _austeer_points(layout: ModelLayout, grid) -> list[dict[str, Any]]:
    sites = grid.get("site", ["attention"])
    sites = [sites] if isinstance(sites, str) else list(sites)
    points = [{"site": s, "k": int(k), "alpha": float(a)} for s in sites for k in grid["k"] for a in grid["alpha"]]
    return [{**p, "sign": sign} for p in points for sign in grid["sign"]] if "sign" in grid else points


def _build_austeer(ctx: FitContext, *, site: str, k: int, alpha: float, sign: str | None = None) -> SteeringState:
    if sign is not None and sign != ctx.sign:
        raise AusteerError(
            f"AUSteer's units were ranked with sign policy '{ctx.sign}', not '{sign}'; fit again with that sign"
        )
    if site not in ctx.rankings:
        raise AusteerError(f"AUSteer has no ranking for site option '{site}'; the pass did not read it")
    return SteeringState.from_selection(
        ctx.rankings[site].head(k),
        ctx.layout,
        alpha=alpha,
        base_model=ctx.base_model,
        sign_policy=ctx.sign,
        token_scope=ctx.token_scope,
        metadata=dict(ctx.metadata),
        layout_spec=ctx.layout_spec,
    )


#: AUSteer's registry entry: its default grid is :class:`AusteerGrid`'s.
AUSTEER = register(
    Method(
        FITTED,
        ("momentum",),
        ("attention",),
        grid=AusteerGrid().as_grid(),
        quick_grid={"site": ["attention"], "k": [10, 50], "alpha": [1.0, 2.0]},
        strength_key="alpha",
        points=_austeer_points,
        build=_build_austeer,
        order=50,
    )
)
AUSTEER_SCALAR = register(Method("austeer_scalar", ("momentum",), learned="scalar", starts_from=FITTED, order=60))
AUSTEER_GATE = register(Method("austeer_gate", ("momentum",), learned="gate", starts_from=FITTED, order=70))
