"""Steering states: apply a handful of unit edits to a model, save them, load them.

A :class:`SteeringState` is a list of activation units ``(site, layer, unit)`` with an edit for
each. At inference every selected unit ``a`` becomes::

    a + scale * a + shift

For AUSteer ``scale = alpha * m`` (the adaptive rule ``a + alpha * m * a``) and ``shift = 0``;
block-level methods use the same representation (SADI: a mask times a scale; ITI and CAA: shifts).

The state is saved as a folder with a JSON config and one ``.safetensors`` file; nothing is
pickled, and loading or applying a state imports neither Lightning nor anything but torch,
safetensors and transformers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from austeer_pl._version import __version__
from austeer_pl.core.compose import StateArithmetic, combine
from austeer_pl.core.hooks import TOKEN_SCOPES, EditHandle
from austeer_pl.core.lora import save_adapter
from austeer_pl.core.merge import merge_into
from austeer_pl.core.placement import input_device
from austeer_pl.core.selection import Selection
from austeer_pl.core.sites import LayoutSpec, ModelLayout, locate_units
from austeer_pl.core.statehub import push_state_to_hub, resolve_state_dir
from austeer_pl.core.stateio import (
    FORMAT_VERSION,
    TENSOR_KEYS,
    check_fields,
    check_gate,
    check_tensor,
    check_units,
    config_field,
    read_state_files,
    state_output,
    write_state_files,
)
from austeer_pl.core.strength import strength_from_config
from austeer_pl.errors import AusteerError

_INT_KEYS = ("site_index", "layer", "unit")


@dataclass
class SteeringState(StateArithmetic):
    """Selected activation units and their edits, tied to one base model's architecture.

    Attributes:
        sites: site names; ``site_index`` points into this tuple.
        site_index, layer, unit: int64 ``(k,)`` coordinates of the steered units.
        momentum: float32 ``(k,)`` activation momentum of each unit (signed).
        scale: float32 ``(k,)`` multiplicative edit (``alpha * m`` for AUSteer; learned for ``scalar``).
        shift: float32 ``(k,)`` additive edit (zero for AUSteer).
        alpha: the strength the edits were computed with; ``apply(alpha=...)`` rescales them.
        sign_policy: ``promote`` or ``both``.
        token_scope: ``all`` (default), ``prompt`` or ``generated``.
        method: ``austeer`` or the name of a block-level method.
        base_model: the name or path of the model the state was fitted on.
        architecture: that model's ``config.model_type``.
        n_layers: its number of decoder layers.
        site_sizes: its units per layer at each site.
        metadata: free-form fit facts (JSON-serialisable).
        strength: closed description of the strength function: ``{"kind": "momentum"}``,
            ``{"kind": "scalar"}`` (learned values in ``scale``) or ``{"kind": "gate", ...}``.
        strength_tensors: the gate's parameters (saved as ``strength.*`` in the safetensors file).
        layout: the :class:`~austeer_pl.core.sites.LayoutSpec` module paths the state was fitted with
            (``{"layers", "attention", "ffn"}``) for a model :func:`locate_units` does not know;
            ``apply`` uses them unless given another layout.
    """

    sites: tuple[str, ...]
    site_index: torch.Tensor
    layer: torch.Tensor
    unit: torch.Tensor
    momentum: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    alpha: float
    architecture: str
    n_layers: int
    site_sizes: dict[str, int]
    base_model: str = ""
    sign_policy: str = "promote"
    token_scope: str = "all"
    method: str = "austeer"
    metadata: dict[str, Any] = field(default_factory=dict)
    strength: dict[str, Any] = field(default_factory=lambda: {"kind": "momentum"})
    strength_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    layout: dict[str, str | None] | None = None

    def __post_init__(self) -> None:
        self.sites = tuple(self.sites)
        for name in TENSOR_KEYS:
            check_tensor(name, getattr(self, name), integer=name in _INT_KEYS)
        k = self.unit.numel()
        for name in TENSOR_KEYS:
            tensor = getattr(self, name)
            if tensor.numel() != k:
                raise AusteerError(
                    f"steering state tensor '{name}' must have shape ({k},) like 'unit', got {tuple(tensor.shape)}; the state is corrupt"
                )
        self.layout = check_fields(self)
        self.site_index, self.layer, self.unit = (t.long().cpu() for t in (self.site_index, self.layer, self.unit))
        self.momentum, self.scale, self.shift = (t.float().cpu() for t in (self.momentum, self.scale, self.shift))
        check_units(self)
        if self.strength.get("kind") == "gate":
            check_gate(self)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_selection(
        cls,
        selection: Selection,
        layout: ModelLayout,
        *,
        alpha: float,
        base_model: str = "",
        sign_policy: str = "promote",
        token_scope: str = "all",
        metadata: Mapping[str, Any] | None = None,
        layout_spec: Mapping[str, str | None] | None = None,
    ) -> SteeringState:
        """An AUSteer state: each selected unit ``a`` becomes ``a + alpha * m * a``.

        Example:
            >>> state = SteeringState.from_selection(select_units(acc, 20, ["attention"]), layout, alpha=5.0)
        """
        alpha = float(alpha)
        if not math.isfinite(alpha):
            raise AusteerError(f"alpha must be a finite number, got {alpha}")
        return cls(
            sites=selection.sites,
            site_index=selection.site_index,
            layer=selection.layer,
            unit=selection.unit,
            momentum=selection.momentum,
            scale=alpha * selection.momentum,
            shift=torch.zeros_like(selection.momentum),
            alpha=alpha,
            architecture=layout.architecture,
            n_layers=layout.n_layers,
            site_sizes={s: layout.site(s).size for s in selection.sites},
            base_model=base_model,
            sign_policy=sign_policy,
            token_scope=token_scope,
            metadata=dict(metadata or {}),
            layout=dict(layout_spec) if layout_spec is not None else None,
        )

    @property
    def k(self) -> int:
        """Number of steered units."""
        return int(self.unit.numel())

    def with_alpha(self, alpha: float) -> SteeringState:
        """The same units with every edit rescaled linearly to strength ``alpha``."""
        alpha = float(alpha)
        if not math.isfinite(alpha):
            raise AusteerError(f"alpha must be a finite number, got {alpha}")
        if alpha == self.alpha:
            return self
        if self.k == 0:  # an empty state ("no steering" was chosen) steers nothing at any strength
            return replace(self, alpha=alpha)
        if self.strength.get("kind") == "gate":
            raise AusteerError(
                "a learned gate has no single strength to rescale; apply it without alpha, or fit it again"
            )
        if self.alpha == 0:
            raise AusteerError("cannot rescale a state fitted with alpha=0; fit it again with a non-zero alpha")
        ratio = alpha / self.alpha
        return replace(self, scale=self.scale * ratio, shift=self.shift * ratio, alpha=alpha)

    def momentum_rule(self) -> SteeringState:
        """The same units with the paper's fixed strength ``alpha * m`` (what a learned strength started from).

        Example:
            >>> learned = SteeringState.from_pretrained("runs/gate/state")
            >>> fixed = learned.momentum_rule()  # evaluate both on the same examples
        """
        if self.method != "austeer":
            raise AusteerError(f"a {self.method} state has no momentum rule; only AUSteer states do")
        return replace(
            self,
            scale=self.alpha * self.momentum.clone(),
            shift=torch.zeros_like(self.momentum),
            strength={"kind": "momentum"},
            strength_tensors={},
        )

    def coordinates(self) -> list[tuple[str, int, int]]:
        return [
            (self.sites[s], int(l), int(u))
            for s, l, u in zip(self.site_index.tolist(), self.layer.tolist(), self.unit.tolist())
        ]

    def layers_by_site(self) -> dict[str, list[int]]:
        """The layers that hold steered units, per site."""
        out: dict[str, list[int]] = {}
        for i, site in enumerate(self.sites):
            layers = sorted(set(self.layer[self.site_index == i].tolist()))
            if layers:
                out[site] = layers
        return out

    # ------------------------------------------------------------------ validation and apply
    def check_compatible(self, layout: ModelLayout) -> None:
        """Raise an :class:`AusteerError` naming the first difference between the state's model and ``layout``."""
        fitted = f" (fitted on {self.base_model})" if self.base_model else ""
        if layout.architecture != self.architecture:
            raise AusteerError(
                f"steering state is for a '{self.architecture}' model{fitted} but this model is '{layout.architecture}'; "
                "apply it to the model it was fitted on"
            )
        if layout.n_layers != self.n_layers:
            raise AusteerError(
                f"steering state is for a model with {self.n_layers} layers{fitted} but this model has {layout.n_layers}; "
                "apply it to the model it was fitted on"
            )
        for site, size in self.site_sizes.items():
            if site not in layout.sites:
                raise AusteerError(
                    f"steering state steers the {site} site, which this model does not have; apply it to the model it was fitted on"
                )
            if layout.site(site).size != size:
                raise AusteerError(
                    f"steering state expects {size} {site} units per layer{fitted} but this model has "
                    f"{layout.site(site).size}; apply it to the model it was fitted on"
                )

    def apply(
        self,
        model: nn.Module,
        *,
        alpha: float | None = None,
        token_scope: str | None = None,
        layout: ModelLayout | LayoutSpec | None = None,
    ) -> EditHandle:
        """Register hooks that edit the selected units; returns a handle with ``.remove()``.

        This mutates ``model`` by adding forward hooks (only on the layers that hold selected units)
        until the handle is removed; the weights are never touched, so after removal the model's
        outputs are bit-identical to before. The handle is also a context manager.

        Args:
            model: the base model (same architecture and sizes as the state's).
            alpha: strength override; edits are rescaled linearly.
            token_scope: override of ``all`` / ``prompt`` / ``generated``. ``prompt`` steers the
                forward pass that processes the input (the prefill); ``generated`` steers the
                positions of generated tokens (decoding steps with a KV cache). A plain forward call
                counts as prompt. Note that the first new token is predicted at the prompt's last
                position, so ``generated`` leaves it unsteered.
            layout: a precomputed layout or a :class:`LayoutSpec` for models not known to
                :func:`~austeer_pl.core.sites.locate_units` (default: the state's recorded ``layout``).

        Example:
            >>> with state.apply(model):
            ...     out = model.generate(**inputs, max_new_tokens=20)
        """
        state = self if alpha is None else self.with_alpha(alpha)
        scope = token_scope or state.token_scope
        if scope not in TOKEN_SCOPES:
            raise AusteerError(f"unknown token scope '{scope}'; choose one of {', '.join(TOKEN_SCOPES)}")
        if layout is None and state.layout is not None:
            layout = LayoutSpec.from_dict(state.layout)
        if not isinstance(layout, ModelLayout):
            layout = locate_units(model, layout)
        state.check_compatible(layout)
        gate = None
        if state.strength.get("kind") == "gate":
            if "residual" in layout.sites and layout.site("residual").size != state.strength["hidden_size"]:
                raise AusteerError(
                    f"steering state gate reads a residual stream of {state.strength['hidden_size']} but this model's has "
                    f"{layout.site('residual').size}; apply it to the model it was fitted on"
                )
            gate = strength_from_config(state.strength, state.strength_tensors, state.k)
            gate.to(input_device(model))
        return EditHandle(model, layout, state, gate, scope)

    def merge_into(self, model: nn.Module, *, layout: ModelLayout | LayoutSpec | None = None) -> nn.Module:
        """Fold the state into ``model``'s weights **in place** and return the model.

        This mutates ``model`` permanently (as peft's ``merge_and_unload`` does): the edited
        projections' weights (and biases) are rescaled so that the plain model computes what the
        hooked model computes. Only edits that fold exactly are accepted; see :mod:`austeer_pl.core.merge`.

        Example:
            >>> merged = state.merge_into(model)  # then merged.save_pretrained("steered-model")
        """

        return merge_into(self, model, layout=layout)

    def to_peft(self, model: nn.Module, directory: str | os.PathLike, **options: Any) -> Path:
        """Write the state as a peft LoRA adapter folder that reproduces it on ``model``, atomically
        (:func:`~austeer_pl.core.lora.save_adapter` takes the ``options``: layout, dtype, overwrite, record).

        Example:
            >>> state.to_peft(model, "rt-lora")  # peft.PeftModel.from_pretrained(model, "rt-lora"), vLLM, TGI
        """
        return save_adapter(self, model, directory, **options)

    @staticmethod
    def combine(states: Any, weights: Any = None) -> SteeringState:
        """One state whose edits are the weighted sum of ``states``' (:func:`~austeer_pl.core.compose.combine`)."""
        return combine(states, weights)

    # ------------------------------------------------------------------ save and load
    def to_config(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "package": "austeer-pl",
            "package_version": __version__,
            "method": self.method,
            "base_model": self.base_model,
            "architecture": self.architecture,
            "n_layers": self.n_layers,
            "site_sizes": dict(self.site_sizes),
            "sites": list(self.sites),
            "k": self.k,
            "alpha": self.alpha,
            "sign_policy": self.sign_policy,
            "token_scope": self.token_scope,
            "strength": self.strength,
            "metadata": self.metadata,
            "layout": self.layout,
        }

    def save_pretrained(self, directory: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write the state to ``directory`` (JSON config + safetensors), atomically.

        The folder is assembled beside its destination and moved into place, so an interrupted save
        leaves either the previous folder or the new one, never a mix. An earlier steering state
        there is replaced (unless ``overwrite`` is false); a folder of anything else never is, also
        when it appears while the state is being written.

        Example:
            >>> state.save_pretrained("runs/rt-austeer")
        """

        output = self.output(directory, overwrite=overwrite).check()
        with output.writing() as tmp:
            tensors = {name: getattr(self, name).contiguous() for name in TENSOR_KEYS}
            tensors.update(
                {f"strength.{name}": t.detach().float().cpu().contiguous() for name, t in self.strength_tensors.items()}
            )
            write_state_files(tmp, tensors, self.to_config())
        return output.path

    push_to_hub = push_state_to_hub  # state.push_to_hub("owner/name"): core.statehub
    output = staticmethod(state_output)  # the steering-state folder output (core.stateio.state_output)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **hub: Any) -> SteeringState:
        """Load a state saved by :meth:`save_pretrained` from a folder or a hub repository ``owner/name``
        (:mod:`~austeer_pl.core.statehub`; ``hub``: revision, cache_dir); no pickle is involved.

        Raises:
            AusteerError: when the folder or a file is missing, altered, or of an unknown format.

        Example:
            >>> state = SteeringState.from_pretrained("runs/rt-austeer")  # or "owner/name" on the hub
        """

        config, tensors = read_state_files(resolve_state_dir(directory, **hub))
        sites = config_field(config, "sites", list)
        site_sizes = config_field(config, "site_sizes", dict)
        strength = config_field(config, "strength", dict, {"kind": "momentum"})
        return cls(
            sites=tuple(sites),
            **{name: tensors[name] for name in TENSOR_KEYS},
            alpha=config_field(config, "alpha", (int, float)),
            architecture=config_field(config, "architecture", str),
            n_layers=config_field(config, "n_layers", int),
            site_sizes=dict(site_sizes),
            base_model=config_field(config, "base_model", str, ""),
            sign_policy=config_field(config, "sign_policy", str, "promote"),
            token_scope=config_field(config, "token_scope", str, "all"),
            method=config_field(config, "method", str, "austeer"),
            metadata=dict(config_field(config, "metadata", dict, {})),
            strength=dict(strength),
            strength_tensors={
                name[len("strength.") :]: t for name, t in tensors.items() if name.startswith("strength.")
            },
            layout=config_field(config, "layout", (dict, type(None)), None),
        )
