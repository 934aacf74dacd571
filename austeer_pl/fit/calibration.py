"""The calibration control: the unsteered model with one log-probability offset per answer, fitted on validation.

How much of a steering gain is a shift of the model's prior over the answers? Contextual calibration
answers it without touching a single activation: each answer gets an offset ``b`` added to its
log-likelihood, and the prediction is ``argmax(log p(choice) + b[choice])``. The offsets minimise the
mean choice log-loss of the validation examples (a convex problem: L-BFGS in float64 from zero, the first
answer's offset held at 0 since only differences matter), the same criterion the grid is chosen by.

An answer is its text when every example offers the same set of answers (``positive``/``negative``,
``Yes``/``No``), else its position among the choices. Positions are refused (:func:`position_leak`) when
every validation answer sits at one of them, as in tasks whose right answer is always listed first: the
offset would learn the listing order, which no scored continuation shows the model, and read it off the
test split's order too. The choice log-likelihoods are those of
:func:`~austeer_pl.scoring.loglik.choice_logprobs`, the scoring of every method; each process scores
its share of the batches and a sum gathers the table exactly (every entry is written by one process).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from austeer_pl.core.placement import input_device
from austeer_pl.errors import AusteerError
from austeer_pl.fit.collectives import Collectives
from austeer_pl.fit.data import FitData
from austeer_pl.scoring.evaluate import answer_suffixes
from austeer_pl.scoring.loglik import choice_logprobs
from austeer_pl.tasks.schema import TaskExample

__all__ = ["Calibration", "choice_keys", "choice_table", "fit_offsets", "position_leak"]


def choice_table(model, tokenizer, data: FitData, split: str, collectives: Collectives) -> torch.Tensor:
    """``(n, most choices)`` float64 log-likelihood of every choice of the ``split`` examples (``-inf``
    where an example has fewer choices), each process scoring its own batches."""
    examples = data.splits[split]
    prompts = data.val_prompts if split == "val" else data.test_prompts
    width = max((len(ex.choices) for ex in examples), default=0)
    local = torch.zeros(len(examples), width, dtype=torch.float64)
    for indices in data.example_batches(split, collectives.rank, collectives.world):
        if not indices:
            continue
        answers = [answer_suffixes(prompts[i], examples[i].choices, data.task) for i in indices]
        scores = choice_logprobs(
            model,
            tokenizer,
            [prompts[i] for i in indices],
            answers,
            batch_size=data.batching.eval_batch_size,
            max_length=data.config.max_length,
        )
        for i, row in zip(indices, scores):
            local[i, : len(row)] = row.double()
    table = collectives.sum(local.to(input_device(model))).cpu()
    counts = torch.tensor([len(ex.choices) for ex in examples])
    return table.masked_fill(torch.arange(width).unsqueeze(0) >= counts.unsqueeze(1), -math.inf)


def _one_answer_set(examples: Sequence[TaskExample]) -> bool:
    return len({frozenset(ex.choices) for ex in examples}) == 1


def choice_keys(*splits: Sequence[TaskExample]) -> tuple[list[str], list[torch.Tensor]]:
    """The answers offsets are kept for, and for each split an ``(n, most choices)`` index into them (-1:
    no choice there): the answer texts when every example offers the same set, else the positions."""
    everything = [ex for split in splits for ex in split]
    by_text = _one_answer_set(everything)
    keys = (
        sorted(everything[0].choices) if by_text else [str(i) for i in range(max(len(ex.choices) for ex in everything))]
    )
    out = []
    for split in splits:
        width = max((len(ex.choices) for ex in split), default=0)
        index = torch.full((len(split), width), -1, dtype=torch.long)
        for row, ex in enumerate(split):
            for col, choice in enumerate(ex.choices):
                index[row, col] = keys.index(choice) if by_text else col
        out.append(index)
    return keys, out


def position_leak(val: Sequence[TaskExample], test: Sequence[TaskExample]) -> str | None:
    """Why offsets cannot be fitted for these splits (``None`` when they can): they would be per position,
    and every validation answer is at the same position, which the offsets would simply learn."""
    positions = {ex.answer for ex in val}
    if len(positions) != 1 or _one_answer_set([*val, *test]):
        return None
    return (
        f"the answers differ per example, so the offsets would be per position, and every validation answer is "
        f"choice {positions.pop() + 1}: they would learn the listing order, not a prior over answers"
    )


def _shifted(table: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return table + torch.where(index >= 0, offsets[index.clamp(min=0)], torch.zeros((), dtype=offsets.dtype))


def fit_offsets(table: torch.Tensor, index: torch.Tensor, answers: torch.Tensor, n_keys: int) -> torch.Tensor:
    """The offsets (one per key, the first 0) that minimise the mean choice log-loss of ``table``."""
    if n_keys < 2 or not len(table):
        return torch.zeros(n_keys, dtype=torch.float64)
    free = torch.zeros(n_keys - 1, dtype=torch.float64, requires_grad=True)
    rows = torch.arange(len(table))
    optimiser = torch.optim.LBFGS([free], lr=1.0, max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimiser.zero_grad()
        shifted = _shifted(table, index, torch.cat([free.new_zeros(1), free]))
        value = (torch.logsumexp(shifted, dim=1) - shifted[rows, answers]).mean()
        value.backward()
        return value

    optimiser.step(loss)
    return torch.cat([torch.zeros(1, dtype=torch.float64), free.detach()])


@dataclass
class Calibration:
    """Fitted per-answer offsets and what they predict (see the module docstring).

    Example:
        >>> cal = Calibration.fit(model, tok, data, collectives)
        >>> cal.offsets, cal.val_accuracy, cal.test_predictions[:5]
    """

    keys: list[str]
    offsets: torch.Tensor
    val_accuracy: float
    test_predictions: torch.Tensor

    @classmethod
    def fit(cls, model, tokenizer, data: FitData, collectives: Collectives) -> Calibration:
        val, test = data.splits["val"], data.splits["test"]
        if not val:
            raise AusteerError("calibration needs validation examples; raise --max_val_examples")
        if leak := position_leak(val, test):
            raise AusteerError(f"calibration cannot be fitted: {leak}")
        keys, (val_index, test_index) = choice_keys(val, test)
        val_table = choice_table(model, tokenizer, data, "val", collectives)
        answers = torch.tensor([ex.answer for ex in val])
        offsets = fit_offsets(val_table, val_index, answers, len(keys))
        shifted = _shifted(val_table, val_index, offsets)
        test_table = choice_table(model, tokenizer, data, "test", collectives)
        return cls(
            keys=keys,
            offsets=offsets,
            val_accuracy=float(shifted.argmax(dim=1).eq(answers).double().mean()),
            test_predictions=_shifted(test_table, test_index, offsets).argmax(dim=1),
        )

    def describe(self) -> dict[str, float]:
        """``{answer: offset}``, as reported."""
        return {key: round(float(value), 6) for key, value in zip(self.keys, self.offsets)}
