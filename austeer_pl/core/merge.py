"""Fold a steering state into the model's weights, so that any engine serves it without hooks.

A multiplicative edit ``a -> (1 + s) * a`` of a unit that is the *input* of a linear map is a
column scale of that map; one of a unit that is its *output* is a row scale (and a scale of its
bias). The ``attention`` site is the input of the attention output projection and the ``ffn`` site
the output of the FFN block, whose last projection (``down_proj``, ``c_proj``, ``dense_4h_to_h``,
``fc2``) produces it. So a state whose edits are all-token scales at those sites folds into the
weights exactly, and so does a shift ``a -> a + t`` where the projection has a bias
(``b += W[:, u] t`` at the attention site, ``b[u] += t`` at the FFN site).
In a mixture of experts the FFN output is the router-weighted sum over experts, so its scale is a
row scale of every expert's down projection, the shared expert's included
(:func:`~austeer_pl.core.projections.moe_output_weights`).

What cannot fold is refused with one sentence (:func:`check_foldable`): an input-dependent gate,
a token scope other than ``all``, residual-stream edits (llama.cpp serves additive ones as a
control vector, see :mod:`austeer_pl.export.merged`) and shifts without a bias.

This module imports torch and transformers only (no Lightning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import nn

from austeer_pl.core.projections import ffn_output_projection, input_axis, moe_output_weights, weight_of, width_of
from austeer_pl.core.sites import LayoutSpec, ModelLayout, locate_units
from austeer_pl.errors import AusteerError


class Edits(Protocol):
    """What merging reads of a steering state (:class:`~austeer_pl.core.state.SteeringState`, which
    imports this module, is one)."""

    sites: tuple[str, ...]
    site_index: torch.Tensor
    layer: torch.Tensor
    unit: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    n_layers: int
    site_sizes: dict[str, int]
    strength: dict[str, Any]
    token_scope: str
    layout: dict[str, str | None] | None

    def check_compatible(self, layout: ModelLayout) -> None: ...


#: Sites whose edits fold into a projection's weights.
FOLDABLE_SITES: tuple[str, ...] = ("attention", "ffn")

_HOOKS = "apply it with hooks (state.apply(model)) instead"


@dataclass(frozen=True)
class SiteEdit:
    """The edits of one site in one layer: each ``unit`` ``a`` becomes ``factor * a + shift``.

    Attributes:
        site: ``attention`` or ``ffn``.
        layer: the decoder layer.
        unit: int64 ``(n,)`` distinct units.
        factor: float32 ``(n,)``, ``1 + scale`` (the very factors the hooks multiply by).
        shift: float32 ``(n,)``.
    """

    site: str
    layer: int
    unit: torch.Tensor
    factor: torch.Tensor
    shift: torch.Tensor

    @property
    def scales(self) -> bool:
        return bool(self.factor.ne(1).any())

    @property
    def shifts(self) -> bool:
        return bool(self.shift.ne(0).any())


def check_foldable(state: Edits, *, sites: tuple[str, ...] = FOLDABLE_SITES) -> None:
    """Raise an :class:`AusteerError` saying why ``state`` cannot fold into fixed weights.

    Checks what holds whatever the model: the strength kind, the token scope, the sites, finite and
    non-repeated edits. Shifts are checked against the projections' biases by :func:`merge_into`.

    Example:
        >>> check_foldable(SteeringState.from_pretrained("runs/rt/state"))
    """
    kind = state.strength.get("kind", "momentum")
    if kind == "gate":
        raise AusteerError(
            "this state's learned gate computes its strengths from each input, and fixed weights cannot depend on the input, "
            f"so it cannot fold into the weights; {_HOOKS}, or export its fixed rule (state.momentum_rule())"
        )
    if kind not in ("momentum", "scalar"):
        raise AusteerError(f"unknown strength function '{kind}' in the state; upgrade austeer-pl or export it again")
    if state.token_scope != "all":
        raise AusteerError(
            f"this state steers only the {state.token_scope} tokens (token scope '{state.token_scope}'), and weights act on every "
            f"token, so it cannot fold into the weights; {_HOOKS}"
        )
    for i, site in enumerate(state.sites):
        rows = state.site_index == i
        if site in sites or not bool(((state.scale[rows] != 0) | (state.shift[rows] != 0)).any()):
            continue
        if site == "residual":
            additive = not bool(state.scale[rows].ne(0).any())
            fix = ("export it with --format control-vector for llama.cpp, or " + _HOOKS) if additive else _HOOKS
            raise AusteerError(
                "this state edits the residual stream (the decoder layers' outputs), which no single weight of a layer produces, "
                f"so it cannot fold into the weights; {fix}"
            )
        raise AusteerError(
            f"this state edits the '{site}' site, which does not fold into a projection's weights; {_HOOKS}"
        )
    if not (bool(torch.isfinite(state.scale).all()) and bool(torch.isfinite(state.shift).all())):
        raise AusteerError("this state holds non-finite edits (NaN or inf); fit it again")
    keys = (state.site_index * state.n_layers + state.layer) * (
        max(state.site_sizes.values(), default=0) + 1
    ) + state.unit
    if keys.unique().numel() != keys.numel():
        raise AusteerError("this state edits some unit twice, which the hooks resolve in no fixed order; fit it again")


def site_edits(state: Edits, *, sites: tuple[str, ...] = FOLDABLE_SITES) -> list[SiteEdit]:
    """The state's edits grouped by site and layer (units that change nothing are dropped)."""
    edits = []
    for i, site in enumerate(state.sites):
        if site not in sites:
            continue
        rows = state.site_index == i
        for layer in sorted(set(state.layer[rows].tolist())):
            sel = rows & (state.layer == layer)
            factor, shift = 1.0 + state.scale[sel], state.shift[sel]
            keep = (factor != 1) | (shift != 0)
            if bool(keep.any()):
                edits.append(SiteEdit(site, int(layer), state.unit[sel][keep], factor[keep], shift[keep]))
    return edits


@dataclass
class FoldStep:
    """One site's edits in one layer and the projection they fold into (``axis``: the weight axis the units index)."""

    edit: SiteEdit
    module: nn.Module
    name: str
    axis: int  # the weight axis the units index
    param: str = "weight"  # the parameter scaled: ``down_proj`` of fused mixture-of-experts weights


def fold_plan(state: Edits, model: nn.Module, layout: ModelLayout, *, in_place: bool = True) -> list[FoldStep]:
    """Each edit's projection, checked (weights in float, not shared, a bias for a shift); nothing is changed."""
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False) if in_place else ():
        owners.setdefault(p.data_ptr(), []).append(pname)
    steps = []
    for edit in site_edits(state):
        site = layout.site(edit.site)
        block = site.modules[edit.layer]
        where = names.get(id(block), f"layer {edit.layer}")
        if any(p.device.type == "meta" for p in block.parameters()):
            raise AusteerError(
                f"'{where}' is offloaded to disk (a device map), so its weights are not in memory to scale; load the model "
                "without disk offload to merge, or apply the state with hooks"
            )
        if edit.site == "attention":
            module = block
            axis = input_axis(module)
            if axis is None or width_of(module, axis) != site.size:
                raise AusteerError(
                    f"the attention site module '{where}' ({type(module).__name__}) is not a Linear or Conv1D with {site.size} inputs, "
                    "so the edit cannot fold into it; point LayoutSpec(attention=...) at the attention output projection"
                )
        else:
            projection = ffn_output_projection(block, site.size)
            moe = None if projection is not None else moe_output_weights(block, site.size)
            if moe is not None:
                if edit.shifts:
                    raise AusteerError(
                        f"this state adds a shift at the ffn site of layer {edit.layer}, the sum over a mixture of experts, which no "
                        f"bias absorbs, so it cannot fold into the weights; {_HOOKS}"
                    )
                for module, param, axis in moe:
                    steps.append(FoldStep(edit, module, names.get(id(module), where), axis, param))
                continue
            if projection is None:
                raise AusteerError(
                    f"cannot find the projection that produces the output of the FFN block '{where}'; set LayoutSpec(ffn=...) to that "
                    "down projection itself (a Linear or Conv1D whose output is the FFN output)"
                )
            module = projection
            axis = 1 - cast(int, input_axis(module))  # a projection found by its width has an input axis
        name = names.get(id(module), where)
        weight = weight_of(module)
        quantized = not weight.dtype.is_floating_point or type(weight) not in (torch.Tensor, nn.Parameter)
        if in_place and quantized:
            raise AusteerError(
                f"'{name}' holds quantized weights ({type(weight).__name__}, {weight.dtype}), which cannot be scaled in place; "
                "load the model in float to merge, or export the state as a LoRA adapter (--format peft)"
            )
        shared = [n for n in owners.get(weight.data_ptr(), []) if n != f"{name}.weight"] if in_place else []
        if shared:
            raise AusteerError(
                f"the weight of '{name}' is shared with '{shared[0]}', so folding the edit would change that module too; {_HOOKS}"
            )
        if edit.shifts and getattr(module, "bias", None) is None:
            raise AusteerError(
                f"this state adds a shift at the {edit.site} site of layer {edit.layer}, but '{name}' has no bias to absorb it, so it "
                f"cannot fold into the weights; {_HOOKS} (additive residual states export as a control vector: --format control-vector)"
            )
        steps.append(FoldStep(edit, module, name, axis))
    return steps


def _fold(step: FoldStep) -> None:
    module, edit, axis = step.module, step.edit, step.axis
    weight = cast(torch.Tensor, getattr(module, step.param))
    bias = cast(torch.Tensor | None, getattr(module, "bias", None)) if step.param == "weight" else None
    unit = edit.unit.to(weight.device)
    factor = edit.factor.to(device=weight.device, dtype=weight.dtype)
    shift = edit.shift.to(device=weight.device, dtype=weight.dtype)
    shape = [1] * weight.dim()
    shape[axis] = -1
    columns = weight.index_select(axis, unit)  # the original weights of the edited units
    if edit.site == "attention" and edit.shifts:
        # W (f a + t) + b = (W diag(f)) a + (b + W t): the shift meets the *unscaled* columns.
        assert bias is not None  # checked when the steps were planned
        bias.add_(columns.movedim(axis, -1) @ shift)
    if edit.scales:
        weight.index_copy_(axis, unit, columns * factor.view(shape))
    if edit.site == "ffn" and bias is not None:
        bias.index_copy_(0, unit, bias.index_select(0, unit) * factor + shift)


def merge_into(state: Edits, model: nn.Module, layout: ModelLayout | LayoutSpec | None = None) -> nn.Module:
    """Fold ``state`` into ``model``'s weights **in place** and return the model.

    Like peft's ``merge_and_unload``, this mutates the model: the attention output projections
    and FFN down projections of the steered layers are rescaled (and their biases shifted), so the
    model then behaves as the hooked one with no hooks at all, up to the order of floating-point
    operations (on tiny random models the logits agree to 3e-16 in float64, 1.2e-7 in float32).
    Nothing is changed unless every edit folds; a state that cannot fold raises an
    :class:`AusteerError` saying why and what to use instead. In float16/bfloat16 weights the
    rescaled weights are rounded to that format; merge in float32 and cast afterwards.

    Args:
        state: a state with all-token scales at the ``attention``/``ffn`` sites (AUSteer, block-level
            AUSteer, SADI, a learned ``scalar`` strength), and shifts only where the projection has a bias.
        model: the base model the state was fitted on (any architecture :func:`locate_units` knows).
        layout: a precomputed layout or a :class:`LayoutSpec` for other models (default: the
            state's recorded ``layout``, as for :meth:`~austeer_pl.core.state.SteeringState.apply`).

    Returns:
        ``model`` itself, merged.

    Example:
        >>> model = merge_into(SteeringState.from_pretrained("runs/rt/state"), model)
        >>> model.save_pretrained("rt-merged")  # plain transformers from here on
    """
    check_foldable(state)
    recorded = getattr(state, "layout", None)
    if layout is None and recorded is not None:
        layout = LayoutSpec.from_dict(recorded)
    if not isinstance(layout, ModelLayout):
        layout = locate_units(model, layout)
    state.check_compatible(layout)
    steps = fold_plan(state, model, layout)
    with torch.no_grad():
        for step in steps:
            _fold(step)
    return model
