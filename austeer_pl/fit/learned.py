"""The learned-strength phase of a fit: one :class:`~austeer_pl.fit.strength.StrengthTrainer` per
learned variant and its epochs.

The phase runs as the epochs after the pass (the strength parameters exist only once the units are
chosen). Each process's gradient, a mean over its rows, is weighted by its share of the global
batch and summed, so uneven last batches average as one process would. Validation sums are summed
over processes before an epoch is judged, so every process keeps the same best epoch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from austeer_pl.core.placement import input_device
from austeer_pl.core.sites import ModelLayout
from austeer_pl.core.state import SteeringState
from austeer_pl.errors import AusteerError
from austeer_pl.fit.collectives import Collectives
from austeer_pl.fit.config import StrengthConfig
from austeer_pl.fit.data import FitData
from austeer_pl.fit.strength import VALIDATION_SUMS, StrengthTrainer
from austeer_pl.methods import get_method


class StrengthPhase:
    """The learned strengths of one fit (no trainer when no learned variant is fitted)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        layout: ModelLayout,
        data: FitData,
        config: StrengthConfig,
        collectives: Collectives,
    ) -> None:
        self.model, self.tokenizer, self.layout, self.data, self.config, self.coll = (
            model,
            tokenizer,
            layout,
            data,
            config,
            collectives,
        )
        self.trainers: dict[str, StrengthTrainer] = {}
        self.seconds: dict[str, float] = {}
        self.logs: list[tuple[str, float]] = []
        self.primary = ""
        self.folded = False
        self.epochs_done = 0
        self._sums: dict[str, torch.Tensor] = {}
        self._scoring = "loglik"

    @property
    def running(self) -> bool:
        """Whether another epoch should run: a trainer is still improving and ``strength_epochs`` are not all done."""
        return (
            bool(self.trainers)
            and self.epochs_done < self.config.strength_epochs
            and not all(t.stopped for t in self.trainers.values())
        )

    def _device(self) -> torch.device:
        return input_device(self.model)

    def _reduce(self, sums: torch.Tensor) -> torch.Tensor:
        return self.coll.sum(sums.to(self._device())).cpu()

    def _validation_sums(self, trainer: StrengthTrainer, indices: Sequence[int]) -> torch.Tensor:
        data = self.data
        examples = [data.splits["val"][i] for i in indices]
        prompts = [data.val_prompts[i] for i in indices]
        return trainer.validation_sums(
            self.tokenizer,
            data.task,
            examples,
            prompts,
            scoring=self._scoring,
            batch_size=data.batching.eval_batch_size,
            max_length=data.config.max_length,
        )

    def start(
        self, methods: Sequence[str], base: SteeringState | None, *, primary: str, scoring: str, criterion: str
    ) -> None:
        """A trainer per learned method, each from ``base`` (the rule ``alpha * m`` is its epoch 0)."""
        learned = [m for m in methods if get_method(m).learned]
        self.primary, self._scoring = primary, scoring
        if not learned or self.config.strength_epochs == 0:
            return
        if base is None:
            raise AusteerError("a learned strength starts from a chosen AUSteer state, and the grid chose none")
        cfg = self.config
        for method in learned:
            started = time.perf_counter()
            trainer = StrengthTrainer(
                self.model,
                self.layout,
                base,
                str(get_method(method).learned),
                lr=cfg.strength_lr,
                kl_weight=cfg.kl_weight,
                loss=cfg.strength_loss,
                patience=cfg.patience,
                gate_layer=cfg.gate_layer,
                gate_width=cfg.gate_width,
                criterion="loss" if criterion == "loss" else "accuracy",
            )
            sums = torch.zeros(VALIDATION_SUMS, dtype=torch.float64)
            for indices in self.data.example_batches("val", self.coll.rank, self.coll.world):
                if indices:
                    sums += self._validation_sums(trainer, indices)
            trainer.begin(self._reduce(sums))
            self.trainers[method] = trainer
            self.seconds[method] = time.perf_counter() - started

    def step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """One optimiser step of every trainer (every process, every step); the primary's losses."""
        out = None
        for method, trainer in self.trainers.items():
            started = time.perf_counter()
            losses = trainer.step(batch, self.coll.sum)
            self.seconds[method] += time.perf_counter() - started
            if losses is not None and method == self.primary:
                out = losses
        return out

    def start_validation(self) -> None:
        self._sums = {m: torch.zeros(VALIDATION_SUMS, dtype=torch.float64) for m in self.trainers}

    def validate(self, indices: Sequence[int]) -> None:
        """This process's validation sums of one batch of examples, for every trainer still training."""
        if not indices:
            return
        for method, trainer in self.trainers.items():
            if not trainer.stopped:
                started = time.perf_counter()
                self._sums[method] += self._validation_sums(trainer, indices)
                self.seconds[method] += time.perf_counter() - started

    def end_epoch(self, epoch: int) -> bool:
        """Judge the epoch on the reduced validation sums; True when the phase is over."""
        self.epochs_done = max(self.epochs_done, epoch)
        for method, trainer in self.trainers.items():
            if trainer.stopped:
                continue
            trainer.end_epoch(epoch, self._reduce(self._sums[method]))
            record = trainer.history[-1]
            self.logs.extend(
                (f"val/{method}_{key.removeprefix('val_')}", float(value))
                for key, value in record.items()
                if key != "epoch"
            )
        return not self.running

    def fold(self) -> dict[str, tuple[SteeringState, StrengthTrainer, float]]:
        """``{method: (state with the best weights folded in, trainer, its local seconds)}`` (once)."""
        if self.folded:
            return {}
        self.folded = True
        return {method: (trainer.fold(), trainer, self.seconds[method]) for method, trainer in self.trainers.items()}


__all__ = ["StrengthPhase"]
