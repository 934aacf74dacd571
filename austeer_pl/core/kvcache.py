"""KV caches that can be shared, and scoring prompts that share a prefix from its cache.

Two users: :class:`~austeer_pl.core.prefix.SharedPrefixReader` (the momentum pass: each pair's prompt
once, its answers from the cache) and :func:`prefix_last_logits` (choice scoring: a few-shot prompt's
demonstrations once per batch, every example's rest from the cache). Both need a model whose forward
takes a cache argument and whose cache is made of plain :class:`transformers.cache_utils.DynamicLayer` s;
a model class that fails either is remembered in :data:`UNSUPPORTED` (with the reason, said once) and
read whole from then on.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from austeer_pl.core.placement import input_device
from austeer_pl.core.reading import continuing_prompt, position_ids_from_mask, unreplayed
from austeer_pl.core.tokens import pad_ids

__all__ = ["UNSUPPORTED", "cache_kwarg", "mark_unsupported", "plain_cache", "prefix_last_logits"]


# Model classes whose KV cache could not be shared (reason), so that later readers skip the attempt.
UNSUPPORTED: dict[type, str] = {}


def cache_kwarg(model: nn.Module) -> str | None:
    """Name of the forward argument that takes a KV cache: ``cache`` in transformers 5.x
    (``past_key_values`` is its deprecated alias there), ``past_key_values`` before."""
    return cache_kwarg_of(type(model))  # type: ignore[arg-type]  # classes hash by identity


@functools.cache
def cache_kwarg_of(cls: Any) -> str | None:
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return None
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def mark_unsupported(model: nn.Module, reason: str) -> None:
    """Remember (per model class) that the cache cannot be shared, and say so once."""
    UNSUPPORTED[type(model)] = reason
    warnings.warn(
        f"shared-prefix reading is not available for {type(model).__name__}: {reason}; "
        "reading full sequences instead (same values, no speed-up)",
        stacklevel=4,
    )


def plain_cache(cache: Any, model: nn.Module) -> list[Any] | None:
    """The cache's layers when they are plain :class:`DynamicLayer` s (else the model is marked unsupported)."""
    layers = list(getattr(cache, "layers", []))
    if not layers or not all(type(layer) is DynamicLayer for layer in layers):
        mark_unsupported(model, "its KV cache is not made of plain DynamicLayers")
        return None
    return layers


def prefix_last_logits(
    model: nn.Module, prefix: Sequence[int], rests: Sequence[Sequence[int]], pad_id: int, keep: int = 1
) -> torch.Tensor | None:
    """Logits at the last ``keep`` positions of each ``prefix + rest``, the shared prefix computed once:
    ``(len(rests), vocab)`` for ``keep=1``, else ``(len(rests), keep, vocab)`` (each rest must hold ``keep``
    tokens for all of them to be its own).

    The prefix is prefilled as one row (every layer, under whatever hooks are on the model, outside
    :class:`~austeer_pl.fit.gridscore.LayerReplay`: :func:`~austeer_pl.core.reading.unreplayed`), its
    cache is expanded (a view, not a copy) to the rows, and the rests run left-padded after it with
    position ids ``len(prefix) + t`` inside :func:`~austeer_pl.core.reading.continuing_prompt`, so a
    ``token_scope="prompt"`` edit steers them as it steers a whole prompt. The same values as
    :func:`~austeer_pl.core.reading.padded_logits` on the left-padded full sequences, to float tolerance.

    A few-shot prompt's demonstrations are such a prefix: about three quarters of each prompt in
    the methods table's Rotten Tomatoes cell (178 of 246 tokens).

    Returns None (the caller runs full sequences) when the model's forward takes no cache, its cache
    is not made of plain :class:`DynamicLayer` s, or its sliding window is shorter than the sequences
    (the left pads of the rests sit between prefix and rest, where a window counts them).

    Example:
        >>> prefix_last_logits(model, demo_ids, [ids[len(demo_ids):] for ids in prompt_ids], pad_id)
    """
    name = cache_kwarg(model)
    if name is None or type(model) in UNSUPPORTED or not prefix or not rests or not all(rests):
        return None
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    width = max(len(r) for r in rests)
    if isinstance(window, int) and 0 < window < len(prefix) + width:
        return None
    device = input_device(model)
    head = torch.tensor([list(prefix)], dtype=torch.long, device=device)
    cache = DynamicCache()
    try:
        with unreplayed():
            model(
                input_ids=head,
                attention_mask=torch.ones_like(head),
                position_ids=torch.arange(head.shape[1], device=device).unsqueeze(0),
                use_cache=True,
                logits_to_keep=1,
                **{name: cache},
            )
    except (AttributeError, NotImplementedError, TypeError) as err:  # e.g. linear-attention layers
        mark_unsupported(model, f"its forward fails with a plain DynamicCache ({type(err).__name__}: {err})")
        return None
    layers = plain_cache(cache, model)
    if layers is None:
        return None
    n = len(rests)
    for layer in layers:  # update() concatenates: the one prefilled row is never written
        layer.keys = layer.keys.expand(n, -1, -1, -1)
        layer.values = layer.values.expand(n, -1, -1, -1)
    ids, mask = pad_ids(rests, pad_id, device=device)
    with continuing_prompt():
        out = model(
            input_ids=ids,
            attention_mask=torch.cat([torch.ones(n, head.shape[1], dtype=mask.dtype, device=device), mask], dim=1),
            position_ids=head.shape[1] + position_ids_from_mask(mask),
            use_cache=True,
            logits_to_keep=keep,
            **{name: cache},
        )
    return out.logits[:, -1] if keep == 1 else out.logits
