"""The one edit-hook layer: hooks that turn each selected unit ``a`` into ``a * (1 + s) + shift``.

:class:`EditHandle` is used for every state and in training: the strength ``s`` comes from a
pluggable source,

* fixed factors (``state.scale``, the default; a plain AUSteer or block-level state), or
* a strength module: a learned per-unit scalar (a module called with no input), or an
  input-conditioned gate (a module with a ``layer`` attribute, called on the residual stream
  entering that decoder layer).

The handle adds forward hooks only to the layers that hold selected units and never touches a
weight; :meth:`EditHandle.remove` (or leaving the ``with`` block) restores the model bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from austeer_pl.core.reading import is_continuing_prompt
from austeer_pl.core.sites import ModelLayout, register_site_hook

TOKEN_SCOPES = ("all", "prompt", "generated")

# Fixed-factor activations up to this many elements are edited with one dense multiply by a
# full-width factor vector; larger ones (long prefills) with index_select/multiply/index_copy_ on
# the selected units only. On the CPU the crossover is near 64k elements; elsewhere one kernel
# launch beats three up to far larger tensors.
_DENSE_MAX_NUMEL = {"cpu": 1 << 16}
_DENSE_MAX_NUMEL_ACCELERATOR = 1 << 22


class EditHandle:
    """Hooks that steer a model; remove them with :meth:`remove` or by leaving the ``with`` block.

    Args:
        model: the model to steer (its weights are never changed).
        layout: the model's located units.
        state: a :class:`~austeer_pl.core.state.SteeringState` (units, ``scale``, ``shift``).
        strength: None for the state's fixed ``scale``, else a strength module (see module docs).
        token_scope: ``all``, ``prompt`` (the forward that processes the input) or ``generated``
            (decoding steps with a KV cache).
    """

    def __init__(
        self,
        model: nn.Module,
        layout: ModelLayout,
        state: Any,
        strength: nn.Module | None = None,
        token_scope: str = "all",
    ) -> None:
        self.model = model
        self.layout = layout
        self.state = state
        self.strength = strength
        self.token_scope = token_scope
        self.enabled = True
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._current: torch.Tensor | None = None
        self._prefill = True
        try:
            param = next(model.parameters())
            device, dtype = param.device, param.dtype
            if device.type == "meta":  # offloaded to disk (a device map): its layers compute on the CPU
                device = torch.device("cpu")
        except StopIteration:
            device, dtype = torch.device("cpu"), torch.float32
        for i, site_name in enumerate(state.sites):
            site = layout.site(site_name)
            rows = state.site_index == i
            for layer in sorted(set(state.layer[rows].tolist())):
                sel = rows & (state.layer == layer)
                cols = torch.nonzero(sel).flatten()
                unit = state.unit[cols].to(device)
                if strength is None:
                    fn = self._fixed_fn(site.size, unit, state.scale[cols], state.shift[cols], device, dtype)
                else:
                    fn = self._learned_fn(unit, cols.to(device))
                self._handles.append(register_site_hook(site, layer, fn))
        if strength is not None and hasattr(strength, "layer"):
            gate_layer = int(strength.layer)  # type: ignore[arg-type]
            self._handles.insert(
                0, layout.layers[gate_layer].register_forward_pre_hook(self._read_gate, with_kwargs=True)
            )
        if token_scope != "all":
            self._handles.insert(0, model.register_forward_pre_hook(self._track_phase, with_kwargs=True))

    # -- phase of generation (prefill vs. decoding steps)
    def _track_phase(self, _module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        get_len = getattr(cache, "get_seq_length", None)
        # A prompt continued from its cached prefix is still the prompt (core.reading.continuing_prompt).
        self._prefill = cache is None or not callable(get_len) or int(get_len()) == 0 or is_continuing_prompt()
        return None

    def _active(self) -> bool:
        if not self.enabled:
            return False
        if self.token_scope == "all":
            return True
        return self._prefill if self.token_scope == "prompt" else not self._prefill

    # -- fixed factors: the fast path of every saved state
    def _fixed_fn(self, width: int, unit: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, device, dtype):
        factor = (1.0 + scale).to(device=device, dtype=dtype)
        added: torch.Tensor | None = shift.to(device=device, dtype=dtype) if bool(shift.ne(0).any()) else None
        # Multiplicative-only edits of distinct units also get a full-width factor vector (1 outside
        # the selected units; x * 1 == x exactly), so that small activations (decoding steps) are
        # edited by one multiply instead of select/multiply/copy. Both paths give the same bits.
        dense = None
        if added is None and unit.unique().numel() == unit.numel():
            dense = torch.ones(width, device=device, dtype=dtype)
            dense.index_copy_(0, unit, factor)
        limit = _DENSE_MAX_NUMEL.get(device.type, _DENSE_MAX_NUMEL_ACCELERATOR) if dense is not None else 0
        check_phase = self.token_scope != "all"

        def fn(x: torch.Tensor) -> torch.Tensor | None:
            # Runs on every forward (every decoding step): a few attribute reads only.
            if check_phase and not self._active():
                return None
            if dense is not None and x.numel() <= limit and x.dtype == dense.dtype and x.device == dense.device:
                if x.requires_grad:
                    return x * dense
                x.mul_(dense)  # in place, as in _edit: a fresh activation that nothing else holds
                return None
            if unit.device != x.device:  # model moved after apply (e.g. by Lightning)
                return _edit(
                    x,
                    unit.to(x.device),
                    factor.to(x.device, x.dtype),
                    None if added is None else added.to(x.device, x.dtype),
                )
            return _edit(x, unit, factor, added)

        return fn

    # -- a strength module (training, and learned gates after loading)
    def _read_gate(self, _module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        assert self.strength is not None
        self._current = self.strength(hidden)
        return None

    def _learned_fn(self, unit: torch.Tensor, cols: torch.Tensor):
        strength = self.strength
        assert strength is not None
        conditioned = hasattr(strength, "layer")

        def fn(x: torch.Tensor) -> torch.Tensor | None:
            if not self._active():
                return None
            if conditioned:
                assert self._current is not None, "the gate reads its layer before the steered ones"
                s = self._current.index_select(-1, cols)
            else:
                s = strength().index_select(0, cols)
            values = x.index_select(-1, unit)
            # The same arithmetic as the fixed path (a * (1 + s)), so a folded scalar matches exactly.
            return x.index_copy(-1, unit, values * (1.0 + s).to(values.dtype))

        return fn

    def remove(self) -> None:
        """Remove every hook this handle registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._current = None

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> EditHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _edit(x: torch.Tensor, unit: torch.Tensor, factor: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor | None:
    values = x.index_select(-1, unit) * factor
    if shift is not None:
        values = values + shift
    if x.requires_grad or (torch.is_grad_enabled() and factor.requires_grad):
        return x.index_copy(-1, unit, values)
    # In-place: the tensor is a fresh activation that nothing else holds; avoids a full copy.
    x.index_copy_(-1, unit, values)
    return None


__all__ = [
    "TOKEN_SCOPES",
    "EditHandle",
]
