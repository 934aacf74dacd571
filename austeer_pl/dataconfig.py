"""One recorded data configuration: the settings that rebuild a fit's exact splits.

``train.py`` records a :class:`DataConfig` in every exported state (``metadata["data"]``);
``evaluate.py`` reads it back to rebuild the same test split, so the fractions, caps and seed are
written once, here, and never re-typed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import AusteerError
from .tasks import Task, TaskExample, load_task, split_examples


@dataclass(frozen=True)
class DataConfig:
    """The settings of a fit's data (the ``--data.*`` options that decide which examples go where).

    Example:
        >>> config = DataConfig.from_metadata(state.metadata)
        >>> task, splits = config.load()
        >>> len(splits["test"])
        500
    """

    task: str = "rotten_tomatoes"
    seed: int = 0
    negatives: str = "sample"
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    max_train_pairs: int | None = 256
    max_val_examples: int | None = 200
    max_test_examples: int | None = 500
    chat_template: bool | None = None
    max_length: int | None = 512
    protocol: str = "default"
    task_files: str | None = None
    paper_accuracy: float | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> DataConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> DataConfig:
        data = metadata.get("data") if isinstance(metadata, Mapping) else None
        if not isinstance(data, Mapping) or not data.get("task"):
            raise AusteerError("the state does not record its data settings; pass --task")
        return cls.from_mapping(data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> DataConfig:
        return DataConfig(**{**self.to_dict(), **changes})

    def load(self, *, task: Task | None = None) -> tuple[Task, dict[str, list[TaskExample]]]:
        """The task and its ``train``/``val``/``test`` splits, exactly as the fit saw them."""
        if task is None:
            if self.protocol == "paper":
                from .paper import load_paper_task

                task = load_paper_task(self.task, files=self.task_files)
            elif self.protocol == "default":
                task = load_task(self.task, seed=self.seed, files=self.task_files)
            else:
                raise AusteerError(f"--data.protocol must be default or paper, not {self.protocol!r}")
        if self.protocol == "paper" and not any(ex.split == "validation" for ex in task.examples):
            raise AusteerError(f"the paper protocol found no validation rows in the training split of {self.task!r}; give at least 2 training rows")
        splits = split_examples(
            task.examples, seed=self.seed, val_fraction=self.val_fraction, test_fraction=self.test_fraction,
            max_val=self.max_val_examples, max_test=self.max_test_examples,
        )
        return task, splits


__all__ = ["DataConfig"]
