"""The Lightning fitting pipeline: contrastive-pair data, the momentum pass, validation grid, export.

Fitting is one pass over the training pairs (no optimiser): each process reads its own,
unrepeated share of the pairs and counts momentum; the counts are summed across processes at
the end of the pass, so N processes give exactly the counts of one. Then every (site, k, alpha)
combination of the grid is scored on the validation split and the best becomes the exported
steering state. The frozen LLM is held outside the module's parameters, so checkpoints carry
only the accumulator and the selection.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader

from .errors import AusteerError
from .fileio import os_error_message
from .evaluation import answer_suffixes, check_scoring, default_scoring, predict
from .models import DEFAULT_MODEL, load_model, model_name_of
from .momentum import MomentumAccumulator
from .prefix import SharedPrefixReader, use_shared_prefix
from .reading import ActivationReader
from .scoring import choice_logprobs, pad_ids, truncate_left
from .selection import SIGN_POLICIES, Selection, rank_units
from .sites import LayoutSpec, ModelLayout, locate_units
from .steering import TOKEN_SCOPES, SteeringState
from .strength import STRENGTH_KINDS, STRENGTH_LOSSES, StrengthHandle, average_gradients, build_strength, fold_strength, learned_fit_metadata, strength_objective
from .tasks import NEGATIVE_MODES, Task, TaskExample, format_prompt, join_answer, load_task, make_pairs, split_examples

SITE_OPTIONS = {"attention": ("attention",), "ffn": ("ffn",), "both": ("attention", "ffn")}


# ============================================================================ data
def shard_batches(n: int, rank: int, world: int, batch_size: int) -> list[list[int]]:
    """Rank ``rank``'s batches of indices ``rank, rank + world, ...`` (no index repeated).

    Every rank gets the same number of batches (some may be short or empty), so collective
    operations stay in step even when ``n`` is not divisible by ``world``.

    Example:
        >>> shard_batches(5, 1, 2, 2)
        [[1, 3], []]
    """
    per_rank = math.ceil(n / world)
    n_batches = max(1, math.ceil(per_rank / batch_size))
    mine = list(range(rank, n, world))
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]


class _BatchList:
    """A fixed list of index batches that can skip the ones already consumed (for resuming)."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches
        self.skip = 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return iter(self.batches[skip:])

    def __len__(self) -> int:
        return len(self.batches)


class ResumableLoader(DataLoader):
    """A DataLoader whose state is the number of batches the module has consumed.

    Lightning saves this state in checkpoints and restores it before iterating, so a fit resumed
    mid-pass continues exactly after the last batch that was counted.
    """

    def __init__(self, dataset, batches: list[list[int]], progress: Callable[[], int], **kwargs) -> None:
        super().__init__(dataset, batch_sampler=_BatchList(batches), **kwargs)
        self._progress = progress

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": int(self._progress())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.skip = int(state.get("batches_done", 0))


@dataclass(frozen=True)
class EncodedPair:
    prompt: list[int]
    positive: list[int]
    negative: list[int]


def pair_rows(prompts: Sequence[list[int]], positives: Sequence[list[int]], negatives: Sequence[list[int]], pad_id: int,
              max_length: int | None, *, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``: every prompt + right answer, then every prompt + wrong answer,
    each cut to its last ``max_length`` ids and padded on ``side``."""
    seqs = [truncate_left(p + a, max_length) for p, a in zip(prompts, positives)]
    seqs += [truncate_left(p + a, max_length) for p, a in zip(prompts, negatives)]
    return pad_ids(seqs, pad_id, side=side)


class ContrastivePairDataModule(pl.LightningDataModule):
    """Serves contrastive pairs (prompt + right answer vs. prompt + wrong answer) and validation examples.

    Args:
        task: ``rotten_tomatoes`` (default), a BIG-bench ``task.json``, a paper task on the hub
            (``boolq``, ``copa``, ``winogrande``, ``svamp``, ``mawps``, ``gsm8k``), ``hub:owner/name``
            or a local ``.jsonl``/``.json``/``.csv`` file (see the README for the schema).
        seed: seed of the split and of the sampled wrong answers.
        negatives: ``sample`` (one wrong choice per example) or ``all`` (every wrong choice).
        val_fraction: share of examples for validation (hyperparameters are chosen there).
        test_fraction: share of examples held out for ``evaluate.py``.
        max_train_pairs: cap on training pairs (None: all).
        max_val_examples: cap on validation examples.
        max_test_examples: cap on test examples (recorded for evaluate.py).
        batch_size: pairs per forward pass in fitting.
        eval_batch_size: examples per forward pass in validation.
        chat_template: format prompts with the tokenizer's chat template (None: when it has one).
        max_length: truncate longer sequences from the left to this many tokens.
        num_workers: DataLoader worker processes.
        shared_prefix: in the momentum pass, run each pair's prompt once and continue both answers
            from its KV cache (about half the work on short answers; the units equal the full
            sequences' to float tolerance). ``False`` reads the two full sequences of each pair.
            ``"auto"`` shares on the CPU and reads full sequences on an accelerator, where a small
            model measured slower shared (:func:`~austeer_pl.prefix.use_shared_prefix`).
    """

    def __init__(
        self,
        task: str = "rotten_tomatoes",
        seed: int = 0,
        negatives: str = "sample",
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        max_train_pairs: int | None = 256,
        max_val_examples: int | None = 100,
        max_test_examples: int | None = 500,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        chat_template: bool | None = None,
        max_length: int | None = 512,
        num_workers: int = 0,
        shared_prefix: bool | Literal["auto"] = "auto",
    ) -> None:
        super().__init__()
        use_shared_prefix(shared_prefix, "cpu")  # a bad value fails here, before any work
        self.save_hyperparameters()
        if batch_size <= 0 or eval_batch_size <= 0:
            raise AusteerError("batch sizes must be positive; set --data.batch_size and --data.eval_batch_size to 1 or more")
        for option, value, least in (
            ("max_length", max_length, 2), ("max_train_pairs", max_train_pairs, 1),
            ("max_val_examples", max_val_examples, 1), ("max_test_examples", max_test_examples, 1),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise AusteerError(
                    f"--data.{option} must be an integer of at least {least} (or null for no limit), got {value!r}"
                    + ("; a prompt and its answer need at least 2 tokens" if option == "max_length" else "")
                )
        if negatives not in NEGATIVE_MODES:
            raise AusteerError(f"--data.negatives must be one of {', '.join(NEGATIVE_MODES)}, got {negatives!r}")
        self.tokenizer = None
        self.task_obj: Task | None = None
        self.splits: dict[str, list[TaskExample]] = {}
        self.pairs: list[EncodedPair] = []
        self.train_examples: list[EncodedPair] = []
        self.val_prompts: list[str] = []

    # -- what the fitting module and evaluate.py need to know
    def data_config(self) -> dict[str, Any]:
        """The settings that reproduce these splits (recorded in the exported state)."""
        keys = ("task", "seed", "negatives", "val_fraction", "test_fraction", "max_train_pairs", "max_val_examples", "max_test_examples", "chat_template", "max_length")
        return {key: self.hparams[key] for key in keys}

    def prepare_task(self) -> Task:
        if self.task_obj is None:
            hp = self.hparams
            self.task_obj = load_task(hp.task, seed=hp.seed)
            self.splits = split_examples(
                self.task_obj.examples,
                seed=hp.seed,
                val_fraction=hp.val_fraction,
                test_fraction=hp.test_fraction,
                max_val=hp.max_val_examples,
                max_test=hp.max_test_examples,
            )
            if not self.splits["train"]:
                raise AusteerError(f"task '{hp.task}' left no training examples; lower val_fraction/test_fraction or add examples")
        return self.task_obj

    def setup(self, stage: str | None = None) -> None:
        task = self.prepare_task()
        if self.tokenizer is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            if module is None or not hasattr(module, "tokenizer"):
                raise AusteerError("the data module needs a tokenizer: attach it to a trainer with AUSteerModule or set .tokenizer")
            self.tokenizer = module.tokenizer
        hp = self.hparams
        pairs = make_pairs(self.splits["train"], negatives=hp.negatives, seed=hp.seed, max_pairs=hp.max_train_pairs)
        if not self.pairs:
            prompts = {p.prompt: None for p in pairs}
            texts = {p: format_prompt(self.tokenizer, task, p, chat_template=hp.chat_template) for p in prompts}
            prompt_ids = dict(zip(texts, self.tokenizer([texts[p] for p in texts], add_special_tokens=True)["input_ids"]))
            pos = self._answers([texts[p.prompt] for p in pairs], [p.positive for p in pairs])
            neg = self._answers([texts[p.prompt] for p in pairs], [p.negative for p in pairs])
            self.pairs = [EncodedPair(prompt_ids[p.prompt], a, b) for p, a, b in zip(pairs, pos, neg)]
        if not self.val_prompts:
            self.val_prompts = [format_prompt(self.tokenizer, task, ex.prompt, chat_template=hp.chat_template) for ex in self.splits["val"]]
        if not self.train_examples:
            # For the learned-strength phase: each training example's prompt, right answer and the
            # wrong answer of its first pair, as ids. The same examples the pairs came from
            # (max_train_pairs caps both phases).
            wrong: dict[str, str] = {}
            for p in pairs:
                wrong.setdefault(p.example_uid, p.negative)
            examples = [ex for ex in self.splits["train"] if ex.uid in wrong]
            texts = [format_prompt(self.tokenizer, task, ex.prompt, chat_template=hp.chat_template) for ex in examples]
            ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
            answers = self._answers(texts, [ex.target for ex in examples])
            negatives = self._answers(texts, [wrong[ex.uid] for ex in examples])
            self.train_examples = [EncodedPair(p, a, n) for p, a, n in zip(ids, answers, negatives)]

    def _answers(self, prompt_texts: Sequence[str], choices: Sequence[str]) -> list[list[int]]:
        suffixes = [join_answer(t, c)[len(t):] for t, c in zip(prompt_texts, choices)]
        ids = self.tokenizer(suffixes, add_special_tokens=False)["input_ids"]
        for seq, choice in zip(ids, choices):
            if not seq:
                raise AusteerError(f"answer {choice!r} tokenizes to nothing; give non-empty choices")
        return ids

    def _world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def collate_pairs(self, items: list[EncodedPair]) -> dict[str, Any]:
        """One batch of pairs: the prompt and answer ids (shared-prefix reading), or the positive
        rows then the negative rows, right-padded (full-sequence reading)."""
        if not items:
            return {"n_pairs": 0}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        limit = self.hparams.max_length
        if self.hparams.shared_prefix:  # True or "auto": the module decides on its device
            lengths = [len(p.prompt) + len(a) for p in items for a in (p.positive, p.negative)]
            return {
                "n_pairs": len(items),
                "shared_prefix": self.hparams.shared_prefix,
                "prompt_ids": [p.prompt for p in items],
                "pos_ids": [p.positive for p in items],
                "neg_ids": [p.negative for p in items],
                "pad_id": pad,
                "max_length": limit,
                "n_tokens": sum(n if limit is None else min(n, limit) for n in lengths),
            }
        ids, mask = pair_rows([p.prompt for p in items], [p.positive for p in items], [p.negative for p in items], pad, limit, side="right")
        return {
            "n_pairs": len(items),
            "input_ids": ids,
            "attention_mask": mask,
            "n_tokens": int(mask.sum()),
        }

    def collate_examples_train(self, items: list[EncodedPair]) -> dict[str, Any]:
        """For the strength phase: rows ``[:n]`` prompt + right answer, rows ``[n:]`` prompt + wrong
        answer, left-padded (answers end at the last position); see
        :func:`~austeer_pl.strength.strength_objective`."""
        if not items:
            return {"n_examples": 0}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids, mask = pair_rows([p.prompt for p in items], [p.positive for p in items], [p.negative for p in items], pad, self.hparams.max_length, side="left")
        lengths = [len(p.positive) for p in items] + [len(p.negative) for p in items]
        return {"n_examples": len(items), "input_ids": ids, "attention_mask": mask, "answer_lengths": torch.tensor(lengths)}

    def strength_batches(self, epoch: int) -> list[list[EncodedPair]]:
        """This process's training examples for learned-strength epoch ``epoch`` (1, 2, ...), in batches.

        Every process applies the same seeded permutation, then takes its share with
        :func:`shard_batches`, so the union of one step's batches is the same global batch whatever
        the number of processes.
        """
        rank, world = self._world()
        order = torch.randperm(len(self.train_examples), generator=torch.Generator().manual_seed(self.hparams.seed + epoch)).tolist()
        return [[self.train_examples[order[i]] for i in rows] for rows in shard_batches(len(order), rank, world, self.hparams.batch_size)]

    def train_dataloader(self) -> DataLoader:
        rank, world = self._world()
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        if epoch > 0:  # learned-strength epochs
            batches = self.strength_batches(epoch)
            return DataLoader(batches, batch_size=None, collate_fn=self.collate_examples_train, num_workers=self.hparams.num_workers)
        module = self.trainer.lightning_module if self.trainer is not None else None
        progress = (lambda: module.batches_done) if module is not None else (lambda: 0)
        return ResumableLoader(
            self.pairs,
            shard_batches(len(self.pairs), rank, world, self.hparams.batch_size),
            progress,
            collate_fn=self.collate_pairs,
            num_workers=self.hparams.num_workers,
        )

    def collate_examples(self, items: list[int]) -> dict[str, Any]:
        return {"index": items}

    def val_dataloader(self) -> DataLoader:
        rank, world = self._world()
        batches = shard_batches(len(self.splits["val"]), rank, world, self.hparams.eval_batch_size)
        return DataLoader(list(range(len(self.splits["val"]))), batch_sampler=_BatchList(batches), collate_fn=self.collate_examples)


# ============================================================================ strategy and callbacks
class FrozenDDPStrategy(DDPStrategy):
    """DDP that does not wrap a module with nothing to train.

    The momentum pass has no gradients to synchronise (``DistributedDataParallel`` refuses such a
    module): processes only need the process group, their own data shard and the final sum of the
    statistics. A module with trainable parameters is wrapped as usual (without buffer broadcasts).
    """

    strategy_name = "austeer_ddp"

    def configure_ddp(self) -> None:
        if any(p.requires_grad for p in self.model.parameters()):
            super().configure_ddp()


def make_strategy(name: str, *, timeout_s: float = 1800.0):
    """Map ``ddp``-family strategy names to :class:`FrozenDDPStrategy`; others pass through."""
    if not isinstance(name, str):
        return name
    start = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}.get(name)
    if start is None:
        return name
    return FrozenDDPStrategy(start_method=start, timeout=timedelta(seconds=timeout_s), broadcast_buffers=False)


class PassCheckpoint(Callback):
    """Writes ``last.ckpt`` every ``every_n_batches`` batches of the momentum pass (atomically).

    ``ModelCheckpoint`` counts optimiser steps, and the momentum pass has none.
    """

    def __init__(self, dirpath: str | Path, every_n_batches: int = 50) -> None:
        self.dirpath = Path(dirpath)
        self.every = int(every_n_batches)

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every > 0 and (batch_idx + 1) % self.every == 0:
            self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.save(trainer)

    def save(self, trainer) -> None:
        tmp = self.dirpath / ".last.ckpt.tmp"
        try:
            trainer.save_checkpoint(tmp)  # collective: every rank calls it; rank zero writes
            if trainer.is_global_zero:
                tmp.replace(self.last_path)
        except (OSError, RuntimeError) as err:
            # A full or read-only disk: leave the previous last.ckpt, and no partial file, behind.
            tmp.unlink(missing_ok=True)
            if isinstance(err, OSError):
                raise AusteerError(os_error_message(err, self.last_path)) from None
            if "writ" not in str(err).lower():
                raise
            raise AusteerError(f"cannot write the checkpoint {self.last_path} ({str(err).splitlines()[0][:120]}); free disk space or choose another --run_dir") from None
        trainer.strategy.barrier("austeer-checkpoint")


PASS_SETTINGS_DATA = ("task", "seed", "negatives", "val_fraction", "test_fraction", "max_train_pairs", "chat_template", "max_length", "batch_size")
PASS_SETTINGS_MODEL = ("model_name", "dtype", "site", "layout_layers", "layout_attention", "layout_ffn")


def pass_settings(model_hparams: Mapping[str, Any], data_hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a momentum pass depends on; a checkpoint resumes only under the same ones."""
    data = {key: data_hparams.get(key) for key in PASS_SETTINGS_DATA}
    model = {key: model_hparams.get(key) for key in PASS_SETTINGS_MODEL}
    model["site"] = sorted({s for _, sites in parse_sites(model["site"]) for s in sites})
    return {"data": data, "model": model}


def check_resume(path: str | Path, settings: dict[str, Any]) -> None:
    """Check, before any work, that ``path`` is an austeer-pl checkpoint written under ``settings``.

    It is read with ``weights_only=True`` (explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot
    turn a crafted file into code execution).

    Raises:
        AusteerError: naming what is wrong: a missing, truncated or foreign file, or the first
            setting that differs from the one the checkpoint was written with.
    """
    path = Path(path)
    if not path.is_file():
        raise AusteerError(f"--ckpt_path {path}: no such file; pass RUN_DIR/checkpoints/last.ckpt of the fit to resume")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a checkpoint, or objects weights_only refuses
        detail = " ".join(str(err).split())[:120]
        raise AusteerError(f"--ckpt_path {path} cannot be read as a checkpoint ({type(err).__name__}: {detail}); it is truncated or not from train.py: start the fit again") from None
    saved = checkpoint.get("austeer") if isinstance(checkpoint, dict) else None
    if not isinstance(saved, dict):
        raise AusteerError(f"--ckpt_path {path} was not written by austeer-pl's train.py; pass a last.ckpt from a train.py run")
    recorded = saved.get("settings")
    if not isinstance(recorded, dict):
        raise AusteerError(f"--ckpt_path {path} records no data and model settings (written by an older austeer-pl); start the fit again")
    for group in ("data", "model"):
        for key, value in settings[group].items():
            before = (recorded.get(group) or {}).get(key)
            if before != value:
                raise AusteerError(
                    f"--ckpt_path {path} was written with --{group}.{key} {before!r}, this run has {value!r}; "
                    "resume with the same settings, or start a new fit without --ckpt_path"
                )


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


# ============================================================================ the module
def parse_sites(site: str | Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    options = [site] if isinstance(site, str) else list(site)
    out = []
    for opt in options:
        key = str(opt).strip().lower()
        if key not in SITE_OPTIONS:
            raise AusteerError(f"unknown site '{opt}'; choose attention, ffn or both (or a list of them)")
        if key not in [o for o, _ in out]:
            out.append((key, SITE_OPTIONS[key]))
    if not out:
        raise AusteerError("no site given; choose attention, ffn or both")
    return out


def _as_list(value, name: str, kind: type) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise AusteerError(f"--model.{name} is empty; give at least one value")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise AusteerError(f"--model.{name} value {v!r} is not a number")
        if kind is int and (float(v) != int(v) or int(v) <= 0):
            raise AusteerError(f"--model.{name} value {v!r} must be a positive whole number")
        if kind is float and not math.isfinite(float(v)):
            raise AusteerError(f"--model.{name} value {v!r} must be finite")
        out.append(kind(v))
    return sorted(set(out), key=out.index)


class AUSteerModule(pl.LightningModule):
    """A frozen causal LM, its momentum pass over contrastive pairs, and the validation grid.

    Args:
        model_name: ``smollm2-135m-instruct`` (embedded), a hub id, a local folder or a ``.gguf`` file.
        dtype: ``float32``, ``bfloat16``, ``float16`` or None (the checkpoint's).
        site: ``attention``, ``ffn``, ``both``, or a list of them to choose from on validation.
        k: number of units, or a list to choose from on validation.
        alpha: strength, or a list to choose from on validation.
        sign: ``promote`` (only m > 0) or ``both``.
        token_scope: ``all``, ``prompt`` or ``generated`` (recorded in the state).
        strength: ``momentum`` (the paper's rule ``alpha * m``), or a learned ``scalar`` per unit or
            input-conditioned ``gate``, trained after selection (see :mod:`austeer_pl.strength`).
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
    """

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        dtype: str | None = None,
        site: str | list[str] = "attention",
        k: int | list[int] = [10, 50],  # noqa: B006 - jsonargparse needs a literal default
        alpha: float | list[float] = [4.0, 16.0, 64.0],  # noqa: B006
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
        self.read_sites = tuple(dict.fromkeys(s for _, sites in self.site_options for s in sites))
        self.export_dir: Path | None = None
        self.batches_done = 0
        self.accumulator: MomentumAccumulator | None = None
        self.rankings: dict[str, Selection] = {}
        self.state: SteeringState | None = None
        self.summary: dict[str, Any] = {}
        self._pending: dict[str, Any] | None = None
        self._val_correct: torch.Tensor | None = None
        self._val_total = 0
        self._fit_started = 0.0
        self._n_tokens = 0
        self.strength_fn: nn.Module | None = None
        self._prefix_readers: dict[tuple[str, ...], SharedPrefixReader] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._best: dict[str, Any] | None = None
        self._bad_epochs = 0
        self.strength_history: list[dict[str, float]] = []
        # The frozen LLM is deliberately not a registered submodule (see `llm`).
        self.__dict__["_llm"] = None
        self.__dict__["_tokenizer"] = None
        self.__dict__["_layout"] = None

    # -- the frozen model, outside parameters and state_dict
    def _load(self) -> None:
        if self._llm is None:
            hp = self.hparams
            model, tokenizer = load_model(hp.model_name, dtype=hp.dtype, cache_dir=hp.cache_dir)
            self.__dict__["_llm"] = model.to(self.device)
            self.__dict__["_tokenizer"] = tokenizer
            spec = None
            if hp.layout_layers:
                spec = LayoutSpec(hp.layout_layers, hp.layout_attention, hp.layout_ffn)
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
        self._prefix_readers = {}
        return self

    # -- the momentum pass
    def setup(self, stage: str) -> None:
        for site in self.read_sites:
            self.layout.site(site)
        if self.accumulator is None:
            self.accumulator = MomentumAccumulator({s: self.layout.site(s).size for s in self.read_sites}, self.layout.n_layers)

    def configure_optimizers(self):
        return None

    def on_train_start(self) -> None:
        self._fit_started = time.perf_counter()
        self.llm.eval()
        self.accumulator.to(self.device)
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.current_epoch > 0:
            return self.strength_step(batch)
        if batch["n_pairs"]:
            pos, neg = self.read_pair_batch(batch)
            self.accumulator.update(pos, neg)
            self._n_tokens += batch["n_tokens"]
        self.batches_done += 1
        return None

    def read_pair_batch(self, batch: dict[str, Any], sites: Sequence[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Last-token units of a collated batch of pairs, ``(pos, neg)``, each ``{site: (B, layers, units)}``.

        Reads prompt + answers from a shared KV cache when the batch holds ids per part and
        ``--data.shared_prefix`` holds on this device, or the padded full sequences otherwise.
        """
        sites = tuple(sites or self.read_sites)
        n = batch["n_pairs"]
        with torch.inference_mode():
            if "prompt_ids" in batch:
                if use_shared_prefix(batch.get("shared_prefix", True), self.device):
                    reader = self._prefix_readers.get(sites)
                    if reader is None:
                        reader = self._prefix_readers[sites] = SharedPrefixReader(self.llm, self.layout, sites)
                    return reader.read_pairs(batch["prompt_ids"], batch["pos_ids"], batch["neg_ids"], batch["pad_id"], max_length=batch["max_length"])
                ids, mask = pair_rows(batch["prompt_ids"], batch["pos_ids"], batch["neg_ids"], batch["pad_id"], batch["max_length"], side="right")
                batch = {"input_ids": ids, "attention_mask": mask}
            acts = ActivationReader(self.llm, self.layout, sites)(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
            return {s: a[:n] for s, a in acts.items()}, {s: a[n:] for s, a in acts.items()}

    def finish_pass(self) -> None:
        """Sum the statistics across processes and rank the units (once, at the end of the pass)."""
        if self.rankings:
            return
        self.accumulator.reduce_(_all_reduce_sum)
        n_max = max(self.k_grid)
        rankings = {}
        for name, sites in self.site_options:
            ranked = rank_units(self.accumulator, sites, self.hparams.sign)
            if ranked.k < n_max:
                raise AusteerError(
                    f"k={n_max} but only {ranked.k} {name} units are eligible (sign policy {self.hparams.sign}); lower --model.k or use --model.sign both"
                )
            rankings[name] = ranked.head(n_max)
        self.rankings = rankings
        tokens = torch.tensor([self._n_tokens], dtype=torch.int64, device=self.device)
        self.summary["fit_tokens"] = int(_all_reduce_sum(tokens))
        self.summary["fit_seconds"] = time.perf_counter() - self._fit_started
        self.summary["n_pairs"] = self.accumulator.n

    def on_validation_start(self) -> None:
        # Lightning validates at the end of the training epoch, before on_train_epoch_end.
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.finish_pass()

    def on_train_epoch_end(self) -> None:
        self.finish_pass()
        self.log("fit/n_pairs", float(self.accumulator.n), rank_zero_only=True)
        self.log("fit/seconds", float(self.summary["fit_seconds"]), rank_zero_only=True)
        self.log("fit/tokens", float(self.summary["fit_tokens"]), rank_zero_only=True)

    # -- the validation grid
    def grid(self) -> list[tuple[str, int, float]]:
        return [(name, k, alpha) for name, _ in self.site_options for k in self.k_grid for alpha in self.alpha_grid]

    def make_state(self, site_option: str, k: int, alpha: float, metadata: dict[str, Any] | None = None) -> SteeringState:
        return SteeringState.from_selection(
            self.rankings[site_option].head(k),
            self.layout,
            alpha=alpha,
            base_model=model_name_of(self.llm),
            sign_policy=self.hparams.sign,
            token_scope=self.hparams.token_scope,
            metadata=metadata,
            layout_spec=self.layout_spec(),
        )

    def layout_spec(self) -> dict[str, str | None] | None:
        """The ``--model.layout_*`` module paths, recorded in exported states (None: located automatically)."""
        hp = self.hparams
        if not hp.layout_layers:
            return None
        return {"layers": hp.layout_layers, "attention": hp.layout_attention, "ffn": hp.layout_ffn}

    def on_validation_epoch_start(self) -> None:
        self._val_correct = torch.zeros(1 + len(self.grid()), dtype=torch.int64)
        self._val_total = 0
        self._val_nll = 0.0
        self._val_choice = 0.0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if not self.rankings or not batch["index"]:
            return None
        if self.strength_fn is not None:
            return self.strength_validation_step(batch)
        dm = self.trainer.datamodule
        task = dm.task_obj
        examples = [dm.splits["val"][i] for i in batch["index"]]
        prompts = [dm.val_prompts[i] for i in batch["index"]]
        scoring = self.hparams.scoring or default_scoring(task)
        answers = torch.tensor([ex.answer for ex in examples])
        kwargs = dict(scoring=scoring, batch_size=dm.hparams.eval_batch_size, max_length=dm.hparams.max_length)
        self._val_correct[0] += int(predict(self.llm, self.tokenizer, task, examples, prompts, **kwargs).eq(answers).sum())
        for i, (option, k, alpha) in enumerate(self.grid(), start=1):
            with self.make_state(option, k, alpha).apply(self.llm, layout=self.layout):
                self._val_correct[i] += int(predict(self.llm, self.tokenizer, task, examples, prompts, **kwargs).eq(answers).sum())
        self._val_total += len(examples)
        return None

    def on_validation_epoch_end(self) -> None:
        if not self.rankings:
            return
        if self.strength_fn is not None:
            return self.strength_validation_end()
        counts = _all_reduce_sum(torch.cat([self._val_correct, torch.tensor([self._val_total])]).to(self.device)).cpu()
        correct, total = counts[:-1], int(counts[-1])
        if total == 0:
            raise AusteerError("the validation split is empty; raise --data.val_fraction or --data.max_val_examples")
        acc = (correct.double() / total).tolist()
        results = [
            {"site": option, "k": k, "alpha": alpha, "val_accuracy": a}
            for (option, k, alpha), a in zip(self.grid(), acc[1:])
        ]
        # Best accuracy; ties go to fewer units, then the weaker push, then grid order.
        best = min(range(len(results)), key=lambda i: (-results[i]["val_accuracy"], results[i]["k"], abs(results[i]["alpha"]), i))
        chosen = results[best]
        dm = self.trainer.datamodule
        metadata = {
            "fit": {
                "strength": self.hparams.strength,
                "n_pairs": self.accumulator.n,
                "n_val_examples": total,
                "val_accuracy_unsteered": acc[0],
                "val_accuracy": chosen["val_accuracy"],
                "site": chosen["site"],
                "grid": results,
                "fit_seconds": self.summary.get("fit_seconds"),
                "world_size": self.trainer.world_size,
                "scoring": self.hparams.scoring or default_scoring(dm.task_obj),
            },
            "data": dm.data_config(),
        }
        self.state = self.make_state(chosen["site"], chosen["k"], chosen["alpha"], metadata)
        self.summary.update(val_accuracy_unsteered=acc[0], val_accuracy=chosen["val_accuracy"], choice=chosen, grid=results, n_val=total)
        self.log("val/accuracy_unsteered", acc[0], rank_zero_only=True)
        self.log("val/accuracy", chosen["val_accuracy"], rank_zero_only=True)
        self.log("val/k", float(chosen["k"]), rank_zero_only=True)
        self.log("val/alpha", float(chosen["alpha"]), rank_zero_only=True)
        if self.hparams.strength != "momentum" and self.hparams.strength_epochs > 0:
            self.start_strength_phase(chosen["val_accuracy"])

    # -- the optional learned-strength phase (epochs after the first)
    def start_strength_phase(self, val_accuracy: float) -> None:
        init = self.state.scale.to(self.device)
        self.strength_fn = build_strength(
            self.hparams.strength, init, self.layout, self.state.layer.tolist(),
            gate_layer=self.hparams.gate_layer, gate_width=self.hparams.gate_width,
        ).to(self.device)
        self._optimizer = torch.optim.Adam(self.strength_fn.parameters(), lr=self.hparams.strength_lr)
        # The momentum rule (the initial weights) is the first candidate for the best weights.
        dm = self.trainer.datamodule
        rank, world = dm._world()
        self._val_correct, self._val_total, self._val_nll, self._val_choice = torch.zeros(1, dtype=torch.int64), 0, 0.0, 0.0
        for indices in shard_batches(len(dm.splits["val"]), rank, world, dm.hparams.eval_batch_size):
            if indices:
                self.strength_validation_step({"index": indices})
        record = self._reduce_strength_validation()
        self._best = {**record, "epoch": 0, "weights": {k: v.detach().clone() for k, v in self.strength_fn.state_dict().items()}}
        self._bad_epochs = 0
        self.strength_history = [{"epoch": 0, **record}]

    def strength_handle(self) -> StrengthHandle:
        return StrengthHandle(self.llm, self.layout, self.state, self.strength_fn)

    def strength_batch_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, nll, kl)``: ``--model.strength_loss`` plus ``kl_weight`` x KL(unsteered || steered) at the answer position."""
        return strength_objective(self.llm, self.layout, self.state, self.strength_fn, batch, kl_weight=self.hparams.kl_weight, loss=self.hparams.strength_loss)

    def strength_step(self, batch: dict[str, Any]) -> None:
        params = list(self.strength_fn.parameters())
        self._optimizer.zero_grad(set_to_none=False)
        if batch["n_examples"]:
            loss, nll, kl = self.strength_batch_loss(batch)
            self.manual_backward(loss)
            self.log_dict({"fit/strength_loss": loss.detach(), "fit/strength_nll": nll.detach(), "fit/strength_kl": kl.detach()}, rank_zero_only=True)
        # Gradient averaging across processes (the DDP reduction; the LLM itself has no gradients).
        average_gradients(params, _all_reduce_sum, batch["n_examples"])
        self._optimizer.step()
        return None

    def strength_validation_step(self, batch: dict[str, Any]) -> None:
        dm = self.trainer.datamodule
        examples = [dm.splits["val"][i] for i in batch["index"]]
        prompts = [dm.val_prompts[i] for i in batch["index"]]
        answers = torch.tensor([ex.answer for ex in examples])
        scoring = self.hparams.scoring or default_scoring(dm.task_obj)
        kwargs = dict(batch_size=dm.hparams.eval_batch_size, max_length=dm.hparams.max_length)
        with torch.no_grad(), self.strength_handle():
            if scoring == "loglik":
                # The log-likelihoods give the prediction, the right answer's NLL and the cross-entropy
                # over the choices (the tie-breaker of the nll and the choice loss).
                scores = choice_logprobs(self.llm, self.tokenizer, prompts, [answer_suffixes(p, ex.choices) for p, ex in zip(prompts, examples)], **kwargs)
                preds = torch.stack([sc.argmax() for sc in scores])
                self._val_nll += float(sum(-sc[ex.answer] for sc, ex in zip(scores, examples)))
                self._val_choice += float(sum(torch.logsumexp(sc.double(), 0) - sc[ex.answer] for sc, ex in zip(scores, examples)))
            else:
                preds = predict(self.llm, self.tokenizer, dm.task_obj, examples, prompts, scoring=scoring, **kwargs)
        self._val_correct[0] += int(preds.eq(answers).sum())
        self._val_total += len(examples)

    def _reduce_strength_validation(self) -> dict[str, float]:
        """``val_accuracy``, ``val_nll`` (the right answer's) and ``val_choice_loss`` (cross-entropy
        over the choices), summed over processes; the latter two are 0 under generation scoring."""
        sums = [float(self._val_correct[0]), float(self._val_total), self._val_nll, self._val_choice]
        counts = _all_reduce_sum(torch.tensor(sums, dtype=torch.float64, device=self.device)).cpu()
        total = max(int(counts[1]), 1)
        return {"val_accuracy": float(counts[0]) / total, "val_nll": float(counts[2]) / total, "val_choice_loss": float(counts[3]) / total}

    def strength_validation_end(self) -> None:
        record = self._reduce_strength_validation()
        epoch = self.current_epoch
        self.strength_history.append({"epoch": epoch, **record})
        for key, value in record.items():
            self.log(f"val/strength_{key.removeprefix('val_')}", value, rank_zero_only=True)
        # Early stopping on validation accuracy; ties go to the lower validation value of the loss
        # being trained (the right answer's NLL, or the cross-entropy over the choices).
        tie = "val_nll" if self.hparams.strength_loss == "nll" else "val_choice_loss"
        if (record["val_accuracy"], -record[tie]) > (self._best["val_accuracy"], -self._best[tie]):
            self._best = {**record, "epoch": epoch, "weights": {k: v.detach().clone() for k, v in self.strength_fn.state_dict().items()}}
            self._bad_epochs = 0
        else:
            self._bad_epochs += 1
            if self._bad_epochs >= self.hparams.patience:
                self.trainer.should_stop = True

    def finish_strength_phase(self) -> None:
        """Keep the best weights (validation accuracy) and fold them into the exported state."""
        self.strength_fn.load_state_dict(self._best["weights"])
        metadata = learned_fit_metadata(
            self.state, self.hparams.strength, val_accuracy=self._best["val_accuracy"], best_epoch=self._best["epoch"],
            history=self.strength_history, lr=self.hparams.strength_lr, kl_weight=self.hparams.kl_weight, loss=self.hparams.strength_loss,
        )
        self.state = fold_strength(self.state, self.strength_fn, metadata)
        self.summary["val_accuracy"] = self._best["val_accuracy"]

    def on_fit_end(self) -> None:
        if self.strength_fn is not None:
            self.finish_strength_phase()
        if self.state is not None and self.export_dir is not None and self.trainer.is_global_zero:
            self.state.save_pretrained(self.export_dir)

    # -- checkpoints: the accumulator and selection only
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        acc = self.accumulator
        tensors = {k: v.detach().clone() for k, v in acc.tensors.items()}
        reduced = bool(self.rankings)
        if not reduced:
            # Mid-pass: each process holds part of the counts; the checkpoint keeps their sum.
            for t in tensors.values():
                _all_reduce_sum(t)
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
