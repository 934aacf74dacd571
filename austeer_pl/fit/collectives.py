"""What a fit needs of its processes: a rank, a world size and two reductions.

A fit session runs the same on one process or many: every cross-process step is a sum (statistics,
gradients, dealt scores) or a maximum (timings, flags) through a :class:`Collectives`. One process
is :data:`ONE_PROCESS`; Lightning's strategy is adapted in :mod:`austeer_pl.lightning.module`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class Collectives(Protocol):
    """The processes of one fit."""

    @property
    def rank(self) -> int: ...

    @property
    def world(self) -> int: ...

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over every process (every process calls it, in the same order)."""
        ...

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``'s elementwise maximum over every process."""
        ...


@dataclass(frozen=True)
class OneProcess:
    """The collectives of a fit on one process: every reduction is the identity."""

    rank: int = 0
    world: int = 1

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


ONE_PROCESS = OneProcess()

__all__ = ["ONE_PROCESS", "Collectives", "OneProcess"]
