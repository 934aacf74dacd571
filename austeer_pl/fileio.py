"""Safe file writes: nothing half-written is ever left where a reader looks, and nothing is deleted
that austeer-pl did not write.

Every writer (state exports, reports, analyses, merged models) goes through three rules:

* :func:`check_output_dir` / :func:`check_output_file` run *before* any work: a folder that holds
  something other than what the writer makes is refused, an existing output of the right kind is
  replaced only when the user asked for it, and the parent must be writable.
* :func:`atomic_dir` / :func:`atomic_path` assemble the output beside its destination and rename it
  into place, so a reader sees the old output or the new one, never a mix, and a failure (a full
  disk, a kill) leaves no temporary file behind.
* ``OSError`` becomes one :class:`~austeer_pl.errors.AusteerError` line naming the path
  (:func:`os_error_message`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import AusteerError

_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a file is in the way of a folder",
    errno.EISDIR: "a folder is in the way of a file",
    errno.ENAMETOOLONG: "the name is too long",
}


def os_error_message(err: OSError, path: str | os.PathLike | None = None, doing: str = "write") -> str:
    """One line for an ``OSError``: what failed, where, why, and what to do."""
    where = path if path is not None else (err.filename or "the output")
    reason = _REASONS.get(err.errno or -1) or (err.strerror or str(err)).lower()
    return f"cannot {doing} {where}: {reason}; free space, fix the permissions or choose another path"


def _default_mode(is_dir: bool) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def _normal_permissions(root: Path) -> None:
    """Give a folder assembled in a private temporary place the permissions of an ordinary one."""
    os.chmod(root, _default_mode(True))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(Path(dirpath) / name, _default_mode(True))
        for name in filenames:
            os.chmod(Path(dirpath) / name, _default_mode(False))


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON (``indent=2, sort_keys=True``) and fsync; not atomic on its own."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_parent(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail early, in one line, when ``path`` could not be created (read-only, no permission, a file in the way)."""
    path = Path(path)
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise AusteerError(f"cannot write the {what} to {path}: {base} is a file, not a folder; choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise AusteerError(f"cannot write the {what} to {path}: {base} is not writable; fix the permissions or choose another path")
    try:
        st = os.statvfs(base)
        if st.f_flag & getattr(os, "ST_RDONLY", 1):
            raise AusteerError(f"cannot write the {what} to {path}: the file system of {base} is read-only; choose another path")
    except (AttributeError, OSError):
        pass
    return path


def check_output_dir(
    path: str | os.PathLike,
    *,
    is_ours: Callable[[Path], bool],
    overwrite: bool = False,
    what: str = "output",
    flag: str = "--overwrite",
) -> Path:
    """Check, before any work, that a folder output may be written to ``path``.

    An absent or empty folder is fine. A folder that :func:`is_ours` recognises (a previous output of
    the same kind) is replaced only with ``overwrite``. Anything else (a file, a folder of other
    things) is refused: austeer-pl never deletes what it did not write.

    Example:
        >>> check_output_dir("runs/x/state", is_ours=is_steering_state, overwrite=False, what="steering state")
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise AusteerError(f"cannot write the {what} to {path}: a file is in the way; choose a new folder path")
        try:
            empty = not any(path.iterdir())
        except OSError as err:
            raise AusteerError(os_error_message(err, path, "read")) from None
        if not empty:
            if not is_ours(path):
                raise AusteerError(
                    f"refusing to write the {what} to {path}: the folder holds other files and would be replaced; "
                    "choose a new or empty folder"
                )
            if not overwrite:
                raise AusteerError(f"{path} already holds a {what}; pass {flag} to replace it, or choose another folder")
    return check_writable_parent(path, what)


def check_output_file(path: str | os.PathLike, *, what: str = "output") -> Path:
    """Check, before any work, that a file output may be written to ``path`` (never onto a folder)."""
    path = Path(path)
    if path.is_dir():
        raise AusteerError(f"cannot write the {what} to {path}: it is a folder; pass a file path")
    return check_writable_parent(path, what)


def paths_overlap(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when one path is the other or lies inside it."""
    a, b = Path(a).absolute().resolve(), Path(b).absolute().resolve()
    return a == b or a in b.parents or b in a.parents


def replace_dir(src: Path, target: Path) -> None:
    """Move folder ``src`` to ``target``, replacing any existing folder there.

    With several writers racing for one target, each rename is atomic and the last one wins whole.
    """
    src, target = Path(src), Path(target)
    backups: list[Path] = []
    try:
        for _ in range(20):
            try:
                os.replace(src, target)
                return
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                    raise
            try:
                kind = os.lstat(target).st_mode  # one look: other writers may swap the target in between
            except FileNotFoundError:
                continue  # another writer moved it away between our two calls; try again
            if stat.S_ISDIR(kind):
                backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:12]}")
                try:
                    os.replace(target, backup)
                    backups.append(backup)
                except FileNotFoundError:
                    pass  # another writer moved it first
            else:
                raise AusteerError(f"cannot replace {target}: a file is in the way; choose a folder path")
        raise AusteerError(f"cannot write {target}: other processes keep replacing it; run one writer at a time")
    finally:
        for backup in backups:
            shutil.rmtree(backup, ignore_errors=True)


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on success it replaces ``target`` whole.

    Files get ordinary permissions (not the private ones of a temporary folder). On any failure the
    temporary folder is removed and ``target`` is left as it was; ``OSError`` becomes one line.

    Example:
        >>> with atomic_dir("runs/x/state") as tmp:
        ...     (tmp / "a.json").write_text("{}")
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as err:
        raise AusteerError(os_error_message(err, target)) from None
    try:
        yield tmp
        _normal_permissions(tmp)
        replace_dir(tmp, target)
    except OSError as err:
        raise AusteerError(os_error_message(err, target)) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    Example:
        >>> with atomic_path("report.json") as tmp:
        ...     tmp.write_text("{}")
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise AusteerError(os_error_message(err, path)) from None
    try:
        yield Path(tmp)
        os.chmod(tmp, _default_mode(False))
        os.replace(tmp, path)
    except OSError as err:
        raise AusteerError(os_error_message(err, path)) from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON to ``path`` through a temporary file and an atomic rename."""
    with atomic_path(path) as tmp:
        write_json(tmp, obj)
    return Path(path)
