"""Scoring the grid on validation, dealt to the processes, and the engine's one choice.

:class:`GridScoring` scores candidates on validation examples: each round's examples are cut into
contiguous batches of ``eval_batch_size`` and dealt to the processes in turn; each process writes
its own batches into zeros and a sum over processes gathers them exactly (every entry is written by
one process), so N processes compute the statistics, and therefore the choice, of one.
:meth:`GridScoring.choose_all` runs :func:`~austeer_pl.fit.choose.choose` for every grid method.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from austeer_pl.core.placement import input_device
from austeer_pl.core.sites import ModelLayout
from austeer_pl.errors import AusteerError
from austeer_pl.fit.choose import Candidate, GridChoice, choose, predictions
from austeer_pl.fit.collectives import Collectives
from austeer_pl.fit.config import SelectionConfig
from austeer_pl.fit.data import FitData
from austeer_pl.fit.gridscore import GridScorer, LayerReplay, first_layer, generic_texts, harm_kl
from austeer_pl.methods.registry import UNSTEERED


class GridScoring:
    """Validation scores of steering states, dealt to the processes (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        layout: ModelLayout,
        data: FitData,
        selection: SelectionConfig,
        collectives: Collectives,
        *,
        scoring: str,
        criterion: str,
    ) -> None:
        self.model, self.tokenizer, self.layout, self.data = model, tokenizer, layout, data
        self.selection, self.coll, self.scoring, self.criterion = selection, collectives, scoring, criterion
        self.choices: dict[str, tuple[list[int], GridChoice, float]] = {}
        #: No steering's statistics on every validation example (the learned strength's verdict reads them).
        self.unsteered: torch.Tensor | None = None
        self._generic: list = []

    @property
    def device(self) -> torch.device:
        return input_device(self.model)

    def slowest(self, seconds: float) -> float:
        """The largest of every process's ``seconds`` (a part's wall time under DDP)."""
        return float(self.coll.max(torch.tensor([seconds], dtype=torch.float64, device=self.device)).reshape(-1)[0])

    def scorer(self, replay: bool) -> GridScorer | None:
        """The log-likelihood scorer (None under generation scorings, which give right or wrong only)."""
        if self.scoring != "loglik":
            return None
        return GridScorer(
            self.model,
            self.tokenizer,
            self.layout,
            self.data.task,
            batch_size=self.data.batching.eval_batch_size,
            max_length=self.data.config.max_length,
            replay=replay,
        )

    def generic(self) -> list:
        """Ordinary text (the unsteered model's answers to generic requests) that harm is measured on."""
        if not self._generic:
            self._generic.extend(
                generic_texts(self.tokenizer, self.model, chat_template=self.data.config.chat_template)
            )
        return self._generic

    def harm(self, states: Sequence[Any], *, replay: bool) -> torch.Tensor:
        return harm_kl(self.model, self.tokenizer, self.layout, states, self.generic(), replay=replay)

    def score_batch(self, states: Sequence[Any], lo: int, hi: int, scorer: GridScorer | None) -> torch.Tensor:
        """``(len(states), hi - lo, 3)`` statistics of validation examples ``lo..hi-1`` on this process."""
        examples, prompts = self.data.splits["val"][lo:hi], self.data.val_prompts[lo:hi]
        if scorer is not None:
            return scorer.score(states, examples, prompts)
        out = torch.zeros(len(states), len(examples), 3, dtype=torch.float64)
        answers = torch.tensor([ex.answer for ex in examples])
        for j, state in enumerate(states):
            preds = predictions(
                self.model,
                self.tokenizer,
                self.data.task,
                state,
                examples,
                prompts,
                scoring=self.scoring,
                batch_size=self.data.batching.eval_batch_size,
                max_length=self.data.config.max_length,
                layout=self.layout,
            )
            out[j, :, 0] = preds.eq(answers).double()
        return out

    def dealt(self, states: Sequence[Any], lo: int, hi: int, scorer: GridScorer | None) -> torch.Tensor:
        """The statistics of ``states`` on examples ``lo..hi-1``, their batches dealt to the processes."""
        size = self.data.batching.eval_batch_size
        spans = [(b, min(b + size, hi)) for b in range(lo, hi, size)]
        local = torch.zeros(len(states), hi - lo, 3, dtype=torch.float64)
        for b, e in spans[self.coll.rank :: self.coll.world]:
            local[:, b - lo : e - lo] = self.score_batch(states, b, e, scorer)
        return self.coll.sum(local.to(self.device)).cpu()

    def choose_all(
        self, candidates: Sequence[Candidate], methods: Sequence[str]
    ) -> dict[str, tuple[list[int], GridChoice, float]]:
        """Score and choose every grid method (``candidates[0]`` is no steering, every method's candidate 0).

        No steering's reduced statistics are kept per batch span and reused when the methods' halving
        schedules cut the same spans.
        """
        sel = self.selection
        n = len(self.data.splits["val"])
        if not n:
            raise AusteerError("the validation split is empty; raise --data.val_fraction or --data.max_val_examples")
        size = self.data.batching.eval_batch_size
        scorer = self.scorer(sel.replay)
        cache: dict[tuple[int, int], torch.Tensor] = {}
        self.unsteered = torch.full((n, 3), float("nan"), dtype=torch.float64)
        for method in methods:
            idx = [0] + [i for i, c in enumerate(candidates) if c.method == method and method != UNSTEERED]
            if len(idx) == 1:  # unsteered itself, or a learned variant (trained in the next epochs)
                continue
            cands = [candidates[i] for i in idx]
            started = time.perf_counter()

            def score(sub, lo, hi, cands=cands):
                sub = list(sub)
                spans = [(b, min(b + size, hi)) for b in range(lo, hi, size)]
                reuse = 0 in sub and all(span in cache for span in spans)
                rows = [j for j in sub if not (reuse and j == 0)]
                out = torch.zeros(len(sub), hi - lo, 3, dtype=torch.float64)
                if rows:  # every process takes the same branch: the cache is built from reduced values
                    out[[sub.index(j) for j in rows]] = self.dealt([cands[j].state for j in rows], lo, hi, scorer)
                if 0 in sub:
                    for b, e in spans:
                        if reuse:
                            out[sub.index(0), b - lo : e - lo] = cache[(b, e)]
                        else:
                            cache[(b, e)] = out[sub.index(0), b - lo : e - lo].clone()
                        assert self.unsteered is not None  # allocated when the grid starts
                        self.unsteered[b:e] = cache[(b, e)]
                return out

            def harm(sub, cands=cands):
                return self.harm([cands[j].state for j in sub], replay=sel.replay)

            kwargs = {**sel.choose_kwargs(), "criterion": self.criterion}
            choice = choose(cands, n, score, harm=harm if sel.harm_budget is not None else None, **kwargs)
            self.choices[method] = (idx, choice, self.slowest(time.perf_counter() - started))
        return self.choices


class TestScoring:
    """Each method's chosen state on the test examples (``evaluate.py --compare``): every process
    scores its batches; predictions are written as positive codes into zeros, so a sum gathers them exactly.

    Under ``loglik`` scoring each batch's unsteered pass is recorded once and every fixed-strength state
    replays the layers below its first steered one (:class:`~austeer_pl.fit.gridscore.LayerReplay`: the
    same bits as a full pass); a learned gate reads the residual stream below its units, so it runs whole.
    The recording pass's time is the unsteered model's (or, without one, the first steered state's).
    """

    def __init__(
        self, model: nn.Module, tokenizer, layout: ModelLayout, data: FitData, collectives: Collectives, *, scoring: str
    ) -> None:
        self.model, self.tokenizer, self.layout, self.data, self.coll, self.scoring = (
            model,
            tokenizer,
            layout,
            data,
            collectives,
            scoring,
        )
        self.states: list[Any] = []

    def start(self, states: Sequence[Any]) -> None:
        n_test = len(self.data.splits["test"])
        if n_test == 0:
            raise AusteerError("the test split is empty; raise --max_test_examples or the test fraction")
        self.states = list(states)
        self.codes = torch.zeros(len(states), n_test, dtype=torch.int64)
        self.seconds = torch.zeros(len(states), dtype=torch.float64)

    def batch(self, indices: Sequence[int]) -> None:
        if not indices:
            return
        index = torch.tensor(list(indices))
        examples = [self.data.splits["test"][i] for i in indices]
        prompts = [self.data.test_prompts[i] for i in indices]

        def predicted(state) -> torch.Tensor:
            return predictions(
                self.model,
                self.tokenizer,
                self.data.task,
                state,
                examples,
                prompts,
                scoring=self.scoring,
                batch_size=self.data.batching.eval_batch_size,
                max_length=self.data.config.max_length,
                layout=self.layout,
            )

        steered = [s is not None and s.k > 0 for s in self.states]
        starts = [
            first_layer(s) if on and s.strength.get("kind") != "gate" else 0 for s, on in zip(self.states, steered)
        ]
        replay = LayerReplay(self.model, self.layout, max(starts)) if self.scoring == "loglik" and max(starts) else None
        base = None
        if replay is not None or not all(steered):
            started = time.perf_counter()
            with replay.recording() if replay is not None else nullcontext():
                base = predicted(None)
            owner = steered.index(False) if not all(steered) else starts.index(max(starts))
            self.seconds[owner] += time.perf_counter() - started
        for j, state in enumerate(self.states):
            if not steered[j]:
                preds = base
            else:
                started = time.perf_counter()
                with replay.replaying(starts[j]) if replay is not None else nullcontext():
                    preds = predicted(state)
                self.seconds[j] += time.perf_counter() - started
            assert preds is not None
            self.codes[j, index] = preds.long().cpu() + 2  # >= 1: a SUM over processes gathers them exactly

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(predictions per state and example, the slowest process's seconds per state)``."""
        device = input_device(self.model)
        codes = self.coll.sum(self.codes.to(device)).cpu()
        seconds = self.coll.max(self.seconds.to(device)).cpu()
        if bool(codes.eq(0).any()):
            raise AusteerError("some test examples were not scored on any process; this is a bug, please report it")
        return codes - 2, seconds


__all__ = ["GridScoring", "TestScoring"]
