"""ITI (Li et al. 2023): per-head probes and mass-mean shifts, as steering states.

The statistics (:mod:`austeer_pl.methods.probes`) are streaming and mergeable: per-head moments
of the two classes and a validation accuracy per head probe. :func:`iti_state` turns them into a state that shifts the top heads
along their mass-mean direction, ``shift = alpha * sigma * direction``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from austeer_pl.core.pairs import read_text_pairs
from austeer_pl.core.placement import input_device
from austeer_pl.core.sites import LayoutSpec, ModelLayout, locate_units
from austeer_pl.core.state import SteeringState
from austeer_pl.errors import AusteerError
from austeer_pl.methods.probes import HeadMoments, HeadProbe, ProbeAccuracy
from austeer_pl.methods.registry import (
    FitContext,
    Method,
    register,
    state_kwargs,
    with_layout,
)
from austeer_pl.methods.shared import (
    block_state,
    check_count,
    check_strength,
    head_units,
    rank_descending,
    ranking_key,
)


def select_heads(
    accuracy: torch.Tensor | ProbeAccuracy, k: int, separation: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` heads with the best validation probe accuracy: ``(layers, heads)`` int64, best first.

    Ties, in order: larger training ``separation`` (taken from the probe when ``accuracy`` is a
    :class:`ProbeAccuracy`; compared after rounding to float32), then lower layer, then lower head.
    """
    if isinstance(accuracy, ProbeAccuracy):
        if separation is None:
            separation = accuracy.probe.separation
        accuracy = accuracy.accuracy()
    accuracy = accuracy.detach().cpu().double()
    n_layers, n_heads = accuracy.shape
    k = check_count(k, "k_heads", n_layers * n_heads, "attention heads")
    keys = [accuracy]
    if separation is not None:
        keys.append(ranking_key(separation).nan_to_num(0.0))
    top = rank_descending(keys)[:k]
    return top // n_heads, top % n_heads


def iti_directions(moments: HeadMoments) -> tuple[torch.Tensor, torch.Tensor]:
    """ITI's mass-mean-shift directions and their activation spread, per head.

    Returns:
        ``direction``: ``(mean_pos - mean_neg) / ||mean_pos - mean_neg||``, float64
        ``(layers, heads, head_dim)`` (zero where the means coincide); ``sigma``: the population
        standard deviation (``ddof = 0``, as ITI's ``np.std``) of the head's training activations
        of both classes projected on the direction, float64 ``(layers, heads)``.
    """
    shift = moments.mass_mean_shift()
    norm = shift.norm(dim=-1, keepdim=True)
    direction = torch.where(norm > 0, shift / norm.clamp(min=1e-300), torch.zeros_like(shift))
    n = sum(moments.counts)
    total_sum = moments.tensors["sum"].sum(0)
    total_outer = moments.tensors["outer"].sum(0)
    mean_proj = (direction * total_sum).sum(-1) / n
    second = torch.einsum("lhi,lhij,lhj->lh", direction, total_outer, direction) / n
    sigma = (second - mean_proj.square()).clamp(min=0.0).sqrt()
    return direction, sigma


def iti_state(
    moments: HeadMoments,
    accuracy: ProbeAccuracy | torch.Tensor,
    layout: ModelLayout,
    *,
    k_heads: int,
    alpha: float,
    base_model: str = "",
    token_scope: str = "all",
    metadata: Mapping[str, Any] | None = None,
) -> SteeringState:
    """Inference-time intervention (Li et al., 2023) on the ``k_heads`` heads with the best validation probes.

    Each selected head ``(l, h)`` gets, on its attention units ``h * head_dim .. (h + 1) * head_dim - 1``,
    ``shift = alpha * sigma[l, h] * direction[l, h]`` (:func:`iti_directions`, from the training
    moments) and ``scale = 0``; ``alpha`` is the state's alpha. Heads are chosen by
    :func:`select_heads` on the validation accuracy of :func:`fit_probes` probes. ``momentum`` is
    zero (ITI has no momentum statistics).

    Example:
        >>> state = iti_state(moments, val_accuracy, layout, k_heads=8, alpha=15.0)
    """
    alpha = check_strength(alpha, "alpha")
    if (moments.n_layers, moments.n_heads, moments.head_dim) != (layout.n_layers, layout.n_heads, layout.head_dim):
        raise AusteerError("the head moments were accumulated on another model (layers, heads or head_dim differ)")
    acc_table = accuracy.accuracy() if isinstance(accuracy, ProbeAccuracy) else accuracy
    layers, heads = select_heads(accuracy, k_heads)
    direction, sigma = iti_directions(moments)
    direction, sigma = direction.cpu(), sigma.cpu()
    layer, unit = head_units(layers, heads, layout.head_dim)
    shift = (alpha * sigma[layers, heads, None] * direction[layers, heads]).flatten()
    n = unit.numel()
    n_pos, n_neg = moments.counts
    return block_state(
        layout,
        "iti",
        ("attention",),
        site_index=torch.zeros(n, dtype=torch.long),
        layer=layer,
        unit=unit,
        momentum=torch.zeros(n),
        scale=torch.zeros(n),
        shift=shift,
        alpha=alpha,
        base_model=base_model,
        token_scope=token_scope,
        metadata={
            "strength": "alpha",
            "k_heads": int(layers.numel()),
            "heads": [[int(l), int(h)] for l, h in zip(layers, heads)],
            "val_accuracy": [float(acc_table[l, h]) for l, h in zip(layers, heads)],
            "sigma": [float(sigma[l, h]) for l, h in zip(layers, heads)],
            "probe": "ridge-regularised Fisher LDA",
            "ridge": accuracy.probe.ridge if isinstance(accuracy, ProbeAccuracy) else None,
            "n_train": [n_pos, n_neg],
            "n_val": int(accuracy.tensors["total"][0, 0]) if isinstance(accuracy, ProbeAccuracy) else None,
        },
        extra=metadata,
    )


# ============================================================================ ITI: reading text
def _read_pairs(model, tokenizer, pairs, layout, batch_size, max_length, consume) -> None:
    for pos, neg in read_text_pairs(
        model, tokenizer, pairs, layout, ["attention"], batch_size=batch_size, max_length=max_length
    ):
        consume(pos, neg)


def _layout(model: nn.Module, layout: ModelLayout | LayoutSpec | None) -> ModelLayout:
    return layout if isinstance(layout, ModelLayout) else locate_units(model, layout)


@torch.inference_mode()
def accumulate_head_moments(
    model: nn.Module,
    tokenizer,
    pairs: Iterable[tuple[str, str]],
    *,
    batch_size: int = 16,
    layout: ModelLayout | LayoutSpec | None = None,
    moments: HeadMoments | None = None,
    max_length: int | None = None,
) -> HeadMoments:
    """ITI's training statistics over ``(positive_text, negative_text)`` pairs (last-token attention heads)."""
    layout = _layout(model, layout)
    if moments is None:
        moments = HeadMoments.from_layout(layout, device=input_device(model))
    _read_pairs(model, tokenizer, pairs, layout, batch_size, max_length, moments.update)
    return moments


@torch.inference_mode()
def accumulate_probe_accuracy(
    model: nn.Module,
    tokenizer,
    pairs: Iterable[tuple[str, str]],
    probe: HeadProbe,
    *,
    batch_size: int = 16,
    layout: ModelLayout | LayoutSpec | None = None,
    counter: ProbeAccuracy | None = None,
    max_length: int | None = None,
) -> ProbeAccuracy:
    """Validation accuracy of each head's probe over ``(positive_text, negative_text)`` pairs (both classes)."""
    layout = _layout(model, layout)
    counter = ProbeAccuracy(probe) if counter is None else counter
    _read_pairs(model, tokenizer, pairs, layout, batch_size, max_length, counter.update)
    return counter


# ---------------------------------------------------------------------------- grid expanders
def _iti_points(layout: ModelLayout, grid) -> list[dict[str, Any]]:
    total = layout.n_layers * layout.n_heads
    return [
        {"k_heads": min(int(k), total), "alpha": float(a)} for k, a in itertools.product(grid["k_heads"], grid["alpha"])
    ]


def _build_iti(ctx: FitContext, **hyper) -> SteeringState:
    if ctx.moments is None or ctx.probe_accuracy is None:
        raise AusteerError("ITI needs head moments (training) and a probe accuracy (validation)")
    return with_layout(iti_state(ctx.moments, ctx.probe_accuracy, ctx.layout, **hyper, **state_kwargs(ctx)), ctx)


#: ITI: ``k_heads`` heads by validation probe accuracy, strength ``alpha`` in units of the head's
#: projected standard deviation (Li et al. 2023 use K=48 of 1024 heads and alpha=15 on LLaMA-7B).
ITI = register(
    Method(
        "iti",
        ("head_moments", "probe_accuracy"),
        ("attention",),
        grid={"k_heads": [1, 2, 4, 8, 16, 32, 48], "alpha": [1.0, 2.5, 5.0, 10.0, 15.0, 20.0]},
        quick_grid={"k_heads": [4, 16], "alpha": [5.0, 15.0]},
        strength_key="alpha",
        points=_iti_points,
        build=_build_iti,
        order=10,
    )
)
