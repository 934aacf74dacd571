"""Models larger than one device: where each layer lives (``device_map``), how much each device may
hold (``max_memory``), and where offloaded weights go on disk (``offload_folder``).

These are transformers' and accelerate's own options, passed to ``from_pretrained``: a placement
name (``auto``, ``balanced``, ``balanced_low_0``, ``sequential``) or an explicit map of module
names to devices (``{"model.layers.0": 0, "model.layers.1": "cpu", "model.layers.2": "disk"}``).
A dispatched model keeps each layer on its device: reads and edits run there (the hooks follow
the activation's device), and the statistics gather on the device of the input. One process
holds one replica; data parallelism runs one process per replica, each possibly spanning devices.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from austeer_pl.core.fileio import parse_json
from austeer_pl.errors import SettingError

__all__ = [
    "PLACEMENTS",
    "input_device",
    "is_dispatched",
    "parse_device_map",
    "parse_max_memory",
    "parse_size",
    "placement_kwargs",
]

#: accelerate's placement strategies.
PLACEMENTS = ("auto", "balanced", "balanced_low_0", "sequential")


def _device(value: Any, setting: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SettingError(setting, f"has a device {value!r}; use a GPU index, 'cpu', 'disk' or e.g. 'cuda:1'")
    return value


def parse_device_map(value: Any) -> str | dict[str, Any] | None:
    """``None``, a placement name, or a map ``{module name: device}`` (a dict or its JSON text)."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip() in PLACEMENTS:
        return value.strip()
    if isinstance(value, str):
        if not value.strip().startswith("{"):
            raise SettingError(
                "device_map", f"is {value!r}; use {', '.join(PLACEMENTS)} or a JSON map of module names to devices"
            )
        value = parse_json(value.encode(), "device_map", fix="write the map as JSON, e.g. '{\"model.layers.0\": 0}'")
    if not isinstance(value, dict) or not value:
        raise SettingError("device_map", "must be a placement name or a non-empty map of module names to devices")
    return {str(name): _device(device, "device_map") for name, device in value.items()}


def parse_size(size: str | int) -> int:
    """Bytes of ``20GiB``, ``500MB``, ``1.5GB`` or a whole number of bytes (accelerate's spellings; no bit
    units: ``5Gb`` is 5 GB)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not match:
        raise SettingError("max_memory", f"has a size {size!r}; write e.g. '20GiB', '500MB' or a number of bytes")
    number, unit = float(match.group(1)), match.group(2) or "B"
    powers = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    return int(number * powers[unit])


def parse_max_memory(value: Any) -> dict[Any, int] | None:
    """``None`` or ``{device: size}`` (a dict or its JSON text), e.g. ``{"0": "20GiB", "cpu": "60GiB"}``."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = parse_json(
            value.encode(), "max_memory", fix='write it as JSON, e.g. \'{"0": "20GiB", "cpu": "60GiB"}\''
        )
    if not isinstance(value, dict) or not value:
        raise SettingError("max_memory", 'must be a map of devices to sizes, e.g. {"0": "20GiB", "cpu": "60GiB"}')
    out: dict[Any, int] = {}
    for device, size in value.items():
        key = int(device) if isinstance(device, str) and device.isdigit() else device
        if not isinstance(size, (str, int)) or isinstance(size, bool):
            raise SettingError(
                "max_memory", f"has a size {size!r} for {device!r}; use e.g. '20GiB' or a number of bytes"
            )
        out[key] = parse_size(size)  # bytes: accelerate reads ints as bytes
    return out


def placement_kwargs(
    device_map: Any = None, max_memory: Any = None, offload_folder: str | None = None
) -> dict[str, Any]:
    """The ``from_pretrained`` keywords of a placement (empty: load whole on one device)."""
    mapped = parse_device_map(device_map)
    memory = parse_max_memory(max_memory)
    if mapped is None:
        if memory is not None or offload_folder:
            raise SettingError(
                "max_memory" if memory is not None else "offload_folder",
                "only applies with a device_map; set one (e.g. auto)",
            )
        return {}
    kwargs: dict[str, Any] = {"device_map": mapped}
    if memory is not None:
        kwargs["max_memory"] = memory
    if offload_folder:
        kwargs["offload_folder"] = str(offload_folder)
    return kwargs


def is_dispatched(model: nn.Module) -> bool:
    """Whether ``model`` was loaded with a device map (its layers may live on several devices or on disk)."""
    return bool(getattr(model, "hf_device_map", None))


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its first parameter's device (the embeddings'), the CPU when that
    parameter is offloaded to disk (accelerate then computes that layer on the CPU)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.device("cpu") if device.type == "meta" else device
