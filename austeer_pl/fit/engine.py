"""The one fitting engine, without Lightning: the statistics pass, grid scoring and its pick, and the
learned-strength trainer.

``train.py`` (through :class:`~austeer_pl.lightning.module.AUSteerModule`), ``evaluate.py --compare`` (the
same module with more methods) and :mod:`austeer_pl.analyses.units` (directly, one process) all drive
these pieces. Everything a process computes here is a local sum; a driver that runs on several
processes passes an ``all_reduce_sum`` callable (the gradient averaging of the strength trainer),
or reduces the returned sums itself (the Lightning adapter does it with torchmetrics).

Example:
    >>> stats = PassStatistics.for_methods(layout, ["austeer", "caa"])
    >>> for batch in batches:
    ...     stats.update(*read_pair_batch(model, layout, batch, stats.sites))
    >>> rankings = rank_site_options(stats.accumulator, [("attention", ("attention",))], "promote", k_max=50)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from austeer_pl.methods.iti import HeadMoments
from austeer_pl.core.tokens import pair_rows
from austeer_pl.errors import AusteerError
from austeer_pl.scoring.evaluate import answer_suffixes, predict
from austeer_pl.fit.gridscore import decision_statistics
from austeer_pl.core.momentum import MomentumAccumulator
from austeer_pl.core.prefix import SharedPrefixReader, use_shared_prefix
from austeer_pl.core.reading import ActivationReader
from austeer_pl.scoring.loglik import choice_logprobs
from austeer_pl.core.selection import Selection, rank_units
from austeer_pl.core.sites import ModelLayout
from austeer_pl.core.strength import STRENGTH_LOSSES, average_gradients, build_strength, fold_strength, learned_fit_metadata, strength_objective


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


# ---------------------------------------------------------------------------- the statistics pass
def read_pair_batch(
    model: nn.Module, layout: ModelLayout, batch: dict[str, Any], sites: Sequence[str], *, readers: dict | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Last-token units of a collated batch of pairs, ``(pos, neg)``, each ``{site: (B, layers, units)}``.

    A batch with ``prompt_ids`` (shared-prefix collation) is read from one KV cache per prompt
    where ``shared_prefix`` holds on the model's device, else joined into full sequences; a batch
    with ``input_ids`` holds the positive rows, then the negative rows.
    """
    sites = tuple(sites)
    device = next(model.parameters()).device
    n = batch["n_pairs"]
    with torch.inference_mode():
        if "prompt_ids" in batch:
            if use_shared_prefix(batch.get("shared_prefix", True), device):
                readers = {} if readers is None else readers
                reader = readers.get(sites)
                if reader is None:
                    reader = readers[sites] = SharedPrefixReader(model, layout, sites)
                return reader.read_pairs(batch["prompt_ids"], batch["pos_ids"], batch["neg_ids"], batch["pad_id"], max_length=batch["max_length"])
            ids, mask = pair_rows(batch["prompt_ids"], batch["pos_ids"], batch["neg_ids"], batch["pad_id"], batch["max_length"], side="right")
            batch = {"input_ids": ids, "attention_mask": mask}
        acts = ActivationReader(model, layout, sites)(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        return {s: a[:n] for s, a in acts.items()}, {s: a[n:] for s, a in acts.items()}


@dataclass
class PassStatistics:
    """The shared pass's streaming statistics: momentum counts and sums, plus ITI's head moments."""

    accumulator: MomentumAccumulator
    head_moments: HeadMoments | None = None
    reduced: bool = False

    @classmethod
    def create(cls, layout: ModelLayout, sites: Sequence[str], *, head_moments: bool = False) -> PassStatistics:
        acc = MomentumAccumulator({s: layout.site(s).size for s in sites}, layout.n_layers)
        return cls(acc, HeadMoments.from_layout(layout) if head_moments else None)

    @property
    def sites(self) -> tuple[str, ...]:
        return self.accumulator.sites

    def update(self, pos: dict[str, torch.Tensor], neg: dict[str, torch.Tensor]) -> None:
        with torch.inference_mode():
            self.accumulator.update(pos, neg)
            if self.head_moments is not None:
                self.head_moments.update(pos, neg)

    def reduce_(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum every process's statistics (once)."""
        if self.reduced:
            return
        self.accumulator.reduce_(all_reduce_sum)
        if self.head_moments is not None:
            self.head_moments.reduce_(all_reduce_sum)
        self.reduced = True

    def to(self, device) -> PassStatistics:
        self.accumulator.to(device)
        if self.head_moments is not None:
            self.head_moments.to(device)
        return self


def rank_site_options(acc: MomentumAccumulator, site_options: Sequence[tuple[str, tuple[str, ...]]], sign: str, k_max: int) -> dict[str, Selection]:
    """AUSteer's ranking of each site option (``("both", ("attention", "ffn"))``...), cut to ``k_max`` units."""
    rankings = {}
    for name, sites in site_options:
        ranked = rank_units(acc, sites, sign)
        if ranked.k < k_max:
            raise AusteerError(
                f"k={k_max} but only {ranked.k} {name} units are eligible (sign policy {sign}); lower --model.k or use --model.sign both"
            )
        rankings[name] = ranked.head(k_max)
    return rankings


# ---------------------------------------------------------------------------- grid scoring and the pick
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


def predictions(model, tokenizer, task, state, examples, prompts, *, scoring: str, batch_size: int, max_length: int | None, layout=None) -> torch.Tensor:
    """Predicted choice per example with ``state`` applied (None: unsteered)."""
    ctx = state.apply(model, layout=layout) if state is not None else nullcontext()
    with ctx:
        return predict(model, tokenizer, task, examples, prompts, scoring=scoring, batch_size=batch_size, max_length=max_length)


def pick(candidates: Sequence[Candidate], values: Sequence[float], indices: Sequence[int] | None = None) -> int:
    """The index of the best candidate by ``values`` (higher is better).

    The one tie rule of every grid: ties go to fewer steered activations, then the weaker push
    (smaller ``|alpha|``), then grid order.
    """
    indices = list(range(len(candidates))) if indices is None else list(indices)
    if not indices:
        raise AusteerError("no grid point to choose from; give at least one value for each hyperparameter")
    return min(indices, key=lambda i: (-values[i], candidates[i].n_steered, candidates[i].strength, i))


#: Validation criteria of the grid: higher is better for each (``loss`` is negated).
CRITERIA = ("accuracy", "margin", "loss")


def criterion_values(stats: torch.Tensor, criterion: str) -> torch.Tensor:
    """Per-example values of ``criterion`` from :class:`~austeer_pl.fit.gridscore.GridScorer` statistics ``(..., 3)``; higher is better."""
    if criterion not in CRITERIA:
        raise AusteerError(f"unknown selection criterion '{criterion}'; choose one of {', '.join(CRITERIA)}")
    column = {"accuracy": 0, "margin": 1, "loss": 2}[criterion]
    values = stats[..., column]
    return -values if criterion == "loss" else values


def halving_schedule(n_examples: int, n_candidates: int, *, min_examples: int, eta: int, final: int) -> list[int]:
    """Example counts of successive halving's rounds: ``min_examples * eta**r``, until at most ``final``
    candidates remain (each round keeps ``ceil(alive / eta)``, at least ``final``) or all examples are used."""
    rounds, alive, n = [], n_candidates, min(max(min_examples, 1), n_examples)
    while True:
        if alive <= final or n >= n_examples:
            rounds.append(n_examples)
            return rounds
        rounds.append(n)
        alive = max(final, math.ceil(alive / eta))
        n = min(n_examples, n * eta)


@dataclass
class GridChoice:
    """What :func:`choose` decided: the chosen grid point, the best steered one, and why.

    ``index`` is the exported candidate (0, the unsteered model, when steering did not help);
    ``best`` is the best steered candidate within the harm budget (None when there is none).
    """

    index: int
    best: int | None
    helps: bool
    criterion: str
    values: list[float | None]
    accuracy: list[float | None]
    n_scored: list[int]
    harm: dict[int, float]
    gain: float = 0.0
    gain_se: float = 0.0
    threshold: float = 0.0
    accuracy_gain: float = 0.0
    n_verdict: int = 0
    reason: str = ""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    scored_evaluations: int = 0


def _normal_quantile(p: float) -> float:
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(p, dtype=torch.float64)))


def choose(
    candidates: Sequence[Candidate],
    n_examples: int,
    score: Callable[[Sequence[int], int, int], torch.Tensor],
    *,
    criterion: str = "loss",
    halving: bool = True,
    min_examples: int = 16,
    eta: int = 3,
    final: int = 2,
    harm: Callable[[Sequence[int]], torch.Tensor] | None = None,
    harm_budget: float | None = None,
    level: float = 0.05,
    correction: str = "final",
) -> GridChoice:
    """The one grid pick of every fit: successive halving on a continuous criterion, a harm budget,
    and a verdict against "no steering".

    ``candidates[0]`` must be the unsteered model; it is scored on every example reached and is
    never pruned. ``score(indices, lo, hi)`` returns the (already reduced) ``(len(indices), hi - lo,
    3)`` statistics of those candidates on examples ``lo..hi-1`` of a fixed order. With ``halving``
    every steered candidate is scored on the first ``min_examples`` examples, the best ``1/eta``
    by ``criterion`` go on to ``eta`` times as many, and so on until ``final`` remain, which see
    every example (:func:`halving_schedule`); without it every candidate sees every example.

    ``harm(indices)`` gives every steered candidate's KL on ordinary text first; only those within
    ``harm_budget`` are scored at all. The best steered point is the first in the order: more
    examples scored, then the criterion, then :func:`pick`'s tie rule (fewer units, weaker push).
    The verdict is a one-sided paired test of its per-example criterion against the unsteered
    model's on the same examples: steering helps when the mean gain exceeds ``z * se`` with ``z``
    the normal quantile of ``1 - level / m``, and its validation accuracy is not below unsteered.
    ``correction="final"`` (the default) takes ``m`` as the number of points in halving's last round
    (the points whose estimates on every example compete; it does not correct for the earlier
    rounds' pruning); ``"grid"`` takes all G steered points (Bonferroni: stricter, since the best of
    G noisy estimates is biased upward; in ``benchmarks/selection.py`` too strict to find the gains
    that were there). ``level >= 1`` skips the test (the best steered point is always chosen).
    """
    if not candidates or candidates[0].state is not None:
        raise AusteerError("the grid must start with the unsteered model (no steering is a grid point)")
    if n_examples <= 0:
        raise AusteerError("the validation split is empty; raise --data.val_fraction or --data.max_val_examples")
    if eta < 2 or min_examples < 1 or final < 1:
        raise AusteerError("--model.halving_eta >= 2, --model.halving_min_examples >= 1 and final >= 1 are required")
    G = len(candidates)
    stats = torch.full((G, n_examples, 3), float("nan"), dtype=torch.float64)
    reached = [0] * G
    steered = list(range(1, G))
    harms: dict[int, float] = {}
    eligible = steered
    if harm is not None and harm_budget is not None and steered:
        # The harm budget bounds the choice before anything is scored: a state that wrecks ordinary text is not a candidate.
        harms = dict(zip(steered, (float(v) for v in harm(steered))))
        eligible = [i for i in steered if harms[i] <= harm_budget]
    schedule = halving_schedule(n_examples, len(eligible), min_examples=min_examples, eta=eta, final=final) if halving and eligible else [n_examples]
    alive, lo, rounds, evaluations = eligible, 0, [], 0

    def mean_value(i: int) -> float:
        return float(criterion_values(stats[i, : reached[i]], criterion).mean())

    for hi in schedule:
        # The unsteered model and the live candidates, on the examples not yet scored.
        todo = [0, *alive]
        stats[todo, lo:hi] = score(todo, lo, hi).to(torch.float64)
        evaluations += len(todo) * (hi - lo)
        for i in todo:
            reached[i] = hi
        rounds.append({"examples": hi, "candidates": len(alive)})
        if hi >= n_examples:
            break
        order = sorted(alive, key=lambda i: (-mean_value(i), candidates[i].n_steered, candidates[i].strength, i))
        alive = order[: max(final, math.ceil(len(alive) / eta))]
        lo = hi

    values = [mean_value(i) if reached[i] else None for i in range(G)]
    accuracy = [float(stats[i, : reached[i], 0].mean()) if reached[i] else None for i in range(G)]
    order = sorted(eligible, key=lambda i: (-reached[i], -values[i], candidates[i].n_steered, candidates[i].strength, i))
    best = order[0] if order else None
    choice = GridChoice(0, best, False, criterion, values, accuracy, reached, harms, rounds=rounds, scored_evaluations=evaluations)
    if best is None:
        choice.reason = f"no steered grid point is within the harm budget (KL <= {harm_budget:g} nats per token on ordinary text)"
        return choice
    n = reached[best]
    if level >= 1:
        v = paired_verdict(stats[best, :n], stats[0, :n], criterion, level=level)
        choice.gain, choice.gain_se, choice.accuracy_gain, choice.n_verdict = v["gain"], v["gain_se"], v["accuracy_gain"], n
        choice.helps, choice.index, choice.reason = True, best, "verdict off (--model.verdict_level 1): the best steered grid point is chosen"
        return choice
    if correction not in ("grid", "final"):
        raise AusteerError(f"--model.verdict_correction must be grid or final, not '{correction}'")
    tests = len(steered) if correction == "grid" else rounds[-1]["candidates"]
    v = paired_verdict(stats[best, :n], stats[0, :n], criterion, level=level, tests=tests, what="the best grid point")
    choice.gain, choice.gain_se, choice.threshold, choice.accuracy_gain, choice.n_verdict = v["gain"], v["gain_se"], v["threshold"], v["accuracy_gain"], n
    choice.helps, choice.reason = v["helps"], v["reason"]
    if choice.helps:
        choice.index = best
    return choice


def paired_verdict(steered: torch.Tensor, unsteered: torch.Tensor, criterion: str, *, level: float = 0.05, tests: int = 1,
                   what: str = "the steered state") -> dict[str, Any]:
    """Whether ``steered`` beats ``unsteered`` on the same examples beyond the noise.

    Both are ``(n, 3)`` per-example statistics (:data:`~austeer_pl.fit.gridscore.STATISTICS`). The
    per-example criterion gain must exceed ``z * se`` (``z`` the normal quantile of ``1 - level /
    tests``: a one-sided paired test, Bonferroni-corrected for ``tests`` comparisons), and accuracy
    must not drop. Returns ``helps``, ``reason``, ``gain``, ``gain_se``, ``threshold``,
    ``accuracy_gain`` and ``n``.
    """
    n = steered.shape[0]
    d = criterion_values(steered, criterion) - criterion_values(unsteered, criterion)
    gain = float(d.mean()) if n else 0.0
    se = float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("inf")
    acc_gain = float(steered[:, 0].mean() - unsteered[:, 0].mean()) if n else 0.0
    z = _normal_quantile(1.0 - min(level, 1.0) / max(1, tests)) if level < 1 else 0.0
    out = {"helps": False, "gain": gain, "gain_se": se, "threshold": z * se, "accuracy_gain": acc_gain, "n": n, "tests": tests}
    if level >= 1:
        out.update(helps=True, reason="verdict off (--model.verdict_level 1)")
    elif gain <= z * se:
        out["reason"] = (f"{what}'s validation {criterion} gain {gain:+.4f} is within the noise "
                         f"({z:.2f} x se {se:.4f} over {n} examples, {tests} comparisons)")
    elif acc_gain < 0:
        out["reason"] = f"{what} by {criterion} lowers validation accuracy ({acc_gain:+.3f})"
    else:
        out.update(helps=True, reason=f"validation {criterion} gain {gain:+.4f} > {z:.2f} x se {se:.4f} ({n} examples)")
    return out


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
    best: dict[str, Any] | None = field(default=None, init=False)
    stopped: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.loss not in STRENGTH_LOSSES:
            raise AusteerError(f"unknown strength loss '{self.loss}'; choose one of {', '.join(STRENGTH_LOSSES)}")
        if self.criterion not in ("accuracy", "loss"):
            raise AusteerError(f"the strength's epoch criterion must be accuracy or loss, not '{self.criterion}'")
        device = next(self.model.parameters()).device
        self.fn = build_strength(self.kind, self.state.scale.to(device), self.layout, self.state.layer.tolist(),
                                 gate_layer=self.gate_layer, gate_width=self.gate_width).to(device)
        self.optimizer = torch.optim.Adam(self.fn.parameters(), lr=self.lr)
        self._bad = 0

    @property
    def tie_key(self) -> str:
        return "val_nll" if self.loss == "nll" else "val_choice_loss"

    def handle(self):
        from austeer_pl.core.hooks import EditHandle

        return EditHandle(self.model, self.layout, self.state, self.fn)

    def batch_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, nll, kl)`` of one collated batch (see :func:`~austeer_pl.core.strength.strength_objective`)."""
        return strength_objective(self.model, self.layout, self.state, self.fn, batch, kl_weight=self.kl_weight, loss=self.loss)

    def step(self, batch: dict[str, Any], all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = _identity) -> dict[str, torch.Tensor] | None:
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

    def validation_sums(self, tokenizer, task, examples, prompts, *, scoring: str, batch_size: int, max_length: int | None) -> torch.Tensor:
        """This process's ``(VALIDATION_SUMS,)`` float64 sums on ``examples`` with the current strength."""
        out = torch.zeros(VALIDATION_SUMS, dtype=torch.float64)
        if not examples:
            return out
        answers = torch.tensor([ex.answer for ex in examples])
        with torch.no_grad(), self.handle():
            if scoring == "loglik":
                scores = choice_logprobs(self.model, tokenizer, prompts, [answer_suffixes(p, ex.choices, task) for p, ex in zip(prompts, examples)],
                                         batch_size=batch_size, max_length=max_length)
                stats = decision_statistics(scores, answers.tolist())  # correct, margin, choice log-loss
                starts = torch.tensor([0] + [len(sc) for sc in scores[:-1]]).cumsum(0)
                out[0] = stats[:, 0].sum()
                out[2] = -torch.cat([sc.double() for sc in scores])[starts + answers].sum()  # the right answers' NLL
                out[3] = stats[:, 2].sum()
            else:
                preds = predict(self.model, tokenizer, task, examples, prompts, scoring=scoring, batch_size=batch_size, max_length=max_length)
                out[0] = float(preds.eq(answers).sum())
        out[1] = float(len(examples))
        return out

    @staticmethod
    def record(sums: torch.Tensor) -> dict[str, float]:
        """Reduced validation sums as ``val_accuracy``, ``val_nll``, ``val_choice_loss`` (the latter two 0 under generation)."""
        total = max(float(sums[1]), 1.0)
        return {"val_accuracy": float(sums[0]) / total, "val_nll": float(sums[2]) / total, "val_choice_loss": float(sums[3]) / total}

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
            self.state, self.kind, val_accuracy=self.best["val_accuracy"], best_epoch=self.best["epoch"],
            history=self.history, lr=self.lr, kl_weight=self.kl_weight, loss=self.loss,
        )
        return fold_strength(self.state, self.fn, metadata)


__all__ = [
    "CRITERIA",
    "Candidate",
    "GridChoice",
    "choose",
    "criterion_values",
    "halving_schedule",
    "paired_verdict",
    "PassStatistics",
    "StrengthTrainer",
    "VALIDATION_SUMS",
    "pick",
    "predictions",
    "rank_site_options",
    "read_pair_batch",
]
