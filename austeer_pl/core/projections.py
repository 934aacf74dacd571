"""Which weights produce a site's units: the projections an edit folds into.

The ``attention`` site is the input of the attention output projection (an ``nn.Linear`` or GPT-2's
``Conv1D``: :func:`input_axis` tells which weight axis holds inputs). The ``ffn`` site is the output of
the FFN block, produced by its down projection (:func:`ffn_output_projection`, found by name or
width and checked on a random input), or, in a mixture of experts, by the rows of every expert's
down projection and the shared expert's (:func:`moe_output_weights`, checked the same way).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from austeer_pl.errors import AusteerError

__all__ = [
    "DOWN_PROJECTION_NAMES",
    "ffn_output_projection",
    "input_axis",
    "moe_output_weights",
    "weight_of",
    "width_of",
]


#: Names of the FFN block's output projection in the architectures the project knows.
DOWN_PROJECTION_NAMES: tuple[str, ...] = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "fc_out", "out_proj")


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D  # noqa: PLC0415 - GPT-2's Conv1D, where this transformers has it
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def input_axis(module: nn.Module) -> int | None:
    """The weight axis that holds a projection's inputs: 1 for ``nn.Linear``, 0 for GPT-2's ``Conv1D``; None otherwise."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    if isinstance(module, nn.Linear):
        return 1
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return 0
    return None


def weight_of(module: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, module.weight)


def width_of(module: nn.Module, axis: int) -> int:
    return int(weight_of(module).shape[axis])


def _output_is_module_output(block: nn.Module, proj: nn.Module, width: int) -> bool:
    """Run ``block`` once on a random input and tell whether ``proj``'s output is the block's output."""
    param = next((p for p in block.parameters() if p.dtype.is_floating_point), None)
    if param is None:
        return False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, width, generator=generator, dtype=torch.float64).to(device=param.device, dtype=param.dtype)
    seen: list[torch.Tensor] = []
    handle = proj.register_forward_hook(lambda _m, _a, out: seen.append(out))
    training = block.training
    block.eval()
    try:
        with torch.no_grad():
            out = block(x)
    except Exception:  # a block that cannot run alone on (batch, seq, hidden) has no findable projection
        return False
    finally:
        handle.remove()
        block.train(training)
    out = out[0] if isinstance(out, (tuple, list)) else out
    last = seen[-1] if seen else None
    return (
        isinstance(last, torch.Tensor)
        and isinstance(out, torch.Tensor)
        and last.shape == out.shape
        and bool(torch.equal(last, out))
    )


def ffn_output_projection(block: nn.Module, width: int) -> nn.Module | None:
    """The projection whose output is the FFN block's output, or None.

    ``block`` itself when it is a projection (OPT's ``fc2``); else a child with a known name
    (:data:`DOWN_PROJECTION_NAMES`), then any projection inside, last first; each candidate must
    map to ``width`` outputs and be checked to produce the block's output on a random input.
    """
    axis = input_axis(block)
    if axis is not None:
        return block if width_of(block, 1 - axis) == width else None
    named = [
        getattr(block, name) for name in DOWN_PROJECTION_NAMES if isinstance(getattr(block, name, None), nn.Module)
    ]
    inner = [m for m in reversed(list(block.modules())) if m is not block]
    seen: set[int] = set()
    for cand in [*named, *inner]:
        axis = input_axis(cand)
        if id(cand) in seen or axis is None or width_of(cand, 1 - axis) != width:
            continue
        seen.add(id(cand))
        if _output_is_module_output(block, cand, width):
            return cand
    return None


def moe_output_weights(block: nn.Module, width: int) -> list[tuple[nn.Module, str, int]] | None:
    """``(module, parameter, axis)`` whose rows produce a mixture-of-experts block's output, or None.

    A sparse block's output is the router-weighted sum of its routed experts' down projections
    (transformers stores them fused: ``experts.down_proj`` of shape ``(experts, width, inner)``),
    plus a gated shared expert where there is one. Scaling output unit ``u`` is scaling row ``u`` of
    every expert's down projection, the shared expert's included. The rows are checked: doubling
    one row must double exactly that unit of the block's output on a random input (and is undone).
    """
    experts = getattr(block, "experts", None)
    fused = getattr(experts, "down_proj", None)
    if not isinstance(experts, nn.Module) or not isinstance(fused, torch.Tensor) or fused.dim() != 3:
        return None
    if fused.shape[1] != width or any(n.endswith("bias") for n, _ in experts.named_parameters()):
        return None
    targets: list[tuple[nn.Module, str, int]] = [(experts, "down_proj", 1)]
    for name in ("shared_expert", "shared_experts"):
        shared = getattr(block, name, None)
        projection = None if shared is None else ffn_output_projection(shared, width)
        if shared is not None and projection is None:
            return None
        if projection is not None:
            targets.append((projection, "weight", 1 - cast(int, input_axis(projection))))
    for module, name, _axis in targets:
        weight = getattr(module, name)
        if type(weight) not in (torch.Tensor, nn.Parameter) or not weight.dtype.is_floating_point:
            raise AusteerError(
                f"the experts' weights are quantized ({type(weight).__name__}, {weight.dtype}); load the model in float to "
                "merge, or apply the state with hooks"
            )
    return targets if _rows_scale_output(block, targets, width) else None


def _rows_scale_output(block: nn.Module, targets: list[tuple[nn.Module, str, int]], width: int) -> bool:
    param = next((p for p in block.parameters() if p.dtype.is_floating_point), None)
    if param is None or not param.dtype.is_floating_point:
        return False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, width, generator=generator, dtype=torch.float64).to(device=param.device, dtype=param.dtype)

    def run() -> torch.Tensor | None:
        try:
            with torch.no_grad():
                out = block(x)
        except Exception:  # a block that cannot run alone is not checked, so not merged
            return None
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out if isinstance(out, torch.Tensor) and out.shape[-1] == width else None

    unit = width // 2
    training = block.training
    block.eval()
    try:
        before = run()
        with torch.no_grad():
            for module, name, axis in targets:
                getattr(module, name).select(axis, unit).mul_(2.0)  # exact, and undone exactly below
        after = run()
    finally:
        with torch.no_grad():
            for module, name, axis in targets:
                getattr(module, name).select(axis, unit).mul_(0.5)
        block.train(training)
    if before is None or after is None:
        return False
    others = torch.arange(width, device=before.device) != unit
    return bool(torch.equal(after[..., others], before[..., others])) and bool(
        torch.allclose(after[..., unit], 2 * before[..., unit], rtol=1e-5, atol=1e-6)
    )
