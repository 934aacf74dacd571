"""Training a learned strength (a scalar per unit, or a gate) on the frozen model: one
:class:`StrengthTrainer` per learned method, its optimizer steps, validation sums and best epoch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from austeer_pl.core.hooks import EditHandle
from austeer_pl.core.placement import input_device
from austeer_pl.core.sites import ModelLayout
from austeer_pl.core.strength import (
    STRENGTH_LOSSES,
    average_gradients,
    build_strength,
    fold_strength,
    learned_fit_metadata,
    strength_objective,
)
from austeer_pl.errors import AusteerError
from austeer_pl.scoring.evaluate import answer_suffixes, predict
from austeer_pl.scoring.loglik import choice_logprobs, decision_statistics


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


# ---------------------------------------------------------------------------- the learned-strength trainer
#: Sums the strength trainer's validation keeps per process: right answers, examples, the right
#: answer's NLL, the cross-entropy over the choices.
VALIDATION_SUMS = 4


@dataclass
class StrengthTrainer:
    """Trains one learned strength on a chosen state with the LLM frozen; keeps its best validation epoch.

    The steps are the same for ``train.py`` and ``--compare``: ``begin`` records epoch 0 (the rule
    ``alpha * m`` the strength starts from), ``step`` runs one optimiser step on a batch of
    training examples (gradients averaged across processes by ``all_reduce_sum``), ``validation_sums``
    scores this process's share of validation, and ``end_epoch`` takes the reduced sums, appends
    to the history, keeps the best epoch and says whether to stop. ``criterion="loss"`` (what
    ``train.py`` passes under log-likelihood scoring: the grid's own criterion) keeps the epoch
    with the lowest validation choice log-loss; a later epoch replaces the best only if strictly
    lower. ``criterion="accuracy"`` (generation scorings, and the default here) keeps the higher
    validation accuracy, ties to a lower validation value of the loss being trained (the right
    answer's NLL, or the cross-entropy over the choices).

    Example:
        >>> trainer = StrengthTrainer(model, layout, state, "gate", lr=0.01)
        >>> trainer.begin(reduce(trainer.validation_sums(...)))
        >>> for epoch in range(1, 4):
        ...     for batch in batches(epoch):
        ...         trainer.step(batch)
        ...     if trainer.end_epoch(epoch, reduce(trainer.validation_sums(...))):
        ...         break
        >>> learned = trainer.fold()
    """

    model: nn.Module
    layout: ModelLayout
    state: Any
    kind: str
    lr: float = 0.01
    kl_weight: float = 1.0
    loss: str = "nll"
    patience: int = 2
    gate_layer: int | None = None
    gate_width: int = 16
    criterion: str = "accuracy"
    fn: nn.Module = field(init=False)
    history: list[dict[str, float]] = field(default_factory=list, init=False)
    best: dict[str, Any] = field(default_factory=dict, init=False)  # filled by begin()
    stopped: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.loss not in STRENGTH_LOSSES:
            raise AusteerError(f"unknown strength loss '{self.loss}'; choose one of {', '.join(STRENGTH_LOSSES)}")
        if self.criterion not in ("accuracy", "loss"):
            raise AusteerError(f"the strength's epoch criterion must be accuracy or loss, not '{self.criterion}'")
        device = input_device(self.model)
        fn = build_strength(
            self.kind,
            self.state.scale.to(device),
            self.layout,
            self.state.layer.tolist(),
            gate_layer=self.gate_layer,
            gate_width=self.gate_width,
        )
        if fn is None:
            raise AusteerError(f"the '{self.kind}' strength has nothing to learn; choose scalar or gate")
        self.fn = fn.to(device)
        self.optimizer = torch.optim.Adam(self.fn.parameters(), lr=self.lr)
        self._bad = 0

    @property
    def tie_key(self) -> str:
        return "val_nll" if self.loss == "nll" else "val_choice_loss"

    def handle(self):

        return EditHandle(self.model, self.layout, self.state, self.fn)

    def batch_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, nll, kl)`` of one collated batch (see :func:`~austeer_pl.core.strength.strength_objective`)."""
        return strength_objective(
            self.model, self.layout, self.state, self.fn, batch, kl_weight=self.kl_weight, loss=self.loss
        )

    def step(
        self, batch: dict[str, Any], all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = _identity
    ) -> dict[str, torch.Tensor] | None:
        """One optimiser step; every process calls it once per global step (with an empty batch if it has none)."""
        if self.stopped:
            return None
        self.optimizer.zero_grad(set_to_none=False)
        out = None
        if batch["n_examples"]:
            with torch.inference_mode(False), torch.enable_grad():
                loss, nll, kl = self.batch_loss(batch)
                loss.backward()
            out = {"loss": loss.detach(), "nll": nll.detach(), "kl": kl.detach()}
        average_gradients(self.fn.parameters(), all_reduce_sum, batch["n_examples"])
        self.optimizer.step()
        return out

    def validation_sums(
        self, tokenizer, task, examples, prompts, *, scoring: str, batch_size: int, max_length: int | None
    ) -> torch.Tensor:
        """This process's ``(VALIDATION_SUMS,)`` float64 sums on ``examples`` with the current strength."""
        out = torch.zeros(VALIDATION_SUMS, dtype=torch.float64)
        if not examples:
            return out
        answers = torch.tensor([ex.answer for ex in examples])
        with torch.no_grad(), self.handle():
            if scoring == "loglik":
                scores = choice_logprobs(
                    self.model,
                    tokenizer,
                    prompts,
                    [answer_suffixes(p, ex.choices, task) for p, ex in zip(prompts, examples)],
                    batch_size=batch_size,
                    max_length=max_length,
                )
                stats = decision_statistics(scores, answers.tolist())  # correct, margin, choice log-loss
                starts = torch.tensor([0] + [len(sc) for sc in scores[:-1]]).cumsum(0)
                out[0] = stats[:, 0].sum()
                out[2] = -torch.cat([sc.double() for sc in scores])[starts + answers].sum()  # the right answers' NLL
                out[3] = stats[:, 2].sum()
            else:
                preds = predict(
                    self.model,
                    tokenizer,
                    task,
                    examples,
                    prompts,
                    scoring=scoring,
                    batch_size=batch_size,
                    max_length=max_length,
                )
                out[0] = float(preds.eq(answers).sum())
        out[1] = float(len(examples))
        return out

    @staticmethod
    def record(sums: torch.Tensor) -> dict[str, float]:
        """Reduced validation sums as ``val_accuracy``, ``val_nll``, ``val_choice_loss`` (the latter two 0 under generation)."""
        total = max(float(sums[1]), 1.0)
        return {
            "val_accuracy": float(sums[0]) / total,
            "val_nll": float(sums[2]) / total,
            "val_choice_loss": float(sums[3]) / total,
        }

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.fn.state_dict().items()}

    def begin(self, sums: torch.Tensor) -> dict[str, float]:
        """Epoch 0: the rule the strength starts from is the first candidate for the best weights."""
        rec = self.record(sums)
        self.history = [{"epoch": 0, **rec}]
        self.best = {**rec, "epoch": 0, "weights": self._snapshot()}
        self._bad = 0
        return rec

    def end_epoch(self, epoch: int, sums: torch.Tensor) -> bool:
        """Record epoch ``epoch``'s reduced validation sums; True when training should stop."""
        if self.stopped:
            return True
        rec = self.record(sums)
        self.history.append({"epoch": epoch, **rec})
        tie = self.tie_key
        if self.criterion == "loss":
            better = rec["val_choice_loss"] < self.best["val_choice_loss"]
        else:
            better = (rec["val_accuracy"], -rec[tie]) > (self.best["val_accuracy"], -self.best[tie])
        if better:
            self.best = {**rec, "epoch": epoch, "weights": self._snapshot()}
            self._bad = 0
        else:
            self._bad += 1
            if self._bad >= self.patience:
                self.stopped = True
        return self.stopped

    def fold(self):
        """The state with the best weights folded in (a scalar into ``scale``, a gate into ``strength_tensors``)."""
        self.fn.load_state_dict(self.best["weights"])
        metadata = learned_fit_metadata(
            self.state,
            self.kind,
            val_accuracy=self.best["val_accuracy"],
            best_epoch=self.best["epoch"],
            history=self.history,
            lr=self.lr,
            kl_weight=self.kl_weight,
            loss=self.loss,
        )
        return fold_strength(self.state, self.fn, metadata)
