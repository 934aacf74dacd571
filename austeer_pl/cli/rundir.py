"""Run folders: ``runs/<kind>-<task>-<time>`` made exclusively (``-2``, ``-3`` ... when taken), locked
while a command runs, refused when they hold anything but a run's files or one of the inputs, and
shared with the DDP children a launcher starts."""

from __future__ import annotations

import errno
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from austeer_pl.core.paths import os_error_message, paths_overlap
from austeer_pl.errors import AusteerError

RUN_DIR_ENV = "AUSTEER_RUN_DIR"


def task_stem(task: str) -> str:
    """A short folder-safe name for a task spec."""
    path = Path(task)
    stem = path.parent.name if path.name == "task.json" else path.stem if path.suffix else task
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in stem)[:40] or "task"


def is_launched_child() -> bool:
    """Whether this process was started by a DDP launcher for another rank (it then shares the
    launching process's run folder, named in ``AUSTEER_RUN_DIR``, and claims nothing)."""
    for name in ("LOCAL_RANK", "RANK"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return True
    return False


@dataclass
class RunFolder:
    """A run folder this process has claimed: created for it alone (default names) and locked
    while it runs, so two commands never write one folder's logs, config and checkpoints at once."""

    path: Path
    _handle: Any = None

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing drops the lock
            self._handle = None


#: What a run folder holds: logs (CSV, config), checkpoints, W&B files, the lock, the default export.
RUN_ENTRIES = frozenset({"logs", "checkpoints", "wandb", "state", ".lock", "config.yaml", "hparams.yaml"})


def claim_run_dir(
    kind: str, task: str, given: str | os.PathLike | None = None, *, inputs: Sequence[str | os.PathLike | None] = ()
) -> RunFolder:
    """The run folder of a command: ``given``, else a new ``runs/KIND-TASK-TIMESTAMP[-N]``, created
    exclusively and locked (a folder another running command holds is refused in one line); DDP
    children take the launching process's folder from ``AUSTEER_RUN_DIR``.

    Example:
        >>> run = claim_run_dir("compare", "rotten_tomatoes")
        >>> run.path  # doctest: +SKIP
        PosixPath('runs/compare-rotten_tomatoes-20261206-101500')
    """
    if is_launched_child() and os.environ.get(RUN_DIR_ENV):
        return RunFolder(Path(os.environ[RUN_DIR_ENV]))
    prefix = f"{kind}-" if kind else ""
    if given:
        for item in inputs:
            if item and Path(item).expanduser().exists() and paths_overlap(given, Path(item).expanduser()):
                raise AusteerError(
                    f"--run_dir {given} is (or holds, or lies in) the input {item}; choose another folder"
                )
        found = Path(given)
        if found.is_dir():
            others = sorted(p.name for p in found.iterdir() if p.name not in RUN_ENTRIES)
            if others:
                raise AusteerError(
                    f"--run_dir {given} holds other files than a run's ({', '.join(others[:3])}); its logs and checkpoints would mix with them: "
                    "choose a new or empty folder"
                )
    try:
        if given:
            path = Path(given)
            path.mkdir(parents=True, exist_ok=True)
        else:
            base = Path("runs") / f"{prefix}{task_stem(task)}-{time.strftime('%Y%m%d-%H%M%S')}"
            base.parent.mkdir(parents=True, exist_ok=True)
            for n in range(1, 1000):
                path = base if n == 1 else base.with_name(f"{base.name}-{n}")
                try:
                    path.mkdir()
                    break
                except FileExistsError:
                    continue
            else:
                raise AusteerError(f"cannot make a new run folder beside {base}: 999 exist; pass --run_dir")
        handle = open(path / ".lock", "a+")  # noqa: SIM115 - held open for the run
    except OSError as err:
        raise AusteerError(os_error_message(err, given or "the run folder")) from None
    try:
        import fcntl  # noqa: PLC0415 - POSIX only

        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # pragma: no cover - no flock (Windows): unique default names still hold
        pass
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            handle.close()
            raise AusteerError(
                f"the run folder {path} is in use by another running command; wait for it, or choose another --run_dir"
            ) from None
        # A file system without locks (some NFS or Lustre mounts): unique default names still hold.
        warnings.warn(
            f"cannot lock the run folder {path} ({(err.strerror or str(err)).lower()}); run one command per --run_dir",
            stacklevel=2,
        )
    os.environ[RUN_DIR_ENV] = str(path)
    return RunFolder(path, handle)


__all__ = [
    "RUN_DIR_ENV",
    "RUN_ENTRIES",
    "RunFolder",
    "claim_run_dir",
    "is_launched_child",
    "task_stem",
]
