"""The one generation loop (batched, left-padded, steered or not), steered and unsteered
generations of the same prompts, and reading a number or a choice out of a generation."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from austeer_pl.core.placement import input_device
from austeer_pl.core.state import SteeringState
from austeer_pl.core.tokens import (
    check_generation_length,
    encode_segments,
    pad_id_of,
    pad_ids,
    truncate_left,
)
from austeer_pl.errors import AusteerError


@dataclass(frozen=True)
class GenerationPairs:
    """The same prompts generated from without and with steering (the new text only)."""

    prompts: list[str]
    unsteered: list[str]
    steered: list[str]

    def rows(self) -> list[dict[str, str]]:
        return [
            {"prompt": p, "unsteered": u, "steered": s} for p, u, s in zip(self.prompts, self.unsteered, self.steered)
        ]


def _generation_config(
    model: nn.Module, tokenizer, *, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float
):

    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_id_of(tokenizer), eos_token_id=eos
    )
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    return GenerationConfig(**kwargs)


def _check_generation_args(max_new_tokens: int, batch_size: int, temperature: float, top_p: float) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise AusteerError(f"max_new_tokens must be a positive whole number, got {max_new_tokens!r}")
    if batch_size < 1:
        raise AusteerError(f"batch_size must be positive, got {batch_size}")
    if not temperature > 0 or not 0 < top_p <= 1:
        raise AusteerError(
            f"sampling needs temperature > 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}"
        )


@torch.inference_mode()
def generate_new_text(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    state: SteeringState | None = None,
    alpha: float | None = None,
    layout=None,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    max_length: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """The new text generated after each prompt, steered by ``state`` when given (greedy by default).

    One ``generate`` call per batch of ``batch_size`` prompts, left-padded, with the KV cache. The
    prompt is tokenized with the tokenizer's special tokens (the formatted text is used as is) and
    keeps its last ``max_length`` ids. The hooks of ``state`` are registered once for all batches
    and removed on return. With ``do_sample`` each batch is drawn from its own seed
    (``seed + batch index``), so steered and unsteered calls with the same seed share their draws.

    Example:
        >>> generate_new_text(model, tok, ["Review:"], state=state, max_new_tokens=8)
        [' A delightful film.']
    """
    _check_generation_args(max_new_tokens, batch_size, temperature, top_p)
    device = input_device(model)
    config = _generation_config(
        model, tokenizer, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p
    )
    ids_all = encode_segments(tokenizer, list(prompts), special=True)
    if any(len(ids) == 0 for ids in ids_all):
        raise AusteerError("a prompt tokenizes to nothing; give every prompt some text")
    ids_all = [truncate_left(list(p), max_length) for p in ids_all]
    check_generation_length(model, ids_all, max_new_tokens)
    texts: list[str] = []
    steer = state.apply(model, alpha=alpha, layout=layout) if state is not None else nullcontext()
    with steer:
        for b, start in enumerate(range(0, len(ids_all), batch_size)):
            chunk = ids_all[start : start + batch_size]
            ids, mask = pad_ids(chunk, config.pad_token_id, side="left", device=device)
            rng = (
                torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) if do_sample else nullcontext()
            )
            with rng:
                if do_sample:
                    torch.manual_seed(seed + b)
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            texts.extend(tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True))
    return texts


def generate_pairs(
    model: nn.Module,
    tokenizer,
    state: SteeringState,
    prompts: Sequence[str],
    *,
    alpha: float | None = None,
    unsteered: Sequence[str] | None = None,
    **kwargs: Any,
) -> GenerationPairs:
    """Unsteered and steered new text of the same prompts (see :func:`generate_new_text` for ``kwargs``).

    Args:
        model: the base model (left without hooks on return).
        tokenizer: its tokenizer.
        state: the steering state (any method's).
        prompts: formatted prompt texts.
        alpha: strength override of the state.
        unsteered: generations of the same prompts and settings made before (skips that pass).
        **kwargs: ``max_new_tokens``, ``batch_size``, ``max_length``, ``do_sample``,
            ``temperature``, ``top_p``, ``seed``, ``layout``.

    Example:
        >>> pairs = generate_pairs(model, tok, state, ["Review:"], max_new_tokens=16)
        >>> pairs.unsteered[0], pairs.steered[0]
        (' It was fine.', ' A wonderful, moving film.')
    """
    prompts = list(prompts)
    if unsteered is None:
        unsteered = generate_new_text(model, tokenizer, prompts, **kwargs)
    elif len(unsteered) != len(prompts):
        raise AusteerError(f"{len(unsteered)} unsteered generations for {len(prompts)} prompts; pass one per prompt")
    steered = generate_new_text(model, tokenizer, prompts, state=state, alpha=alpha, **kwargs)
    return GenerationPairs(prompts, list(unsteered), steered)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _normalise(text: str) -> str:
    return re.sub(r"[^\w\s]", "", text).strip().lower()


def parse_number(text: str) -> float | None:
    """The answer number of a generation: the last number (after ``####`` where present, as GSM8K
    writes answers), commas as thousands separators. A model that reasons before answering ends with
    the answer, so the first number would be a step of the reasoning.

    Example:
        >>> parse_number("3 apples and 4 pears make 7"), parse_number("... #### 1,200 (done in 2 steps)")
        (7.0, 1200.0)
    """
    head, sep, tail = text.partition("####")
    source = tail if sep else head
    matches = _NUMBER.findall(source)
    if not matches:
        return None
    try:
        return float(matches[0 if sep else -1].replace(",", ""))
    except ValueError:
        return None


def generation_prediction(text: str, choices: Sequence[str], *, numeric: bool = False) -> int:
    """Which choice a generated text gives, or -1 when none (exact match after normalisation).

    Numeric tasks compare the first number in the text with each choice's number. Other tasks take
    the choice the text starts with (the longest one when several match).
    """
    if numeric:
        value = parse_number(text)
        if value is None:
            return -1
        for i, choice in enumerate(choices):
            target = parse_number(choice)
            if target is not None and math.isclose(value, target, rel_tol=1e-6, abs_tol=1e-6):
                return i
        return -1
    said = _normalise(text)
    best, best_len = -1, -1
    for i, choice in enumerate(choices):
        c = _normalise(choice)
        if c and (said == c or said.startswith(c + " ")) and len(c) > best_len:
            best, best_len = i, len(c)
    return best
