"""Safe file writes and reads: nothing half-written is left where a reader looks, nothing is replaced
that austeer-pl did not write (unless the user says so), and no input is ever an output.

Every writer (states, reports, generations, plots, analyses, merged models, GGUF files) describes
what it writes as an :class:`Output` and goes through two steps:

* :meth:`Output.check` runs *before* any work: the path is not one of the command's inputs, its
  name fits the file system, and what is there now may be replaced (see :class:`Output`).
* :meth:`Output.writing` assembles the output beside its destination under a temporary name that
  carries the writer's process id, and swaps it into place. The swap looks again at what is there
  *at that moment* (it is moved aside, judged, and put back untouched if it may not be replaced),
  so a file that appeared during a long fit is never deleted. A failure or a signal leaves no
  temporary behind; temporaries of writers that were killed outright (SIGKILL) are removed by the
  next writer to the same place, and only when their process is gone.

``OSError`` becomes one :class:`~austeer_pl.errors.AusteerError` line naming the path
(:func:`~austeer_pl.core.paths.os_error_message`). The common outputs (JSON reports, JSON lines, plots) are described in
:mod:`austeer_pl.core.fileio`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import stat
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from austeer_pl.core.paths import (
    check_writable_parent,
    default_mode,
    name_max,
    normal_permissions,
    os_error_message,
    paths_overlap,
)
from austeer_pl.errors import AusteerError

#: This machine, in temporary names: a process id means something only on the host that made it.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]

#: Bytes a temporary name adds to its target's name: ".NAME.<host>-<pid>-<8 hex>.tmp".
_TEMP_OVERHEAD = 1 + 1 + 6 + 1 + 10 + 1 + 8 + 4

_OURS = re.compile(r"^\.(?P<name>.+)\.(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]{8}\.(?P<kind>tmp|old)$")


@dataclass(frozen=True)
class Output:
    """A file or folder a command writes, and what may be replaced by it.

    Args:
        path: where it goes.
        what: its name in messages ("report", "steering state").
        is_ours: recognises an output austeer-pl wrote before (by its content: a marker or a shape).
        overwrite: the user passed ``flag``.
        folder: a folder output (written whole, like a steering state); else a file.
        ours_need_overwrite: replacing our own earlier output needs ``flag`` too (states, merged
            models: a fit's result); else it is replaced freely (reports, plots, generations).
        flag: the option that says "replace it".

    What may be replaced: nothing, or an empty folder, always; our own output unless
    ``ours_need_overwrite`` and no ``flag``; a file of someone else's only with ``flag`` (file
    outputs) and never for folder outputs, which are replaced whole. An input of the command never.

    Example:
        >>> report = Output("r.json", "report", is_marked_json).check(inputs=["task.jsonl"])
        >>> with report.writing() as tmp:
        ...     write_json(tmp, {"accuracy": 0.5, JSON_MARKER: {"output": "report"}})
    """

    path: Path
    what: str
    is_ours: Callable[[Path], bool]
    overwrite: bool = False
    folder: bool = False
    ours_need_overwrite: bool = False
    flag: str = "--overwrite"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # -- before any work
    def check(self, inputs: Iterable[str | os.PathLike | None] = ()) -> Output:
        """Refuse, in one line, an output that must not be written; returns ``self``."""
        path = self.path
        for given in inputs:
            if (
                given is not None
                and str(given)
                and Path(given).expanduser().exists()
                and paths_overlap(path, Path(given).expanduser())
            ):
                raise AusteerError(
                    f"the {self.what} path {path} is (or holds, or lies in) the input {given}; write it somewhere else"
                )
        name = os.fsencode(path.absolute().name)
        limit = name_max(path.parent) - _TEMP_OVERHEAD
        if len(name) > limit:
            raise AusteerError(
                f"cannot write the {self.what} to {str(path)[:60]}...: its name is {len(name)} bytes, at most {limit} fit here; choose a shorter name"
            )
        self._judge(path, at_swap=False)
        check_writable_parent(path, self.what)
        return self

    def _judge(self, found: Path, *, at_swap: bool, shown: Path | None = None) -> None:
        """Raise unless what is at ``found`` (the output path, or where it was moved aside) may be replaced.

        Another writer may swap the path while it is read: a refusal stands only if the same file
        or folder is still there afterwards (else the judgement is made again)."""
        for _ in range(20):
            try:
                before = os.lstat(found)
            except FileNotFoundError:
                return
            except OSError as err:
                raise AusteerError(os_error_message(err, shown or self.path, "read")) from None
            try:
                self._judge_once(found, before.st_mode, at_swap=at_swap, shown=shown or self.path)
                return
            except AusteerError:
                try:
                    after = os.lstat(found)
                except FileNotFoundError:
                    return
                if (after.st_ino, after.st_dev) == (before.st_ino, before.st_dev):
                    raise
        raise AusteerError(
            f"cannot write {shown or self.path}: other processes keep replacing it; run one writer at a time"
        )

    def _judge_once(self, found: Path, mode: int, *, at_swap: bool, shown: Path) -> None:
        during = " (it appeared while this command ran)" if at_swap else ""
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
            raise AusteerError(
                f"cannot write the {self.what} to {shown}: it is a device, pipe or socket{during}; pass a file path"
            )
        if self.folder:
            if not stat.S_ISDIR(mode):
                raise AusteerError(
                    f"cannot write the {self.what} to {shown}: a file is in the way{during}; choose a new folder path"
                )
            try:
                empty = not any(found.iterdir())
            except OSError as err:
                raise AusteerError(os_error_message(err, shown, "read")) from None
            if not at_swap and os.path.ismount(found):
                raise AusteerError(
                    f"cannot write the {self.what} to {shown}: it is a mount point, and a {self.what} is written whole by a rename "
                    "that a mount point cannot take; pass a folder inside it"
                )
            if empty:
                return
            if not self.is_ours(found):
                raise AusteerError(
                    f"refusing to write the {self.what} to {shown}: the folder holds other files{during} and would be replaced; "
                    "choose a new or empty folder"
                )
            if self.ours_need_overwrite and not self.overwrite:
                raise AusteerError(
                    f"{shown} already holds a {self.what}{during}; pass {self.flag} to replace it, or choose another folder"
                )
            return
        if stat.S_ISDIR(mode):
            raise AusteerError(f"cannot write the {self.what} to {shown}: it is a folder{during}; pass a file path")
        ours = self.is_ours(found)
        if ours and self.ours_need_overwrite and not self.overwrite:
            raise AusteerError(
                f"{shown} already holds a {self.what}{during}; pass {self.flag} to replace it, or choose another path"
            )
        if not ours and (self.ours_need_overwrite or not self.overwrite):
            fix = (
                "choose a new path"
                if self.ours_need_overwrite
                else f"pass {self.flag} to replace it, or choose a new path"
            )
            raise AusteerError(
                f"refusing to replace {shown}{during}: it is not a {self.what} that austeer-pl wrote; {fix}"
            )

    # -- the write
    def temporary(self) -> Path:
        """A fresh temporary path beside the output (nothing is created)."""
        return self.path.with_name(f".{self.path.name}.{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")

    @contextmanager
    def writing(self) -> Iterator[Path]:
        """Yield a temporary path (an empty folder for folder outputs) beside :attr:`path`; on
        success it replaces the output (:meth:`place`)."""
        target = self.path
        tmp = self.temporary()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(target)
            if self.folder:
                tmp.mkdir(mode=0o700)
            else:
                tmp.touch(mode=0o600)
        except OSError as err:
            _remove(tmp)
            raise AusteerError(os_error_message(err, target)) from None
        try:
            try:
                yield tmp
            except OSError as err:  # a full disk or a permission while the output is written
                raise AusteerError(os_error_message(err, target)) from None
            self.place(tmp)
        finally:
            _remove(tmp)

    def place(self, tmp: Path) -> None:
        """Move the finished ``tmp`` onto the output, after :meth:`check`'s rules are applied once more
        to what is there at that moment (moved aside, judged, and put back if it may not be replaced)."""
        target = self.path
        try:
            if self.folder:
                normal_permissions(tmp)
            else:
                os.chmod(tmp, default_mode(False))
            self._swap(tmp, target)
        except OSError as err:
            raise AusteerError(os_error_message(err, target)) from None
        finally:
            _remove(tmp)

    def _swap(self, tmp: Path, target: Path) -> None:
        backups: list[Path] = []  # our own earlier outputs, moved aside: removed once the new one is in place
        placed = False
        try:
            for _ in range(20):
                if _place(tmp, target, folder=self.folder):
                    placed = True
                    return
                aside = target.with_name(f".{target.name}.{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.old")
                try:
                    os.rename(target, aside)  # one atomic look: another writer may swap it in between
                except FileNotFoundError:
                    continue
                try:
                    self._judge(aside, at_swap=True, shown=target)
                except BaseException as stop:  # a refusal, or a signal while judging: put it back untouched
                    if not _place(aside, target, folder=stat.S_ISDIR(os.lstat(aside).st_mode)):
                        visible = _keep_visible(aside, target)
                        if isinstance(stop, AusteerError):
                            raise AusteerError(f"{stop} (what was at {target} is kept as {visible})") from None
                    raise
                backups.append(aside)
            raise AusteerError(f"cannot write {target}: other processes keep replacing it; run one writer at a time")
        finally:
            for backup in backups:
                if placed:
                    _remove(backup)  # judged ours and replaced
                elif not _place(backup, target, folder=stat.S_ISDIR(os.lstat(backup).st_mode)):
                    _keep_visible(backup, target)


def _keep_visible(aside: Path, target: Path) -> Path:
    """Give something that could not go back to ``target`` a visible name beside it (never delete it)."""
    visible = target.with_name(f"{target.name}.kept-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(aside, visible)
        return visible
    except OSError:
        return aside


def _place(src: Path, target: Path, *, folder: bool) -> bool:
    """Move ``src`` to ``target`` unless something is there (an empty folder counts as nothing)."""
    try:
        if folder:
            os.rename(src, target)  # replaces only an empty folder
        else:
            os.link(src, target)  # never replaces
            os.unlink(src)
        return True
    except FileExistsError:
        return False
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
            return False
        if not folder and err.errno in (
            errno.EPERM,
            errno.ENOTSUP,
            errno.EXDEV,
            getattr(errno, "EOPNOTSUPP", errno.ENOTSUP),
        ):
            # No hard links here (some network and FAT file systems): look, then rename.
            if os.path.lexists(target):
                return False
            os.replace(src, target)
            return True
        raise


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Clean up beside ``target`` after writers of this machine that were killed outright (SIGKILL).

    Their ``.tmp`` outputs are removed; what one had moved aside (``.old``: a user's file being
    judged, or an earlier output) is never removed: it goes back to ``target`` when that is free.
    Only temporaries of this host whose process is gone are touched. Returns what was removed.
    """
    target = Path(target)
    removed: list[Path] = []
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return removed
    for sibling in siblings:
        match = _OURS.match(sibling.name)
        if not match or match["name"] != target.name or match["host"] != _HOST or _alive(int(match["pid"])):
            continue
        if match["kind"] == "tmp":
            _remove(sibling)
            removed.append(sibling)
        else:
            with suppress(OSError):
                _place(sibling, target, folder=sibling.is_dir() and not sibling.is_symlink())
    return removed


__all__ = [
    "Output",
    "remove_stale_temporaries",
]
