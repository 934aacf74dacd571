"""What identifies a base model's weights, and the check before a state is used with them.

A fit records ``metadata["inputs"]["model"]``: the sha256 of the weight files (the embedded model's
cache, a local folder's weight files, a ``.gguf`` file) or, for a hub model, its revision.
``evaluate.py``, ``generate.py``, ``export.py`` and ``analyze.py behaviour`` refuse other weights in
one line (``--allow_changed_inputs`` makes that a warning): a state merged into other weights
gives numbers that look right and are not. The task's files are pinned by :mod:`austeer_pl.tasks.pins`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from austeer_pl.core.digests import refuse_or_warn, sha256_cached, short
from austeer_pl.core.embedded import DEFAULT_MODEL, MARKER_NAME, ensure_embedded_model

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_pin(name: str, model: Any = None, *, cache_dir: Any = None) -> dict[str, Any]:
    """What identifies a base model's weights: sha256 of its weight files, or a hub revision.

    Example:
        >>> model_pin("smollm2-135m-instruct")["kind"]  # doctest: +SKIP
        'embedded'
    """

    text = str(name).strip()
    if text.lower() == DEFAULT_MODEL:
        folder = ensure_embedded_model(cache_dir)
        marker = json.loads((folder / MARKER_NAME).read_text())
        return {
            "kind": "embedded",
            "name": DEFAULT_MODEL,
            "sha256": {f: s for f, s in sorted(marker.get("sha256", {}).items()) if f.endswith(WEIGHT_SUFFIXES)},
        }
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
        return {"kind": "folder", "path": str(path.absolute()), "sha256": {p.name: sha256_cached(p) for p in files}}
    if path.is_file():
        return {"kind": "file", "path": str(path.absolute()), "sha256": {path.name: sha256_cached(path)}}
    revision = getattr(getattr(model, "config", None), "_commit_hash", None)
    return {"kind": "hub", "name": text, "revision": revision}


def check_model(
    recorded: Mapping[str, Any] | None, name: str, model: Any = None, *, allow: bool = False, cache_dir: Any = None
) -> None:
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
            refuse_or_warn(
                f"the base model {name} has other weights than the fit's ({', '.join(changed[:3])} differ)", allow
            )
    elif (
        pin.get("kind") == now.get("kind") == "hub"
        and pin.get("revision")
        and now.get("revision")
        and pin["revision"] != now["revision"]
    ):
        refuse_or_warn(
            f"the base model {name} is at revision {short(now['revision'])}..., the fit used {short(pin['revision'])}...",
            allow,
        )
    # A hub id on one side and local files on the other cannot be compared here: nothing is said.


__all__ = ["WEIGHT_SUFFIXES", "check_model", "model_pin"]
