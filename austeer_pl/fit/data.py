"""The data of a fit, without Lightning: contrastive pairs as token ids, validation and test examples,
each process's unrepeated share.

:class:`FitData` is what the fit session reads: the pass's pair batches, the learned strength's
training examples, the validation and test prompts. The Lightning data module serves the same
batches through data loaders; a plain loop (:meth:`~austeer_pl.fit.session.FitSession.run`) reads
them directly.

Every process reads its own share (:func:`shard_batches`) with the same number of batches on every
rank, so collectives stay in step and N processes see each pair exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from austeer_pl.core.pins import model_pin
from austeer_pl.core.tokens import encode_pairs, pad_id_of, pair_rows
from austeer_pl.errors import AusteerError
from austeer_pl.fit.config import BatchConfig
from austeer_pl.tasks.config import DataConfig
from austeer_pl.tasks.pins import task_pins
from austeer_pl.tasks.prompts import format_prompt, join_for
from austeer_pl.tasks.schema import ContrastivePair, Task, TaskExample
from austeer_pl.tasks.splits import make_pairs


def input_pins(config: DataConfig, model_name: str, model: Any = None, *, cache_dir: Any = None) -> dict[str, Any]:
    """The ``metadata["inputs"]`` of a state fitted on ``config``'s task and ``model_name``: what
    :func:`~austeer_pl.tasks.pins.check_task` and :func:`~austeer_pl.core.pins.check_model` compare later."""
    return {"task": task_pins(config), "model": model_pin(model_name, model, cache_dir=cache_dir)}


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


@dataclass(frozen=True)
class EncodedPair:
    """A prompt and two answers as token ids (an answer's ids are the joined text's after the prompt)."""

    prompt: list[int]
    positive: list[int]
    negative: list[int]


@dataclass
class FitData:
    """A task's splits and pairs for one tokenizer, batched as the fit reads them.

    Example:
        >>> data = FitData(DataConfig(task="rotten_tomatoes"), BatchConfig()).prepare(tokenizer)
        >>> batch = data.collate_pairs([data.pairs[i] for i in data.pair_batches(rank=0, world=1)[0]])
    """

    config: DataConfig = field(default_factory=DataConfig)
    batching: BatchConfig = field(default_factory=BatchConfig)
    tokenizer: Any = None
    task: Task | None = None
    splits: dict[str, list[TaskExample]] = field(default_factory=dict)
    pairs: list[EncodedPair] = field(default_factory=list)
    train_examples: list[EncodedPair] = field(default_factory=list)
    val_prompts: list[str] = field(default_factory=list)
    _val_pairs: list[EncodedPair] | None = None
    _test_prompts: list[str] | None = None

    @property
    def loaded_task(self) -> Task:
        """The task (after :meth:`load`)."""
        if self.task is None:
            raise AusteerError("the task is not loaded yet; call FitData.load() or prepare() first")
        return self.task

    def load(self) -> FitData:
        """Read the task and its splits (no tokenizer needed)."""
        if self.task is None:
            self.task, self.splits = self.config.load()
            if not self.splits["train"]:
                raise AusteerError(
                    f"task '{self.config.task}' left no training examples; lower val_fraction/test_fraction or add examples"
                )
        return self

    def prepare(self, tokenizer) -> FitData:
        """Encode the pairs, the strength phase's examples and the validation prompts (once)."""
        self.load()
        self.tokenizer = tokenizer
        if self.pairs:
            return self
        cfg = self.config
        pairs = make_pairs(self.splits["train"], negatives=cfg.negatives, seed=cfg.seed, max_pairs=cfg.max_train_pairs)
        self.pairs = self.encode_pairs(pairs)
        self.val_prompts = self.prompt_texts(self.splits["val"])
        # The learned strength's examples: each training example's prompt, right answer and the wrong
        # answer of its first pair (the same examples the pairs came from; max_train_pairs caps both).
        wrong: dict[str, str] = {}
        for p in pairs:
            wrong.setdefault(p.example_uid, p.negative)
        examples = [ex for ex in self.splits["train"] if ex.uid in wrong]
        texts = self.prompt_texts(examples)
        prompts, answers, negatives = self._encode(
            texts, [ex.target for ex in examples], [wrong[ex.uid] for ex in examples]
        )
        self.train_examples = [EncodedPair(p, a, n) for p, a, n in zip(prompts, answers, negatives)]
        return self

    # -- text and ids
    def prompt_texts(self, examples: Sequence[TaskExample]) -> list[str]:
        """The formatted prompt of each example (the text before the answer)."""
        return self.format_prompts([ex.prompt for ex in examples])

    def format_prompts(self, prompts: Sequence[str]) -> list[str]:
        assert self.task is not None
        unique = {
            p: format_prompt(self.tokenizer, self.task, p, chat_template=self.config.chat_template) for p in prompts
        }
        return [unique[p] for p in prompts]

    def _encode(self, texts: Sequence[str], positives: Sequence[str], negatives: Sequence[str]):
        assert self.task is not None
        task = self.task
        for choice in (*positives, *negatives):
            if not choice:
                raise AusteerError(f"answer {choice!r} tokenizes to nothing; give non-empty choices")
        suffixes = [
            [join_for(task, t, c)[len(t) :] for t, c in zip(texts, answers)] for answers in (positives, negatives)
        ]
        return encode_pairs(self.tokenizer, texts, suffixes[0], suffixes[1])

    def encode_pairs(self, pairs: Sequence[ContrastivePair]) -> list[EncodedPair]:
        """Contrastive pairs as token ids (:func:`~austeer_pl.core.tokens.encode_pairs`)."""
        if not pairs:
            return []
        prompt_texts = self.format_prompts([p.prompt for p in pairs])
        prompts, pos, neg = self._encode(prompt_texts, [p.positive for p in pairs], [p.negative for p in pairs])
        return [EncodedPair(p, a, b) for p, a, b in zip(prompts, pos, neg)]

    @property
    def test_prompts(self) -> list[str]:
        if self._test_prompts is None:
            self._test_prompts = self.prompt_texts(self.splits["test"])
        return self._test_prompts

    # -- batches of one process
    def pair_batches(self, rank: int = 0, world: int = 1) -> list[list[int]]:
        """This process's batches of the pass (indices into :attr:`pairs`)."""
        return shard_batches(len(self.pairs), rank, world, self.batching.batch_size)

    def example_batches(self, split: str, rank: int = 0, world: int = 1) -> list[list[int]]:
        """This process's batches of ``val`` or ``test`` example indices (``eval_batch_size`` each)."""
        return shard_batches(len(self.splits[split]), rank, world, self.batching.eval_batch_size)

    def val_pair_batches(self, rank: int = 0, world: int = 1) -> list[dict[str, Any]]:
        """This process's share of the validation pairs (each validation example's right answer against
        its sampled wrong answers), collated like the training pairs (ITI's probe pass)."""
        if self._val_pairs is None:
            cfg = self.config
            self._val_pairs = (
                self.encode_pairs(make_pairs(self.splits["val"], negatives=cfg.negatives, seed=cfg.seed))
                if self.splits["val"]
                else []
            )
        return [
            self.collate_pairs([self._val_pairs[i] for i in b])
            for b in shard_batches(len(self._val_pairs), rank, world, self.batching.batch_size)
        ]

    def strength_batches(self, epoch: int, rank: int = 0, world: int = 1) -> list[list[EncodedPair]]:
        """This process's training examples for learned-strength epoch ``epoch`` (1, 2, ...), in batches.

        Every process applies the same seeded permutation, then takes its share with
        :func:`shard_batches`, so the union of one step's batches is the same global batch whatever
        the number of processes.
        """
        order = torch.randperm(
            len(self.train_examples), generator=torch.Generator().manual_seed(self.config.seed + epoch)
        ).tolist()
        return [
            [self.train_examples[order[i]] for i in rows]
            for rows in shard_batches(len(order), rank, world, self.batching.batch_size)
        ]

    # -- collation
    def collate_pairs(self, items: list[EncodedPair]) -> dict[str, Any]:
        """One batch of pairs: the prompt and answer ids (shared-prefix reading), or the positive
        rows then the negative rows, right-padded (full-sequence reading)."""
        if not items:
            return {"n_pairs": 0}
        pad = pad_id_of(self.tokenizer)
        limit = self.config.max_length
        shared = self.batching.shared_prefix
        if shared:  # True or "auto": the reader decides on its device
            lengths = [len(p.prompt) + len(a) for p in items for a in (p.positive, p.negative)]
            return {
                "n_pairs": len(items),
                "shared_prefix": shared,
                "prompt_ids": [p.prompt for p in items],
                "pos_ids": [p.positive for p in items],
                "neg_ids": [p.negative for p in items],
                "pad_id": pad,
                "max_length": limit,
                "n_tokens": sum(n if limit is None else min(n, limit) for n in lengths),
            }
        ids, mask = pair_rows(
            [p.prompt for p in items],
            [p.positive for p in items],
            [p.negative for p in items],
            pad,
            limit,
            side="right",
        )
        return {"n_pairs": len(items), "input_ids": ids, "attention_mask": mask, "n_tokens": int(mask.sum())}

    def collate_examples_train(self, items: list[EncodedPair]) -> dict[str, Any]:
        """For the strength phase: rows ``[:n]`` prompt + right answer, rows ``[n:]`` prompt + wrong
        answer, left-padded (answers end at the last position); see
        :func:`~austeer_pl.core.strength.strength_objective`."""
        if not items:
            return {"n_examples": 0}
        pad = pad_id_of(self.tokenizer)
        ids, mask = pair_rows(
            [p.prompt for p in items],
            [p.positive for p in items],
            [p.negative for p in items],
            pad,
            self.config.max_length,
            side="left",
        )
        lengths = [len(p.positive) for p in items] + [len(p.negative) for p in items]
        return {
            "n_examples": len(items),
            "input_ids": ids,
            "attention_mask": mask,
            "answer_lengths": torch.tensor(lengths),
        }


__all__ = ["EncodedPair", "FitData", "input_pins", "shard_batches"]
