"""The shared pass's statistics: momentum counts and sums (and ITI's head moments) summed across
processes once, checkpointed mid-pass, and AUSteer's ranking of each site option."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from austeer_pl.core.momentum import MomentumAccumulator
from austeer_pl.core.selection import Selection, rank_units
from austeer_pl.core.sites import ModelLayout
from austeer_pl.errors import AusteerError
from austeer_pl.fit.collectives import Collectives
from austeer_pl.methods.probes import HeadMoments


@dataclass
class PassStatistics:
    """The shared pass's streaming statistics: momentum counts and sums, plus ITI's head moments."""

    accumulator: MomentumAccumulator
    head_moments: HeadMoments | None = None
    reduced: bool = False

    @classmethod
    def create(cls, layout: ModelLayout, sites: Sequence[str], *, head_moments: bool = False) -> PassStatistics:
        acc = MomentumAccumulator({s: layout.site(s).size for s in sites}, layout.n_layers)
        return cls(acc, HeadMoments.from_layout(layout) if head_moments else None)

    @property
    def sites(self) -> tuple[str, ...]:
        return self.accumulator.sites

    def update(self, pos: dict[str, torch.Tensor], neg: dict[str, torch.Tensor]) -> None:
        with torch.inference_mode():
            self.accumulator.update(pos, neg)
            if self.head_moments is not None:
                self.head_moments.update(pos, neg)

    def reduce_(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum every process's statistics (once)."""
        if self.reduced:
            return
        self.accumulator.reduce_(all_reduce_sum)
        if self.head_moments is not None:
            self.head_moments.reduce_(all_reduce_sum)
        self.reduced = True

    def checkpoint(self, coll: Collectives, *, reduced: bool) -> dict[str, Any]:
        """The momentum counts for a pass checkpoint; mid-pass (not ``reduced``) their sum over processes (a collective)."""
        tensors = {k: v.detach().clone() for k, v in self.accumulator.tensors.items()}
        if not reduced:  # each process holds part of the counts; the checkpoint keeps their sum
            tensors = {k: coll.sum(t) for k, t in tensors.items()}
        return {"accumulator": {k: v.cpu() for k, v in tensors.items()}, "reduced": reduced, "world_size": coll.world}

    def restore(self, saved: Mapping[str, Any], coll: Collectives, device: torch.device) -> None:
        """Load a :meth:`checkpoint`: the summed counts go to rank zero only, so the end-of-pass sum counts them once."""
        if not saved["reduced"] and saved["world_size"] != coll.world:
            raise AusteerError(
                f"the checkpoint was written mid-pass by {saved['world_size']} processes; resume it with --trainer.devices {saved['world_size']}"
            )
        if coll.rank == 0:
            self.accumulator.load_state_dict(saved["accumulator"])
        self.accumulator.to(device)

    def to(self, device) -> PassStatistics:
        self.accumulator.to(device)
        if self.head_moments is not None:
            self.head_moments.to(device)
        return self


def rank_site_options(
    acc: MomentumAccumulator, site_options: Sequence[tuple[str, tuple[str, ...]]], sign: str, k_max: int
) -> dict[str, Selection]:
    """AUSteer's ranking of each site option (``("both", ("attention", "ffn"))``...), cut to ``k_max`` units."""
    rankings = {}
    for name, sites in site_options:
        ranked = rank_units(acc, sites, sign)
        if ranked.k < k_max:
            raise AusteerError(
                f"k={k_max} but only {ranked.k} {name} units are eligible (sign policy {sign}); lower --model.k or use --model.sign both"
            )
        rankings[name] = ranked.head(k_max)
    return rankings
