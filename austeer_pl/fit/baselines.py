"""The simple alternatives a comparison measures steering against: prompting, and prompting + AUSteer.

* ``zero_shot``: the unsteered model with the task's zero-shot instruction (``instruction="auto"``).
* ``few_shot``: the unsteered model with ``n`` demonstrations drawn from the training split, ``n``
  chosen on validation from :data:`FEW_SHOT_GRID` by the grid's own criterion (ties: fewer shots).
* ``prompted_austeer``: AUSteer fitted and applied on top of the better of the two prompts (chosen on
  validation; ties: the shorter prompt), by the same :class:`~austeer_pl.fit.session.FitSession` as
  ``train.py --data.instruction auto --data.shots n``.

A prompt is a data setting (:mod:`austeer_pl.tasks.prompting`), so a baseline's examples are the
comparison's own examples, prompted, and they are scored by the grid's own
:class:`~austeer_pl.fit.grid.GridScoring` and :class:`~austeer_pl.fit.grid.TestScoring`: a baseline's
scores are those of scoring the prompted examples directly. Its cost is its prompt: the tokens it adds to
every request (``added_prompt_tokens``, the mean over test prompts before truncation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from austeer_pl.fit.collectives import Collectives
from austeer_pl.fit.config import FitConfig, SelectionConfig
from austeer_pl.fit.data import FitData
from austeer_pl.fit.grid import GridScoring, TestScoring
from austeer_pl.fit.session import FitSession
from austeer_pl.methods.registry import FITTED, UNSTEERED
from austeer_pl.scoring.statistics import criterion_values, reported

__all__ = ["FEW_SHOT_GRID", "PROMPT_BASELINES", "QUICK_FEW_SHOT_GRID", "PromptBaselines", "PromptResult"]

#: The baselines of every comparison beside the registry's methods, in report order.
PROMPT_BASELINES = ("zero_shot", "few_shot", "calibrated", "prompted_austeer")
#: Demonstrations the few-shot baseline chooses from on validation (``--grid quick``: the quick grid).
FEW_SHOT_GRID = (2, 4, 8)
QUICK_FEW_SHOT_GRID = (2, 4)


@dataclass
class PromptResult:
    """One prompt's validation and test results."""

    name: str
    settings: dict[str, Any]
    val_accuracy: float
    val_value: float
    test_predictions: torch.Tensor | None
    seconds: float
    prompt_tokens: float
    added_prompt_tokens: float
    truncated: int
    grid: list[dict[str, Any]] = field(default_factory=list)
    data: FitData | None = field(default=None, repr=False)  # the prompted examples, kept for a later test


class PromptBaselines:
    """Prompted variants of one comparison's data, scored unsteered on its examples.

    Args:
        model, tokenizer, layout: the frozen model of the comparison.
        data: the comparison's (unprompted) data, prepared.
        collectives: its processes.
        scoring, criterion, selection: the grid's scoring, criterion and settings.
    """

    def __init__(
        self,
        model,
        tokenizer,
        layout,
        data: FitData,
        collectives: Collectives,
        *,
        scoring: str,
        criterion: str,
        selection: SelectionConfig,
    ) -> None:
        self.model, self.tokenizer, self.layout, self.data, self.coll = model, tokenizer, layout, data, collectives
        self.scoring, self.criterion, self.selection = scoring, criterion, selection
        self._plain_lengths: torch.Tensor | None = None  # the unprompted test prompts' tokens, counted once

    def variant(self, **settings: Any) -> FitData:
        """The comparison's data with prompt ``settings`` (same task, seed and splits), prompts formatted."""
        data = FitData(self.data.config.replace(**settings), self.data.batching).load()
        data.tokenizer = self.tokenizer
        data.val_prompts = data.prompt_texts(data.splits["val"])
        return data

    def _lengths(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]])

    def score(self, name: str, *, test: bool = True, **settings: Any) -> PromptResult:
        """Validation statistics (and, with ``test``, test predictions) of the unsteered model on one prompted variant."""
        started = time.perf_counter()
        data = self.variant(**settings)
        grid = GridScoring(
            self.model,
            self.tokenizer,
            self.layout,
            data,
            self.selection,
            self.coll,
            scoring=self.scoring,
            criterion=self.criterion,
        )
        stats = grid.dealt([None], 0, len(data.splits["val"]), grid.scorer(False))[0]
        if self._plain_lengths is None:
            self._plain_lengths = self._lengths(self.data.test_prompts)
        prompted, plain = self._lengths(data.test_prompts), self._plain_lengths
        limit = data.config.max_length
        result = PromptResult(
            name=name,
            settings=dict(settings),
            val_accuracy=float(stats[:, 0].mean()),
            val_value=float(criterion_values(stats, self.criterion).mean()),
            test_predictions=None,
            seconds=0.0,
            prompt_tokens=float(prompted.double().mean()),
            added_prompt_tokens=float((prompted - plain).double().mean()),
            truncated=int(prompted.gt(limit).sum()) if limit is not None else 0,
            data=data,
        )
        if test:
            self._test(result)
        result.seconds = grid.slowest(time.perf_counter() - started)
        return result

    def _test(self, result: PromptResult) -> PromptResult:
        """``result``'s test predictions (the unsteered model on its prompted test examples)."""
        data = result.data or self.variant(**result.settings)
        testing = TestScoring(self.model, self.tokenizer, self.layout, data, self.coll, scoring=self.scoring)
        testing.start([None])
        for indices in data.example_batches("test", self.coll.rank, self.coll.world):
            testing.batch(indices)
        codes, _ = testing.finish()
        result.test_predictions = codes[0]
        return result

    def zero_shot(self) -> PromptResult:
        return self.score("zero_shot", instruction="auto")

    def few_shot(self, shots: tuple[int, ...] = FEW_SHOT_GRID) -> PromptResult | None:
        """The best number of demonstrations on validation (ties: fewer), its grid recorded; only it is tested.
        Counts above the training examples are not tried; None when none is left."""
        feasible = sorted(n for n in set(shots) if n <= len(self.data.splits["train"]))
        if not feasible:
            return None
        tried = [self.score("few_shot", test=False, shots=n) for n in feasible]
        best = max(range(len(tried)), key=lambda i: (tried[i].val_value, -i))
        out = tried[best]
        started = time.perf_counter()
        self._test(out)
        out.seconds = sum(r.seconds for r in tried) + time.perf_counter() - started
        key = f"val_{self.criterion}"
        out.grid = [
            {"shots": r.settings["shots"], "val_accuracy": r.val_accuracy, key: reported(self.criterion, r.val_value)}
            for r in tried
        ]
        return out

    @staticmethod
    def better(*results: PromptResult | None) -> PromptResult:
        """The better prompt on validation (ties: fewer added tokens)."""
        return min((r for r in results if r is not None), key=lambda r: (-r.val_value, r.added_prompt_tokens))

    def prompted_austeer(self, prompt: PromptResult, config: FitConfig) -> FitSession:
        """AUSteer fitted on ``prompt``'s examples (a :class:`~austeer_pl.fit.session.FitSession` that also
        tests): returns the session, whose ``results`` hold the unsteered prompt and AUSteer on top of it."""
        data = FitData(self.data.config.replace(**prompt.settings), self.data.batching).prepare(self.tokenizer)
        session = FitSession(
            self.model,
            self.tokenizer,
            self.layout,
            data,
            config,
            methods=(UNSTEERED, FITTED),
            export_anyway=True,
            collectives=self.coll,
        )
        session.run(test=True)
        return session
