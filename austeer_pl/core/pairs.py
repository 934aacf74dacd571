"""The one pair reader: last-token units of prompt + right answer and prompt + wrong answer.

Every path that reads pairs (the fit's pass, ITI's probe pass, :func:`accumulate_momentum` over
texts) collates them into one batch form and calls :func:`read_pair_batch`:

* :func:`pair_batch`: each pair's prompt and answer ids, read from one KV cache per prompt where
  ``shared_prefix`` holds on the model's device (:class:`~austeer_pl.core.prefix.SharedPrefixReader`),
  else joined into full sequences;
* :func:`rows_batch`: already encoded full sequences, the positive rows then the negative rows, read
  in one forward (:class:`~austeer_pl.core.reading.ActivationReader`);
* :func:`split_batch`: encoded full sequences split at their longest common token prefix (token
  boundaries never move), read as :func:`pair_batch`.

:func:`accumulate_momentum` and :func:`fit_state` are the plain-PyTorch fit for notebooks; the full
fit (grid, verdict, learned strength) is :class:`~austeer_pl.fit.session.FitSession`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from austeer_pl.core.momentum import MomentumAccumulator
from austeer_pl.core.placement import input_device
from austeer_pl.core.prefix import (
    SharedPrefixReader,
    split_shared_prefix,
    use_shared_prefix,
)
from austeer_pl.core.reading import ActivationReader
from austeer_pl.core.selection import select_units
from austeer_pl.core.sites import LayoutSpec, ModelLayout, locate_units
from austeer_pl.core.state import SteeringState
from austeer_pl.core.tokens import encode_texts, pair_rows
from austeer_pl.errors import AusteerError

DEFAULT_SITES = ("attention",)


def pair_batch(
    prompt_ids: Sequence[Sequence[int]],
    pos_ids: Sequence[Sequence[int]],
    neg_ids: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    max_length: int | None = None,
    shared_prefix: bool | str = True,
) -> dict[str, Any]:
    """Pairs as prompt ids and answer ids (each answer continues its prompt; lengths may differ).

    ``shared_prefix`` (True, False or ``"auto"``) says how :func:`read_pair_batch` reads them;
    ``max_length`` cuts each full sequence to its last tokens first.
    """
    return {
        "n_pairs": len(prompt_ids),
        "prompt_ids": [list(p) for p in prompt_ids],
        "pos_ids": [list(p) for p in pos_ids],
        "neg_ids": [list(n) for n in neg_ids],
        "pad_id": int(pad_id),
        "max_length": max_length,
        "shared_prefix": shared_prefix,
    }


def rows_batch(pos: dict[str, torch.Tensor], neg: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Encoded full sequences (``input_ids``, ``attention_mask`` of equal batch size), padded to a
    common width and stacked: the positive rows, then the negative rows (one forward serves both)."""
    n = pos["input_ids"].shape[0]
    width = max(pos["input_ids"].shape[1], neg["input_ids"].shape[1])

    def widen(t: torch.Tensor, value: int) -> torch.Tensor:
        return nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return {
        "n_pairs": n,
        "input_ids": torch.cat([widen(pos["input_ids"], 0), widen(neg["input_ids"], 0)]),
        "attention_mask": torch.cat([widen(pos["attention_mask"], 0), widen(neg["attention_mask"], 0)]),
    }


def split_batch(pos: dict[str, torch.Tensor], neg: dict[str, torch.Tensor], pad_id: int = 0) -> dict[str, Any]:
    """Encoded full sequences (any padding side) split at each pair's longest common token prefix
    (:func:`~austeer_pl.core.prefix.split_shared_prefix`): the values read are those of the full
    sequences exactly as tokenized."""
    rows = [
        [row[m].tolist() for row, m in zip(t["input_ids"].cpu(), t["attention_mask"].bool().cpu())] for t in (pos, neg)
    ]
    prompts, p_rest, n_rest = split_shared_prefix(*rows)
    return pair_batch(prompts, p_rest, n_rest, pad_id=pad_id)


def read_pair_batch(
    model: nn.Module,
    layout: ModelLayout,
    batch: dict[str, Any],
    sites: Sequence[str],
    *,
    readers: dict | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Last-token units of a batch of pairs, ``(pos, neg)``, each ``{site: (B, layers, units)}``.

    A batch of prompt and answer ids (:func:`pair_batch`) is read from one KV cache per prompt where
    its ``shared_prefix`` holds on the model's device, else joined into full sequences; a batch of
    rows (:func:`rows_batch`) holds the positive rows, then the negative rows. ``readers`` caches
    the shared-prefix readers between calls.

    Example:
        >>> pos, neg = read_pair_batch(model, layout, pair_batch([[1, 2]], [[3]], [[4]]), ["attention"])
    """
    sites = tuple(sites)
    device = input_device(model)
    n = batch["n_pairs"]
    with torch.inference_mode():
        if "prompt_ids" in batch:
            if use_shared_prefix(batch.get("shared_prefix", True), device):
                readers = {} if readers is None else readers
                reader = readers.get(sites)
                if reader is None:
                    reader = readers[sites] = SharedPrefixReader(model, layout, sites)
                return reader.read_pairs(
                    batch["prompt_ids"],
                    batch["pos_ids"],
                    batch["neg_ids"],
                    batch["pad_id"],
                    max_length=batch["max_length"],
                )
            ids, mask = pair_rows(
                batch["prompt_ids"],
                batch["pos_ids"],
                batch["neg_ids"],
                batch["pad_id"],
                batch["max_length"],
                side="right",
            )
            batch = {"input_ids": ids, "attention_mask": mask}
        acts = ActivationReader(model, layout, sites)(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        return {s: a[:n] for s, a in acts.items()}, {s: a[n:] for s, a in acts.items()}


def read_text_pairs(
    model: nn.Module,
    tokenizer,
    pairs: Iterable[tuple[str, str]],
    layout: ModelLayout,
    sites: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    shared_prefix: bool | str = "auto",
) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Last-token units of ``(positive_text, negative_text)`` pairs, one batch at a time.

    Yields ``(pos, neg)``, each ``{site: (batch, layers, units)}``, for every ``batch_size`` pairs.
    Texts are tokenized whole (truncated to ``max_length`` tokens). Where ``shared_prefix`` holds
    on the model's device (:func:`~austeer_pl.core.prefix.use_shared_prefix`: ``"auto"`` is on for
    the CPU, off for an accelerator) each pair is split at its longest common token prefix
    (:func:`split_batch`); otherwise both full sequences are read in one pass (:func:`rows_batch`).
    """
    if batch_size <= 0:
        raise AusteerError(f"batch_size must be positive, got {batch_size}")
    if tokenizer.pad_token_id is None:
        raise AusteerError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
    shared = use_shared_prefix(shared_prefix, input_device(model))
    readers: dict = {}

    def read(chunk: list[tuple[str, str]]):
        pos = encode_texts(tokenizer, [p for p, _ in chunk], max_length=max_length)
        neg = encode_texts(tokenizer, [n for _, n in chunk], max_length=max_length)
        batch = split_batch(pos, neg, tokenizer.pad_token_id) if shared else rows_batch(pos, neg)
        return read_pair_batch(model, layout, batch, sites, readers=readers)

    chunk: list[tuple[str, str]] = []
    for pair in pairs:
        chunk.append(pair)
        if len(chunk) == batch_size:
            yield read(chunk)
            chunk = []
    if chunk:
        yield read(chunk)


@torch.inference_mode()
def accumulate_momentum(
    model: nn.Module,
    tokenizer,
    pairs: Iterable[tuple[str, str]],
    *,
    sites: Sequence[str] = DEFAULT_SITES,
    batch_size: int = 16,
    layout: ModelLayout | LayoutSpec | None = None,
    accumulator: MomentumAccumulator | None = None,
    max_length: int | None = None,
    shared_prefix: bool | str = "auto",
) -> MomentumAccumulator:
    """Accumulate activation momentum over ``(positive_text, negative_text)`` pairs.

    Args:
        model: frozen causal LM.
        tokenizer: its tokenizer (needs a pad token).
        pairs: full texts (prompt + right answer, prompt + wrong answer).
        sites: sites to read.
        batch_size: pairs per forward pass (each pass holds ``2 * batch_size`` rows).
        layout: precomputed layout or a :class:`LayoutSpec`.
        accumulator: an accumulator to continue; a new one otherwise.
        max_length: truncate longer texts from the left to their last ``max_length`` tokens (the
            last token, whose units are read, always survives).
        shared_prefix: split each pair at its longest common token prefix, run that prefix once and
            continue both answers from its KV cache (:mod:`austeer_pl.core.prefix`): about half the work
            on short answers. The units are those of the full sequences to float tolerance, so a
            difference that is zero up to rounding may count on the other side; ``False`` reads the
            two full sequences. ``"auto"``: shared on the CPU, full sequences on an accelerator
            (:func:`~austeer_pl.core.prefix.use_shared_prefix`).

    Example:
        >>> acc = accumulate_momentum(model, tok, [("Q? Yes", "Q? No")], sites=["attention"])
    """
    if not isinstance(layout, ModelLayout):
        layout = locate_units(model, layout)
    if accumulator is None:
        device = input_device(model)
        accumulator = MomentumAccumulator({s: layout.site(s).size for s in sites}, layout.n_layers, device=device)
    for pos, neg in read_text_pairs(
        model,
        tokenizer,
        pairs,
        layout,
        sites,
        batch_size=batch_size,
        max_length=max_length,
        shared_prefix=shared_prefix,
    ):
        accumulator.update(pos, neg)
    return accumulator


def fit_state(
    model: nn.Module,
    tokenizer,
    pairs: Iterable[tuple[str, str]],
    *,
    k: int,
    alpha: float,
    sites: Sequence[str] = DEFAULT_SITES,
    sign: str = "promote",
    batch_size: int = 16,
    base_model: str = "",
    layout: ModelLayout | LayoutSpec | None = None,
    shared_prefix: bool | str = "auto",
) -> SteeringState:
    """Momentum pass, top-``k`` selection and an AUSteer state in one call.

    Example:
        >>> state = fit_state(model, tok, pairs, k=20, alpha=5.0, sites=["attention"])
        >>> state.save_pretrained("my-state")
    """
    if not isinstance(layout, ModelLayout):
        layout = locate_units(model, layout)
    acc = accumulate_momentum(
        model, tokenizer, pairs, sites=sites, batch_size=batch_size, layout=layout, shared_prefix=shared_prefix
    )
    selection = select_units(acc, k, sites, sign)
    return SteeringState.from_selection(
        selection,
        layout,
        alpha=alpha,
        base_model=base_model or str(getattr(model, "name_or_path", "")),
        sign_policy=sign,
        metadata={"n_pairs": acc.n},
    )
