"""Compare AUSteer with the block-level baselines on one split: ``evaluate.py --compare``.

Every method is fitted on the same training pairs, tuned on the same validation examples and
scored on the same test examples of one :class:`CompareDataModule` (the pipeline's data module,
plus a test loader and the validation pairs ITI's probes need):

* ``unsteered``: the base model;
* ``iti``, ``sadi``, ``caa``, ``austeer_block``: :mod:`austeer_pl.baselines`, each over its grid
  (:data:`~austeer_pl.baselines.METHOD_GRIDS` by default, :data:`QUICK_GRIDS` with ``--grid quick``);
* ``austeer``: the module's own ``site x k x alpha`` grid, with the paper's strength rule ``alpha * m``;
* ``austeer_scalar``, ``austeer_gate``: AUSteer's chosen units with a learned strength function
  (:mod:`austeer_pl.strength`), trained on the training examples for ``strength_epochs`` epochs
  after the grid, starting from the momentum rule and keeping the epoch with the best validation
  accuracy (ties keep the earlier epoch, so epoch 0, the momentum rule itself, wins a tie).

Statistics. :class:`CompareModule` is an :class:`~austeer_pl.lightning.AUSteerModule` whose single
momentum pass reads the ``attention``, ``ffn`` and ``residual`` sites once per batch and feeds both
the :class:`~austeer_pl.momentum.MomentumAccumulator` (AUSteer, block AUSteer, SADI, CAA) and the
:class:`~austeer_pl.baselines.HeadMoments` (ITI). Both are summed across processes at the end of
the pass (the module's exact DDP reduction), so N processes give the statistics of one. ITI's head
probes are then scored on the validation pairs in a second, small reading pass (sharded and
summed the same way). Validation (every grid point of every method) and test (each method's
chosen configuration) run in Lightning's validation and test loops, sharded across processes;
correct counts and predictions are summed exactly.

Fit time. ``fit_seconds`` of a method is the shared pass (counted in full for every method that
uses it), plus ITI's probe pass (ITI only), plus the validation time of the method's own grid; the
unsteered model's is 0. The parts are in ``fit_seconds_parts``. Under DDP each part is the slowest
process's time.

Example:
    >>> report = compare(task="rotten_tomatoes", max_train_pairs=300, max_val_examples=100, grid="quick")
    >>> [(m["name"], round(m["test_accuracy"], 3)) for m in report["methods"]]
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from . import lightning as lit
from .baselines import METHOD_GRIDS, METHODS, HeadMoments, ProbeAccuracy, baseline_state, fit_probes, grid_points
from .errors import AusteerError
from .evaluation import accuracy_summary, default_scoring, predict
from .models import DEFAULT_MODEL, model_name_of
from .strength import STRENGTH_LOSSES, average_gradients, build_strength, fold_strength, learned_fit_metadata, strength_objective
from .tasks import format_prompt, make_pairs

#: Methods in report order.
COMPARE_METHODS: tuple[str, ...] = ("unsteered", "iti", "sadi", "caa", "austeer_block", "austeer", "austeer_scalar", "austeer_gate")
#: The learned-strength variants of AUSteer and their strength functions.
LEARNED_METHODS: dict[str, str] = {"austeer_scalar": "scalar", "austeer_gate": "gate"}
#: Sites the shared pass reads (ITI's head moments come from ``attention``).
READ_SITES: tuple[str, ...] = ("attention", "ffn", "residual")

#: Small grids (4 points per method) for quick comparisons on slow hardware (``--grid quick``).
#: Each keeps two structural sizes and two strengths from the documented default grid
#: (:data:`austeer_pl.baselines.METHOD_GRIDS`), and AUSteer gets as many points.
QUICK_GRIDS: dict[str, dict[str, list[Any]]] = {
    "iti": {"k_heads": [4, 16], "alpha": [5.0, 15.0]},
    "sadi": {"site": ["attention"], "k_heads": [2, 8], "k_units": [4, 16], "delta": [1.0, 4.0]},
    "caa": {"layer_fraction": [0.3, 0.5], "multiplier": [1.0, 4.0]},
    "austeer_block": {"sites": [("attention",)], "k_blocks": [1, 4], "alpha": [1.0, 4.0]},
    "austeer": {"site": ["attention"], "k": [10, 50], "alpha": [1.0, 2.0]},
}
GRID_PRESETS = ("default", "quick")

FIT_SECONDS_NOTE = (
    "fit_seconds = shared momentum pass over the training pairs (one forward pass feeding every method's "
    "statistics; counted in full for each method that uses it) + ITI's validation probe pass (ITI only) + "
    "the validation time of the method's own grid (for the learned AUSteer variants: AUSteer's grid plus "
    "their strength training and its validation epochs); 0 for the unsteered model. Under DDP each part is "
    "the slowest process's wall time."
)


# ============================================================================ small helpers
def parse_list(value: Any, name: str, kind: type) -> list:
    """``"10,50"``, ``"[10, 50]"``, ``10`` or ``[10, 50]`` as a list of ``kind``."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [p for p in str(value).strip().strip("[]").replace(" ", ",").split(",") if p]
    out = []
    for item in items:
        try:
            out.append(kind(item) if kind is not str else str(item).strip().strip("'\""))
        except (TypeError, ValueError):
            raise AusteerError(f"{name}: {item!r} is not a {'whole number' if kind is int else 'number' if kind is float else 'name'}") from None
    if not out:
        raise AusteerError(f"{name} is empty; give at least one value")
    return out


def folder_bytes(path: str | os.PathLike) -> int:
    """Total size of the files in a folder (recursively)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _accelerator(device: str | None) -> tuple[str, Any]:
    """Lightning ``(accelerator, devices)`` for ``--device``; ``None`` means auto."""
    if device is None or device == "auto":
        return "auto", None
    dev = str(device).lower()
    if dev == "cpu":
        return "cpu", None
    if dev in ("cuda", "gpu"):
        return "gpu", None
    if dev.startswith("cuda:") and dev[5:].isdigit():
        return "gpu", [int(dev[5:])]
    if dev == "mps":
        return "mps", None
    raise AusteerError(f"--device {device!r} is not understood; use cpu, cuda, cuda:N or mps")


# ============================================================================ data
class CompareDataModule(lit.ContrastivePairDataModule):
    """The pipeline's data module plus test prompts, a sharded test loader and encoded validation pairs.

    Validation pairs (every validation example's right answer against one sampled wrong answer,
    or every wrong answer with ``negatives="all"``) feed ITI's probe accuracy; they are encoded
    exactly as the training pairs.
    """

    test_prompts: list[str]
    val_pairs: list

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        hp = self.hparams
        if not getattr(self, "test_prompts", None):
            self.test_prompts = [format_prompt(self.tokenizer, self.task_obj, ex.prompt, chat_template=hp.chat_template) for ex in self.splits["test"]]
        if not getattr(self, "val_pairs", None):
            pairs = make_pairs(self.splits["val"], negatives=hp.negatives, seed=hp.seed) if self.splits["val"] else []
            self.val_pairs = self.encode_pairs(pairs)

    def encode_pairs(self, pairs) -> list:
        """Contrastive pairs as token ids, exactly as :meth:`setup` encodes the training pairs."""
        if not pairs:
            return []
        hp = self.hparams
        texts = {p.prompt: format_prompt(self.tokenizer, self.task_obj, p.prompt, chat_template=hp.chat_template) for p in pairs}
        keys = list(texts)
        prompt_ids = dict(zip(keys, self.tokenizer([texts[k] for k in keys], add_special_tokens=True)["input_ids"]))
        pos = self._answers([texts[p.prompt] for p in pairs], [p.positive for p in pairs])
        neg = self._answers([texts[p.prompt] for p in pairs], [p.negative for p in pairs])
        return [lit.EncodedPair(prompt_ids[p.prompt], a, b) for p, a, b in zip(pairs, pos, neg)]

    def val_pair_batches(self) -> list[dict[str, Any]]:
        """This process's share of the validation pairs, collated (same batch count on every rank)."""
        rank, world = self._world()
        return [self.collate_pairs([self.val_pairs[i] for i in b]) for b in lit.shard_batches(len(self.val_pairs), rank, world, self.hparams.batch_size)]

    def test_dataloader(self):
        rank, world = self._world()
        batches = lit.shard_batches(len(self.splits["test"]), rank, world, self.hparams.eval_batch_size)
        return DataLoader(list(range(len(self.splits["test"]))), batch_sampler=lit._BatchList(batches), collate_fn=self.collate_examples)


# ============================================================================ the module
@dataclass
class Candidate:
    """One grid point of one method, with its state (None for the unsteered model)."""

    method: str
    hyper: dict[str, Any]
    state: Any = None

    @property
    def n_steered(self) -> int:
        return 0 if self.state is None else int(self.state.k)

    @property
    def strength(self) -> float:
        return 0.0 if self.state is None else abs(float(self.state.alpha))


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


class CompareModule(lit.AUSteerModule):
    """An :class:`~austeer_pl.lightning.AUSteerModule` that fits and tunes every method in one run.

    Args:
        methods: methods to compare (a subset of :data:`COMPARE_METHODS`; ``unsteered`` is always kept).
        grids: per-method grids replacing :data:`~austeer_pl.baselines.METHOD_GRIDS` entries
            (e.g. :data:`QUICK_GRIDS`); AUSteer's grid is the module's ``site``, ``k``, ``alpha``.
        **kwargs: :class:`~austeer_pl.lightning.AUSteerModule` arguments.
    """

    def __init__(self, methods: Sequence[str] = COMPARE_METHODS, grids: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        unknown = [m for m in methods if m not in COMPARE_METHODS]
        if unknown:
            raise AusteerError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(COMPARE_METHODS)}")
        wanted = set(methods) | ({"austeer"} if any(m in LEARNED_METHODS for m in methods) else set())  # learned variants start from it
        self.methods = ("unsteered", *[m for m in COMPARE_METHODS if m in wanted and m != "unsteered"])
        self.grids = {k: v for k, v in dict(grids or {}).items() if k in METHODS}
        self.read_sites = tuple(dict.fromkeys([*self.read_sites, *READ_SITES]))
        self.head_moments: HeadMoments | None = None
        self.probe_accuracy: ProbeAccuracy | None = None
        self._moments_reduced = False
        self.candidates: list[Candidate] = []
        self.results: dict[str, MethodResult] = {}
        self.timing: dict[str, float] = {}
        self._val_seconds: torch.Tensor | None = None
        self._test_codes: torch.Tensor | None = None
        self._test_seconds: torch.Tensor | None = None

    # -- the shared pass
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if "iti" in self.methods and self.head_moments is None:
            self.head_moments = HeadMoments.from_layout(self.layout)

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.head_moments is not None:
            self.head_moments.to(self.device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if batch["n_pairs"]:
            pos, neg = self.read_pair_batch(batch)
            with torch.inference_mode():
                self.accumulator.update(pos, neg)
                if self.head_moments is not None:
                    self.head_moments.update(pos, neg)
            self._n_tokens += batch["n_tokens"]
        self.batches_done += 1
        return None

    def finish_pass(self) -> None:
        if self.rankings:
            return
        if self.head_moments is not None and not self._moments_reduced:
            self.head_moments.reduce_(lit._all_reduce_sum)
            self._moments_reduced = True
        super().finish_pass()

    # -- ITI's probe pass and every method's grid
    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self.trainer.sanity_checking or not self.rankings or self.candidates:
            return
        dm = self.trainer.datamodule
        if self.head_moments is not None:
            started = time.perf_counter()
            self.probe_accuracy = ProbeAccuracy(fit_probes(self.head_moments))
            with torch.inference_mode():
                for batch in dm.val_pair_batches():
                    if batch["n_pairs"]:
                        pos, neg = self.read_pair_batch(batch, ["attention"])
                        self.probe_accuracy.update(pos["attention"], neg["attention"])
            self.probe_accuracy.reduce_(lit._all_reduce_sum)
            seconds = torch.tensor([time.perf_counter() - started], dtype=torch.float64, device=self.device)
            self.timing["probe_pass"] = float(_all_reduce(seconds, "max"))
        self.candidates = self.build_candidates()

    def build_candidates(self) -> list[Candidate]:
        """Unsteered first, then every grid point of every method (states built once)."""
        dm = self.trainer.datamodule
        base = model_name_of(self.llm)
        out = [Candidate("unsteered", {}, None)]
        for method in self.methods:
            if method == "austeer":
                for option, k, alpha in self.grid():
                    out.append(Candidate("austeer", {"site": option, "k": k, "alpha": alpha, "sign": self.hparams.sign}, self.make_state(option, k, alpha)))
            elif method != "unsteered" and method not in LEARNED_METHODS:
                for hyper in grid_points(method, self.layout, self.grids.get(method)):
                    state = baseline_state(
                        method, self.layout, acc=self.accumulator, moments=self.head_moments, accuracy=self.probe_accuracy,
                        base_model=base, token_scope=self.hparams.token_scope, metadata={"data": dm.data_config()}, **hyper,
                    )
                    out.append(Candidate(method, dict(hyper), state))
        return out

    def _predict(self, state, examples, prompts) -> torch.Tensor:
        dm = self.trainer.datamodule
        scoring = self.hparams.scoring or default_scoring(dm.task_obj)
        ctx = state.apply(self.llm, layout=self.layout) if state is not None else nullcontext()
        with ctx:
            return predict(self.llm, self.tokenizer, dm.task_obj, examples, prompts, scoring=scoring,
                           batch_size=dm.hparams.eval_batch_size, max_length=dm.hparams.max_length)

    def on_validation_epoch_start(self) -> None:
        self._val_correct = torch.zeros(len(self.candidates), dtype=torch.int64)
        self._val_seconds = torch.zeros(len(self.candidates), dtype=torch.float64)
        self._val_total = 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if not self.candidates or not batch["index"]:
            return None
        dm = self.trainer.datamodule
        examples = [dm.splits["val"][i] for i in batch["index"]]
        prompts = [dm.val_prompts[i] for i in batch["index"]]
        answers = torch.tensor([ex.answer for ex in examples])
        for i, cand in enumerate(self.candidates):
            started = time.perf_counter()
            self._val_correct[i] += int(self._predict(cand.state, examples, prompts).eq(answers).sum())
            self._val_seconds[i] += time.perf_counter() - started
        self._val_total += len(examples)
        return None

    def on_validation_epoch_end(self) -> None:
        if not self.candidates:
            return
        counts = _all_reduce(torch.cat([self._val_correct, torch.tensor([self._val_total])]).to(self.device)).cpu()
        seconds = _all_reduce(self._val_seconds.to(self.device), "max").cpu()
        correct, total = counts[:-1], int(counts[-1])
        if total == 0:
            raise AusteerError("the validation split is empty; raise --max_val_examples or the validation fraction")
        acc = (correct.double() / total).tolist()
        dm = self.trainer.datamodule
        self.results = {}
        for method in self.methods:
            idx = [i for i, c in enumerate(self.candidates) if c.method == method]
            if not idx:  # the learned variants are trained below
                continue
            # Best accuracy; ties go to fewer steered activations, then the weaker push, then grid order.
            best = min(idx, key=lambda i: (-acc[i], self.candidates[i].n_steered, self.candidates[i].strength, i))
            grid = [{**_jsonable(self.candidates[i].hyper), "n_steered_activations": self.candidates[i].n_steered, "val_accuracy": acc[i]} for i in idx]
            self.results[method] = MethodResult(method, self.candidates[best], acc[best], grid, float(seconds[idx].sum()))
        fit_meta = {
            "n_pairs": self.accumulator.n,
            "n_val_examples": total,
            "val_accuracy_unsteered": acc[0],
            "fit_seconds": self.summary.get("fit_seconds"),
            "world_size": self.trainer.world_size,
            "scoring": self.hparams.scoring or default_scoring(dm.task_obj),
            "compare": True,
        }
        for method, res in self.results.items():
            if res.chosen.state is None:
                continue
            meta = dict(res.chosen.state.metadata)
            meta["fit"] = {**fit_meta, "val_accuracy": res.val_accuracy, "grid": res.grid, **({"strength": self.hparams.strength, "site": res.chosen.hyper["site"]} if method == "austeer" else {})}
            meta["data"] = dm.data_config()
            res.chosen.state.metadata = meta
        if "austeer" in self.results:
            self.state = self.results["austeer"].chosen.state
        self.summary.update(val_accuracy_unsteered=acc[0], n_val=total, val_total_seconds=float(seconds.sum()))
        for method in self.methods:
            if method in LEARNED_METHODS:
                self.results[method] = self.fit_learned_strength(method)
        for method, res in self.results.items():
            self.log(f"val/{method}_accuracy", res.val_accuracy, rank_zero_only=True)

    # -- the learned-strength variants of AUSteer's choice
    def fit_learned_strength(self, method: str) -> MethodResult:
        """Train ``method``'s strength function on AUSteer's chosen units; keep its best validation epoch.

        The steps are the pipeline's learned-strength phase (:func:`~austeer_pl.strength.strength_objective`,
        the same seeded order and sharding of the training examples, gradients averaged across
        processes), driven here inside the comparison's validation epoch.
        """
        dm = self.trainer.datamodule
        hp = self.hparams
        base = self.results["austeer"]
        state = base.chosen.state
        started = time.perf_counter()
        fn = build_strength(
            LEARNED_METHODS[method], state.scale.to(self.device), self.layout, state.layer.tolist(),
            gate_layer=hp.gate_layer, gate_width=hp.gate_width,
        ).to(self.device)
        optimizer = torch.optim.Adam(fn.parameters(), lr=hp.strength_lr)
        best = {"epoch": 0, "accuracy": base.val_accuracy, "weights": {k: v.detach().clone() for k, v in fn.state_dict().items()}}
        history = [{"epoch": 0, "val_accuracy": base.val_accuracy}]
        bad = 0
        for epoch in range(1, hp.strength_epochs + 1):
            for examples in dm.strength_batches(epoch):
                batch = dm.collate_examples_train(examples)
                optimizer.zero_grad(set_to_none=False)
                if batch["n_examples"]:
                    # Lightning runs this hook without autograd; the strength parameters need it.
                    with torch.inference_mode(False), torch.enable_grad():
                        loss, _, _ = strength_objective(self.llm, self.layout, state, fn, batch, kl_weight=hp.kl_weight, loss=hp.strength_loss)
                        loss.backward()
                average_gradients(fn.parameters(), lit._all_reduce_sum, batch["n_examples"])
                optimizer.step()
            accuracy = self.val_accuracy_of(fold_strength(state, fn))
            history.append({"epoch": epoch, "val_accuracy": accuracy})
            if accuracy > best["accuracy"]:
                best = {"epoch": epoch, "accuracy": accuracy, "weights": {k: v.detach().clone() for k, v in fn.state_dict().items()}}
                bad = 0
            else:
                bad += 1
                if bad >= hp.patience:
                    break
        fn.load_state_dict(best["weights"])
        meta = learned_fit_metadata(
            state, LEARNED_METHODS[method], val_accuracy=best["accuracy"], best_epoch=best["epoch"],
            history=history, lr=hp.strength_lr, kl_weight=hp.kl_weight, loss=hp.strength_loss,
        )
        learned = fold_strength(state, fn, meta)
        seconds = float(_all_reduce(torch.tensor([time.perf_counter() - started], dtype=torch.float64, device=self.device), "max"))
        hyper = {**base.chosen.hyper, "strength": LEARNED_METHODS[method], "best_epoch": best["epoch"]}
        self.log(f"val/{method}_accuracy", best["accuracy"], rank_zero_only=True)
        return MethodResult(method, Candidate(method, hyper, learned), best["accuracy"], history, base.tuning_seconds + seconds, training_seconds=seconds)

    def val_accuracy_of(self, state) -> float:
        """Validation accuracy of one state, this process's share scored and the counts summed."""
        dm = self.trainer.datamodule
        rank, world = dm._world()
        correct = total = 0
        for rows in lit.shard_batches(len(dm.splits["val"]), rank, world, dm.hparams.eval_batch_size):
            if rows:
                examples = [dm.splits["val"][i] for i in rows]
                answers = torch.tensor([ex.answer for ex in examples])
                correct += int(self._predict(state, examples, [dm.val_prompts[i] for i in rows]).eq(answers).sum())
                total += len(rows)
        counts = _all_reduce(torch.tensor([correct, total], dtype=torch.int64, device=self.device)).cpu()
        return float(counts[0]) / max(int(counts[1]), 1)

    # -- test: each method's chosen configuration
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
            preds = self._predict(self.results[method].chosen.state, examples, prompts)
            # +2 keeps every written code positive (predictions are >= -1), so a SUM gathers them exactly.
            self._test_codes[j, index] = preds.long().cpu() + 2
            self._test_seconds[j] += time.perf_counter() - started
        return None

    def on_test_epoch_end(self) -> None:
        codes = _all_reduce(self._test_codes.to(self.device)).cpu()
        seconds = _all_reduce(self._test_seconds.to(self.device), "max").cpu()
        if bool(codes.eq(0).any()):
            raise AusteerError("some test examples were not scored on any process; this is a bug, please report it")
        for j, method in enumerate(self.methods):
            self.results[method].test_predictions = codes[j] - 2
            self.results[method].test_seconds = float(seconds[j])


# ============================================================================ running it
def make_trainer(
    *, accelerator: str = "auto", devices: Any = None, loggers: Any = False, strategy: str = "auto", ddp_timeout: float = 1800.0, limit_val_batches: float | int | None = None
):
    """A Trainer for one frozen pass: one epoch, no checkpoints, no sanity check, no distributed sampler."""
    if devices is None:
        devices = 1
    n_devices = devices if isinstance(devices, int) else (len(devices) if isinstance(devices, list) else 1)
    if strategy == "auto" and n_devices > 1:
        strategy = "ddp"
    return pl.Trainer(
        max_epochs=1,
        accelerator=accelerator,
        devices=devices,
        strategy=lit.make_strategy(strategy, timeout_s=ddp_timeout),
        logger=loggers,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
        log_every_n_steps=10,
        limit_val_batches=limit_val_batches,
    )


def fit_statistics(
    data,
    *,
    model_name: str,
    sites: Sequence[str] = ("attention", "ffn"),
    iti: bool = False,
    dtype: str | None = None,
    cache_dir: str | None = None,
    accelerator: str = "auto",
    devices: Any = None,
):
    """Run only the pipeline's shared pass (no validation grid) and return the fitted module.

    The module's ``accumulator`` holds the reduced momentum statistics of ``sites`` (and
    ``head_moments`` those of ITI when ``iti``); ``module.llm``, ``module.tokenizer`` and
    ``module.layout`` are the loaded model. Used by :mod:`austeer_pl.analyses`.
    """
    module = CompareModule(methods=("unsteered", "iti") if iti else ("unsteered",), model_name=model_name, dtype=dtype, cache_dir=cache_dir,
                    site="attention", k=[1], alpha=[1.0], sign="both")
    module.read_sites = tuple(dict.fromkeys(["attention", *sites]))
    trainer = make_trainer(accelerator=accelerator, devices=devices, limit_val_batches=0)
    with _quiet_fit():
        trainer.fit(module, datamodule=data)
    if not module.rankings:  # pragma: no cover - the pass always finishes at the epoch end
        module.finish_pass()
    return module


class _quiet_fit:
    """Silence Lightning's chatter about the frozen single-pass fit (no optimiser, no val batches)."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        for pattern in (r".*configure_optimizers.*", r".*smaller than the logging interval.*", r".*does not have many workers.*",
                        r".*limit_val_batches.*", r".*`training_step` returned `None`.*", r".*GPU available but not used.*"):
            warnings.filterwarnings("ignore", message=pattern)
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


@dataclass
class CompareOptions:
    """Everything ``evaluate.py --compare`` needs (see :func:`options_from_args`).

    ``None`` for a data or grid option means the pipeline's default
    (:class:`~austeer_pl.lightning.ContrastivePairDataModule`, :class:`~austeer_pl.lightning.AUSteerModule`).
    """

    task: str = "rotten_tomatoes"
    model: str | None = None
    seed: int = 0
    methods: tuple[str, ...] = COMPARE_METHODS
    grid: str = "default"
    site: list[str] | None = None
    k: list[int] | None = None
    alpha: list[float] | None = None
    sign: str = "promote"
    strength_epochs: int | None = None
    strength_lr: float | None = None
    strength_loss: str | None = None
    negatives: str = "sample"
    max_train_pairs: int | None = None
    max_val_examples: int | None = None
    max_test_examples: int | None = None
    batch_size: int = 16
    eval_batch_size: int | None = None
    max_length: int | None = None
    chat_template: bool | None = None
    scoring: str | None = None
    dtype: str | None = None
    device: str | None = None
    devices: int = 1
    cache_dir: str | None = None
    report: str | None = None
    export_dir: str | None = None
    run_dir: str | None = None
    wandb_mode: str = "offline"
    wandb_project: str = "austeer-pl"


def options_from_args(args) -> CompareOptions:
    """Map the parsed ``evaluate.py`` arguments to :class:`CompareOptions` (checking them)."""
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    if g("steering"):
        raise AusteerError("--compare fits its own states; drop --steering")
    if g("split", "test") != "test":
        raise AusteerError("--compare tunes on validation and reports the test split; drop --split")
    if g("scoring") == "both":
        raise AusteerError("--compare scores with one method; choose --scoring loglik or generate")
    if g("strength_epochs") is not None and g("strength_epochs") < 0:
        raise AusteerError(f"--strength_epochs must be 0 or more, got {g('strength_epochs')}")
    if g("strength_lr") is not None and not g("strength_lr") > 0:
        raise AusteerError(f"--strength_lr must be positive, got {g('strength_lr')}")
    if g("strength_loss") is not None and g("strength_loss") not in STRENGTH_LOSSES:
        raise AusteerError(f"--strength_loss must be one of {', '.join(STRENGTH_LOSSES)}, not '{g('strength_loss')}'")
    for name in ("limit", "max_train_pairs", "max_val_examples", "max_test_examples", "batch_size", "devices", "max_length"):
        value = g(name)
        if value is not None and value <= 0:
            raise AusteerError(f"--{name} must be positive, got {value}")
    from .cli import resolve_wandb_mode
    from .fileio import check_output_dir, check_output_file
    from .steering import is_steering_state

    report = g("report")
    if report:
        check_output_file(report, what="comparison report")
    mode = resolve_wandb_mode(g("wandb_mode") or os.environ.get("WANDB_MODE", "offline"), g("wandb_fallback") or "offline")
    grid = g("grid") or "default"
    if grid not in GRID_PRESETS:
        raise AusteerError(f"--grid must be one of {', '.join(GRID_PRESETS)}, not '{grid}'")
    methods = tuple(parse_list(g("methods"), "--methods", str)) if g("methods") else COMPARE_METHODS
    bad = [m for m in methods if m not in COMPARE_METHODS]
    if bad:
        raise AusteerError(f"--methods: unknown method(s) {', '.join(bad)}; choose from {', '.join(COMPARE_METHODS)}")
    max_test = g("max_test_examples")
    if g("limit") is not None:
        max_test = g("limit") if max_test is None else min(max_test, g("limit"))
    if g("export_dir"):
        for method in methods:
            if method != "unsteered":
                check_output_dir(Path(g("export_dir")) / method, is_ours=is_steering_state, overwrite=bool(g("overwrite")), what=f"{method} steering state")
    chat = {"on": True, "off": False, "auto": None, None: None}[g("chat_template")]
    return CompareOptions(
        task=g("task") or "rotten_tomatoes",
        model=g("model") or DEFAULT_MODEL,
        seed=0 if g("seed") is None else int(g("seed")),
        methods=methods,
        grid=grid,
        site=parse_list(g("site"), "--site", str) if g("site") else None,
        k=parse_list(g("k"), "--k", int) if g("k") else None,
        alpha=parse_list(g("alpha"), "--alpha", float) if g("alpha") else None,
        sign=g("sign") or "promote",
        strength_epochs=g("strength_epochs"),
        strength_lr=g("strength_lr"),
        strength_loss=g("strength_loss"),
        negatives=g("negatives") or "sample",
        max_train_pairs=g("max_train_pairs"),
        max_val_examples=g("max_val_examples"),
        max_test_examples=max_test,
        batch_size=g("batch_size") or 16,
        max_length=g("max_length"),
        chat_template=chat,
        scoring=g("scoring"),
        dtype=g("dtype"),
        device=g("device"),
        devices=g("devices") or 1,
        cache_dir=g("cache_dir"),
        report=report,
        export_dir=g("export_dir"),
        run_dir=g("run_dir"),
        wandb_mode=mode,
        wandb_project=g("wandb_project") or os.environ.get("WANDB_PROJECT", "austeer-pl"),
    )


def _austeer_grid(opts: CompareOptions) -> dict[str, Any]:
    """AUSteer's grid: the options given, else the quick preset (``--grid quick``) or the module's defaults."""
    preset = QUICK_GRIDS["austeer"] if opts.grid == "quick" else {}
    out = {"site": opts.site or preset.get("site"), "k": opts.k or preset.get("k"), "alpha": opts.alpha or preset.get("alpha")}
    return {key: value for key, value in out.items() if value is not None}


def _data_kwargs(opts: CompareOptions) -> dict[str, Any]:
    out = dict(task=opts.task, seed=opts.seed, negatives=opts.negatives, batch_size=opts.batch_size,
               eval_batch_size=opts.eval_batch_size or opts.batch_size, chat_template=opts.chat_template)
    for key in ("max_train_pairs", "max_val_examples", "max_test_examples", "max_length"):
        if getattr(opts, key) is not None:
            out[key] = getattr(opts, key)
    return out


def compare(opts: CompareOptions | None = None, **overrides: Any) -> dict[str, Any]:
    """Fit, tune and test every method on one split; write the report and states; return the report.

    Example:
        >>> report = compare(task="rotten_tomatoes", max_train_pairs=300, grid="quick", report="compare.json")
    """
    from .cli import _task_stem, quiet

    opts = opts or CompareOptions()
    for key, value in overrides.items():
        if not hasattr(opts, key):
            raise AusteerError(f"unknown comparison option '{key}'")
        setattr(opts, key, value)
    opts.model = opts.model or DEFAULT_MODEL
    quiet()

    accelerator, devices = _accelerator(opts.device)
    if opts.devices > 1:
        devices = opts.devices if devices is None else devices
    grids = {m: (QUICK_GRIDS[m] if opts.grid == "quick" else METHOD_GRIDS[m]) for m in METHOD_GRIDS}
    au = _austeer_grid(opts)
    data = CompareDataModule(**_data_kwargs(opts))
    learned = {key: getattr(opts, key) for key in ("strength_epochs", "strength_lr", "strength_loss") if getattr(opts, key) is not None}
    module = CompareModule(
        methods=opts.methods, grids=grids, model_name=opts.model, dtype=opts.dtype, cache_dir=opts.cache_dir,
        sign=opts.sign, scoring=opts.scoring, **au, **learned,
    )
    run_dir = Path(opts.run_dir or os.environ.get("AUSTEER_RUN_DIR") or Path("runs") / f"compare-{_task_stem(opts.task)}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.environ["AUSTEER_RUN_DIR"] = str(run_dir)  # DDP children re-run the command and must share it
    loggers: Any = False
    if opts.wandb_mode != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        run_dir.mkdir(parents=True, exist_ok=True)
        loggers = [WandbLogger(project=opts.wandb_project, save_dir=str(run_dir), offline=opts.wandb_mode == "offline", name=run_dir.name, config=_jsonable(vars(opts)), mode=opts.wandb_mode)]
    trainer = make_trainer(accelerator=accelerator, devices=devices, loggers=loggers)
    started = time.perf_counter()
    with _quiet_fit():
        trainer.fit(module, datamodule=data)
        if not module.results:
            raise AusteerError("the comparison stopped before the validation grid ran; check the validation split")
        trainer.test(module, datamodule=data, verbose=False)
    total_seconds = time.perf_counter() - started
    test_examples = data.splits["test"]
    shared = float(module.summary.get("fit_seconds") or 0.0)
    probe = float(module.timing.get("probe_pass", 0.0))
    entries = []
    export_root = Path(opts.export_dir) if opts.export_dir else None
    scratch = None
    if trainer.is_global_zero:
        scratch = Path(tempfile.mkdtemp(prefix=".compare-states-"))
    try:
        for method in module.methods:
            res = module.results[method]
            state = res.chosen.state
            summary = accuracy_summary(test_examples, res.test_predictions)
            parts = {"shared_pass": 0.0, "probe_pass": 0.0, "tuning": 0.0}
            state_bytes, state_dir = 0, None
            if state is not None:
                parts = {"shared_pass": shared, "probe_pass": probe if method == "iti" else 0.0, "tuning": res.tuning_seconds - res.training_seconds}
                if method in LEARNED_METHODS:
                    parts["strength_training"] = res.training_seconds
                if trainer.is_global_zero:
                    folder = (export_root / method) if export_root else scratch / method
                    state.save_pretrained(folder)
                    state_bytes = folder_bytes(folder)
                    state_dir = str(folder) if export_root else None
            entries.append({
                "name": method,
                "hyperparameters": _jsonable(res.chosen.hyper),
                "val_accuracy": res.val_accuracy,
                "test_accuracy": summary["accuracy"],
                "ci_low": summary["ci_low"],
                "ci_high": summary["ci_high"],
                "n_test": summary["n"],
                "test": summary,
                "n_steered_activations": res.chosen.n_steered,
                "state_bytes": state_bytes,
                "state_dir": state_dir,
                "fit_seconds": sum(parts.values()),
                "fit_seconds_parts": parts,
                "val_seconds": res.tuning_seconds,
                "test_seconds": res.test_seconds,
                "grid": res.grid,
            })
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    task = data.task_obj
    layout = module.layout
    uids = "\n".join(ex.uid for ex in test_examples)
    report = {
        "kind": "compare",
        "task": opts.task,
        "task_name": task.name,
        "split": "test",
        "seed": opts.seed,
        "base_model": opts.model,
        "scoring": module.hparams.scoring or ("generate" if task.scoring == "generate" else "loglik"),
        "grid_preset": opts.grid,
        "grids": _jsonable({**{m: grids[m] for m in grids if m in module.methods},
                            "austeer": {"site": [o for o, _ in module.site_options], "k": module.k_grid, "alpha": module.alpha_grid}}),
        "data": data.data_config(),
        "n_train_pairs": module.accumulator.n,
        "n_val": int(module.summary.get("n_val", 0)),
        "n_test": len(test_examples),
        "test_uids_sha256": hashlib.sha256(uids.encode()).hexdigest(),
        "n_units_total": {s: layout.site(s).size * layout.n_layers for s in READ_SITES},
        "shared_pass_seconds": shared,
        "probe_pass_seconds": probe,
        "total_seconds": total_seconds,
        "world_size": trainer.world_size,
        "fit_seconds_note": FIT_SECONDS_NOTE,
        "methods": entries,
    }
    if trainer.is_global_zero:
        if opts.report:
            from .fileio import write_json_atomic

            write_json_atomic(opts.report, report)
        _log_wandb(loggers, report)
        print_compare_table(report)
    return report


def _log_wandb(loggers, report: dict[str, Any]) -> None:
    for logger in loggers or []:
        if type(logger).__name__ != "WandbLogger":
            continue
        import wandb

        cols = ["method", "val_accuracy", "test_accuracy", "ci_low", "ci_high", "n_steered_activations", "state_bytes", "fit_seconds"]
        table = wandb.Table(columns=cols, data=[[m["name"] if c == "method" else m[c] for c in cols] for m in report["methods"]])
        exp = logger.experiment
        exp.log({"compare/table": table, **{f"test/{m['name']}_accuracy": m["test_accuracy"] for m in report["methods"]}})
        exp.finish()


def print_compare_table(report: dict[str, Any]) -> None:
    """The comparison as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    title = f"{report['task_name']}: test n={report['n_test']}, val n={report['n_val']}, {report['n_train_pairs']} training pairs ({report['base_model']})"
    table = Table(title=title, title_justify="left")
    for col, justify in (("method", "left"), ("val acc", "right"), ("test acc", "right"), ("95% CI", "right"),
                         ("steered", "right"), ("state", "right"), ("fit s", "right"), ("chosen", "left")):
        table.add_column(col, justify=justify)
    for m in report["methods"]:
        hyper = ", ".join(f"{k}={v if not isinstance(v, list) else '+'.join(map(str, v))}" for k, v in m["hyperparameters"].items())
        table.add_row(
            m["name"], f"{m['val_accuracy']:.3f}", f"{m['test_accuracy']:.3f}", f"[{m['ci_low']:.3f}, {m['ci_high']:.3f}]",
            str(m["n_steered_activations"]), _human_bytes(m["state_bytes"]), f"{m['fit_seconds']:.1f}", hyper or "-",
        )
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def _human_bytes(n: int) -> str:
    if n <= 0:
        return "-"
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / 1024 / 1024:.1f} MB"


def compare_main_args(args) -> dict[str, Any]:
    """``evaluate.py --compare``: run :func:`compare` with the parsed arguments."""
    return compare(options_from_args(args))


__all__ = [
    "COMPARE_METHODS",
    "FIT_SECONDS_NOTE",
    "QUICK_GRIDS",
    "READ_SITES",
    "Candidate",
    "CompareDataModule",
    "CompareModule",
    "CompareOptions",
    "MethodResult",
    "compare",
    "compare_main_args",
    "fit_statistics",
    "folder_bytes",
    "make_trainer",
    "options_from_args",
    "print_compare_table",
]
