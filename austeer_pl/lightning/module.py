"""The Lightning adapter: one frozen pass, the validation grid, the strength trainers, export.

Fitting is one pass over the training pairs (no optimiser): each process reads its own,
unrepeated share of the pairs and counts momentum; the counts are summed across processes at
the end of the pass, so N processes give exactly the counts of one. Then every grid point of
every method is scored on the validation split and the best becomes the exported steering state;
learned strengths train in the epochs after. The work itself is :mod:`austeer_pl.fit.engine`'s (the
same engine ``analyze.py`` drives without Lightning); this module calls it from Lightning hooks,
reduces across processes through Lightning's strategy and torchmetrics, checkpoints the
statistics and resumes them. The frozen LLM is held outside the module's parameters, so
checkpoints carry only the statistics and the selection.

Why one module of this size: the hooks of one LightningModule (pass, grid, strength epochs, test, checkpoints) must sit in one class; the work they call is in :mod:`austeer_pl.fit.engine`.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import replace
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn

from austeer_pl.methods.iti import ProbeAccuracy, fit_probes
from austeer_pl.lightning.datamodule import ContrastivePairDataModule, EncodedPair, ResumableLoader, shard_batches
from austeer_pl.fit.engine import CRITERIA, VALIDATION_SUMS, Candidate, PassStatistics, StrengthTrainer, choose, paired_verdict, predictions, rank_site_options, read_pair_batch
from austeer_pl.fit.gridscore import GridScorer, generic_texts, harm_kl
from austeer_pl.errors import AusteerError
from austeer_pl.scoring.evaluate import check_scoring, default_scoring
from austeer_pl.core.hooks import TOKEN_SCOPES
from austeer_pl.methods.registry import METHODS, FitContext, build_state, get_method, needs
from austeer_pl.core.models import DEFAULT_MODEL, load_model, model_name_of
from austeer_pl.core.momentum import MomentumAccumulator
from austeer_pl.core.selection import SIGN_POLICIES, Selection
from austeer_pl.core.sites import SITES, LayoutSpec, ModelLayout, locate_units
from austeer_pl.core.state import SteeringState
from austeer_pl.cli.runtime import jsonable
from austeer_pl.core.strength import STRENGTH_KINDS, STRENGTH_LOSSES

# The strategy, the pass checkpoint, the resume check and the site options live in pipeline.py.
from austeer_pl.lightning.strategy import (
    SITE_OPTIONS,
    FrozenDDPStrategy,
    PassCheckpoint,
    _as_list,
    check_resume,
    frozen_trainer,
    make_strategy,
    parse_sites,
    pass_settings,
)

#: How the grid is chosen: by validation accuracy, or by a judge of generated text under a fluency
#: budget (behaviour tasks); ``auto`` follows the task.
SELECTIONS = ("auto", "accuracy", "judge")

#: The default validation grid (both sites, k and alpha on log scales) and how it is chosen; the
#: regret table of ``benchmarks/selection.py`` (``benchmarks/README.md``) is why.
DEFAULT_GRID = {"site": ["attention", "ffn"], "k": [3, 10, 30, 100], "alpha": [4.0, 8.0, 16.0]}
DEFAULT_SELECTION = {"criterion": "loss", "halving": True, "min_examples": 16, "eta": 3, "harm_budget": 0.5, "level": 0.05, "correction": "final"}


class ReducedTensor(torchmetrics.Metric):
    """A tensor summed (or maxed) over processes: torchmetrics keeps it and syncs it on ``compute``.

    Integer counts (right answers per grid point, test predictions) stay integers, so N processes
    give exactly the sums of one.
    """

    full_state_update = False

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, reduce: str = "sum") -> None:
        super().__init__()
        self.add_state("value", default=torch.zeros(shape, dtype=dtype), dist_reduce_fx=reduce)

    def update(self, value: torch.Tensor) -> None:
        self.value += value.to(self.value.dtype)

    def compute(self) -> torch.Tensor:
        return self.value


@dataclass
class MethodResult:
    """A method's validation grid, its chosen point and (after testing) its test predictions."""

    method: str
    chosen: Candidate
    val_accuracy: float
    grid: list[dict[str, Any]] = field(default_factory=list)
    tuning_seconds: float = 0.0
    training_seconds: float = 0.0
    test_predictions: torch.Tensor | None = None
    test_seconds: float = 0.0


class AUSteerModule(pl.LightningModule):
    """A frozen causal LM, its momentum pass over contrastive pairs, the validation grid and the
    learned-strength phase, as Lightning hooks around :mod:`austeer_pl.fit.engine`.

    ``train.py`` fits AUSteer (and ``--model.strength``'s learned variant); ``evaluate.py
    --compare`` calls :meth:`use_methods` to fit every registered method in the same run.

    Args:
        model_name: ``smollm2-135m-instruct`` (embedded), a hub id, a local folder or a ``.gguf`` file.
        dtype: ``float32``, ``bfloat16``, ``float16`` or None (the checkpoint's).
        site: ``attention``, ``ffn``, ``both``, ``residual`` (the decoder layer output, which the paper code also steers), or a list of them to choose from on validation.
        k: number of units, or a list to choose from on validation.
        alpha: strength, or a list to choose from on validation.
        sign: ``promote`` (only m > 0) or ``both``.
        token_scope: ``all``, ``prompt`` or ``generated`` (recorded in the state).
        strength: ``momentum`` (the paper's rule ``alpha * m``), or a learned ``scalar`` per unit or
            input-conditioned ``gate``, trained after selection (see :mod:`austeer_pl.core.strength`).
        strength_epochs: epochs of the learned-strength phase (early-stopped on validation accuracy).
        strength_lr: Adam learning rate of the strength parameters.
        strength_loss: ``nll`` (the right answer's negative log-likelihood) or ``choice`` (the
            logistic loss of right vs. wrong answer, the decision log-likelihood scoring makes).
        kl_weight: weight of KL(unsteered || steered) of the next-token distribution at the answer position.
        patience: validation epochs without improvement before the strength phase stops.
        gate_layer: decoder layer whose input the gate reads (default: the first steered layer).
        gate_width: hidden width of the gate.
        scoring: validation scoring, ``loglik`` or ``generate`` (None: the task's default).
        cache_dir: cache of the converted embedded model.
        layout_layers, layout_attention, layout_ffn: module paths for models austeer-pl does not know.
        selection: ``accuracy`` (validation accuracy), ``judge`` (behaviour: the judge score of greedy
            generations from validation prompts, among grid points whose perplexity under the
            unsteered model is at most ``fluency_budget`` x the unsteered one's) or ``auto`` (``judge``
            for behaviour tasks such as ``sentiment``).
        judge: ``vader``, ``vader:negative`` or a local classifier folder (see :mod:`austeer_pl.scoring.judges`).
        fluency_budget: the largest perplexity ratio a chosen behaviour state may have (default 1.5).
        max_new_tokens: tokens generated per validation prompt when judging.
        max_judge_prompts: distinct validation prompts generated from when judging.
        criterion: what the grid is chosen by on validation: ``loss`` (the mean choice log-loss,
            ``logsumexp(choices) - log p(right)``; the default), ``margin`` (right minus best wrong
            log-likelihood) or ``accuracy``; accuracy is always reported beside it. Generation
            scorings use accuracy.
        halving: successive halving: every grid point on the first ``halving_min_examples``
            validation examples, the best ``1/halving_eta`` on ``halving_eta`` times as many, ...
            until two remain, which see all; false scores every point on every example.
        harm_budget: the largest mean per-token KL (nats) to the unsteered next-token distribution
            on ordinary text (the model's own answers to generic requests) a grid point may have;
            points above it are not candidates. None: no bound.
        verdict_level: the verdict's one-sided level, Bonferroni-corrected over the grid: the best
            point must beat "no steering" by more than that noise, or the fit exports an empty state
            (``train.py --export_anyway`` exports the best point regardless). 1 turns the verdict off.
        verdict_correction: ``final`` (the default) divides the level by the number of points that
            reach halving's last round; ``grid`` by the whole grid (Bonferroni, stricter). The regret
            table of ``benchmarks/selection.py`` chose ``final``.
        replay: score grid points from the unsteered model's recorded layers below their first
            steered layer (exact; about half the work for AUSteer's upper-layer units).
    """

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        dtype: str | None = None,
        site: str | list[str] = ["attention", "ffn"],  # noqa: B006 - jsonargparse needs a literal default (DEFAULT_GRID)
        k: int | list[int] = [3, 10, 30, 100],  # noqa: B006
        alpha: float | list[float] = [4.0, 8.0, 16.0],  # noqa: B006
        sign: str = "promote",
        token_scope: str = "all",
        strength: str = "momentum",
        strength_epochs: int = 3,
        strength_lr: float = 0.01,
        strength_loss: str = "nll",
        kl_weight: float = 1.0,
        patience: int = 2,
        gate_layer: int | None = None,
        gate_width: int = 16,
        scoring: str | None = None,
        cache_dir: str | None = None,
        layout_layers: str | None = None,
        layout_attention: str | None = None,
        layout_ffn: str | None = None,
        selection: str = "auto",
        judge: str = "vader",
        fluency_budget: float = 1.5,
        max_new_tokens: int = 32,
        max_judge_prompts: int = 32,
        criterion: str = "loss",
        halving: bool = True,
        halving_min_examples: int = 16,
        halving_eta: int = 3,
        harm_budget: float | None = 0.5,
        verdict_level: float = 0.05,
        verdict_correction: str = "final",
        replay: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.site_options = parse_sites(site)
        self.k_grid = _as_list(k, "k", int)
        self.alpha_grid = _as_list(alpha, "alpha", float)
        if sign not in SIGN_POLICIES:
            raise AusteerError(f"unknown sign policy '{sign}'; choose promote or both")
        if token_scope not in TOKEN_SCOPES:
            raise AusteerError(f"unknown token scope '{token_scope}'; choose one of {', '.join(TOKEN_SCOPES)}")
        if strength not in STRENGTH_KINDS:
            raise AusteerError(f"unknown strength function '{strength}'; choose one of {', '.join(STRENGTH_KINDS)}")
        if strength_loss not in STRENGTH_LOSSES:
            raise AusteerError(f"unknown strength loss '{strength_loss}'; choose one of {', '.join(STRENGTH_LOSSES)}")
        if strength_epochs < 0 or strength_lr <= 0 or kl_weight < 0 or patience < 1 or gate_width < 1:
            raise AusteerError("strength_epochs >= 0, strength_lr > 0, kl_weight >= 0, patience >= 1 and gate_width >= 1 are required")
        if scoring is not None:
            check_scoring(scoring)
        if selection not in SELECTIONS:
            raise AusteerError(f"--model.selection must be one of {', '.join(SELECTIONS)}, not '{selection}'")
        if not math.isfinite(fluency_budget) or fluency_budget <= 0 or max_new_tokens < 1 or max_judge_prompts < 1:
            raise AusteerError("--model.fluency_budget > 0 (a perplexity ratio), --model.max_new_tokens >= 1 and --model.max_judge_prompts >= 1 are required")
        if criterion not in CRITERIA:
            raise AusteerError(f"--model.criterion must be one of {', '.join(CRITERIA)}, not '{criterion}'")
        if halving_min_examples < 1 or halving_eta < 2:
            raise AusteerError("--model.halving_min_examples >= 1 and --model.halving_eta >= 2 are required")
        if harm_budget is not None and (not math.isfinite(harm_budget) or harm_budget <= 0):
            raise AusteerError(f"--model.harm_budget must be a positive KL in nats per token (or null for no bound), not {harm_budget}")
        if verdict_correction not in ("final", "grid"):
            raise AusteerError(f"--model.verdict_correction must be final or grid, not '{verdict_correction}'")
        if not math.isfinite(verdict_level) or not 0 < verdict_level <= 1:
            raise AusteerError(f"--model.verdict_level must be in (0, 1] (1 turns the verdict off), not {verdict_level}")
        self.export_dir: Path | None = None
        #: Export the best steered grid point even when the verdict says steering did not help (``train.py --export_anyway``).
        self.export_anyway = False
        #: Replace a steering state already at :attr:`export_dir` (``train.py --overwrite``).
        self.overwrite = False
        self.verdict: dict[str, Any] = {}
        self.batches_done = 0
        self.stats: PassStatistics | None = None
        self.rankings: dict[str, Selection] = {}
        self.state: SteeringState | None = None
        self.summary: dict[str, Any] = {}
        self.candidates: list[Candidate] = []
        self.results: dict[str, MethodResult] = {}
        self.trainers: dict[str, StrengthTrainer] = {}
        self.timing: dict[str, float] = {}
        self._pending: dict[str, Any] | None = None
        self._fit_started = 0.0
        self._n_tokens = 0
        self._readers: dict = {}
        self._metrics: dict[str, ReducedTensor] = {}
        learned = f"austeer_{strength}" if strength != "momentum" and strength_epochs > 0 else None
        self.use_methods(("unsteered", "austeer", *([learned] if learned else [])), primary=learned or "austeer")
        # The frozen LLM is deliberately not a registered submodule (see `llm`).
        self.__dict__["_llm"] = None
        self.__dict__["_tokenizer"] = None
        self.__dict__["_layout"] = None

    def use_methods(self, methods: Sequence[str], grids: Mapping[str, Any] | None = None, *, primary: str = "austeer") -> AUSteerModule:
        """Fit, tune (and test) these registered methods in the same run (``evaluate.py --compare``).

        ``grids`` replaces methods' default grids; AUSteer's grid is the module's ``site``, ``k``,
        ``alpha``. ``primary`` is the method whose chosen state becomes :attr:`state` (the export).
        """
        for m in methods:
            get_method(m)
        wanted = set(methods) | ({"austeer"} if any(get_method(m).learned for m in methods) else set())  # learned variants start from it
        self.methods = ("unsteered", *[m for m in METHODS if m in wanted and m != "unsteered"])
        self.grids = {k: v for k, v in dict(grids or {}).items() if k in METHODS and k != "austeer"}
        self.primary = primary
        sites = {s for _, group in self.site_options for s in group}
        sites |= {s for m in self.methods if m != "austeer" for s in get_method(m).read_sites}
        self.read_sites = tuple(s for s in SITES if s in sites)
        return self

    # -- the frozen model, outside parameters and state_dict
    def _load(self) -> None:
        if self._llm is None:
            hp = self.hparams
            model, tokenizer = load_model(hp.model_name, dtype=hp.dtype, cache_dir=hp.cache_dir)
            self.__dict__["_llm"] = model.to(self.device)
            self.__dict__["_tokenizer"] = tokenizer
            spec = LayoutSpec(**self.layout_spec()) if self.layout_spec() else None
            self.__dict__["_layout"] = locate_units(model, spec)

    @property
    def llm(self) -> nn.Module:
        """The frozen base model. Not a submodule, so it is never checkpointed, wrapped or trained."""
        self._load()
        return self._llm

    @property
    def tokenizer(self):
        self._load()
        return self._tokenizer

    @property
    def layout(self) -> ModelLayout:
        self._load()
        return self._layout

    def layout_spec(self) -> dict[str, str | None] | None:
        """The ``--model.layout_*`` module paths, recorded in exported states (None: located automatically)."""
        hp = self.hparams
        if not hp.layout_layers:
            return None
        return {"layers": hp.layout_layers, "attention": hp.layout_attention, "ffn": hp.layout_ffn}

    def _apply(self, fn, *args, **kwargs):
        # Device and dtype moves of the module apply to the frozen model too.
        super()._apply(fn, *args, **kwargs)
        if self.__dict__.get("_llm") is not None:
            self._llm._apply(fn, *args, **kwargs)
        return self

    def attach(self, model: nn.Module, tokenizer, layout: ModelLayout | None = None) -> AUSteerModule:
        """Use an already loaded model (tests, notebooks) instead of loading ``model_name``."""
        self.__dict__["_llm"] = model.requires_grad_(False).eval()
        self.__dict__["_tokenizer"] = tokenizer
        self.__dict__["_layout"] = layout or locate_units(model)
        self._readers = {}
        return self

    # -- reductions: Lightning's (a no-op on one process)
    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._trainer is None:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    def _reduced(self, name: str, local: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """``local`` summed (or maxed) over processes through a torchmetrics metric."""
        metric = ReducedTensor(tuple(local.shape), local.dtype, reduce).to(self.device)
        metric.update(local.to(self.device))
        out = metric.compute().cpu()
        self._metrics[name] = metric
        return out

    @property
    def accumulator(self) -> MomentumAccumulator | None:
        return None if self.stats is None else self.stats.accumulator

    # -- the momentum pass
    def setup(self, stage: str) -> None:
        for site in self.read_sites:
            self.layout.site(site)
        if self.stats is None:
            self.stats = PassStatistics.create(self.layout, self.read_sites, head_moments="head_moments" in needs(self.methods))

    def configure_optimizers(self):
        return None

    def on_train_start(self) -> None:
        self._fit_started = time.perf_counter()
        self.llm.eval()
        self.stats.to(self.device)
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.current_epoch > 0:
            return self.strength_step(batch)
        if batch["n_pairs"]:
            self.stats.update(*read_pair_batch(self.llm, self.layout, batch, self.read_sites, readers=self._readers))
            self._n_tokens += batch["n_tokens"]
        self.batches_done += 1
        return None

    def read_pair_batch(self, batch: dict[str, Any], sites: Sequence[str] | None = None):
        return read_pair_batch(self.llm, self.layout, batch, tuple(sites or self.read_sites), readers=self._readers)

    def finish_pass(self) -> None:
        """Sum the statistics across processes and rank the units (once, at the end of the pass)."""
        if self.rankings:
            return
        self.stats.reduce_(self._sum)
        self.rankings = rank_site_options(self.stats.accumulator, self.site_options, self.hparams.sign, max(self.k_grid))
        tokens = self._sum(torch.tensor([self._n_tokens], dtype=torch.int64, device=self.device))
        self.summary["fit_tokens"] = int(tokens)
        self.summary["fit_seconds"] = time.perf_counter() - self._fit_started
        self.summary["n_pairs"] = self.accumulator.n

    def on_train_epoch_end(self) -> None:
        if self.current_epoch > 0:
            return
        self.finish_pass()
        self.log("fit/n_pairs", float(self.accumulator.n), rank_zero_only=True)
        self.log("fit/seconds", float(self.summary["fit_seconds"]), rank_zero_only=True)
        self.log("fit/tokens", float(self.summary["fit_tokens"]), rank_zero_only=True)

    # -- the validation grid (epoch 0) and the strength trainers' validation (epochs 1..)
    def grid(self) -> list[tuple[str, int, float]]:
        return [(name, k, alpha) for name, _ in self.site_options for k in self.k_grid for alpha in self.alpha_grid]

    def fit_context(self, metadata: Mapping[str, Any] | None = None) -> FitContext:
        return FitContext(
            layout=self.layout, acc=self.accumulator, moments=self.stats.head_moments if self.stats else None,
            probe_accuracy=getattr(self, "probe_accuracy", None), rankings=self.rankings, base_model=model_name_of(self.llm),
            token_scope=self.hparams.token_scope, sign=self.hparams.sign, layout_spec=self.layout_spec(), metadata=dict(metadata or {}),
        )

    def make_state(self, site_option: str, k: int, alpha: float, metadata: dict[str, Any] | None = None) -> SteeringState:
        return build_state("austeer", self.fit_context(metadata), site=site_option, k=k, alpha=alpha)

    def on_validation_start(self) -> None:
        # Lightning validates at the end of the training epoch, before on_train_epoch_end.
        if self.trainer.state.fn != "fit" or self.trainer.sanity_checking or self.current_epoch > 0:
            return
        self.finish_pass()
        if self.candidates:
            return
        if "probe_accuracy" in needs(self.methods):
            started = time.perf_counter()
            self.probe_accuracy = ProbeAccuracy(fit_probes(self.stats.head_moments))
            with torch.inference_mode():
                for batch in self.trainer.datamodule.val_pair_batches():
                    if batch["n_pairs"]:
                        pos, neg = self.read_pair_batch(batch, ["attention"])
                        self.probe_accuracy.update(pos["attention"], neg["attention"])
            self.probe_accuracy.reduce_(self._sum)
            self.timing["probe_pass"] = float(self._reduced("probe_seconds", torch.tensor([time.perf_counter() - started], dtype=torch.float64), "max"))
        self.candidates = self.build_candidates()
        if self.by_judge():
            self.behaviour_choice = self.choose_by_judge()
        else:
            self.run_grid()

    def by_judge(self) -> bool:
        """Whether the grid is chosen by a judge of generated text (behaviour tasks)."""
        selection = self.hparams.selection
        if selection == "auto":
            return bool(getattr(self.trainer.datamodule.task_obj, "behaviour", False))
        return selection == "judge"

    def choose_by_judge(self):
        """AUSteer's grid judged on greedy generations from validation prompts (every process
        computes the same choice: generation is deterministic and the prompts are few)."""
        from austeer_pl.analyses.behaviour import behaviour_prompts, choose_by_judge

        if any(m != "austeer" and not get_method(m).learned for m in self.methods if m != "unsteered"):
            raise AusteerError("--compare chooses by accuracy; fit behaviour states with train.py (--model.selection judge)")
        hp, dm = self.hparams, self.trainer.datamodule
        prompts = behaviour_prompts(self.tokenizer, dm.task_obj, dm.splits["val"], chat_template=dm.hparams.chat_template)[: hp.max_judge_prompts]
        if not prompts:
            raise AusteerError("the validation split is empty; raise --data.val_fraction or --data.max_val_examples")
        grid = [(f"{c.hyper['site']},k={c.hyper['k']},alpha={c.hyper['alpha']:g}", c.state) for c in self.candidates if c.method == "austeer"]
        self._n_judge_prompts = len(prompts)
        return choose_by_judge(self.llm, self.tokenizer, grid, prompts, hp.judge, budget=hp.fluency_budget, max_new_tokens=hp.max_new_tokens,
                               batch_size=dm.hparams.eval_batch_size, max_length=dm.hparams.max_length, layout=self.layout)

    def build_candidates(self) -> list[Candidate]:
        """Unsteered first, then every grid point of every grid method (states built once)."""
        ctx = self.fit_context({"data": self.trainer.datamodule.data_config()})
        out = [Candidate("unsteered", {}, None)]
        for method in self.methods:
            if method == "austeer":
                for option, k, alpha in self.grid():
                    out.append(Candidate("austeer", {"site": option, "k": k, "alpha": alpha, "sign": self.hparams.sign}, self.make_state(option, k, alpha)))
            elif method != "unsteered" and get_method(method).points is not None:
                for hyper in get_method(method).grid_points(self.layout, self.grids.get(method)):
                    out.append(Candidate(method, dict(hyper), build_state(method, ctx, **hyper)))
        return out

    def _scoring(self) -> str:
        return self.hparams.scoring or default_scoring(self.trainer.datamodule.task_obj)

    def on_validation_epoch_start(self) -> None:
        self._strength_sums = {m: torch.zeros(VALIDATION_SUMS, dtype=torch.float64) for m in self.trainers}

    def _val_batch(self, indices: Sequence[int]):
        dm = self.trainer.datamodule
        return [dm.splits["val"][i] for i in indices], [dm.val_prompts[i] for i in indices]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # Epoch 0's grid is scored in run_grid (successive halving needs its own order of examples);
        # the epochs after validate the learned strengths.
        if not batch["index"] or not self.rankings or self.current_epoch == 0:
            return None
        dm = self.trainer.datamodule
        examples, prompts = self._val_batch(batch["index"])
        kwargs = dict(scoring=self._scoring(), batch_size=dm.hparams.eval_batch_size, max_length=dm.hparams.max_length)
        for method, trainer in self.trainers.items():
            if not trainer.stopped:
                started = time.perf_counter()
                self._strength_sums[method] += trainer.validation_sums(self.tokenizer, dm.task_obj, examples, prompts, **kwargs)
                self._train_seconds[method] += time.perf_counter() - started
        return None

    # -- the grid: every method's points scored on validation and chosen by the engine's one rule
    def _score_batch(self, states: Sequence[Any], examples, prompts, scorer: GridScorer | None) -> torch.Tensor:
        if scorer is not None:
            return scorer.score(states, examples, prompts)
        # Generation scorings give right or wrong only (the continuous criteria need log-likelihoods).
        dm = self.trainer.datamodule
        out = torch.zeros(len(states), len(examples), 3, dtype=torch.float64)
        answers = torch.tensor([ex.answer for ex in examples])
        for j, state in enumerate(states):
            preds = predictions(self.llm, self.tokenizer, dm.task_obj, state, examples, prompts, scoring=self._scoring(),
                                batch_size=dm.hparams.eval_batch_size, max_length=dm.hparams.max_length, layout=self.layout)
            out[j, :, 0] = preds.eq(answers).double()
        return out

    def _dealt_scores(self, states: Sequence[Any], spans: Sequence[tuple[int, int]], lo: int, hi: int, scorer: GridScorer | None, name: str) -> torch.Tensor:
        """``(len(states), hi - lo, 3)`` validation statistics of examples ``lo..hi-1``: the batch
        ``spans`` are dealt to the processes in turn, each writes its own into zeros, and the sum
        over processes gathers them exactly (every entry is written by one process)."""
        dm = self.trainer.datamodule
        examples, prompts = dm.splits["val"], dm.val_prompts
        rank, world = dm._world()
        local = torch.zeros(len(states), hi - lo, 3, dtype=torch.float64)
        for b, e in list(spans)[rank::world]:
            local[:, b - lo : e - lo] = self._score_batch(states, examples[b:e], prompts[b:e], scorer)
        return self._reduced(name, local)

    def criterion(self) -> str:
        """The grid's validation criterion: ``--model.criterion``, or accuracy under generation scorings."""
        return self.hparams.criterion if self._scoring() == "loglik" else "accuracy"

    def run_grid(self) -> None:
        """Score and choose every grid method with :func:`~austeer_pl.fit.engine.choose`.

        Each round's examples are cut into contiguous batches of ``eval_batch_size`` and dealt to
        the processes (:meth:`_dealt_scores`), so N processes compute the statistics, and therefore
        the choice, of one.
        """
        hp, dm = self.hparams, self.trainer.datamodule
        examples = dm.splits["val"]
        if not examples:
            raise AusteerError("the validation split is empty; raise --data.val_fraction or --data.max_val_examples")
        size = dm.hparams.eval_batch_size
        scorer = GridScorer(self.llm, self.tokenizer, self.layout, dm.task_obj, batch_size=size, max_length=dm.hparams.max_length,
                            replay=hp.replay) if self._scoring() == "loglik" else None
        calls = itertools.count()
        generic: list = []
        # No steering is every method's candidate 0, scored on the same batches when the methods'
        # halving schedules cut the same ranges: its reduced statistics are kept per batch and reused.
        unsteered: dict[tuple[int, int], torch.Tensor] = {}
        self._val_unsteered = torch.full((len(examples), 3), float("nan"), dtype=torch.float64)  # for the learned strength's verdict
        self._generic = generic
        self.grid_choices = {}
        for method in self.methods:
            idx = [0] + [i for i, c in enumerate(self.candidates) if c.method == method and method != "unsteered"]
            if len(idx) == 1:  # unsteered itself, or a learned variant (trained in the next epochs)
                continue
            cands = [self.candidates[i] for i in idx]
            started = time.perf_counter()

            def score(sub, lo, hi, cands=cands):
                sub = list(sub)
                spans = [(b, min(b + size, hi)) for b in range(lo, hi, size)]
                reuse = 0 in sub and all(span in unsteered for span in spans)
                rows = [j for j in sub if not (reuse and j == 0)]
                out = torch.zeros(len(sub), hi - lo, 3, dtype=torch.float64)
                if rows:  # every process takes the same branch: the cache is built from reduced values
                    out[[sub.index(j) for j in rows]] = self._dealt_scores([cands[j].state for j in rows], spans, lo, hi, scorer, f"grid_{next(calls)}")
                if 0 in sub:
                    for b, e in spans:
                        if reuse:
                            out[sub.index(0), b - lo : e - lo] = unsteered[(b, e)]
                        else:
                            unsteered[(b, e)] = out[sub.index(0), b - lo : e - lo].clone()
                        self._val_unsteered[b:e] = unsteered[(b, e)]
                return out

            def harm(sub, cands=cands):
                if not generic:
                    generic.extend(generic_texts(self.tokenizer, self.llm, chat_template=dm.hparams.chat_template))
                return harm_kl(self.llm, self.tokenizer, self.layout, [cands[j].state for j in sub], generic, replay=hp.replay)

            choice = choose(cands, len(examples), score, criterion=self.criterion(), halving=hp.halving, min_examples=hp.halving_min_examples,
                            eta=hp.halving_eta, harm=harm if hp.harm_budget is not None else None, harm_budget=hp.harm_budget, level=hp.verdict_level,
                            correction=hp.verdict_correction)
            seconds = float(self._reduced(f"grid_seconds_{method}", torch.tensor([time.perf_counter() - started], dtype=torch.float64), "max"))
            self.grid_choices[method] = (idx, choice, seconds)

    def on_validation_epoch_end(self) -> None:
        if not self.rankings:
            return
        if self.current_epoch > 0:
            return self.strength_validation_end()
        if getattr(self, "behaviour_choice", None) is not None:
            return self.finish_behaviour_choice()
        self.finish_grid()

    def finish_grid(self) -> None:
        """Each method's chosen point becomes its result; AUSteer's becomes :attr:`state` (an empty
        state, which steers nothing, when the verdict says steering did not help, unless
        :attr:`export_anyway`)."""
        hp, dm = self.hparams, self.trainer.datamodule
        n_val = len(dm.splits["val"])
        fit_meta = {
            "n_pairs": self.accumulator.n, "n_val_examples": n_val, "fit_seconds": self.summary.get("fit_seconds"),
            "world_size": self.trainer.world_size, "scoring": self._scoring(), "criterion": self.criterion(), "halving": hp.halving,
            "harm_budget": hp.harm_budget, "verdict_level": hp.verdict_level, "verdict_correction": hp.verdict_correction,
        }
        self.results = {}
        total_seconds = 0.0
        for method, (idx, choice, seconds) in self.grid_choices.items():
            cands = [self.candidates[i] for i in idx]
            total_seconds += seconds
            key = f"val_{choice.criterion}"
            grid = [{**jsonable(c.hyper), "n_steered_activations": c.n_steered, "val_accuracy": choice.accuracy[j], key: choice.values[j],
                     "n_val_scored": choice.n_scored[j], **({"harm_kl": choice.harm[j]} if j in choice.harm else {})}
                    for j, c in enumerate(cands) if j > 0]
            verdict = {"helps": choice.helps, "reason": choice.reason, "criterion_gain": choice.gain, "criterion_gain_se": choice.gain_se,
                       "threshold": choice.threshold, "accuracy_gain": choice.accuracy_gain, "n_verdict": choice.n_verdict,
                       "best": None if choice.best is None else jsonable(cands[choice.best].hyper), "evaluations": choice.scored_evaluations,
                       "rounds": choice.rounds}
            j = choice.index if method == "austeer" and not self.export_anyway else (choice.best if choice.best is not None else 0)
            chosen = cands[j]

            def meta(i: int) -> dict[str, Any]:
                return {**fit_meta, "val_accuracy_unsteered": choice.accuracy[0], "val_accuracy": choice.accuracy[i], key: choice.values[i],
                        f"{key}_unsteered": choice.values[0], "harm_kl": choice.harm.get(i, 0.0), "grid": grid, "verdict": verdict,
                        **({"strength": "momentum", "site": cands[i].hyper.get("site")} if method == "austeer" else {})}

            if method == "austeer":
                b = choice.best if choice.best is not None else 1
                best = cands[b].state
                # The learned variants start from the best steered point (the rule alpha * m is their epoch 0).
                best.metadata = {**best.metadata, "fit": meta(b), "data": dm.data_config()}
                self._strength_base = best
                if chosen.state is None:  # "no steering" is the choice: an empty state says so wherever it goes
                    empty = replace(best, **{t: getattr(best, t)[:0] for t in ("site_index", "layer", "unit", "momentum", "scale", "shift")}, alpha=0.0)
                    chosen = Candidate("austeer", {"site": best.sites[0] if len(best.sites) == 1 else "both", "k": 0, "alpha": 0.0, "sign": hp.sign}, empty)
            if chosen.state is not None:
                chosen.state.metadata = {**chosen.state.metadata, "fit": {**meta(j), "site": chosen.hyper.get("site")} if method == "austeer" else meta(j),
                                         "data": dm.data_config()}
            self.results[method] = MethodResult(method, chosen, choice.accuracy[j], grid, seconds)
            self.log(f"val/{method}_accuracy", choice.accuracy[j], rank_zero_only=True)
            if method == "austeer":
                self.verdict = verdict
                self.summary.update(val_accuracy_unsteered=choice.accuracy[0], n_val=n_val, val_accuracy=choice.accuracy[j], criterion=choice.criterion,
                                    val_criterion_unsteered=choice.values[0], val_criterion=choice.values[j], harm_kl=choice.harm.get(j, 0.0),
                                    helps=choice.helps, verdict=verdict, choice={**chosen.hyper, "val_accuracy": choice.accuracy[j]}, grid=grid,
                                    grid_seconds=seconds, exported="steered" if chosen.state.k else "no steering")
        if self.grid_choices:
            acc0 = next(iter(self.grid_choices.values()))[1].accuracy[0]
            self.results = {"unsteered": MethodResult("unsteered", self.candidates[0], acc0, [{"n_steered_activations": 0, "val_accuracy": acc0}]), **self.results}
            self.log("val/unsteered_accuracy", acc0, rank_zero_only=True)
        self.summary.update(val_total_seconds=total_seconds)
        austeer = self.results.get("austeer")
        if austeer is None:  # a comparison without AUSteer
            return
        self.state = austeer.chosen.state
        self.log("val/accuracy_unsteered", self.summary["val_accuracy_unsteered"], rank_zero_only=True)
        self.log("val/accuracy", austeer.val_accuracy, rank_zero_only=True)
        self.log("val/k", float(austeer.chosen.hyper["k"]), rank_zero_only=True)
        self.log("val/alpha", float(austeer.chosen.hyper["alpha"]), rank_zero_only=True)
        self.log("val/helps", float(self.verdict["helps"]), rank_zero_only=True)
        self.log("val/criterion_gain", float(self.verdict["criterion_gain"]), rank_zero_only=True)
        self.log("val/harm_kl", float(self.summary["harm_kl"]), rank_zero_only=True)
        self.start_strength_phase()

    def finish_behaviour_choice(self) -> None:
        """The judged grid's pick becomes the state; when no steered point beats the unsteered model
        within the budget, the best steered point within it is kept and the summary says so."""
        from austeer_pl.analyses.behaviour import UNSTEERED

        choice, hp, dm = self.behaviour_choice, self.hparams, self.trainer.datamodule
        steered = [r for r in choice.results if r["label"] != UNSTEERED]
        base = next(r for r in choice.results if r["label"] == UNSTEERED)
        beats = choice.choice.label != UNSTEERED
        if beats:
            label = choice.choice.label
        else:  # the best steered point within the budget (or the most fluent ones if none is)
            pool = [r for r in steered if r["perplexity"] <= hp.fluency_budget * base["perplexity"]] or steered
            label = max(pool, key=lambda r: (r["share_positive"], r["mean_score"], -r["perplexity_ratio"]))["label"]
        austeer = [c for c in self.candidates if c.method == "austeer"]
        index = [r["label"] for r in steered].index(label)
        chosen = austeer[index]
        record = steered[index]
        grid = [{**jsonable(c.hyper), "n_steered_activations": c.n_steered, **{k: r[k] for k in ("share_positive", "mean_score", "perplexity_ratio", "distinct_2")}}
                for c, r in zip(austeer, steered)]
        beats = choice.choice.label != UNSTEERED
        chosen.state.metadata = {
            **chosen.state.metadata,
            "fit": {"strength": "momentum", "site": chosen.hyper["site"], "selection": "judge", "judge": hp.judge, "fluency_budget": hp.fluency_budget,
                    "n_pairs": self.accumulator.n, "n_val_prompts": self._n_judge_prompts,
                    "val_share_positive_unsteered": base["share_positive"], "val_share_positive": record["share_positive"],
                    "val_perplexity_ratio": record["perplexity_ratio"], "beats_unsteered": beats, "grid": grid,
                    "fit_seconds": self.summary.get("fit_seconds"), "world_size": self.trainer.world_size},
            "data": dm.data_config(),
        }
        self.results = {"austeer": MethodResult("austeer", chosen, record["share_positive"], grid)}
        self.state = chosen.state
        self.summary.update(val_accuracy_unsteered=base["share_positive"], val_accuracy=record["share_positive"], selection="judge",
                            beats_unsteered=beats, perplexity_ratio=record["perplexity_ratio"], n_val=self._n_judge_prompts,
                            choice={**chosen.hyper, "share_positive": record["share_positive"]}, grid=grid)
        self.log("val/share_positive_unsteered", base["share_positive"], rank_zero_only=True)
        self.log("val/share_positive", record["share_positive"], rank_zero_only=True)
        self.log("val/perplexity_ratio", record["perplexity_ratio"], rank_zero_only=True)
        self.start_strength_phase()

    # -- the learned-strength variants (epochs after the first), one StrengthTrainer each
    def start_strength_phase(self) -> None:
        hp = self.hparams
        learned = [m for m in self.methods if get_method(m).learned]
        self.trainers = {}
        self._train_seconds = {}
        if not learned or hp.strength_epochs == 0:
            return
        dm = self.trainer.datamodule
        rank, world = dm._world()
        for method in learned:
            started = time.perf_counter()
            trainer = StrengthTrainer(self.llm, self.layout, getattr(self, "_strength_base", None) or self.state, get_method(method).learned, lr=hp.strength_lr, kl_weight=hp.kl_weight,
                                      loss=hp.strength_loss, patience=hp.patience, gate_layer=hp.gate_layer, gate_width=hp.gate_width,
                                      criterion="loss" if self.criterion() == "loss" else "accuracy")
            sums = torch.zeros(VALIDATION_SUMS, dtype=torch.float64)
            for indices in shard_batches(len(dm.splits["val"]), rank, world, dm.hparams.eval_batch_size):
                if indices:
                    examples, prompts = self._val_batch(indices)
                    sums += trainer.validation_sums(self.tokenizer, dm.task_obj, examples, prompts, scoring=self._scoring(),
                                                    batch_size=dm.hparams.eval_batch_size, max_length=dm.hparams.max_length)
            trainer.begin(self._reduced(f"{method}_epoch0", sums))
            self.trainers[method] = trainer
            self._train_seconds[method] = time.perf_counter() - started

    @property
    def strength_fn(self) -> nn.Module | None:
        """The primary learned strength's module (``--model.strength``), while it trains."""
        trainer = self.trainers.get(self.primary)
        return None if trainer is None else trainer.fn

    @property
    def _best(self) -> dict[str, Any] | None:
        trainer = self.trainers.get(self.primary)
        return None if trainer is None else trainer.best

    @property
    def strength_history(self) -> list[dict[str, float]]:
        trainer = self.trainers.get(self.primary)
        return [] if trainer is None else trainer.history

    def strength_handle(self):
        return self.trainers[self.primary].handle()

    def strength_batch_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, nll, kl)``: ``--model.strength_loss`` plus ``kl_weight`` x KL(unsteered || steered) at the answer position."""
        trainer = self.trainers[self.primary]
        trainer.loss, trainer.kl_weight = self.hparams.strength_loss, self.hparams.kl_weight  # the module's settings rule
        return trainer.batch_loss(batch)

    def strength_step(self, batch: dict[str, Any]) -> None:
        for method, trainer in self.trainers.items():
            started = time.perf_counter()
            losses = trainer.step(batch, self._sum)
            self._train_seconds[method] += time.perf_counter() - started
            if losses is not None and method == self.primary:
                self.log_dict({f"fit/strength_{k}": v for k, v in losses.items()}, rank_zero_only=True)
        return None

    def strength_validation_end(self) -> None:
        epoch = self.current_epoch
        for method, trainer in self.trainers.items():
            if trainer.stopped:
                continue
            trainer.end_epoch(epoch, self._reduced(f"{method}_val", self._strength_sums[method]))
            record = trainer.history[-1]
            for key, value in record.items():
                if key != "epoch":
                    self.log(f"val/{method}_{key.removeprefix('val_')}", value, rank_zero_only=True)
        if self.trainers and all(t.stopped for t in self.trainers.values()):
            self.trainer.should_stop = True

    def finish_strength_phase(self) -> None:
        """Fold each trainer's best weights into its state; the primary one becomes :attr:`state`."""
        base = self.results["austeer"]
        for method, trainer in self.trainers.items():
            learned = trainer.fold()
            seconds = float(self._reduced(f"{method}_seconds", torch.tensor([self._train_seconds[method]], dtype=torch.float64), "max"))
            hyper = {**base.chosen.hyper, "strength": trainer.kind, "best_epoch": trainer.best["epoch"]}
            self.results[method] = MethodResult(method, Candidate(method, hyper, learned), trainer.best["val_accuracy"], trainer.history,
                                                base.tuning_seconds + seconds, training_seconds=seconds)
            if method == self.primary:
                verdict = self.learned_verdict(learned, epochs=len(trainer.history) - 1)
                if verdict is not None:
                    learned.metadata = {**learned.metadata, "fit": {**learned.metadata.get("fit", {}), "learned_verdict": verdict}}
                    self.summary["learned_verdict"] = verdict
                    if self.trainer.is_global_zero:  # on_fit_end: self.log is closed, the loggers are not
                        for logger in self.loggers:
                            logger.log_metrics({"val/learned_helps": float(verdict["helps"]), "val/learned_criterion_gain": verdict["gain"]}, step=self.global_step)
                if verdict is None or verdict["helps"] or self.export_anyway:
                    self.state = learned
                    self.summary["val_accuracy"] = trainer.best["val_accuracy"]
                    self.summary["exported"] = "steered"
                    if verdict is not None and "harm_kl" in verdict:
                        self.summary["harm_kl"] = verdict["harm_kl"]  # the exported state's
                else:  # the grid's choice stays the export, and says why the learned strength is not
                    self.state.metadata = {**self.state.metadata, "fit": {**self.state.metadata.get("fit", {}), "learned_verdict": verdict}}
        self._folded = True

    def learned_verdict(self, learned, epochs: int = 1) -> dict[str, Any] | None:
        """The grid's verdict, applied to the learned strength: it is exported only if it, too, beats
        no steering on validation beyond the noise and keeps ordinary text within the harm budget;
        otherwise the grid's own choice is (the best point when that helped, else the empty state).
        The test counts the grid verdict's comparisons plus one per trained epoch (the best epoch was
        picked on the same examples). None for a judged (behaviour) fit."""
        hp = self.hparams
        grid = self.grid_choices.get("austeer") if getattr(self, "grid_choices", None) else None
        if grid is None:
            return None
        _, choice, _ = grid
        dm = self.trainer.datamodule
        size = dm.hparams.eval_batch_size
        # Plain scoring (no replay): a gate reads the residual stream, possibly below the first steered layer.
        scorer = GridScorer(self.llm, self.tokenizer, self.layout, dm.task_obj, batch_size=size, max_length=dm.hparams.max_length,
                            replay=False) if self._scoring() == "loglik" else None
        n = len(dm.splits["val"])
        stats = self._dealt_scores([learned], [(b, min(b + size, n)) for b in range(0, n, size)], 0, n, scorer, "learned_verdict")[0]
        base = self._val_unsteered  # complete: choose scores no steering on every validation example
        grid_tests = sum(1 for c in self.candidates if c.method == "austeer") if hp.verdict_correction == "grid" else (choice.rounds[-1]["candidates"] if choice.rounds else 1)
        tests = grid_tests + max(1, epochs)
        verdict = paired_verdict(stats, base, self.criterion(), level=hp.verdict_level, tests=tests, what="the learned strength")
        if hp.harm_budget is not None:
            if not self._generic:
                self._generic.extend(generic_texts(self.tokenizer, self.llm, chat_template=dm.hparams.chat_template))
            local = harm_kl(self.llm, self.tokenizer, self.layout, [learned], self._generic, replay=False).to(torch.float64)
            verdict["harm_kl"] = float(self._reduced("learned_harm", local, "max").reshape(-1)[0])  # one value on every process
            if verdict["helps"] and verdict["harm_kl"] > hp.harm_budget:
                verdict.update(helps=False, reason=f"the learned strength's KL on ordinary text {verdict['harm_kl']:.3f} is above the harm budget {hp.harm_budget:g}")
        verdict["val_accuracy"] = float(stats[:, 0].mean())
        return verdict

    def on_train_end(self) -> None:
        # Before the strategy's teardown moves the model to the CPU: the learned verdict scores on the device.
        if self.trainers and not getattr(self, "_folded", False):
            self.finish_strength_phase()

    def on_fit_end(self) -> None:
        if self.trainers and not getattr(self, "_folded", False):
            self.finish_strength_phase()
        if self.state is not None and self.export_dir is not None and self.trainer.is_global_zero:
            self.state.metadata = {**self.state.metadata, "inputs": self.input_pins()}
            self.state.save_pretrained(self.export_dir, overwrite=self.overwrite)

    def input_pins(self) -> dict[str, Any]:
        """What the exported state pins: its task files' and base model's content (:mod:`austeer_pl.fit.pins`)."""
        from austeer_pl.fit.pins import record

        return record(self.trainer.datamodule.config(), self.hparams.model_name, self.llm, cache_dir=self.hparams.cache_dir)

    # -- test (evaluate.py --compare): each method's chosen state on the same examples
    def on_test_epoch_start(self) -> None:
        if not self.results:
            raise AusteerError("nothing to test: the validation grid did not run (is the validation split empty?)")
        n_test = len(self.trainer.datamodule.splits["test"])
        if n_test == 0:
            raise AusteerError("the test split is empty; raise --max_test_examples or the test fraction")
        self._test_codes = torch.zeros(len(self.methods), n_test, dtype=torch.int64)
        self._test_seconds = torch.zeros(len(self.methods), dtype=torch.float64)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if not batch["index"]:
            return None
        dm = self.trainer.datamodule
        index = torch.tensor(batch["index"])
        examples = [dm.splits["test"][i] for i in batch["index"]]
        prompts = [dm.test_prompts[i] for i in batch["index"]]
        for j, method in enumerate(self.methods):
            started = time.perf_counter()
            preds = predictions(self.llm, self.tokenizer, dm.task_obj, self.results[method].chosen.state, examples, prompts, scoring=self._scoring(),
                                batch_size=dm.hparams.eval_batch_size, max_length=dm.hparams.max_length, layout=self.layout)
            # +2 keeps every written code positive (predictions are >= -1), so a SUM gathers them exactly.
            self._test_codes[j, index] = preds.long().cpu() + 2
            self._test_seconds[j] += time.perf_counter() - started
        return None

    def on_test_epoch_end(self) -> None:
        codes = self._reduced("test_codes", self._test_codes)
        seconds = self._reduced("test_seconds", self._test_seconds, "max")
        if bool(codes.eq(0).any()):
            raise AusteerError("some test examples were not scored on any process; this is a bug, please report it")
        for j, method in enumerate(self.methods):
            self.results[method].test_predictions = codes[j] - 2
            self.results[method].test_seconds = float(seconds[j])

    # -- checkpoints: the accumulator and selection only
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        acc = self.accumulator
        tensors = {k: v.detach().clone() for k, v in acc.tensors.items()}
        reduced = bool(self.rankings)
        if not reduced:
            # Mid-pass: each process holds part of the counts; the checkpoint keeps their sum.
            for t in tensors.values():
                self._sum(t)
        checkpoint["austeer"] = {
            "accumulator": {k: v.cpu() for k, v in tensors.items()},
            "batches_done": self.batches_done,
            "reduced": reduced,
            "world_size": self.trainer.world_size if self._trainer is not None else 1,
            "n_tokens": self._n_tokens,
            "phase": "strength" if self.strength_fn is not None else "momentum",
            "settings": pass_settings(self.hparams, self.trainer.datamodule.hparams if self._trainer is not None and self.trainer.datamodule is not None else {}),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "austeer" not in checkpoint:
            raise AusteerError("this checkpoint was not written by austeer-pl's AUSteerModule; pass a last.ckpt from a train.py run")
        if checkpoint["austeer"].get("phase") == "strength":
            raise AusteerError("this checkpoint was written during the learned-strength phase, which does not resume; start the fit again (the momentum pass is fast to redo) or resume from an earlier checkpoint")
        self._pending = checkpoint["austeer"]

    def _restore(self, saved: dict[str, Any]) -> None:
        world = self.trainer.world_size
        if not saved["reduced"] and saved["world_size"] != world:
            raise AusteerError(
                f"the checkpoint was written mid-pass by {saved['world_size']} processes; resume it with --trainer.devices {saved['world_size']}"
            )
        # The summed counts go to rank zero only, so the end-of-pass sum counts them once.
        if self.trainer.global_rank == 0:
            self.accumulator.load_state_dict(saved["accumulator"])
        self.accumulator.to(self.device)
        # A pass that had finished is not re-read, whatever the sharding now.
        self.batches_done = int(saved["batches_done"]) if not saved["reduced"] else 1 << 62
        self._n_tokens = int(saved.get("n_tokens", 0)) if self.trainer.global_rank == 0 else 0
