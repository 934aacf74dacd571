"""Paths before a write: one line for an ``OSError`` (what failed, where, why, what to do), a writable
parent, a name the file system takes, whether two paths overlap, and the permissions of an
ordinary file or folder."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from austeer_pl.errors import AusteerError

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


def default_mode(is_dir: bool) -> int:
    """The mode an ordinary new folder (``is_dir``) or file gets under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


def normal_permissions(root: Path) -> None:
    """Give a folder assembled in a private temporary place the permissions of an ordinary one."""
    os.chmod(root, default_mode(True))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(Path(dirpath) / name, default_mode(True))
        for name in filenames:
            os.chmod(Path(dirpath) / name, default_mode(False))


def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_parent(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail early, in one line, when ``path`` could not be created (read-only, no permission, a file in the way)."""
    path = Path(path)
    base = nearest_existing(path.parent)
    if not base.is_dir():
        raise AusteerError(f"cannot write the {what} to {path}: {base} is a file, not a folder; choose another path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise AusteerError(
            f"cannot write the {what} to {path}: {base} is not writable; fix the permissions or choose another path"
        )
    try:
        st = os.statvfs(base)
        if st.f_flag & getattr(os, "ST_RDONLY", 1):
            raise AusteerError(
                f"cannot write the {what} to {path}: the file system of {base} is read-only; choose another path"
            )
    except (AttributeError, OSError):
        pass
    return path


def name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(nearest_existing(folder), "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def paths_overlap(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when one path is the other (also through links) or lies inside it."""
    a, b = Path(a).absolute().resolve(), Path(b).absolute().resolve()
    if a == b or a in b.parents or b in a.parents:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


__all__ = [
    "check_writable_parent",
    "default_mode",
    "name_max",
    "nearest_existing",
    "normal_permissions",
    "os_error_message",
    "paths_overlap",
]
