"""Fitting without Lightning: one batched pass over contrastive pairs into a momentum accumulator.

The Lightning pipeline (:mod:`austeer_pl.lightning.module`) uses the same pieces per batch; this module is
the plain-PyTorch path for notebooks and tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from austeer_pl.errors import AusteerError
from austeer_pl.core.momentum import MomentumAccumulator
from austeer_pl.core.tokens import encode_texts
from austeer_pl.core.reading import ActivationReader
from austeer_pl.core.selection import select_units
from austeer_pl.core.sites import LayoutSpec, ModelLayout, locate_units
from austeer_pl.core.state import SteeringState

DEFAULT_SITES = ("attention",)


def read_pair_batch(
    reader: ActivationReader,
    pos: dict[str, torch.Tensor],
    neg: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read the positive and negative rows of a batch in one forward pass.

    ``pos`` and ``neg`` hold ``input_ids`` and ``attention_mask`` of equal batch size; they are
    padded to a common length and concatenated, so one pass serves both.
    """
    batch = pos["input_ids"].shape[0]
    width = max(pos["input_ids"].shape[1], neg["input_ids"].shape[1])
    pad_id = 0

    def widen(t: torch.Tensor, value: int) -> torch.Tensor:
        return nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    ids = torch.cat([widen(pos["input_ids"], pad_id), widen(neg["input_ids"], pad_id)])
    mask = torch.cat([widen(pos["attention_mask"], 0), widen(neg["attention_mask"], 0)])
    acts = reader(ids, mask)
    return {s: a[:batch] for s, a in acts.items()}, {s: a[batch:] for s, a in acts.items()}


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
    on the model's device (:func:`~austeer_pl.core.prefix.use_shared_prefix`: ``"auto"`` is on for the
    CPU, off for an accelerator) each pair is then split at its longest common token prefix and
    read with :class:`~austeer_pl.core.prefix.SharedPrefixReader`; otherwise both full sequences are
    read in one pass.
    """
    from austeer_pl.core.prefix import SharedPrefixReader, use_shared_prefix

    if batch_size <= 0:
        raise AusteerError(f"batch_size must be positive, got {batch_size}")
    if tokenizer.pad_token_id is None:
        raise AusteerError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
    device = next(model.parameters()).device
    shared_prefix = use_shared_prefix(shared_prefix, device)
    reader = SharedPrefixReader(model, layout, sites) if shared_prefix else ActivationReader(model, layout, sites)
    where = None if shared_prefix else device  # the shared reader pads on its own

    def read(chunk: list[tuple[str, str]]):
        pos = encode_texts(tokenizer, [p for p, _ in chunk], device=where, max_length=max_length)
        neg = encode_texts(tokenizer, [n for _, n in chunk], device=where, max_length=max_length)
        with torch.inference_mode():
            if shared_prefix:
                return reader.read_pair_batch(pos, neg, tokenizer.pad_token_id)
            return read_pair_batch(reader, pos, neg)

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
        device = next(model.parameters()).device
        accumulator = MomentumAccumulator({s: layout.site(s).size for s in sites}, layout.n_layers, device=device)
    for pos, neg in read_text_pairs(model, tokenizer, pairs, layout, sites, batch_size=batch_size, max_length=max_length, shared_prefix=shared_prefix):
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
    acc = accumulate_momentum(model, tokenizer, pairs, sites=sites, batch_size=batch_size, layout=layout, shared_prefix=shared_prefix)
    selection = select_units(acc, k, sites, sign)
    return SteeringState.from_selection(
        selection, layout, alpha=alpha, base_model=base_model or str(getattr(model, "name_or_path", "")),
        sign_policy=sign, metadata={"n_pairs": acc.n},
    )
