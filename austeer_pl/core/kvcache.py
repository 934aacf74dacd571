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
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from austeer_pl.core.placement import input_device
from austeer_pl.core.reading import continuing_prompt, position_ids_from_mask, unreplayed
from austeer_pl.core.tokens import pad_ids

__all__ = [
    "UNSUPPORTED",
    "cache_kwarg",
    "mark_unsupported",
    "plain_cache",
    "prefix_last_logits",
    "shared_prompt_logprobs",
]


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
    if _window_too_short(model, len(prefix) + max(len(r) for r in rests)):
        return None
    device = input_device(model)
    n = len(rests)
    cache = _prefilled(model, name, prefix, n)
    if cache is None:
        return None
    head = len(prefix)
    ids, mask = pad_ids(rests, pad_id, device=device)
    with continuing_prompt():
        out = model(
            input_ids=ids,
            attention_mask=torch.cat([torch.ones(n, head, dtype=mask.dtype, device=device), mask], dim=1),
            position_ids=head + position_ids_from_mask(mask),
            use_cache=True,
            logits_to_keep=keep,
            **{name: cache},
        )
    return out.logits[:, -1] if keep == 1 else out.logits


def _window_too_short(model: nn.Module, length: int) -> bool:
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    return isinstance(window, int) and 0 < window < length


def _prefilled(model: nn.Module, name: str, prefix: Sequence[int], n: int) -> DynamicCache | None:
    """A cache holding ``prefix`` prefilled once (every layer: :func:`unreplayed`), expanded to ``n`` rows (a
    view: ``update`` concatenates, so the one prefilled row is never written); None if the model cannot share."""
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
    for layer in layers:
        layer.keys = layer.keys.expand(n, -1, -1, -1)
        layer.values = layer.values.expand(n, -1, -1, -1)
    return cache


def _fill_skipped(layers: list[Any], length: int) -> None:
    """Give the layers a replayed pass skipped (no cache, or a shorter one) zeros up to ``length``. Only
    their length is ever read (the mask's size), since every pass that continues this cache skips them too;
    so their shape is borrowed from a computed layer."""
    like = next(layer.keys for layer in reversed(layers) if layer.is_initialized and layer.keys.shape[-2] == length)
    for layer in layers:
        have = layer.keys.shape[-2] if layer.is_initialized and layer.keys.numel() else 0
        if have == length:
            continue
        zeros = like.new_zeros(()).expand(*like.shape[:-2], length - have, like.shape[-1])
        if have == 0:
            layer.lazy_initialization(like, like)
            layer.keys, layer.values = zeros, zeros
        else:
            layer.keys, layer.values = torch.cat([layer.keys, zeros], -2), torch.cat([layer.values, zeros], -2)


def shared_prompt_logprobs(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
    prefix: Sequence[int] | None = None,
) -> list[torch.Tensor] | None:
    """Summed log-probability of each of ``answers[i]`` after ``prompts[i]``, each prompt computed once for
    all its answers (float32, one tensor per prompt): the same values as scoring every ``prompt + answer``
    whole, to float tolerance.

    The prompts are prefilled left-padded (after ``prefix``'s cache when they all start with it, as in
    :func:`prefix_last_logits`); their last logits give each answer's first token. Then round r continues
    every prompt with its r-th answer, right-padded (a prompt without one runs a pad whose scores are
    dropped), inside :func:`~austeer_pl.core.reading.continuing_prompt` like any rest of a prompt, and
    the cache is cut back to the prompts. Under :class:`~austeer_pl.fit.gridscore.LayerReplay` each
    prefill and round is a forward of its own, recorded and replayed; the layers a replayed prefill
    skips get a placeholder cache (:func:`_fill_skipped`). A sentiment example (a 46-token prompt, two
    reviews of about 19) is 46 + 2 x 19 tokens this way instead of 2 x 65.

    Returns None (the caller scores whole sequences) when the model cannot share a cache, its sliding
    window is shorter than the sequences, or an answer is empty.

    Example:
        >>> shared_prompt_logprobs(model, [prompt_ids], [[yes_ids, no_ids]], pad_id)
        [tensor([-1.2, -3.4])]
    """
    name = cache_kwarg(model)
    if name is None or type(model) in UNSUPPORTED or not prompts or any(not a for group in answers for a in group):
        return None
    n = len(prefix) if prefix and all(list(p[: len(prefix)]) == list(prefix) for p in prompts) else 0
    rests = [list(p[n:]) for p in prompts]
    if not all(rests) or _window_too_short(
        model, max(len(p) for p in prompts) + max(len(a) for group in answers for a in group)
    ):
        return None
    device = input_device(model)
    u = len(prompts)
    cache = _prefilled(model, name, list(prefix or [])[:n], u) if n else DynamicCache()
    if cache is None:
        return None
    ids, mask = pad_ids(rests, pad_id, device=device)
    mask = torch.cat([torch.ones(u, n, dtype=mask.dtype, device=device), mask], dim=1)
    try:
        with continuing_prompt() if n else nullcontext():
            last = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=n + position_ids_from_mask(mask[:, n:]),
                use_cache=True,
                logits_to_keep=1,
                **{name: cache},
            ).logits[:, -1]
    except (AttributeError, NotImplementedError, TypeError) as err:
        mark_unsupported(model, f"its forward fails with a plain DynamicCache ({type(err).__name__}: {err})")
        return None
    layers = plain_cache(cache, model)
    if layers is None:
        return None
    width = mask.shape[1]
    _fill_skipped(layers, width)
    starts = torch.tensor([len(p) for p in prompts], device=device).unsqueeze(1)
    out = [torch.empty(len(group), dtype=torch.float32) for group in answers]
    for r in range(max(len(group) for group in answers)):
        rows = [list(group[r]) if r < len(group) else [pad_id] for group in answers]
        ans, ans_mask = pad_ids(rows, pad_id, side="right", device=device)
        with continuing_prompt():
            logits = model(
                input_ids=ans,
                # Answer pads are unmasked: they follow every real token of their row, which never sees them.
                attention_mask=torch.cat([mask, torch.ones_like(ans_mask)], dim=1),
                position_ids=starts + torch.arange(ans.shape[1], device=device).unsqueeze(0),
                use_cache=True,
                logits_to_keep=ans.shape[1],
                **{name: cache},
            ).logits
        for layer in layers:
            layer.keys, layer.values = layer.keys[..., :width, :], layer.values[..., :width, :]
        # Token t of an answer is predicted at position t - 1: the prompt's last position for t = 0.
        predicting = torch.cat([last.unsqueeze(1), logits[:, :-1]], dim=1)
        picked = torch.log_softmax(predicting.float(), dim=-1).gather(-1, ans.unsqueeze(-1)).squeeze(-1)
        sums = torch.where(ans_mask.bool(), picked, 0.0).sum(-1).cpu()  # where, not *: a pad may hold NaN
        for i, group in enumerate(answers):
            if r < len(group):
                out[i][r] = sums[i]
    return out
