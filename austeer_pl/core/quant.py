"""Quantised bases: the weights in 8 or 4 bits, the steering edits in the activations' own dtype.

* ``int8``: torchao's weight-only int8 quantisation of every linear layer, on any device (CPU included,
  so it is tested here); loaded in float, then quantised in place.
* ``bnb-int8``, ``bnb-nf4``: bitsandbytes through transformers (``load_in_8bit`` / 4-bit NF4), CUDA only.

Hooks read and edit activations, which stay in float, so fitting, evaluating and generating work as on a
float base. A LoRA adapter (``--format peft``, ``gguf-lora``) is computed from the dequantised weights;
merging into quantised weights is refused with the reason (their values are not stored to scale in
place: load the base in float to merge).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from austeer_pl.errors import AusteerError, SettingError

__all__ = ["QUANTIZATIONS", "check_quantize", "dequantized", "quantization_kwargs", "quantize_model"]

QUANTIZATIONS = ("int8", "bnb-int8", "bnb-nf4")


def check_quantize(value: str | None) -> str | None:
    if value in (None, "", "none"):
        return None
    if value not in QUANTIZATIONS:
        raise SettingError("quantize", f"is {value!r}; use one of {', '.join(QUANTIZATIONS)} (or leave it unset)")
    return value


def quantization_kwargs(value: str | None) -> dict[str, Any]:
    """``from_pretrained`` keywords of a bitsandbytes quantisation (empty for the others)."""
    value = check_quantize(value)
    if value is None or not value.startswith("bnb-"):
        return {}
    if not torch.cuda.is_available():
        raise AusteerError(f"--model.quantize {value} needs bitsandbytes on a CUDA GPU; on the CPU use int8 (torchao)")
    from transformers import BitsAndBytesConfig  # noqa: PLC0415 - bitsandbytes bases only

    if value == "bnb-int8":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")}


def quantize_model(model: nn.Module, value: str | None) -> nn.Module:
    """Quantise ``model``'s linear weights in place for ``int8`` (torchao); other values are applied at load."""
    if check_quantize(value) != "int8":
        return model
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: PLC0415 - optional: pip install torchao
    except ImportError:
        raise AusteerError(
            "--model.quantize int8 needs torchao: pip install 'austeer-pl[quant]' (or torchao)"
        ) from None
    quantize_(model, Int8WeightOnlyConfig())
    return model


def dequantized(weight: torch.Tensor) -> torch.Tensor:
    """A weight's float values: itself, or the dequantised values of a quantised tensor subclass that
    implements ``dequantize`` (torchao). Other quantised weights (bitsandbytes) are refused in one line:
    ``torch.Tensor.dequantize`` of their int8 storage would drop their scales."""
    if type(weight) in (torch.Tensor, nn.Parameter) and weight.dtype.is_floating_point:
        return weight
    if getattr(type(weight), "dequantize", None) is not torch.Tensor.dequantize:
        return weight.dequantize()
    raise AusteerError(
        f"cannot read the float values of {type(weight).__name__} weights ({weight.dtype}); load the base in float "
        "(or with --model.quantize int8) to write an adapter"
    )
