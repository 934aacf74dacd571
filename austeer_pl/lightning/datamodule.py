"""The Lightning data module: serves a :class:`~austeer_pl.fit.data.FitData`'s batches to each process.

Every process reads its own, unrepeated share with the same number of batches on every rank
(:func:`~austeer_pl.fit.data.shard_batches`), so collectives stay in step and N processes see each
pair exactly once. The options (``--data.*``) are the fields of
:class:`~austeer_pl.tasks.config.DataConfig` and :class:`~austeer_pl.fit.config.BatchConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from austeer_pl.errors import AusteerError
from austeer_pl.fit.config import (
    DATA_GROUPS,
    BatchConfig,
    group_settings,
    settings_doc,
)
from austeer_pl.fit.data import EncodedPair, FitData
from austeer_pl.tasks.config import DataConfig


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


def _indices(items: list[int]) -> dict[str, Any]:
    return {"index": items}


class ContrastivePairDataModule(pl.LightningDataModule):
    def __init__(  # one keyword per setting of DATA_GROUPS, defaults read from them (tests/lightning checks both)
        self,
        task: str = DataConfig.task,
        seed: int = DataConfig.seed,
        negatives: str = DataConfig.negatives,
        val_fraction: float = DataConfig.val_fraction,
        test_fraction: float = DataConfig.test_fraction,
        max_train_pairs: int | None = DataConfig.max_train_pairs,
        max_val_examples: int | None = DataConfig.max_val_examples,
        max_test_examples: int | None = DataConfig.max_test_examples,
        chat_template: bool | None = DataConfig.chat_template,
        max_length: int | None = DataConfig.max_length,
        protocol: Literal["default", "paper"] = DataConfig.protocol,
        task_files: str | None = DataConfig.task_files,
        paper_accuracy: float | None = DataConfig.paper_accuracy,
        instruction: str | None = DataConfig.instruction,
        shots: int = DataConfig.shots,
        batch_size: int = BatchConfig.batch_size,
        eval_batch_size: int = BatchConfig.eval_batch_size,
        num_workers: int = BatchConfig.num_workers,
        shared_prefix: bool | Literal["auto"] = BatchConfig.shared_prefix,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        config, batching = group_settings(
            DATA_GROUPS, {k: v for k, v in self.hparams.items() if not k.startswith("_")}
        )  # LightningCLI adds _instantiator
        self.data = FitData(config, batching)

    def config(self) -> DataConfig:
        """The settings that reproduce these splits, local task paths absolute (recorded in exported states)."""
        return self.data.config.absolute()

    def _world(self) -> tuple[int, int]:
        return (0, 1) if self.trainer is None else (self.trainer.global_rank, self.trainer.world_size)

    def setup(self, stage: str | None = None) -> None:
        self.data.load()
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None or not hasattr(module, "tokenizer"):
            raise AusteerError("the data module needs a tokenizer: attach it to a trainer with AUSteerModule")
        self.data.prepare(module.tokenizer)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._world()
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        if epoch > 0:  # learned-strength epochs
            batches = self.data.strength_batches(epoch, rank, world)
            return DataLoader(
                batches,
                batch_size=None,
                collate_fn=self.data.collate_examples_train,
                num_workers=self.data.batching.num_workers,
            )
        module = self.trainer.lightning_module if self.trainer is not None else None
        progress = (
            (lambda: module.session.batches_done) if module is not None and module.session is not None else (lambda: 0)
        )
        return ResumableLoader(
            self.data.pairs,
            self.data.pair_batches(rank, world),
            progress,
            collate_fn=self.data.collate_pairs,
            num_workers=self.data.batching.num_workers,
        )

    def _examples(self, split: str) -> DataLoader:
        rank, world = self._world()
        return DataLoader(
            list(range(len(self.data.splits[split]))),
            batch_sampler=_BatchList(self.data.example_batches(split, rank, world)),
            collate_fn=_indices,
        )

    def val_dataloader(self) -> DataLoader:
        return self._examples("val")

    def test_dataloader(self) -> DataLoader:
        return self._examples("test")


ContrastivePairDataModule.__doc__ = settings_doc(
    "Serves contrastive pairs (prompt + right answer vs. prompt + wrong answer) and validation and test examples.",
    DATA_GROUPS,
)

__all__ = ["ContrastivePairDataModule", "EncodedPair", "ResumableLoader"]
