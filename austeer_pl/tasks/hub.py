"""Hub data sets by name (BoolQ, COPA, WinoGrande, SVAMP, MAWPS, GSM8K, or ``hub:owner/name``): which
data set each name reads (:data:`HUB_TASKS`, for both protocols), fetching it (one bounded attempt
when the hub is unreachable, a one-line way out to a local file) or reading local files in its
schema; the rows become examples in :mod:`austeer_pl.tasks.hub_rows`."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from austeer_pl.core.network import hub_endpoint, hub_offline, unreachable
from austeer_pl.errors import AusteerError
from austeer_pl.tasks.files import LOCAL_FILE_HINT
from austeer_pl.tasks.hub_rows import (
    boolq_examples,
    copa_examples,
    generic_examples,
    gsm8k_examples,
    mawps_examples,
    svamp_examples,
    winogrande_examples,
)
from austeer_pl.tasks.schema import (
    DEFAULT_ANSWER_PREFIX,
    SPLIT_ALIASES,
    Task,
    TaskExample,
    canonical_split,
    split_files,
)


@dataclass(frozen=True)
class HubTask:
    """A hub data set of the paper and how to turn its rows into a :class:`Task` (the default protocol;
    the paper protocol reads the same data set: :mod:`austeer_pl.tasks.paper`)."""

    path: str
    config: str | None
    splits: tuple[str, ...]
    convert: Callable[..., list[TaskExample]]
    scoring: str
    instruction: str
    answer_prefix: str = DEFAULT_ANSWER_PREFIX


_MATH_INSTRUCTION = "Solve the math word problem. Answer with a single number.\n\n"


HUB_TASKS: dict[str, HubTask] = {
    "boolq": HubTask(
        "google/boolq",
        None,
        ("train", "validation"),
        boolq_examples,
        "choice",
        "Read the passage and answer the question with yes or no.\n\n",
    ),
    "copa": HubTask(
        "pkavumba/balanced-copa",
        None,
        ("train", "test"),
        copa_examples,
        "choice",
        "Choose the more plausible cause or effect of the premise.\n\n",
    ),
    "winogrande": HubTask(
        "allenai/winogrande",
        "winogrande_m",
        ("train", "validation"),
        winogrande_examples,
        "choice",
        "Choose the option that correctly fills the blank (_) in the sentence.\n\n",
    ),
    "svamp": HubTask("ChilleD/SVAMP", None, ("train", "test"), svamp_examples, "generate", _MATH_INSTRUCTION),
    "mawps": HubTask("garrethlee/MAWPS", None, ("train", "test"), mawps_examples, "generate", _MATH_INSTRUCTION),
    "gsm8k": HubTask("openai/gsm8k", "main", ("train", "test"), gsm8k_examples, "generate", _MATH_INSTRUCTION),
}


_FILE_KINDS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def local_hub_rows(
    files: str | Sequence[str], *, dataset: str, cache_dir: Any = None
) -> dict[str, list[Mapping[str, Any]]]:
    """Rows in a hub dataset's own schema from local JSONL/JSON/CSV/Parquet files, read through
    ``datasets`` instead of fetched, keyed by canonical split.

    A file's split is its ``split`` column when it has one (per row), else the split word in its
    name (``train``, ``validation``/``val``/``dev``, ``test``).

    Raises:
        AusteerError: a missing file, an unknown type, or a file whose split cannot be told.

    Example:
        >>> rows = local_hub_rows("boolq_train.jsonl,boolq_validation.jsonl", dataset="google/boolq")  # doctest: +SKIP
    """
    import datasets  # noqa: PLC0415 - hub data sets only

    paths = [
        Path(p).expanduser()
        for p in (split_files(files) if isinstance(files, str) else [str(f).strip() for f in files if str(f).strip()])
    ]
    if not paths:
        raise AusteerError("--data.task_files is empty; give one or more files, comma-separated")
    out: dict[str, list[Mapping[str, Any]]] = {}
    for path in paths:
        if not path.is_file():
            raise AusteerError(f"--data.task_files {path}: no such file; check the path")
        kind = _FILE_KINDS.get(path.suffix.lower())
        if kind is None:
            raise AusteerError(
                f"--data.task_files {path}: unsupported type {path.suffix or '(none)'!r}; use one of {', '.join(_FILE_KINDS)}"
            )
        try:
            rows = datasets.load_dataset(
                kind, data_files=str(path), split="train", cache_dir=cache_dir, trust_remote_code=False
            )
        except Exception as exc:  # datasets raises many kinds for a malformed file
            raise AusteerError(
                f"--data.task_files {path}: cannot read it as {kind} ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})"
            ) from None
        if "split" in rows.column_names:
            for row in rows:
                out.setdefault(canonical_split(str(row["split"])), []).append(
                    {k: v for k, v in row.items() if k != "split"}
                )
            continue
        words = re.findall(r"[a-z]+", path.stem.lower())
        named = [SPLIT_ALIASES[w] for w in words if w in SPLIT_ALIASES]
        if len(set(named)) != 1:
            raise AusteerError(
                f"--data.task_files {path}: name its split in the file name (train, validation, test) or add a 'split' column, for {dataset}"
            )
        out.setdefault(named[0], []).extend(rows)
    return out


def fetch_hub(
    path: str,
    config: str | None,
    splits: Sequence[str] | None,
    *,
    hub_split: str | None,
    cache_dir: Any,
    files: Any = None,
) -> dict[str, Iterable[Mapping[str, Any]]]:
    """Rows of each wanted split of a hub dataset (or of local ``files`` in its schema), keyed by canonical split name."""
    try:
        import datasets  # noqa: PLC0415 - hub data sets only
    except ImportError:
        raise AusteerError(f"loading {path!r} from the hub needs the datasets package: pip install datasets") from None
    label = f"{path!r}" + (f" (config {config!r})" if config else "")
    if files:
        available = local_hub_rows(files, dataset=label, cache_dir=cache_dir)
        wanted = {name: rows for name, rows in available.items() if splits is None or name in splits}
        if not wanted:
            raise AusteerError(
                f"--data.task_files give splits {', '.join(sorted(available))} but {label} needs one of {', '.join(splits or ())}"
            )
        return wanted

    if not hub_offline() and (reason := unreachable(hub_endpoint())) is not None:
        # One bounded attempt: datasets would retry for about half a minute, printing each try.
        raise AusteerError(
            f"cannot fetch dataset {label}: the Hugging Face hub is unreachable ({reason}); if it is in your datasets cache "
            f"set HF_DATASETS_OFFLINE=1, else use a local file: {LOCAL_FILE_HINT}"
        )
    try:
        if hub_split is not None:
            loaded = datasets.load_dataset(path, config, split=hub_split, cache_dir=cache_dir, trust_remote_code=False)
            return {canonical_split(hub_split): loaded}
        loaded = datasets.load_dataset(path, config, cache_dir=cache_dir, trust_remote_code=False)
    except AusteerError:
        raise
    except Exception as exc:  # the hub raises many kinds (ConnectionError, HfHubHTTPError, ValueError...)
        detail = " ".join(str(exc).split())[:200]
        raise AusteerError(
            f"could not fetch dataset {label} from the Hugging Face hub ({type(exc).__name__}: {detail}); "
            f"check the name, split and network, or use a local file instead: {LOCAL_FILE_HINT}"
        ) from None
    available = {canonical_split(name): loaded[name] for name in loaded}
    wanted = {name: rows for name, rows in available.items() if splits is None or name in splits}
    if not wanted:
        raise AusteerError(
            f"dataset {label} has splits {', '.join(sorted(available))} but none of {', '.join(splits or ())}; "
            f"pick one with hub_split or use a local file: {LOCAL_FILE_HINT}"
        )
    return wanted


def load_hub_task(
    name_or_path: str, *, hub_split: str | None = None, cache_dir: Any = None, seed: int = 0, files: Any = None
) -> Task:
    """Load one of :data:`HUB_TASKS` by name (or hub path), or any ``owner/name[:config]`` in the generic schema.

    Args:
        name_or_path: ``"boolq"``, ``"google/boolq"`` or, for the generic schema, ``"owner/name"``
            or ``"owner/name:config"``.
        hub_split: Load only this split (``"train"``, ``"validation[:200]"``...); default: the
            task's train and held-out splits (for generic datasets, every split, so name a
            labelled one here when some split is unlabelled).
        cache_dir: Passed to ``datasets.load_dataset``.
        seed: Seed of the wrong numbers of numeric tasks.

    Raises:
        AusteerError: The dataset cannot be fetched, or a row does not fit the schema.

    Example:
        >>> task = load_hub_task("boolq")  # doctest: +SKIP
        >>> task.examples[0].choices  # doctest: +SKIP
        ('no', 'yes')
    """
    by_path = {hub.path: name for name, hub in HUB_TASKS.items()}
    name = name_or_path if name_or_path in HUB_TASKS else by_path.get(name_or_path)
    if name is not None:
        hub = HUB_TASKS[name]
        rows = fetch_hub(hub.path, hub.config, hub.splits, hub_split=hub_split, cache_dir=cache_dir, files=files)
        examples = [ex for split, split_rows in rows.items() for ex in hub.convert(split_rows, split=split, seed=seed)]
        task_name, scoring, instruction, prefix = name, hub.scoring, hub.instruction, hub.answer_prefix
        label = hub.path
    else:
        path, _, config = name_or_path.partition(":")
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path):
            raise AusteerError(f"bad hub dataset name {name_or_path!r}; write hub:owner/name or hub:owner/name:config")
        rows = fetch_hub(path, config or None, None, hub_split=hub_split, cache_dir=cache_dir, files=files)
        examples = [
            ex
            for split, split_rows in rows.items()
            for ex in generic_examples(split_rows, split=split, seed=seed, dataset=path)
        ]
        task_name, scoring, instruction, prefix = path.rsplit("/", 1)[-1], "choice", "", DEFAULT_ANSWER_PREFIX
        label = path
    if not examples:
        raise AusteerError(f"dataset {label!r} has no rows; pick another split or use a local file: {LOCAL_FILE_HINT}")
    return Task(
        name=task_name, examples=tuple(examples), scoring=scoring, instruction=instruction, answer_prefix=prefix
    )
