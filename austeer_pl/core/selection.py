"""Global top-k selection of activation units by |momentum|.

Ranking, over every unit of the chosen sites in every layer, is deterministic:

1. larger ``|m|`` first;
2. ties: larger ``|mean(d) / std(d)|`` first (the more consistent shift), compared after
   rounding to float32 so that float64 sums that differ only in summation order (one process
   vs. several) rank the same;
3. remaining ties: site order as given, then lower layer, then lower unit index.

Sign policy ``promote`` keeps only units with ``m > 0`` (the activation is larger for the right
answer); ``both`` keeps either sign.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from austeer_pl.core.momentum import MomentumAccumulator
from austeer_pl.errors import AusteerError

SIGN_POLICIES = ("promote", "both")


@dataclass(frozen=True)
class Selection:
    """The selected units, best first.

    Attributes:
        sites: site names; ``site_index`` points into this tuple.
        site_index, layer, unit: int64 coordinates, each ``(k,)``.
        momentum: float32 signed momentum of each unit, ``(k,)``.
    """

    sites: tuple[str, ...]
    site_index: torch.Tensor
    layer: torch.Tensor
    unit: torch.Tensor
    momentum: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.unit.numel())

    def coordinates(self) -> list[tuple[str, int, int]]:
        return [
            (self.sites[s], int(l), int(u))
            for s, l, u in zip(self.site_index.tolist(), self.layer.tolist(), self.unit.tolist())
        ]

    def head(self, k: int) -> Selection:
        """The best ``k`` of these units (selection is nested: top-k of top-K)."""
        if not 0 < k <= self.k:
            raise AusteerError(f"k={k} is out of range: choose 1 <= k <= {self.k}")
        return Selection(self.sites, self.site_index[:k], self.layer[:k], self.unit[:k], self.momentum[:k])


def rank_units(acc: MomentumAccumulator, sites: Sequence[str], sign: str = "promote") -> Selection:
    """All eligible units of ``sites`` in rank order (see the module docstring)."""
    if sign not in SIGN_POLICIES:
        raise AusteerError(f"unknown sign policy '{sign}'; choose one of {', '.join(SIGN_POLICIES)}")
    sites = tuple(dict.fromkeys(sites))
    if not sites:
        raise AusteerError("no sites selected; choose at least one of attention, ffn")
    ms, effects, site_idx, layers, units = [], [], [], [], []
    for i, site in enumerate(sites):
        m = acc.momentum(site)
        n_layers, size = m.shape
        ms.append(m.flatten())
        effects.append(acc.effect_size(site).abs().float().flatten())
        site_idx.append(torch.full((n_layers * size,), i, dtype=torch.int64))
        layers.append(torch.arange(n_layers).repeat_interleave(size))
        units.append(torch.arange(size).repeat(n_layers))
    m = torch.cat(ms).cpu()
    effect = torch.cat(effects).cpu()
    site_index, layer, unit = torch.cat(site_idx), torch.cat(layers), torch.cat(units)
    if sign == "promote":
        keep = m > 0
        m, effect, site_index, layer, unit = m[keep], effect[keep], site_index[keep], layer[keep], unit[keep]
    # Stable sorts from the last key to the first; natural order is (site, layer, unit) already.
    order = torch.sort(effect, descending=True, stable=True).indices
    order = order[torch.sort(m.abs()[order], descending=True, stable=True).indices]
    return Selection(sites, site_index[order], layer[order], unit[order], m[order])


def select_units(acc: MomentumAccumulator, k: int, sites: Sequence[str], sign: str = "promote") -> Selection:
    """Global top-``k`` units by ``|m|`` across all layers of ``sites``.

    Args:
        acc: accumulated momentum statistics.
        k: number of units to keep, ``1 <= k <= number of eligible units``.
        sites: sites to rank together, e.g. ``["attention"]`` or ``["attention", "ffn"]``.
        sign: ``"promote"`` (only ``m > 0``) or ``"both"``.

    Raises:
        AusteerError: for ``k`` out of range, an unknown sign policy or site.

    Example:
        >>> sel = select_units(acc, k=20, sites=["attention"])
        >>> sel.coordinates()[0]
        ('attention', 17, 301)
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise AusteerError(f"k must be a whole number, got {k!r}")
    total = sum(acc.site_sizes[s] * acc.n_layers for s in dict.fromkeys(sites) if s in acc.site_sizes)
    if k <= 0 or k > total:
        raise AusteerError(
            f"k={k} is out of range: choose 1 <= k <= {total} (the number of units at {', '.join(sites)})"
        )
    ranked = rank_units(acc, sites, sign)
    if k > ranked.k:
        raise AusteerError(f"k={k} but only {ranked.k} units have positive momentum; lower k or use sign policy 'both'")
    return ranked.head(k)
