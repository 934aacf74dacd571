"""Reading activation units at the last token of each sequence, in batches.

Only the last-token values are kept (``batch x layers x units`` per site), never whole
sequences. "The last token" is the last non-pad token of each row, whatever the padding side,
and position ids are derived from the attention mask, so a row read inside a padded batch
equals the same row read alone (to float tolerance).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from austeer_pl.core.sites import ModelLayout, register_site_hook

# Marks on the forward passes of a prompt read in two parts (a shared prefix, then the rest from its KV
# cache: austeer_pl.core.kvcache.prefix_last_logits), read by the hooks that must tell them apart.
_CONTINUING_PROMPT: contextvars.ContextVar[bool] = contextvars.ContextVar("austeer_continuing_prompt", default=False)
_UNREPLAYED: contextvars.ContextVar[bool] = contextvars.ContextVar("austeer_unreplayed", default=False)


@contextmanager
def _flag(var: contextvars.ContextVar[bool]) -> Iterator[None]:
    token = var.set(True)
    try:
        yield
    finally:
        var.reset(token)


def continuing_prompt():
    """Forwards inside this block continue a prompt from its cached prefix: they are still the prompt
    (a ``token_scope="prompt"`` edit steers them), not decoding steps."""
    return _flag(_CONTINUING_PROMPT)


def is_continuing_prompt() -> bool:
    return _CONTINUING_PROMPT.get()


def unreplayed():
    """Forwards inside this block (a shared prefix's prefill) are neither recorded nor replayed by
    :class:`~austeer_pl.fit.gridscore.LayerReplay`: they compute every layer."""
    return _flag(_UNREPLAYED)


def is_unreplayed() -> bool:
    return _UNREPLAYED.get()


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad token of each row, for left or right padding.

    Example:
        >>> last_token_index(torch.tensor([[1, 1, 0], [0, 1, 1]]))
        tensor([1, 2])
    """
    if attention_mask.dim() != 2:
        raise ValueError("attention_mask must be (batch, seq)")
    seq = attention_mask.shape[1]
    flipped = attention_mask.flip(-1).ne(0).to(torch.int8)
    return (seq - 1) - flipped.argmax(dim=-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def padded_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """The logits at the last ``keep`` positions of a padded batch (as the model computes them):
    position ids from the mask, so left padding shifts nothing, and no KV cache."""
    return model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask),
        logits_to_keep=keep,
        use_cache=False,
    ).logits


class StopForward(Exception):
    """Raised after the last decoder layer: nothing after it (final norm, LM head) is needed."""


class ActivationReader:
    """Reads the last-token value of every unit of the chosen sites in all layers.

    Hooks are registered for the duration of each call only. The forward pass stops after the
    last decoder layer, so the LM head (a large matmul over the vocabulary) is never computed.

    Args:
        model: a causal LM.
        layout: its :class:`~austeer_pl.core.sites.ModelLayout`.
        sites: the sites to read.

    Example:
        >>> reader = ActivationReader(model, locate_units(model), ["attention", "ffn"])
        >>> acts = reader(input_ids, attention_mask)  # {"attention": (B, L, D), "ffn": (B, L, H)}
    """

    def __init__(self, model: nn.Module, layout: ModelLayout, sites: Sequence[str]) -> None:
        self.model = model
        self.layout = layout
        self.sites = tuple(sites)
        for name in self.sites:
            layout.site(name)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        batch, seq = input_ids.shape[0], input_ids.shape[1]
        device = input_ids.device
        rows = torch.arange(batch, device=device)
        last = last_token_index(attention_mask)
        # Row of each sequence's last token in a (batch * seq, units) view of a site tensor.
        flat = rows * seq + last
        n_layers = self.layout.n_layers
        # (layers, batch, units) per site: each hook fills its layer's contiguous slab with one
        # index_select, without temporaries; the slabs are transposed to (batch, layers, units) once.
        slabs = {
            name: torch.empty(n_layers, batch, self.layout.site(name).size, dtype=torch.float32, device=device)
            for name in self.sites
        }

        def capture(name: str, layer: int):
            slab = slabs[name][layer]

            def fn(x: torch.Tensor) -> None:
                if (
                    x.dim() == 3
                    and x.shape == (batch, seq, slab.shape[1])
                    and x.dtype == slab.dtype
                    and x.is_contiguous()
                    and not x.requires_grad
                    and x.device == slab.device
                ):
                    torch.index_select(x.view(batch * seq, x.shape[2]), 0, flat, out=slab)
                elif x.device != slab.device:  # a layer placed on another device: gather on the input's
                    slab.copy_(x[rows.to(x.device), last.to(x.device)])
                else:
                    slab.copy_(x[rows, last])

            return fn

        handles = [
            register_site_hook(self.layout.site(name), layer, capture(name, layer))
            for name in self.sites
            for layer in range(n_layers)
        ]

        def stop(_module, _args, _output):
            raise StopForward

        # Registered after the capture hooks, so the last layer's residual output is read first.
        handles.append(self.layout.layers[-1].register_forward_hook(stop))
        try:
            self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=False,
            )
        except StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return {name: slab.transpose(0, 1).contiguous() for name, slab in slabs.items()}
