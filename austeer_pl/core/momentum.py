"""Activation momentum: streaming, mergeable per-unit statistics over contrastive pairs.

For each pair, ``d = a(prompt + right answer) - a(prompt + wrong answer)`` at the last token.
Per unit, with ``P = #(d > 0)``, ``Q = #(d < 0)`` over ``N`` pairs::

    m = P / N   if P >= Q
    m = -Q / N  if Q > P

The accumulator keeps integer counts (exact under any merge order) and float64 running sums for
mean-difference statistics. Memory is proportional to the number of units, independent of the
number of pairs. Merging two accumulators equals accumulating the union of their pairs, which is
the DDP reduction.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from austeer_pl.errors import AusteerError

#: Per-site statistics: integer counts, then float64 sums.
COUNT_STATS = ("pos_count", "neg_count")
SUM_STATS = ("sum_pos", "sum_neg", "sum_sq_diff")


class SummedStatistics:
    """Named tensors that only ever grow by addition: mergeable in any order, summed across processes
    by one SUM all-reduce each, and checkpointed as plain tensors.

    Subclasses fill ``self.tensors`` and name themselves in error messages (``_what``, ``_plural``).
    """

    tensors: dict[str, torch.Tensor]
    _what = "statistics"
    _plural = "statistics"
    _missing_hint = ""
    _shape_hint = ""

    def merge_(self, other):
        """Add another accumulator's counts and sums into this one (in place) and return self."""
        if type(other) is not type(self) or {k: v.shape for k, v in other.tensors.items()} != {
            k: v.shape for k, v in self.tensors.items()
        }:
            raise ValueError(f"cannot merge {self._plural} of different shapes")
        for key, value in self.tensors.items():
            value.add_(other.tensors[key].to(value.device))
        return self

    def reduce_(self, all_reduce):
        """Sum every statistic across processes with ``all_reduce(tensor) -> summed tensor`` (a SUM
        all-reduce); the keys are visited in sorted order, the same on every process."""
        for key in sorted(self.tensors):
            self.tensors[key] = all_reduce(self.tensors[key])
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: value.detach().cpu().clone() for key, value in self.tensors.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = set(self.tensors) - set(state)
        if missing:
            raise AusteerError(f"{self._what} state is missing {', '.join(sorted(missing))}{self._missing_hint}")
        for key, value in self.tensors.items():
            if tuple(state[key].shape) != tuple(value.shape):
                raise AusteerError(
                    f"{self._what} state '{key}' has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}{self._shape_hint}"
                )
            value.copy_(state[key])

    def to(self, device: torch.device | str):
        self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return self


class MomentumAccumulator(SummedStatistics):
    """Streaming counts ``P, Q, N`` and sums per activation unit.

    Args:
        site_sizes: units per layer for each site, e.g. ``{"attention": 576, "ffn": 576}``.
        n_layers: number of decoder layers.
        device: where the statistics live (the activations' device, to avoid transfers).

    Example:
        >>> acc = MomentumAccumulator({"ffn": 8}, n_layers=2)
        >>> acc.update({"ffn": pos}, {"ffn": neg})  # pos, neg: (batch, 2, 8)
        >>> acc.momentum("ffn").shape
        torch.Size([2, 8])
    """

    _what = "momentum"
    _plural = "accumulators"
    _missing_hint = "; it was saved for other sites"

    def __init__(self, site_sizes: Mapping[str, int], n_layers: int, device: torch.device | str | None = None) -> None:
        if not site_sizes:
            raise AusteerError("no sites to accumulate; choose at least one of attention, ffn, residual")
        self.site_sizes = dict(site_sizes)
        self.n_layers = int(n_layers)
        # Normal (not inference-mode) tensors, so they can be merged, reduced and checkpointed anywhere.
        with torch.inference_mode(False):
            self.tensors: dict[str, torch.Tensor] = {"n": torch.zeros((), dtype=torch.int64, device=device)}
            for site, size in self.site_sizes.items():
                for stat in COUNT_STATS:
                    self.tensors[f"{site}.{stat}"] = torch.zeros(n_layers, size, dtype=torch.int64, device=device)
                for stat in SUM_STATS:
                    self.tensors[f"{site}.{stat}"] = torch.zeros(n_layers, size, dtype=torch.float64, device=device)

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.site_sizes)

    @property
    def n(self) -> int:
        return int(self.tensors["n"])

    def _t(self, site: str, stat: str) -> torch.Tensor:
        try:
            return self.tensors[f"{site}.{stat}"]
        except KeyError:
            raise AusteerError(
                f"site '{site}' was not accumulated; accumulated sites: {', '.join(self.sites)}"
            ) from None

    def update(self, pos: Mapping[str, torch.Tensor], neg: Mapping[str, torch.Tensor]) -> None:
        """Add a batch of pairs: ``pos[site]`` and ``neg[site]`` are ``(batch, layers, units)``."""
        batch = None
        for site in self.sites:
            p, q = pos[site], neg[site]
            if p.shape != q.shape or p.shape[1:] != (self.n_layers, self.site_sizes[site]):
                raise ValueError(
                    f"{site}: expected (batch, {self.n_layers}, {self.site_sizes[site]}), got {tuple(p.shape)} and {tuple(q.shape)}"
                )
            if batch is not None and p.shape[0] != batch:
                raise ValueError("all sites must hold the same number of pairs")
            batch = p.shape[0]
            if not (torch.isfinite(p).all() and torch.isfinite(q).all()):
                raise AusteerError(
                    f"non-finite activations at the {site} site (NaN or inf); load the model in float32 "
                    "or bfloat16 instead of float16, and check the inputs"
                )
            d = p.float() - q.float()
            self._t(site, "pos_count").add_((d > 0).sum(0))
            self._t(site, "neg_count").add_((d < 0).sum(0))
            self._t(site, "sum_pos").add_(p.double().sum(0))
            self._t(site, "sum_neg").add_(q.double().sum(0))
            self._t(site, "sum_sq_diff").add_(d.double().square().sum(0))
        if batch:
            self.tensors["n"].add_(batch)

    def _require_pairs(self) -> int:
        n = self.n
        if n == 0:
            raise AusteerError("no contrastive pairs were accumulated; give the fit at least one training pair")
        return n

    def counts(self, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, Q)`` for a site, each ``(layers, units)`` int64."""
        return self._t(site, "pos_count"), self._t(site, "neg_count")

    def momentum(self, site: str) -> torch.Tensor:
        """Signed activation momentum ``m`` of a site, ``(layers, units)`` float32."""
        n = self._require_pairs()
        p, q = self.counts(site)
        return (torch.where(p >= q, p, -q).double() / n).float()

    def mean_difference(self, site: str) -> torch.Tensor:
        """Mean of ``d = pos - neg`` per unit, float64."""
        n = self._require_pairs()
        return (self._t(site, "sum_pos") - self._t(site, "sum_neg")) / n

    def mean_positive(self, site: str) -> torch.Tensor:
        return self._t(site, "sum_pos") / self._require_pairs()

    def mean_negative(self, site: str) -> torch.Tensor:
        return self._t(site, "sum_neg") / self._require_pairs()

    def effect_size(self, site: str) -> torch.Tensor:
        """``mean(d) / std(d)`` per unit (0 where ``d`` is constant zero), float64."""
        n = self._require_pairs()
        mean = self.mean_difference(site)
        var = (self._t(site, "sum_sq_diff") / n - mean.square()).clamp(min=0.0)
        std = var.sqrt()
        return torch.where(std > 0, mean / std.clamp(min=1e-300), torch.sign(mean) * torch.inf).nan_to_num(0.0)
