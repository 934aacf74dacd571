"""The Lightning data module: contrastive pairs, validation and test examples, sharded without repeats.

Every process reads its own, unrepeated share (:func:`shard_batches`) with the same number of
batches on every rank, so collectives stay in step and N processes see each pair exactly once.
Rows are built by :mod:`austeer_pl.core.tokens`, the same way as in scoring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from austeer_pl.core.tokens import encode_pairs, pad_id_of, pair_rows
from austeer_pl.tasks.config import DataConfig
from austeer_pl.errors import AusteerError
from austeer_pl.core.prefix import use_shared_prefix
from austeer_pl.tasks.sources import NEGATIVE_MODES, Task, TaskExample, format_prompt, join_for, make_pairs


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
            model measured slower shared (:func:`~austeer_pl.core.prefix.use_shared_prefix`).
        protocol: ``default`` (this project's prompts and scoring) or ``paper`` (the AUSteer paper
            code's prompts, training strings, read token, scoring and sizes: :mod:`austeer_pl.tasks.paper`).
        task_files: local files (comma-separated) with rows in a hub task's own schema, read
            through ``datasets`` instead of fetching; a split is named in the file name or a
            ``split`` column.
        paper_accuracy: the paper code's logged accuracy for this setting (configs in
            ``configs/paper``), recorded so that ``evaluate.py`` prints it beside this run's.
    """

    def __init__(
        self,
        task: str = "rotten_tomatoes",
        seed: int = 0,
        negatives: str = "sample",
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        max_train_pairs: int | None = 256,
        max_val_examples: int | None = 200,
        max_test_examples: int | None = 500,
        batch_size: int = 16,
        eval_batch_size: int = 16,
        chat_template: bool | None = None,
        max_length: int | None = 512,
        num_workers: int = 0,
        shared_prefix: bool | Literal["auto"] = "auto",
        protocol: Literal["default", "paper"] = "default",
        task_files: str | None = None,
        paper_accuracy: float | None = None,
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
        if protocol not in ("default", "paper"):
            raise AusteerError(f"--data.protocol must be default or paper, not {protocol!r}")
        if negatives not in NEGATIVE_MODES:
            raise AusteerError(f"--data.negatives must be one of {', '.join(NEGATIVE_MODES)}, got {negatives!r}")
        self.tokenizer = None
        self.task_obj: Task | None = None
        self.splits: dict[str, list[TaskExample]] = {}
        self.pairs: list[EncodedPair] = []
        self.train_examples: list[EncodedPair] = []
        self.val_prompts: list[str] = []
        self.val_pairs: list[EncodedPair] | None = None
        self._test_prompts: list[str] | None = None

    # -- what the fitting module and evaluate.py need to know
    def config(self) -> DataConfig:
        """The settings that reproduce these splits (recorded in the exported state, read by evaluate.py),
        with local task paths made absolute: a state evaluated from another folder reads the same file."""
        return DataConfig.from_mapping(self.hparams).absolute()

    def data_config(self) -> dict[str, Any]:
        return self.config().to_dict()

    def prepare_task(self) -> Task:
        if self.task_obj is None:
            hp = self.hparams
            self.task_obj, self.splits = self.config().load()
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
            self.pairs = self.encode_pairs(pairs)
        if not self.val_prompts:
            self.val_prompts = self.prompt_texts(self.splits["val"])
        if not self.train_examples:
            # For the learned-strength phase: each training example's prompt, right answer and the
            # wrong answer of its first pair, as ids. The same examples the pairs came from
            # (max_train_pairs caps both phases).
            wrong: dict[str, str] = {}
            for p in pairs:
                wrong.setdefault(p.example_uid, p.negative)
            examples = [ex for ex in self.splits["train"] if ex.uid in wrong]
            texts = self.prompt_texts(examples)
            prompts, answers, negatives = self._encode(texts, [ex.target for ex in examples], [wrong[ex.uid] for ex in examples])
            self.train_examples = [EncodedPair(p, a, n) for p, a, n in zip(prompts, answers, negatives)]

    def prompt_texts(self, examples: Sequence[TaskExample]) -> list[str]:
        """The formatted prompt of each example (the text before the answer)."""
        return self.format_prompts([ex.prompt for ex in examples])

    def format_prompts(self, prompts: Sequence[str]) -> list[str]:
        unique = {p: format_prompt(self.tokenizer, self.task_obj, p, chat_template=self.hparams.chat_template) for p in prompts}
        return [unique[p] for p in prompts]

    def _encode(self, texts: Sequence[str], positives: Sequence[str], negatives: Sequence[str]):
        for choice in (*positives, *negatives):
            if not choice:
                raise AusteerError(f"answer {choice!r} tokenizes to nothing; give non-empty choices")
        suffix = lambda t, c: join_for(self.task_obj, t, c)[len(t):]  # noqa: E731
        return encode_pairs(self.tokenizer, texts, [suffix(t, c) for t, c in zip(texts, positives)], [suffix(t, c) for t, c in zip(texts, negatives)])

    def encode_pairs(self, pairs) -> list[EncodedPair]:
        """Contrastive pairs as token ids (:func:`~austeer_pl.core.tokens.encode_pairs`)."""
        if not pairs:
            return []
        prompt_texts = self.format_prompts([p.prompt for p in pairs])
        prompts, pos, neg = self._encode(prompt_texts, [p.positive for p in pairs], [p.negative for p in pairs])
        return [EncodedPair(p, a, b) for p, a, b in zip(prompts, pos, neg)]

    # -- held-out data of a comparison (ITI's probe pass, the test split)
    def val_pair_batches(self) -> list[dict[str, Any]]:
        """This process's share of the validation pairs (each validation example's right answer
        against its sampled wrong answers), collated like the training pairs."""
        if self.val_pairs is None:
            hp = self.hparams
            self.val_pairs = self.encode_pairs(make_pairs(self.splits["val"], negatives=hp.negatives, seed=hp.seed)) if self.splits["val"] else []
        rank, world = self._world()
        return [self.collate_pairs([self.val_pairs[i] for i in b]) for b in shard_batches(len(self.val_pairs), rank, world, self.hparams.batch_size)]

    @property
    def test_prompts(self) -> list[str]:
        if self._test_prompts is None:
            self._test_prompts = self.prompt_texts(self.splits["test"])
        return self._test_prompts

    def _world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def collate_pairs(self, items: list[EncodedPair]) -> dict[str, Any]:
        """One batch of pairs: the prompt and answer ids (shared-prefix reading), or the positive
        rows then the negative rows, right-padded (full-sequence reading)."""
        if not items:
            return {"n_pairs": 0}
        pad = pad_id_of(self.tokenizer)
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
        :func:`~austeer_pl.core.strength.strength_objective`."""
        if not items:
            return {"n_examples": 0}
        pad = pad_id_of(self.tokenizer)
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

    def test_dataloader(self) -> DataLoader:
        rank, world = self._world()
        batches = shard_batches(len(self.splits["test"]), rank, world, self.hparams.eval_batch_size)
        return DataLoader(list(range(len(self.splits["test"]))), batch_sampler=_BatchList(batches), collate_fn=self.collate_examples)


__all__ = ["ContrastivePairDataModule", "EncodedPair", "ResumableLoader", "shard_batches"]
