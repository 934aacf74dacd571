"""The steering-state folder format: ``steering_config.json`` and ``steering_state.safetensors``,
nothing else, no pickle.

:func:`write_state_files` writes the two files (the safetensors header made canonical, the config
holding the weights' sha256); :func:`read_state_files` checks everything a reader relies on (the
package mark, the format version, the checksum, every tensor and field's type) and ends any
damage in one line that says to export the state again.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from austeer_pl.core.fileio import parse_json, sha256_file, write_json
from austeer_pl.core.hooks import TOKEN_SCOPES
from austeer_pl.core.output import Output
from austeer_pl.core.selection import SIGN_POLICIES
from austeer_pl.core.strength import STRENGTH_KINDS
from austeer_pl.errors import AusteerError

FORMAT_VERSION = 1
CONFIG_NAME = "steering_config.json"
WEIGHTS_NAME = "steering_state.safetensors"
TENSOR_KEYS = ("site_index", "layer", "unit", "momentum", "scale", "shift")
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def is_steering_state(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder of a steering state's files and nothing else (what
    :meth:`SteeringState.save_pretrained` writes, also when damaged): only then may a save replace it."""
    folder = Path(path)
    try:
        names = {p.name for p in folder.iterdir()}
        text = (folder / CONFIG_NAME).read_bytes()
    except OSError:
        return False
    if not names <= {CONFIG_NAME, WEIGHTS_NAME}:
        return False
    try:
        config = json.loads(text)
    except (ValueError, RecursionError):
        return True  # our file name, and nothing a reader could use: a damaged state
    return isinstance(config, dict) and config.get("package") == "austeer-pl"


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its ``__metadata__`` keys sorted, in place.

    safetensors writes the metadata map in a random order (a Rust ``HashMap``), so the same state
    gave two different files; sorted keys make the bytes, and their sha256, a function of the state.
    The header keeps its length (the same keys and values), so nothing else moves.
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        if "__metadata__" in header:
            header = {
                "__metadata__": dict(sorted(header["__metadata__"].items())),
                **{k: v for k, v in header.items() if k != "__metadata__"},
            }
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (n - len(text))
        if len(text) != n:
            raise AusteerError(
                f"cannot rewrite the header of {path}: its length changed; this is a bug, please report it"
            )
        f.seek(8)
        f.write(text)


def check_tensor(name: str, tensor: Any, *, integer: bool) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise AusteerError(
            f"steering state field '{name}' must be a tensor, got {type(tensor).__name__}; the state is corrupt, export it again"
        )
    if tensor.dim() != 1:
        raise AusteerError(
            f"steering state tensor '{name}' must be 1-D, got shape {tuple(tensor.shape)}; the state is corrupt, export it again"
        )
    if integer and tensor.dtype not in INT_DTYPES:
        raise AusteerError(
            f"steering state tensor '{name}' must hold integers, got {tensor.dtype}; the state is corrupt, export it again"
        )
    if not integer:
        if tensor.dtype not in FLOAT_DTYPES:  # float8 and the like cannot even be checked for NaN
            raise AusteerError(
                f"steering state tensor '{name}' must hold float16/32/64 or bfloat16 values, got {tensor.dtype}; the state is corrupt, export it again"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise AusteerError(
                f"steering state tensor '{name}' holds NaN or infinite values; the state is corrupt, export it again"
            )
    return tensor


def config_field(config: Mapping[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if name not in config:
        if default is ...:
            raise AusteerError(f"{CONFIG_NAME} lacks field '{name}'; the state was altered, export it again")
        return default
    value = config[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        want = " or ".join(k.__name__ for k in kinds)
        raise AusteerError(
            f"{CONFIG_NAME} field '{name}' must be {want}, got {type(value).__name__} {short_value(value)}; the state was altered, export it again"
        )
    return value


def short_value(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, torch.Tensor) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_fields(state: Any) -> dict[str, str | None] | None:
    """The scalar fields of a :class:`~austeer_pl.core.state.SteeringState` (alpha, sizes, sites, metadata,
    strength, layout, the gate's tensors), each refused in one line when it cannot be right; returns the
    layout with its three keys."""
    layout = None
    if isinstance(state.alpha, bool) or not isinstance(state.alpha, int | float) or not math.isfinite(state.alpha):
        raise AusteerError(
            f"steering state 'alpha' must be a finite number, got {state.alpha!r}; the state is corrupt, export it again"
        )
    if isinstance(state.n_layers, bool) or not isinstance(state.n_layers, int) or state.n_layers < 1:
        raise AusteerError(
            f"steering state 'n_layers' must be a positive integer, got {state.n_layers!r}; the state is corrupt"
        )
    if not isinstance(state.site_sizes, Mapping) or not all(
        isinstance(s, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0
        for s, v in state.site_sizes.items()
    ):
        raise AusteerError(
            f"steering state 'site_sizes' must map site names to positive integers, got {state.site_sizes!r}; the state is corrupt"
        )
    if not all(isinstance(s, str) for s in state.sites):
        raise AusteerError(f"steering state 'sites' must be names, got {list(state.sites)!r}; the state is corrupt")
    if not isinstance(state.metadata, dict):
        raise AusteerError(
            f"steering state 'metadata' must be an object, got {type(state.metadata).__name__}; the state is corrupt"
        )
    if not isinstance(state.strength, dict) or state.strength.get("kind", "momentum") not in STRENGTH_KINDS:
        raise AusteerError(
            f"steering state 'strength' must be an object with kind {', '.join(STRENGTH_KINDS)}, got {state.strength!r}; the state is corrupt"
        )
    if state.layout is not None:
        if (
            not isinstance(state.layout, Mapping)
            or not isinstance(state.layout.get("layers"), str)
            or not all(
                state.layout.get(key) is None or isinstance(state.layout.get(key), str) for key in ("attention", "ffn")
            )
            or set(state.layout) - {"layers", "attention", "ffn"}
        ):
            raise AusteerError(
                f"steering state 'layout' must name module paths (layers, attention, ffn), got {state.layout!r}; the state is corrupt"
            )
        layout = {key: state.layout.get(key) for key in ("layers", "attention", "ffn")}
    for name, tensor in state.strength_tensors.items():
        if (
            not isinstance(tensor, torch.Tensor)
            or tensor.dtype not in FLOAT_DTYPES
            or not bool(torch.isfinite(tensor).all())
        ):
            raise AusteerError(
                f"steering state tensor 'strength.{name}' must hold finite floats; the state is corrupt, export it again"
            )
    return layout


def check_units(state: Any) -> None:
    """The token scope, the sign policy, and every unit's site, layer and index within the model the
    state records (a :class:`~austeer_pl.core.state.SteeringState` whose tensors are already int64)."""
    if state.token_scope not in TOKEN_SCOPES:
        raise AusteerError(f"unknown token scope '{state.token_scope}'; choose one of {', '.join(TOKEN_SCOPES)}")
    if state.sign_policy not in SIGN_POLICIES:
        raise AusteerError(f"unknown sign policy '{state.sign_policy}'; choose one of {', '.join(SIGN_POLICIES)}")
    if state.k and (int(state.site_index.min()) < 0 or int(state.site_index.max()) >= len(state.sites)):
        raise AusteerError(
            "steering state has a site index outside its list of sites; the state is corrupt, fit it again"
        )
    for i, site in enumerate(state.sites):
        rows = state.site_index == i
        if site not in state.site_sizes:
            raise AusteerError(f"steering state uses site '{site}' but records no size for it; the state is corrupt")
        if rows.any():
            if int(state.layer[rows].min()) < 0 or int(state.layer[rows].max()) >= state.n_layers:
                raise AusteerError(f"steering state has a layer outside 0..{state.n_layers - 1}; the state is corrupt")
            if int(state.unit[rows].min()) < 0 or int(state.unit[rows].max()) >= state.site_sizes[site]:
                raise AusteerError(
                    f"steering state has a {site} unit outside 0..{state.site_sizes[site] - 1}; the state is corrupt"
                )


def check_gate(state: Any) -> None:
    """A learned gate's description and tensors (of a :class:`~austeer_pl.core.state.SteeringState`) must fit each
    other and the steered layers."""
    gate = state.strength
    for key in ("layer", "width", "hidden_size"):
        value = gate.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "layer" else 1):
            raise AusteerError(
                f"steering state gate field '{key}' must be a {'non-negative' if key == 'layer' else 'positive'} integer, got {short_value(value)}; "
                "the state is corrupt, export it again"
            )
    if state.k and gate["layer"] > int(state.layer.min()):
        raise AusteerError(
            f"steering state gate reads layer {gate['layer']}, above the first steered layer {int(state.layer.min())} (it would see its own edits); "
            "the state is corrupt, export it again"
        )
    if gate["layer"] >= state.n_layers:
        raise AusteerError(
            f"steering state gate reads layer {gate['layer']} of a {state.n_layers}-layer model; the state is corrupt, export it again"
        )
    shapes = {
        "inner.weight": (gate["width"], gate["hidden_size"]),
        "inner.bias": (gate["width"],),
        "outer.weight": (state.k, gate["width"]),
        "outer.bias": (state.k,),
    }
    for name, shape in shapes.items():
        tensor = state.strength_tensors.get(name)
        if tensor is None or tuple(tensor.shape) != shape:
            found = "missing" if tensor is None else f"shape {tuple(tensor.shape)}"
            raise AusteerError(
                f"steering state gate tensor 'strength.{name}' must have shape {shape}, got {found}; the state is corrupt, export it again"
            )


def write_state_files(folder: Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    """Write ``tensors`` and ``config`` (with the weights' sha256 added) into ``folder``."""
    save_file(
        dict(tensors), str(folder / WEIGHTS_NAME), metadata={"format": "pt", "format_version": str(FORMAT_VERSION)}
    )
    _sort_metadata(folder / WEIGHTS_NAME)
    write_json(folder / CONFIG_NAME, {**config, "files": {WEIGHTS_NAME: sha256_file(folder / WEIGHTS_NAME)}})


def read_state_files(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checked ``(config, tensors)`` of a steering-state folder.

    Raises:
        AusteerError: when the folder or a file is missing, altered, or of an unknown format.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise AusteerError(
            f"no steering state at {folder}: the folder does not exist; pass the folder written by train.py (--export_dir)"
        )
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AusteerError(
                f"steering state at {folder} is missing {path.name}; export it again with train.py or save_pretrained"
            )
    try:
        text = config_path.read_bytes()
    except OSError as err:
        raise AusteerError(
            f"cannot read {config_path} ({(err.strerror or str(err)).lower()}); check its permissions"
        ) from None
    config = parse_json(text, str(config_path), fix="the state was altered, export it again")
    if not isinstance(config, dict) or config.get("package") != "austeer-pl":
        raise AusteerError(f"{config_path} is not an austeer-pl steering config; pass a folder written by austeer-pl")
    version = config.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise AusteerError(
            f"{config_path} field 'format_version' must be the integer {FORMAT_VERSION}, got {type(version).__name__} {short_value(version)}; "
            "the state was altered, export it again"
        )
    if version != FORMAT_VERSION:
        raise AusteerError(
            f"steering state at {folder} has format version {version}, this austeer-pl reads {FORMAT_VERSION}; "
            "upgrade austeer-pl or export the state again"
        )
    files = config_field(config, "files", dict, {})
    expected = files.get(WEIGHTS_NAME)
    if expected is not None and sha256_file(weights_path) != expected:
        raise AusteerError(
            f"{weights_path} does not match the checksum in {CONFIG_NAME}: the file was altered or truncated; export the state again"
        )
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AusteerError(f"cannot read {weights_path} ({str(err).splitlines()[0]}); export the state again") from None
    missing = [name for name in TENSOR_KEYS if name not in tensors]
    if missing:
        raise AusteerError(f"{weights_path} lacks tensors {', '.join(missing)}; the state was altered, export it again")
    return config, tensors


__all__ = [
    "CONFIG_NAME",
    "FLOAT_DTYPES",
    "FORMAT_VERSION",
    "INT_DTYPES",
    "TENSOR_KEYS",
    "WEIGHTS_NAME",
    "check_fields",
    "check_gate",
    "check_tensor",
    "check_units",
    "config_field",
    "is_steering_state",
    "read_state_files",
    "short_value",
    "state_output",
    "write_state_files",
]


def state_output(directory: str | os.PathLike, *, overwrite: bool = False, flag: str = "--overwrite") -> Output:
    """The steering-state folder output at ``directory`` (see :class:`~austeer_pl.core.output.Output`)."""
    return Output(
        Path(directory),
        "steering state",
        is_steering_state,
        overwrite=overwrite,
        folder=True,
        ours_need_overwrite=True,
        flag=flag,
    )
