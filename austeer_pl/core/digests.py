"""Content digests that outlive a process, and the one way a changed input is refused.

Hashes of large files are kept in ``$AUSTEER_CACHE/sha256.json``, keyed by real path, size, mtime
and inode, so a model's weights are read once per version, not at every command. Only the standard
library is imported here.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from austeer_pl.core.fileio import sha256_file
from austeer_pl.errors import AusteerError

_CACHE_FROM = 16 << 20  # smaller files are hashed again each time (faster than a cache look-up)


def default_cache_dir() -> Path:
    """Returns the folder that holds converted models and remembered digests.

    Returns:
        ``$AUSTEER_CACHE`` if set, else ``$XDG_CACHE_HOME/austeer_pl``, else
        ``~/.cache/austeer_pl``.
    """
    if os.environ.get("AUSTEER_CACHE"):
        return Path(os.environ["AUSTEER_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "austeer_pl"
    return Path.home() / ".cache" / "austeer_pl"


def sha256_cached(path: str | os.PathLike) -> str:
    """The sha256 of a file, remembered across processes by (real path, size, mtime, inode)."""
    path = Path(path)
    stat = path.stat()
    if stat.st_size < _CACHE_FROM:
        return sha256_file(path)
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    cache = default_cache_dir() / "sha256.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError, RecursionError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(key), str):
        return known[key]
    digest = sha256_file(path)
    known[key] = digest
    try:  # a cache: losing a race with another writer only costs a later re-hash
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=0, sort_keys=True))
        os.replace(tmp, cache)
    except OSError:
        pass
    return digest


def short(digest: Any) -> str:
    """The first 12 hex digits of a digest, for messages."""
    return str(digest)[:12] if digest else "none"


def refuse_or_warn(problem: str, allow: bool) -> None:
    """Refuse a changed input in one line, or only warn when the user allowed it (``--allow_changed_inputs``)."""
    if allow:
        warnings.warn(f"{problem}; going on (--allow_changed_inputs)", stacklevel=3)
        return
    raise AusteerError(f"{problem}; restore it, or pass --allow_changed_inputs to go on anyway")


__all__ = ["default_cache_dir", "refuse_or_warn", "sha256_cached", "short"]
