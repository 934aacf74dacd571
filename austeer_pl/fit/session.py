"""The plain fit session: pass -> rank -> candidates -> choose -> strength epochs -> verdicts -> state.

:class:`FitSession` is the whole fit without Lightning. Every step that crosses processes goes
through a :class:`~austeer_pl.fit.collectives.Collectives` (rank, world size, sum, max), so the
session gives the same result on one process or many, driven by a plain loop (:meth:`FitSession.run`)
or by Lightning's hooks (:mod:`austeer_pl.lightning.module` turns each hook into one call here).
``evaluate.py --compare`` is the same session with more methods and a test step.

Example:
    >>> data = FitData(DataConfig(), BatchConfig()).prepare(tokenizer)
    >>> session = FitSession(model, tokenizer, layout, data, FitConfig())
    >>> state = session.run()
    >>> state.save_pretrained("runs/rt/state")
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from austeer_pl.core.models import model_name_of
from austeer_pl.core.pairs import read_pair_batch
from austeer_pl.core.placement import input_device
from austeer_pl.core.sites import SITES, ModelLayout
from austeer_pl.core.state import SteeringState
from austeer_pl.errors import AusteerError
from austeer_pl.fit.choose import Candidate, MethodResult
from austeer_pl.fit.collectives import ONE_PROCESS, Collectives
from austeer_pl.fit.config import FitConfig
from austeer_pl.fit.data import FitData
from austeer_pl.fit.grid import GridScoring, TestScoring
from austeer_pl.fit.learned import StrengthPhase
from austeer_pl.fit.outcome import Outcomes
from austeer_pl.fit.statistics import PassStatistics, rank_site_options
from austeer_pl.methods import (
    FITTED,
    METHODS,
    UNSTEERED,
    FitContext,
    build_state,
    get_method,
    needs,
)
from austeer_pl.methods.probes import ProbeAccuracy, fit_probes
from austeer_pl.scoring.evaluate import default_scoring


class FitSession(Outcomes):
    """One fit of a frozen model on one task's pairs (see the module docstring).

    Args:
        model, tokenizer, layout: the frozen base model, its tokenizer and located units.
        data: the task's pairs and examples, prepared for ``tokenizer``.
        config: the fit's settings.
        methods: the registered methods to fit (default: AUSteer, and its learned variant when
            ``config.strength`` asks for one); ``unsteered`` is always a candidate.
        grids: grids that replace methods' default grids (AUSteer's is ``config.grid``).
        primary: the method whose chosen state is :attr:`state` (the export).
        export_anyway: export the best steered point even when the verdict says it does not help.
        collectives: the processes of the fit.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        layout: ModelLayout,
        data: FitData,
        config: FitConfig | None = None,
        *,
        methods: Sequence[str] | None = None,
        grids: Mapping[str, Any] | None = None,
        primary: str | None = None,
        export_anyway: bool = False,
        collectives: Collectives = ONE_PROCESS,
    ) -> None:
        self.model, self.tokenizer, self.layout, self.data = model, tokenizer, layout, data
        self.config = config or FitConfig()
        learned = self.config.strength.learned
        methods = (UNSTEERED, FITTED, *([learned] if learned else [])) if methods is None else tuple(methods)
        wanted = set(methods) | {
            get_method(m).starts_from for m in methods if get_method(m).starts_from
        }  # learned variants start from it
        self.methods = (UNSTEERED, *[m for m in METHODS if m in wanted and m != UNSTEERED])
        # Every grid method's grid: the registry's default, replaced by ``grids``; AUSteer's is the settings'.
        self.grids = {
            **{k: v for k, v in dict(grids or {}).items() if k in METHODS},
            FITTED: self.config.grid.as_grid(sign=True),
        }
        self.primary = primary or learned or FITTED
        self.export_anyway = export_anyway
        self.coll = collectives
        sites = {s for _, group in self.config.grid.site_options for s in group}
        sites |= {s for m in self.methods if m != FITTED for s in get_method(m).read_sites}
        self.read_sites = tuple(s for s in SITES if s in sites)
        for site in self.read_sites:
            layout.site(site)
        self.stats = PassStatistics.create(layout, self.read_sites, head_moments="head_moments" in needs(self.methods))
        self.batches_done, self.n_tokens = 0, 0
        self.rankings: dict[str, Any] = {}
        self.candidates: list[Candidate] = []
        self.results: dict[str, MethodResult] = {}
        self.state: SteeringState | None = None
        self.verdict: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self.timing: dict[str, float] = {}
        self.logs: list[tuple[str, float]] = []  # metrics to log, oldest first; a driver takes them
        self.probe_accuracy: ProbeAccuracy | None = None
        self.grid = GridScoring(
            model,
            tokenizer,
            layout,
            data,
            self.config.selection,
            collectives,
            scoring=self.scoring,
            criterion=self.criterion,
        )
        self.strength = StrengthPhase(model, tokenizer, layout, data, self.config.strength, collectives)
        self._strength_base: SteeringState | None = None
        self._readers: dict = {}
        self._started = 0.0

    @property
    def device(self) -> torch.device:
        return input_device(self.model)

    @property
    def accumulator(self):
        return self.stats.accumulator

    @property
    def scoring(self) -> str:
        """The validation scoring: the setting, else the task's default."""
        return self.config.selection.scoring or default_scoring(self.data.loaded_task)

    @property
    def criterion(self) -> str:
        """The grid's validation criterion: the setting, or accuracy under generation scorings."""
        return self.config.selection.criterion if self.scoring == "loglik" else "accuracy"

    def log(self, **metrics: float) -> None:
        self.logs.extend((name.replace("__", "/"), float(value)) for name, value in metrics.items())

    def take_logs(self) -> list[tuple[str, float]]:
        """The metrics to log since the last call (the strength phase's too), oldest first."""
        out, self.logs, self.strength.logs = self.logs + self.strength.logs, [], []
        return out

    # -- the pass
    def start(self) -> None:
        self._started = time.perf_counter()
        self.model.eval()
        self.stats.to(self.device)

    def read_pairs(self, batch: dict[str, Any], sites: Sequence[str] | None = None):
        return read_pair_batch(self.model, self.layout, batch, tuple(sites or self.read_sites), readers=self._readers)

    def read(self, batch: dict[str, Any]) -> None:
        """Count one collated batch of pairs (an empty one too: every process takes every step)."""
        if batch["n_pairs"]:
            self.stats.update(*self.read_pairs(batch))
            self.n_tokens += batch["n_tokens"]
        self.batches_done += 1

    def finish_pass(self) -> None:
        """Sum the statistics across processes and rank the units (once)."""
        if self.rankings:
            return
        self.stats.reduce_(self.coll.sum)
        grid = self.config.grid
        self.rankings = rank_site_options(self.accumulator, grid.site_options, grid.sign, max(grid.k_values))
        tokens = self.coll.sum(torch.tensor([self.n_tokens], dtype=torch.int64, device=self.device))
        self.summary.update(
            fit_tokens=int(tokens), fit_seconds=time.perf_counter() - self._started, n_pairs=self.accumulator.n
        )
        self.log(
            fit__n_pairs=self.accumulator.n,
            fit__seconds=self.summary["fit_seconds"],
            fit__tokens=self.summary["fit_tokens"],
        )

    # -- the candidates and the choice
    def fit_context(self, metadata: Mapping[str, Any] | None = None) -> FitContext:
        return FitContext(
            layout=self.layout,
            acc=self.accumulator,
            moments=self.stats.head_moments,
            probe_accuracy=self.probe_accuracy,
            rankings=self.rankings,
            base_model=model_name_of(self.model),
            token_scope=self.config.grid.token_scope,
            sign=self.config.grid.sign,
            layout_spec=self.config.model.layout_spec(),
            metadata=dict(metadata or {}),
        )

    def build_candidates(self) -> list[Candidate]:
        """Unsteered first, then every grid point of every grid method (states built once)."""
        ctx = self.fit_context({"data": self.data.config.absolute().to_dict()})
        out = [Candidate(UNSTEERED, {}, None)]
        for method in self.methods:
            if get_method(method).points is not None:
                for hyper in get_method(method).grid_points(self.layout, self.grids.get(method)):
                    out.append(Candidate(method, dict(hyper), build_state(method, ctx, **hyper)))
        return out

    def by_judge(self) -> bool:
        """Whether the grid is chosen by a judge of generated text (behaviour tasks)."""
        selection = self.config.selection.selection
        return bool(self.data.loaded_task.behaviour) if selection == "auto" else selection == "judge"

    def choose(self) -> None:
        """Score every candidate on validation and choose (ITI's probe pass first, when asked for)."""
        self.finish_pass()
        if self.candidates:
            return
        if "probe_accuracy" in needs(self.methods):
            started = time.perf_counter()
            assert self.stats.head_moments is not None  # collected because a method needs it
            self.probe_accuracy = ProbeAccuracy(fit_probes(self.stats.head_moments))
            with torch.inference_mode():
                for batch in self.data.val_pair_batches(self.coll.rank, self.coll.world):
                    if batch["n_pairs"]:
                        pos, neg = self.read_pairs(batch, ["attention"])
                        self.probe_accuracy.update(pos["attention"], neg["attention"])
            self.probe_accuracy.reduce_(self.coll.sum)
            self.timing["probe_pass"] = self.grid.slowest(time.perf_counter() - started)
        self.candidates = self.build_candidates()
        if self.by_judge():
            self.judged_choice()
        else:
            self.grid.choose_all(self.candidates, self.methods)
            self.finish_grid()
        self.strength.start(
            self.methods,
            self._strength_base or self.state,
            primary=self.primary,
            scoring=self.scoring,
            criterion=self.criterion,
        )

    # -- test (evaluate.py --compare): each method's chosen state on the same examples
    def start_test(self) -> None:
        if not self.results:
            raise AusteerError("nothing to test: the validation grid did not run (is the validation split empty?)")
        self.testing = TestScoring(self.model, self.tokenizer, self.layout, self.data, self.coll, scoring=self.scoring)
        self.testing.start([self.results[m].chosen.state for m in self.methods])

    def test_batch(self, indices: Sequence[int]) -> None:
        self.testing.batch(indices)

    def finish_test(self) -> None:
        codes, seconds = self.testing.finish()
        for j, method in enumerate(self.methods):
            self.results[method].test_predictions = codes[j]
            self.results[method].test_seconds = float(seconds[j])

    # -- a pass checkpoint (resume)
    def pass_checkpoint(self) -> dict[str, Any]:
        """The pass's statistics for a checkpoint; mid-pass, their sum over processes (a collective)."""
        return {
            **self.stats.checkpoint(self.coll, reduced=bool(self.rankings)),
            "batches_done": self.batches_done,
            "n_tokens": self.n_tokens,
            "phase": "strength" if self.strength.trainers else "momentum",
        }

    def restore_pass(self, saved: Mapping[str, Any]) -> None:
        self.stats.restore(saved, self.coll, self.device)
        # A pass that had finished is not re-read, whatever the sharding now.
        self.batches_done = int(saved["batches_done"]) if not saved["reduced"] else 1 << 62
        self.n_tokens = int(saved.get("n_tokens", 0)) if self.coll.rank == 0 else 0

    # -- the whole fit in a plain loop
    def run(self, *, test: bool = False) -> SteeringState | None:
        """Pass, choice, strength epochs and verdicts (and the test, with ``test``); returns :attr:`state`."""
        rank, world = self.coll.rank, self.coll.world
        self.start()
        for indices in self.data.pair_batches(rank, world):
            self.read(self.data.collate_pairs([self.data.pairs[i] for i in indices]))
        self.choose()
        for epoch in itertools.count(1):
            if not self.strength.running:
                break
            for items in self.data.strength_batches(epoch, rank, world):
                self.strength.step(self.data.collate_examples_train(items))
            self.strength.start_validation()
            for indices in self.data.example_batches("val", rank, world):
                self.strength.validate(indices)
            self.strength.end_epoch(epoch)
        self.finish()
        if test:
            self.start_test()
            for indices in self.data.example_batches("test", rank, world):
                self.test_batch(indices)
            self.finish_test()
        return self.state


__all__ = ["FitSession", "MethodResult"]
