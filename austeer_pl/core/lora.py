"""A steering state as an ordinary LoRA adapter: the same edit as a low-rank weight update.

Scaling the units ``S`` of the attention output projection's *input* by ``1 + g`` is
``W a' = W a + W[:, S] diag(g) a_S``: a LoRA pair ``A = E_S^T`` (it picks the units) and
``B = W[:, S] diag(g)``, of rank ``|S|`` in that layer. Scaling the units ``S`` of the FFN block's
*output* (its down projection's output) is ``B = E_S`` and ``A = diag(g) W_down[S, :]``; where that
projection has a bias, the bias of the scaled units scales too, which peft's LoRA bias carries
(``lora_bias``: a bias on ``lora_B`` holding ``g * b_S``). Every target module gets the same rank
(the most units any module has), zero-padded, so engines that take one maximum rank load it. The
adapter's ``lora_alpha`` equals its rank, so its scale is 1 and a scale ``s`` (peft's ``scale_layer``,
llama.cpp's ``--lora-scaled``, a per-request scale) multiplies ``g``, which is the state's ``alpha``.

The adapter reproduces the hooked model up to the order of floating-point operations. What cannot
be a fixed weight update is refused with the reason (:func:`~austeer_pl.core.merge.check_foldable`:
a learned gate, a prompt or generated token scope, residual edits), and so are additive shifts
(``a + t``), which keep the merged and control-vector exports.

The files are peft's: ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (``lora_B.bias``), which
``peft.PeftModel.from_pretrained(base, folder)``, vLLM, TGI and lm-evaluation-harness read. Writing
them needs no peft.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save_file
from torch import nn

from austeer_pl._version import __version__
from austeer_pl.core.fileio import JSON_MARKER, parse_json, write_json
from austeer_pl.core.merge import Edits, FoldStep, check_foldable, fold_plan
from austeer_pl.core.output import Output
from austeer_pl.core.quant import dequantized
from austeer_pl.core.sites import LayoutSpec, ModelLayout, locate_units
from austeer_pl.core.statehub import base_model_yaml
from austeer_pl.errors import AusteerError

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "PROVENANCE_NAME",
    "LoraAdapter",
    "adapter_output",
    "adapter_record",
    "is_adapter_folder",
    "lora_adapter",
    "save_adapter",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class LoraAdapter:
    """LoRA factors that reproduce a steering state on one base model.

    Attributes:
        rank: the one rank of every target module (zero-padded).
        factors: ``module name -> (A (rank, in), B (out, rank), bias (out,) or None)``, in the
            adapter's dtype; ``module(x) + B @ A @ x (+ bias)`` is the steered module.
        fan_in_fan_out: the targets store their weight as ``(in, out)`` (GPT-2's ``Conv1D``).
        base_model: the base model the state was fitted on, as the state records it.
    """

    rank: int
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    fan_in_fan_out: bool
    base_model: str

    @property
    def lora_bias(self) -> bool:
        return any(bias is not None for _, _, bias in self.factors.values())

    def config(self) -> dict[str, Any]:
        """peft's ``adapter_config.json`` for these factors."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": self.rank,
            "lora_alpha": self.rank,  # scale 1: the factors hold the edit itself
            "target_modules": sorted(self.factors),
            "lora_dropout": 0.0,
            "bias": "none",
            "lora_bias": self.lora_bias,
            "fan_in_fan_out": self.fan_in_fan_out,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
            "layers_to_transform": None,
            "revision": None,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """peft's ``adapter_model.safetensors`` tensors (keys without the adapter's name)."""
        out = {}
        for name, (a, b, bias) in sorted(self.factors.items()):
            key = f"base_model.model.{name}"
            out[f"{key}.lora_A.weight"] = a.contiguous()
            out[f"{key}.lora_B.weight"] = b.contiguous()
            if self.lora_bias:
                out[f"{key}.lora_B.bias"] = (bias if bias is not None else torch.zeros_like(b[:, 0])).contiguous()
        return out


def _factors(step: FoldStep, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    module, edit, axis = step.module, step.edit, step.axis
    weight = dequantized(cast(torch.Tensor, module.weight)).detach().to(device="cpu", dtype=torch.float64)
    if (axis == 0 and edit.site == "attention") or (axis == 1 and edit.site == "ffn"):  # Conv1D stores (in, out)
        weight = weight.t()
    out_features, in_features = weight.shape  # as an nn.Linear's weight: (out, in)
    g = (edit.factor.to(torch.float64) - 1.0).cpu()
    unit = edit.unit.cpu()
    n = int(unit.numel())
    a = torch.zeros(rank, in_features, dtype=torch.float64)
    b = torch.zeros(out_features, rank, dtype=torch.float64)
    bias = None
    slots = torch.arange(n)
    if edit.site == "attention":  # units are inputs: pick them, then the scaled columns of W
        a[slots, unit] = 1.0
        b[:, :n] = weight[:, unit] * g
    else:  # units are outputs: the scaled rows of W, then put them back in their rows
        a[:n] = weight[unit] * g.unsqueeze(1)
        b[unit, slots] = 1.0
        module_bias = getattr(module, "bias", None)
        if module_bias is not None:
            bias = torch.zeros(out_features, dtype=torch.float64)
            bias[unit] = module_bias.detach().to(device="cpu", dtype=torch.float64)[unit] * g
    return a.to(dtype), b.to(dtype), None if bias is None else bias.to(dtype)


def lora_adapter(
    state: Edits,
    model: nn.Module,
    layout: ModelLayout | LayoutSpec | None = None,
    *,
    dtype: torch.dtype | None = None,
    base_model: str = "",
) -> LoraAdapter:
    """The LoRA factors that reproduce ``state`` on ``model`` (which is not changed).

    Args:
        state: a state with all-token scales at the ``attention``/``ffn`` sites (AUSteer, block-level
            AUSteer, SADI, a learned ``scalar`` strength).
        model: the base model the state was fitted on.
        layout: as for :func:`~austeer_pl.core.merge.merge_into` (default: the state's recorded layout).
        dtype: the factors' dtype (default: the target weights' dtype).
        base_model: recorded as ``base_model_name_or_path`` (default: the state's ``base_model``).

    Raises:
        AusteerError: the state cannot be a fixed weight update (the reason and what to use instead).

    Example:
        >>> adapter = lora_adapter(state, model)
        >>> adapter.rank, sorted(adapter.factors)[:1]
        (12, ['model.layers.3.self_attn.o_proj'])
    """
    check_foldable(state)
    if bool(state.shift.ne(0).any()):
        raise AusteerError(
            "this state adds shifts (a + t), which a LoRA update (B A x) cannot add without a bias on every target; "
            "export it merged (--format transformers or gguf) or, for residual shifts, as a control vector"
        )
    recorded = getattr(state, "layout", None)
    if layout is None and recorded is not None:
        layout = LayoutSpec.from_dict(recorded)
    if not isinstance(layout, ModelLayout):
        layout = locate_units(model, layout)
    state.check_compatible(layout)
    steps = fold_plan(state, model, layout, in_place=False)  # the weights are read, not scaled
    if not steps:
        raise AusteerError(
            "this state steers no unit (the fit found no help), so there is no adapter to write; use the base model as it is"
        )
    if any(step.param != "weight" for step in steps):
        raise AusteerError(
            "this state scales the FFN output of a mixture of experts, the sum over routed experts, which no single projection's "
            "LoRA update reproduces; export it merged (--format transformers) or apply it with hooks"
        )
    rank = max(int(step.edit.unit.numel()) for step in steps)
    target = dtype or dequantized(cast(torch.Tensor, steps[0].module.weight)).dtype
    factors = {step.name: _factors(step, rank, target) for step in steps}
    if len(factors) != len(steps):
        raise AusteerError("two of this state's edits fold into one module; apply it with hooks (state.apply(model))")
    return LoraAdapter(
        rank=rank,
        factors=factors,
        fan_in_fan_out=any(step.axis == 0 and step.edit.site == "attention" for step in steps)
        or any(step.axis == 1 and step.edit.site == "ffn" for step in steps),
        base_model=base_model or str(getattr(state, "base_model", "")),
    )


#: The provenance file beside peft's two files: it marks the folder as austeer-pl's (replaceable with overwrite).
PROVENANCE_NAME = "austeer_pl.json"
_ADAPTER_FILES = {ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PROVENANCE_NAME, "README.md"}


def is_adapter_folder(path: Path) -> bool:
    """A folder :func:`save_adapter` wrote: peft's files, our provenance, a card, nothing else."""
    try:
        names = {p.name for p in path.iterdir()}
        record = parse_json((path / PROVENANCE_NAME).read_bytes(), str(path / PROVENANCE_NAME))
    except (OSError, AusteerError):
        return False
    return isinstance(record, dict) and JSON_MARKER in record and names <= _ADAPTER_FILES


def adapter_record(state: Any, adapter: LoraAdapter, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the adapter's card and provenance file say: base model and its weights' sha256, method,
    units, alpha, the fit's verdict and validation figures."""
    fit = dict(state.metadata.get("fit", {}))
    verdict = fit.get("verdict", {}) if isinstance(fit.get("verdict"), dict) else {}
    inputs = state.metadata.get("inputs", {}) if isinstance(state.metadata.get("inputs"), dict) else {}
    model_pin = inputs.get("model", {}) if isinstance(inputs.get("model"), dict) else {}
    record = {
        "exported_by": f"austeer-pl {__version__}",
        "format": "peft-lora",
        "base_model": state.base_model,
        "base_model_weights": model_pin.get("sha256") or model_pin.get("revision"),
        "method": state.method,
        "k": state.k,
        "alpha": state.alpha,
        "sites": list(state.layers_by_site()),
        "strength": state.strength.get("kind", "momentum"),
        "rank": adapter.rank,
        "target_modules": len(adapter.factors),
        "helps": verdict.get("helps"),
        "verdict": verdict.get("reason"),
        "val_accuracy": fit.get("val_accuracy"),
        "val_accuracy_unsteered": fit.get("val_accuracy_unsteered"),
        **(extra or {}),
    }
    return {key: value for key, value in record.items() if value is not None}


def _card(record: dict[str, Any]) -> str:
    rows = "\n".join(f"| {key} | `{value}` |" for key, value in sorted(record.items()))
    return (
        f"---\nlibrary_name: peft\n{base_model_yaml(record['base_model'])}tags:\n- austeer-pl\n- activation-steering\n- lora\n---\n\n"
        f"# A {record['method']} steering state of {record['base_model']} as a LoRA adapter\n\n"
        f"{record['k']} steered activation units (alpha {record['alpha']:g}) written as an exact low-rank update of the attention "
        f"output and FFN down projections (rank {record['rank']}, scale 1: a scale s steers at alpha x s).\n\n"
        f"| field | value |\n|---|---|\n{rows}\n\n"
        "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
        f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{record["base_model"]}"), "PATH")\n```\n'
    )


def adapter_output(directory: str | os.PathLike, *, overwrite: bool = False) -> Output:
    """A LoRA adapter folder: replaces one austeer-pl wrote (with ``overwrite``), never anything else."""
    return Output(
        Path(directory), "LoRA adapter", is_adapter_folder, overwrite=overwrite, folder=True, ours_need_overwrite=True
    )


def save_adapter(
    state: Any,
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    layout: ModelLayout | LayoutSpec | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = True,
    record: dict[str, Any] | None = None,
) -> Path:
    """Write ``state`` as a peft LoRA adapter folder, atomically (see :func:`lora_adapter`)."""
    output = adapter_output(directory, overwrite=overwrite).check()
    adapter = lora_adapter(state, model, layout, dtype=dtype)
    provenance = {**adapter_record(state, adapter, record), JSON_MARKER: {"output": "lora adapter"}}
    with output.writing() as tmp:
        save_file(adapter.tensors(), str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        write_json(tmp / ADAPTER_CONFIG_NAME, adapter.config())
        write_json(tmp / PROVENANCE_NAME, provenance)
        (tmp / "README.md").write_text(_card(provenance))
    return output.path
