"""What a fit concludes: each method's chosen point as its result and its state's metadata, the
verdict against no steering, the behaviour choice by a judge, and the learned strength's fold and
verdict. :class:`Outcomes` is the part of :class:`~austeer_pl.fit.session.FitSession` that turns
the grid's scores into results; the session provides the attributes declared here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from austeer_pl.core.momentum import MomentumAccumulator
from austeer_pl.core.sites import ModelLayout
from austeer_pl.core.state import SteeringState
from austeer_pl.errors import AusteerError
from austeer_pl.fit.choose import Candidate, MethodResult, grid_record
from austeer_pl.fit.collectives import Collectives
from austeer_pl.fit.config import FitConfig
from austeer_pl.fit.data import FitData
from austeer_pl.fit.grid import GridScoring
from austeer_pl.fit.judged import judge_grid
from austeer_pl.fit.learned import StrengthPhase
from austeer_pl.methods.registry import FITTED, UNSTEERED, get_method
from austeer_pl.scoring.statistics import paired_verdict


def _scored(accuracy: float | None) -> float:
    """The validation accuracy of a chosen candidate (scored on every example, so never missing)."""
    assert accuracy is not None
    return accuracy


class Outcomes:
    """The session's conclusions (mixed into :class:`~austeer_pl.fit.session.FitSession`)."""

    # Provided by the session.
    model: nn.Module
    tokenizer: Any
    layout: ModelLayout
    data: FitData
    config: FitConfig
    methods: tuple[str, ...]
    primary: str
    export_anyway: bool
    coll: Collectives
    candidates: list[Candidate]
    results: dict[str, MethodResult]
    state: SteeringState | None
    verdict: dict[str, Any]
    summary: dict[str, Any]
    grid: GridScoring
    strength: StrengthPhase
    _strength_base: SteeringState | None

    @property
    def accumulator(self) -> MomentumAccumulator:
        raise NotImplementedError

    @property
    def scoring(self) -> str:
        raise NotImplementedError

    @property
    def criterion(self) -> str:
        raise NotImplementedError

    def log(self, **metrics: float) -> None:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def fit_metadata(self) -> dict[str, Any]:
        sel = self.config.selection
        return {
            "n_pairs": self.accumulator.n,
            "n_val_examples": len(self.data.splits["val"]),
            "fit_seconds": self.summary.get("fit_seconds"),
            "world_size": self.coll.world,
            "scoring": self.scoring,
            "criterion": self.criterion,
            "halving": sel.halving,
            "harm_budget": sel.harm_budget,
            "verdict_level": sel.verdict_level,
            "verdict_correction": sel.verdict_correction,
        }

    def finish_grid(self) -> None:
        """Each method's chosen point becomes its result; AUSteer's becomes :attr:`state` (an empty
        state, which steers nothing, when the verdict says steering did not help, unless
        :attr:`export_anyway`)."""
        fit_meta, data_meta = self.fit_metadata(), self.data.config.absolute().to_dict()
        total_seconds = 0.0
        for method, (idx, choice, seconds) in self.grid.choices.items():
            cands = [self.candidates[i] for i in idx]
            total_seconds += seconds
            key, value, grid, verdict = grid_record(choice, cands)
            j = (
                choice.index
                if method == FITTED and not self.export_anyway
                else (choice.best if choice.best is not None else 0)
            )
            chosen = cands[j]

            def meta(
                i: int, choice=choice, key=key, value=value, grid=grid, verdict=verdict, cands=cands, method=method
            ) -> dict[str, Any]:
                return {
                    **fit_meta,
                    "val_accuracy_unsteered": choice.accuracy[0],
                    "val_accuracy": choice.accuracy[i],
                    key: value[i],
                    f"{key}_unsteered": value[0],
                    "harm_kl": choice.harm.get(i, 0.0),
                    "grid": grid,
                    "verdict": verdict,
                    **({"strength": "momentum", "site": cands[i].hyper.get("site")} if method == FITTED else {}),
                }

            if method == FITTED:
                b = choice.best if choice.best is not None else 1
                best = cands[b].state
                # The learned variants start from the best steered point (the rule alpha * m is their epoch 0).
                best.metadata = {**best.metadata, "fit": meta(b), "data": data_meta}
                self._strength_base = best
                if chosen.state is None:  # "no steering" is the choice: an empty state says so wherever it goes
                    empty = replace(
                        best,
                        **{
                            t: getattr(best, t)[:0]
                            for t in ("site_index", "layer", "unit", "momentum", "scale", "shift")
                        },
                        alpha=0.0,
                    )
                    chosen = Candidate(
                        FITTED,
                        {
                            "site": best.sites[0] if len(best.sites) == 1 else "both",
                            "k": 0,
                            "alpha": 0.0,
                            "sign": self.config.grid.sign,
                        },
                        empty,
                    )
            if chosen.state is not None:
                chosen.state.metadata = {
                    **chosen.state.metadata,
                    "fit": {**meta(j), "site": chosen.hyper.get("site")} if method == FITTED else meta(j),
                    "data": data_meta,
                }
            chosen_accuracy = _scored(choice.accuracy[j])
            self.results[method] = MethodResult(method, chosen, chosen_accuracy, grid, seconds)
            self.log(**{f"val__{method}_accuracy": chosen_accuracy})
            if method == FITTED:
                self.verdict = verdict
                self.summary.update(
                    val_accuracy_unsteered=choice.accuracy[0],
                    n_val=len(self.data.splits["val"]),
                    val_accuracy=choice.accuracy[j],
                    criterion=choice.criterion,
                    val_criterion_unsteered=choice.values[0],
                    val_criterion=choice.values[j],
                    harm_kl=choice.harm.get(j, 0.0),
                    helps=choice.helps,
                    verdict=verdict,
                    choice={**chosen.hyper, "val_accuracy": choice.accuracy[j]},
                    grid=grid,
                    grid_seconds=seconds,
                    exported="steered" if chosen.state.k else "no steering",
                )
        if self.grid.choices or self.data.splits["val"]:
            if self.grid.choices:
                acc0 = _scored(next(iter(self.grid.choices.values()))[1].accuracy[0])
            else:  # no grid method (a comparison of baselines only): score no steering on its own
                scorer = self.grid.scorer(False)
                acc0 = _scored(float(self.grid.dealt([None], 0, len(self.data.splits["val"]), scorer)[0, :, 0].mean()))
            self.results = {
                UNSTEERED: MethodResult(
                    UNSTEERED, self.candidates[0], acc0, [{"n_steered_activations": 0, "val_accuracy": acc0}]
                ),
                **self.results,
            }
            self.log(val__unsteered_accuracy=acc0)
        self.summary.update(val_total_seconds=total_seconds)
        austeer = self.results.get(FITTED)
        if austeer is None:  # a comparison without AUSteer
            return
        self.state = austeer.chosen.state
        self.log(
            val__accuracy_unsteered=self.summary["val_accuracy_unsteered"],
            val__accuracy=austeer.val_accuracy,
            val__k=austeer.chosen.hyper["k"],
            val__alpha=austeer.chosen.hyper["alpha"],
            val__helps=self.verdict["helps"],
            val__criterion_gain=self.verdict["criterion_gain"],
            val__harm_kl=self.summary["harm_kl"],
        )

    def judged_choice(self) -> None:
        """A behaviour fit: AUSteer's grid chosen by a judge of generated text under the fluency budget."""
        if any(m != FITTED and not get_method(m).learned for m in self.methods if m != UNSTEERED):
            raise AusteerError(
                "--compare chooses by accuracy; fit behaviour states with train.py (--model.selection judge)"
            )
        cfg = self.config.judge
        out = judge_grid(
            self.model, self.tokenizer, self.layout, self.data, [c for c in self.candidates if c.method == FITTED], cfg
        )
        chosen, record, base = out.chosen, out.record, out.unsteered
        chosen.state.metadata = {
            **chosen.state.metadata,
            "fit": {
                "strength": "momentum",
                "site": chosen.hyper["site"],
                "selection": "judge",
                "judge": cfg.judge,
                "fluency_budget": cfg.fluency_budget,
                "n_pairs": self.accumulator.n,
                "n_val_prompts": out.n_prompts,
                "val_share_positive_unsteered": base["share_positive"],
                "val_share_positive": record["share_positive"],
                "val_perplexity_ratio": record["perplexity_ratio"],
                "beats_unsteered": out.beats_unsteered,
                "grid": out.grid,
                "fit_seconds": self.summary.get("fit_seconds"),
                "world_size": self.coll.world,
            },
            "data": self.data.config.absolute().to_dict(),
        }
        self.results = {FITTED: MethodResult(FITTED, chosen, record["share_positive"], out.grid)}
        self.state = chosen.state
        self.summary.update(
            val_accuracy_unsteered=base["share_positive"],
            val_accuracy=record["share_positive"],
            selection="judge",
            beats_unsteered=out.beats_unsteered,
            perplexity_ratio=record["perplexity_ratio"],
            n_val=out.n_prompts,
            choice={**chosen.hyper, "share_positive": record["share_positive"]},
            grid=out.grid,
        )
        self.log(
            val__share_positive_unsteered=base["share_positive"],
            val__share_positive=record["share_positive"],
            val__perplexity_ratio=record["perplexity_ratio"],
        )

    # -- the learned strength's fold and verdict
    def finish(self) -> None:
        """Fold each learned strength's best weights into its state; the primary one becomes :attr:`state`
        if it, too, beats no steering beyond the noise within the harm budget (or ``export_anyway``)."""
        folded = self.strength.fold()
        if not folded:
            return
        base = self.results[FITTED]
        for method, (learned, trainer, local_seconds) in folded.items():
            seconds = self.grid.slowest(local_seconds)
            hyper = {**base.chosen.hyper, "strength": trainer.kind, "best_epoch": trainer.best["epoch"]}
            self.results[method] = MethodResult(
                method,
                Candidate(method, hyper, learned),
                trainer.best["val_accuracy"],
                trainer.history,
                base.tuning_seconds + seconds,
                training_seconds=seconds,
            )
            if method != self.primary:
                continue
            verdict = self.learned_verdict(learned, epochs=len(trainer.history) - 1)
            if verdict is not None:
                learned.metadata = {
                    **learned.metadata,
                    "fit": {**learned.metadata.get("fit", {}), "learned_verdict": verdict},
                }
                self.summary["learned_verdict"] = verdict
                self.log(val__learned_helps=verdict["helps"], val__learned_criterion_gain=verdict["gain"])
            if verdict is None or verdict["helps"] or self.export_anyway:
                self.state = learned
                self.summary["val_accuracy"] = trainer.best["val_accuracy"]
                self.summary["exported"] = "steered"
                if verdict is not None and "harm_kl" in verdict:
                    self.summary["harm_kl"] = verdict["harm_kl"]  # the exported state's
            elif self.state is not None:  # the grid's choice stays the export, and says why the learned strength is not
                self.state.metadata = {
                    **self.state.metadata,
                    "fit": {**self.state.metadata.get("fit", {}), "learned_verdict": verdict},
                }

    def learned_verdict(self, learned: SteeringState, epochs: int = 1) -> dict[str, Any] | None:
        """The grid's verdict, applied to the learned strength, with one more comparison per trained
        epoch (the best epoch was picked on the same examples), and the harm budget. None for a
        judged (behaviour) fit."""
        sel = self.config.selection
        grid = self.grid.choices.get(FITTED)
        if grid is None or self.grid.unsteered is None:
            return None
        _, choice, _ = grid
        # Plain scoring (no replay): a gate reads the residual stream, possibly below the first steered layer.
        stats = self.grid.dealt([learned], 0, len(self.data.splits["val"]), self.grid.scorer(replay=False))[0]
        grid_tests = (
            sum(1 for c in self.candidates if c.method == FITTED)
            if sel.verdict_correction == "grid"
            else (choice.rounds[-1]["candidates"] if choice.rounds else 1)
        )
        verdict = paired_verdict(
            stats,
            self.grid.unsteered,
            self.criterion,
            level=sel.verdict_level,
            tests=grid_tests + max(1, epochs),
            what="the learned strength",
        )
        if sel.harm_budget is not None:
            local = self.grid.harm([learned], replay=False).to(torch.float64)
            verdict["harm_kl"] = float(
                self.coll.max(local.to(self.device)).reshape(-1)[0]
            )  # one value on every process
            if verdict["helps"] and verdict["harm_kl"] > sel.harm_budget:
                verdict.update(
                    helps=False,
                    reason=f"the learned strength's KL on ordinary text {verdict['harm_kl']:.3f} is above the harm budget {sel.harm_budget:g}",
                )
        verdict["val_accuracy"] = float(stats[:, 0].mean())
        return verdict


__all__ = ["Outcomes"]
