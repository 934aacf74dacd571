"""Reading and writing the files users hand us and the common outputs, in one line when they fail.

JSON from users' files is parsed by :func:`parse_json`, which turns every way of being unreadable
(bad syntax, a 5,000-digit number, deep nesting) into one :class:`~austeer_pl.errors.AusteerError`
line. Our JSON reports, JSON-lines files and PNG plots carry a mark (:data:`JSON_MARKER`,
:data:`PNG_SOFTWARE`) by which a later run knows them as ours and replaces them freely; each is
written atomically through an :class:`~austeer_pl.core.output.Output`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from austeer_pl._version import __version__
from austeer_pl.core.output import Output
from austeer_pl.core.paths import os_error_message
from austeer_pl.errors import AusteerError

#: The key that marks a JSON output as austeer-pl's (its value names the output and the version;
#: distinct from the ``austeer_pl`` provenance record of a merged model's ``config.json``).
JSON_MARKER = "austeer_pl_output"
#: The PNG text chunk that marks a plot as austeer-pl's.
PNG_SOFTWARE = f"austeer-pl {__version__}"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- reading JSON
def parse_json(
    text: str | bytes, where: str, *, fix: str = "fix the JSON syntax", object_pairs_hook: Callable | None = None
) -> Any:
    """``json.loads`` whose every failure is one :class:`AusteerError` line naming ``where``.

    Besides bad syntax, Python refuses integers of more than 4,300 digits (``ValueError``) and
    nesting deeper than its recursion limit (``RecursionError``); neither may end in a traceback.

    Example:
        >>> parse_json('{"a": 1}', "config.json")
        {'a': 1}
    """
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as err:
        line = f":{err.lineno}" if err.lineno > 1 else ""
        raise AusteerError(f"{where}{line}: invalid JSON ({err.msg} at column {err.colno}); {fix}") from None
    except RecursionError:
        raise AusteerError(f"{where}: JSON nested too deeply to read; {fix}") from None
    except UnicodeDecodeError as err:
        raise AusteerError(f"{where}: not UTF-8 text (byte {err.start}); {fix}") from None
    except ValueError as err:  # e.g. an integer with more digits than Python converts
        raise AusteerError(f"{where}: unreadable JSON ({' '.join(str(err).split())[:100]}); {fix}") from None


def read_json_file(path: str | os.PathLike, *, fix: str = "fix the JSON syntax") -> Any:
    """Parse a JSON file with :func:`parse_json`; an unreadable file is one line too."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as err:
        raise AusteerError(os_error_message(err, path, "read")) from None
    return parse_json(text, str(path), fix=fix)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON (``indent=2, sort_keys=True``) and fsync; not atomic on its own."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------- recognising our outputs
def is_marked_json(path: Path) -> bool:
    """A JSON object with the :data:`JSON_MARKER` key (reports, analyses, comparisons)."""
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except (OSError, ValueError, RecursionError):
        return False
    marker = obj.get(JSON_MARKER) if isinstance(obj, dict) else None
    return isinstance(marker, dict) and isinstance(marker.get("output"), str)


def jsonl_with_keys(keys: Iterable[str]) -> Callable[[Path], bool]:
    """A recogniser of JSON-lines files whose rows all have exactly ``keys`` (empty files too)."""
    wanted = frozenset(keys)

    def is_ours(path: Path) -> bool:
        try:
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        row = json.loads(line)
                        if not isinstance(row, dict) or set(row) != wanted:
                            return False
        except (OSError, ValueError, RecursionError):
            return False
        return True

    return is_ours


def is_marked_png(path: Path) -> bool:
    """A PNG whose ``Software`` text chunk names austeer-pl (see :data:`PNG_SOFTWARE`)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return head.startswith(b"\x89PNG\r\n\x1a\n") and b"Software\x00austeer-pl" in head


# ---------------------------------------------------------------------------- the common outputs
def json_output(path: str | os.PathLike, what: str = "report", *, overwrite: bool = False) -> Output:
    """A JSON report: replaces an earlier austeer-pl JSON freely, anything else only with ``--overwrite``."""
    return Output(Path(path), what, is_marked_json, overwrite=overwrite)


def write_json_output(output: Output, obj: dict[str, Any]) -> Path:
    """Write ``obj`` (a JSON object) to ``output`` atomically, with the :data:`JSON_MARKER` key."""
    with output.writing() as tmp:
        write_json(tmp, {**obj, JSON_MARKER: {"output": output.what, "version": __version__}})
    return output.path


def write_json_atomic(path: str | os.PathLike, obj: dict[str, Any], *, what: str = "result") -> Path:
    """Write a JSON result that a script owns (the benchmarks' results), replacing what is there
    (never a folder or an input); commands describe their outputs with :func:`json_output`."""
    return write_json_output(json_output(path, what, overwrite=True).check(), obj)


def jsonl_output(path: str | os.PathLike, what: str, keys: Iterable[str], *, overwrite: bool = False) -> Output:
    """A JSON-lines file of rows with exactly ``keys``."""
    return Output(Path(path), what, jsonl_with_keys(keys), overwrite=overwrite)


def write_jsonl_output(output: Output, rows: Iterable[dict[str, Any]]) -> Path:
    """One JSON object a line, atomically."""
    with output.writing() as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return output.path


def png_output(path: str | os.PathLike, what: str = "plot", *, overwrite: bool = False) -> Output:
    """A PNG plot, recognised by its ``Software`` text chunk."""
    return Output(Path(path), what, is_marked_png, overwrite=overwrite)


def save_figure(fig: Any, output: Output) -> Path:
    """Save a matplotlib figure as a marked PNG, atomically."""
    with output.writing() as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight", metadata={"Software": PNG_SOFTWARE})
    return output.path


__all__ = [
    "JSON_MARKER",
    "PNG_SOFTWARE",
    "is_marked_json",
    "is_marked_png",
    "json_output",
    "jsonable",
    "jsonl_output",
    "jsonl_with_keys",
    "parse_json",
    "png_output",
    "read_json_file",
    "save_figure",
    "sha256_file",
    "write_json",
    "write_json_atomic",
    "write_json_output",
    "write_jsonl_output",
]


def jsonable(value: Any) -> Any:
    """Tuples as lists, recursively (JSON reports and W&B configs)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
