"""One recorded data configuration: the settings that rebuild a fit's exact splits.

``train.py`` records a :class:`DataConfig` in every exported state (``metadata["data"]``);
``evaluate.py`` reads it back to rebuild the same test split, so the fractions, caps and seed are
written once, here, and never re-typed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from austeer_pl.errors import AusteerError, SettingError
from austeer_pl.tasks.paper.protocol import PROTOCOLS
from austeer_pl.tasks.pins import same_content
from austeer_pl.tasks.prompting import prompted_task
from austeer_pl.tasks.registry import is_named_task, load_task
from austeer_pl.tasks.schema import NEGATIVE_MODES, Task, TaskExample, split_files
from austeer_pl.tasks.splits import split_examples

_SPLITS = ("train", "val", "test")
#: The prompt settings and their defaults (left out of :meth:`DataConfig.to_dict` at the default).
_PROMPT_SETTINGS: dict[str, Any] = {"instruction": None, "shots": 0}


def _is_local(spec: str) -> bool:
    """Whether ``load_task`` reads ``spec`` as a local path (not a task name or hub dataset)."""
    text = str(spec).strip()
    return not is_named_task(text) and Path(text).expanduser().exists()


def _absolute(spec: str | None) -> str | None:
    """A local path as an absolute one (names and hub ids unchanged)."""
    if spec is None:
        return None
    text = str(spec).strip()
    return str(Path(text).expanduser().absolute()) if _is_local(text) else text


@dataclass(frozen=True)
class DataConfig:
    """The settings of a fit's data: the ``--data.*`` options that decide which examples go where.

    Args:
        task: ``rotten_tomatoes`` (default), a BIG-bench ``task.json``, a paper task on the hub (``boolq``, ``copa``, ``winogrande``, ``svamp``, ``mawps``, ``gsm8k``), ``hub:owner/name`` or a local ``.jsonl``/``.json``/``.csv`` file (see the README for the schema).
        seed: seed of the split and of the sampled wrong answers.
        negatives: ``sample`` (one wrong choice per example) or ``all`` (every wrong choice).
        val_fraction: share of examples for validation (hyperparameters are chosen there).
        test_fraction: share of examples held out for ``evaluate.py``.
        max_train_pairs: cap on training pairs (None: all).
        max_val_examples: cap on validation examples.
        max_test_examples: cap on test examples (recorded for evaluate.py).
        chat_template: format prompts with the tokenizer's chat template (None: when it has one).
        max_length: truncate longer sequences from the left to this many tokens.
        protocol: ``default`` (this project's prompts and scoring) or ``paper`` (the AUSteer paper code's prompts, training strings, read token, scoring and sizes: :mod:`austeer_pl.tasks.paper`).
        task_files: local files (comma-separated) with rows in a hub task's own schema, read through ``datasets`` instead of fetching; a split is named in the file name or a ``split`` column.
        paper_accuracy: the paper code's logged accuracy for this setting (configs in ``configs/paper``), recorded so that ``evaluate.py`` prints it beside this run's.
        instruction: text put before the task's own instruction in every prompt; ``auto``: the task's zero-shot instruction (its description and the answers to choose from; :mod:`austeer_pl.tasks.prompting`).
        shots: few-shot demonstrations shown before every prompt: training examples with their right answer, drawn by ``seed`` and balanced over the answers.

    Example:
        >>> config = DataConfig.of_state(state.metadata)
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
    protocol: Literal["default", "paper"] = "default"
    task_files: str | None = None
    paper_accuracy: float | None = None
    instruction: str | None = None
    shots: int = 0

    def __post_init__(self) -> None:
        kinds = {
            "task": (str,),
            "seed": (int,),
            "negatives": (str,),
            "val_fraction": (int, float),
            "test_fraction": (int, float),
            "max_train_pairs": (int, type(None)),
            "max_val_examples": (int, type(None)),
            "max_test_examples": (int, type(None)),
            "chat_template": (bool, type(None)),
            "max_length": (int, type(None)),
            "protocol": (str,),
            "task_files": (str, type(None)),
            "paper_accuracy": (int, float, type(None)),
            "instruction": (str, type(None)),
            "shots": (int,),
        }
        for name, allowed in kinds.items():
            value = getattr(self, name)
            if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
                want = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
                raise SettingError(name, f"must be {want}, got {type(value).__name__} {str(value)[:40]!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise SettingError(name, f"must be a finite number, got {value}")
        for name, least in (
            ("max_length", 2),
            ("max_train_pairs", 1),
            ("max_val_examples", 1),
            ("max_test_examples", 1),
        ):
            value = getattr(self, name)
            if value is not None and value < least:
                raise SettingError(
                    name,
                    f"must be an integer of at least {least} (or null for no limit), got {value!r}"
                    + ("; a prompt and its answer need at least 2 tokens" if name == "max_length" else ""),
                )
        if self.shots < 0:
            raise SettingError("shots", f"must be 0 or more demonstrations, got {self.shots}")
        if self.protocol == "paper" and (self.shots or self.instruction is not None):
            raise SettingError(
                "instruction" if self.instruction is not None else "shots",
                "the paper protocol feeds the paper code's prompts raw; drop --data.instruction and --data.shots",
            )
        if self.protocol not in PROTOCOLS:
            raise SettingError("protocol", f"must be default or paper, not {self.protocol!r}")
        if self.negatives not in NEGATIVE_MODES:
            raise SettingError("negatives", f"must be one of {', '.join(NEGATIVE_MODES)}, got {self.negatives!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> DataConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    @classmethod
    def of_state(cls, metadata: Any, *, task: str | None = None, **changes: Any) -> DataConfig:
        """The data settings a state was fitted with (they rebuild its exact splits).

        ``task`` other than the fit's keeps the fit's fractions and seed with no caps; ``changes``
        that are not None replace settings (``seed``, ``protocol``, ``task_files``).

        Raises:
            AusteerError: the state records no task and none is given, or its ``metadata.data`` is
                not a valid data configuration.
        """
        data = metadata.get("data") if isinstance(metadata, Mapping) else None
        if data is not None and not isinstance(data, Mapping):
            raise AusteerError(
                f"the state's metadata.data must be an object, got {type(data).__name__}; the state was altered, export it again"
            )
        if not data or not data.get("task"):
            if task is None:
                raise AusteerError("the state does not record its task; pass --task")
            config = cls(task=task)
        else:
            try:
                config = cls.from_mapping(data)
            except SettingError as err:
                raise AusteerError(
                    f"the state's metadata.data is damaged (data {err}); export it again, or pass --task"
                ) from None
            if task is not None and not config.same_task(task):
                if _is_local(task) and same_content(metadata.get("inputs"), task):
                    config = config.replace(task=_absolute(task))  # the fit's file, moved: the fit's splits
                else:
                    config = config.replace(task=task, max_val_examples=None, max_test_examples=None)
        picked = {k: v for k, v in changes.items() if v is not None}
        return config.replace(**picked) if picked else config

    def same_task(self, spec: str) -> bool:
        """Whether ``spec`` names this config's task (paths compared as files, not as text)."""
        if str(spec).strip() == self.task:
            return True
        if _is_local(spec) and _is_local(self.task):
            return Path(str(spec)).expanduser().resolve() == Path(self.task).expanduser().resolve()
        return False

    def absolute(self) -> DataConfig:
        """The same settings with local task paths made absolute (what a state records)."""
        files = None if self.task_files is None else ",".join(_absolute(p) or "" for p in self.file_list)
        return self.replace(task=_absolute(self.task), task_files=files)

    @property
    def file_list(self) -> list[str]:
        """``task_files`` as a list of paths (the setting is comma-separated)."""
        return split_files(self.task_files)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a dict; the prompt settings only when set (a state fitted without a prompt
        records what it recorded before they existed)."""
        out = asdict(self)
        for name in _PROMPT_SETTINGS:
            if out[name] == _PROMPT_SETTINGS[name]:
                del out[name]
        return out

    def replace(self, **changes: Any) -> DataConfig:
        return DataConfig(**{**asdict(self), **changes})

    def load_task(self) -> Task:
        """The task, under this config's protocol."""
        return load_task(self.task, protocol=self.protocol, seed=self.seed, files=self.task_files)

    def load(
        self, *, task: Task | None = None, need: tuple[str, ...] = _SPLITS, rows_as_labelled: bool = False
    ) -> tuple[Task, dict[str, list[TaskExample]]]:
        """The task and its ``train``/``val``/``test`` splits, exactly as the fit saw them.

        ``need`` names the splits the caller uses: one that only reads the test split needs no
        training or validation rows. ``rows_as_labelled`` (a command that shows a file's rows and
        fits nothing, such as ``--dump_examples``) keeps rows that all name one split in it; a fit
        splits such a file by the fractions, and evaluating its state must do the same.
        """
        if task is None:
            task = self.load_task()
        if (
            self.protocol == "paper"
            and ("train" in need or "val" in need)
            and not any(ex.split == "validation" for ex in task.examples)
        ):
            raise AusteerError(
                f"the paper protocol found no validation rows in the training split of {self.task!r}; give at least 2 training rows"
            )
        only_test = rows_as_labelled and set(need) <= {"test"} and all(ex.split == "test" for ex in task.examples)
        splits = split_examples(
            task.examples,
            seed=self.seed,
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
            max_val=self.max_val_examples,
            max_test=self.max_test_examples,
            keep_lone_split=only_test,
        )
        task = prompted_task(task, splits["train"], instruction=self.instruction, shots=self.shots, seed=self.seed)
        return task, splits


__all__ = [
    "DataConfig",
]
