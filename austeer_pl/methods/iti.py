"""ITI (Li et al. 2023): per-head probes and mass-mean shifts, as steering states.

Statistics are streaming and mergeable like :mod:`austeer_pl.core.momentum`: :class:`HeadMoments`
keeps per-head first and second moments of the two classes over the training pairs, and
:class:`ProbeAccuracy` a validation accuracy per head probe; both sum across processes with
``reduce_(all_reduce)``. :func:`iti_state` turns them into a state that shifts the top heads
along their mass-mean direction, ``shift = alpha * sigma * direction``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from austeer_pl.core.momentum import SummedStatistics
from austeer_pl.core.pairs import read_text_pairs
from austeer_pl.core.sites import LayoutSpec, ModelLayout, locate_units
from austeer_pl.core.state import SteeringState
from austeer_pl.errors import AusteerError
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


# ============================================================================ ITI: statistics
def _acts(value: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    if isinstance(value, Mapping):
        if "attention" not in value:
            raise AusteerError("ITI reads the attention site; read activations with sites including 'attention'")
        value = value["attention"]
    return value


class HeadMoments(SummedStatistics):
    """Per-head first and second moments of the attention site, per class, streaming and mergeable.

    For each class ``c`` (0 = positive completions, 1 = negative ones) it keeps the example count
    ``n_c`` (int64; every example contributes to every head), and per ``(layer, head)`` the float64
    sums ``sum_c = sum x`` (``head_dim``) and ``outer_c = sum x x^T`` (``head_dim x head_dim``),
    ``x`` the head's slice of the attention site at the last token. Memory is
    ``2 * layers * heads * head_dim * (head_dim + 1)`` float64 values, independent of the data.

    Args:
        n_layers, n_heads, head_dim: the layout (or use :meth:`from_layout`).
        device: where the statistics live.

    Example:
        >>> moments = HeadMoments.from_layout(layout)
        >>> moments.update(pos_acts, neg_acts)  # each (batch, layers, n_heads * head_dim)
        >>> moments.mean(0).shape
        torch.Size([layers, heads, head_dim])
    """

    _what = "head-moment"
    _plural = "head moments"
    _shape_hint = "; it was saved for another model"

    KEYS = ("count", "sum", "outer")

    def __init__(self, n_layers: int, n_heads: int, head_dim: int, device: torch.device | str | None = None) -> None:
        self.n_layers, self.n_heads, self.head_dim = int(n_layers), int(n_heads), int(head_dim)
        shape = (2, self.n_layers, self.n_heads, self.head_dim)
        with torch.inference_mode(False):
            self.tensors: dict[str, torch.Tensor] = {
                "count": torch.zeros(2, dtype=torch.int64, device=device),
                "sum": torch.zeros(shape, dtype=torch.float64, device=device),
                "outer": torch.zeros(*shape, self.head_dim, dtype=torch.float64, device=device),
            }

    @classmethod
    def from_layout(cls, layout: ModelLayout, device: torch.device | str | None = None) -> HeadMoments:
        if layout.site("attention").size != layout.n_heads * layout.head_dim:
            raise AusteerError("the attention site does not split into n_heads x head_dim units on this model")
        return cls(layout.n_layers, layout.n_heads, layout.head_dim, device=device)

    @property
    def counts(self) -> tuple[int, int]:
        """``(n_pos, n_neg)``."""
        c = self.tensors["count"].tolist()
        return int(c[0]), int(c[1])

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        x = _acts(x)
        width = self.n_heads * self.head_dim
        if x.dim() != 3 or x.shape[1:] != (self.n_layers, width):
            raise ValueError(f"expected attention activations (batch, {self.n_layers}, {width}), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise AusteerError(
                "non-finite activations at the attention site (NaN or inf); load the model in float32 "
                "or bfloat16 instead of float16, and check the inputs"
            )
        return x.to(self.tensors["sum"].device, torch.float64).view(x.shape[0], self.n_layers, self.n_heads, self.head_dim)

    def update_class(self, acts: torch.Tensor | Mapping[str, torch.Tensor], label: int) -> None:
        """Add a batch ``(batch, layers, n_heads * head_dim)`` of one class (0 positive, 1 negative)."""
        if label not in (0, 1):
            raise ValueError(f"label must be 0 (positive) or 1 (negative), got {label!r}")
        x = self._heads(acts)
        if x.shape[0] == 0:
            return
        self.tensors["sum"][label].add_(x.sum(0))
        self.tensors["outer"][label].add_(torch.einsum("blhi,blhj->lhij", x, x))
        self.tensors["count"][label].add_(x.shape[0])

    def update(self, pos: torch.Tensor | Mapping[str, torch.Tensor], neg: torch.Tensor | Mapping[str, torch.Tensor]) -> None:
        """Add a batch of positive and one of negative activations (sizes may differ; mappings use ``"attention"``)."""
        xp, xn = self._heads(pos), self._heads(neg)  # validate both before changing anything
        for label, x in ((0, xp), (1, xn)):
            if x.shape[0]:
                self.tensors["sum"][label].add_(x.sum(0))
                self.tensors["outer"][label].add_(torch.einsum("blhi,blhj->lhij", x, x))
                self.tensors["count"][label].add_(x.shape[0])

    def _require_both(self) -> tuple[int, int]:
        n_pos, n_neg = self.counts
        if n_pos == 0 or n_neg == 0:
            raise AusteerError(
                f"ITI needs activations of both classes (have {n_pos} positive, {n_neg} negative); give it training pairs"
            )
        return n_pos, n_neg

    def mean(self, label: int) -> torch.Tensor:
        """Class mean ``(layers, heads, head_dim)``, float64 (0 positive, 1 negative)."""
        n = self.counts[label]
        if n == 0:
            raise AusteerError(f"no {'positive' if label == 0 else 'negative'} activations were accumulated")
        return self.tensors["sum"][label] / n

    def scatter(self, label: int) -> torch.Tensor:
        """``sum (x - mean)(x - mean)^T`` of one class, ``(layers, heads, head_dim, head_dim)``."""
        n = self.counts[label]
        mu = self.mean(label)
        return self.tensors["outer"][label] - n * mu.unsqueeze(-1) * mu.unsqueeze(-2)

    def covariance(self, label: int, ddof: int = 1) -> torch.Tensor:
        """Class covariance with ``ddof`` (denominator ``max(n - ddof, 1)``)."""
        return self.scatter(label) / max(self.counts[label] - ddof, 1)

    def pooled_covariance(self) -> torch.Tensor:
        """Within-class covariance pooled over both classes: ``(S_pos + S_neg) / max(n_pos + n_neg - 2, 1)``."""
        n_pos, n_neg = self._require_both()
        return (self.scatter(0) + self.scatter(1)) / max(n_pos + n_neg - 2, 1)

    def mass_mean_shift(self) -> torch.Tensor:
        """``mean_pos - mean_neg`` per head, ``(layers, heads, head_dim)``."""
        self._require_both()
        return self.mean(0) - self.mean(1)


@dataclass
class HeadProbe:
    """One linear probe per head: ``score = w . x + b``, positive class iff ``score > 0``.

    Attributes:
        weight: float64 ``(layers, heads, head_dim)``.
        bias: float64 ``(layers, heads)``.
        separation: float64 ``(layers, heads)``, ``w . (mean_pos - mean_neg)`` (the regularised
            squared Mahalanobis distance between the class means): the training-set tie-breaker
            of :func:`select_heads`.
        ridge: the relative ridge the probes were fitted with.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    separation: torch.Tensor
    ridge: float

    @property
    def n_layers(self) -> int:
        return int(self.weight.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.weight.shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.weight.shape[2])

    def scores(self, acts: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Probe scores ``(batch, layers, heads)`` (float64) of attention activations ``(batch, layers, units)``."""
        x = _acts(acts)
        b, width = x.shape[0], self.n_heads * self.head_dim
        if x.dim() != 3 or x.shape[1:] != (self.n_layers, width):
            raise ValueError(f"expected attention activations (batch, {self.n_layers}, {width}), got {tuple(x.shape)}")
        x = x.to(self.weight.device, torch.float64).view(b, self.n_layers, self.n_heads, self.head_dim)
        return torch.einsum("blhd,lhd->blh", x, self.weight) + self.bias

    def predict(self, acts: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """True where a head's probe calls the example positive, ``(batch, layers, heads)``."""
        return self.scores(acts) > 0


def fit_probes(moments: HeadMoments, ridge: float = 0.1) -> HeadProbe:
    """Closed-form per-head probes: regularised Fisher linear discriminant analysis.

    ``w = (Sigma + ridge * tr(Sigma) / head_dim * I)^-1 (mean_pos - mean_neg)`` with ``Sigma`` the
    pooled within-class covariance (:meth:`HeadMoments.pooled_covariance`), and the bias puts the
    boundary at the midpoint of the class means: ``b = -w . (mean_pos + mean_neg) / 2``. The ridge
    is relative to the head's mean variance, so it does not depend on the activations' scale (a head
    with zero variance uses ``ridge * I``, i.e. a nearest-class-mean probe). ITI's original
    probes are logistic regressions; LDA is their closed-form, streaming counterpart. All heads of
    all layers are solved in one batched call.
    """
    ridge = float(ridge)
    if not (math.isfinite(ridge) and ridge > 0):
        raise AusteerError(f"ridge must be a positive number, got {ridge}")
    delta = moments.mass_mean_shift()
    midpoint = (moments.mean(0) + moments.mean(1)) / 2
    sigma = moments.pooled_covariance()
    mean_var = torch.diagonal(sigma, dim1=-2, dim2=-1).mean(-1)
    reg = ridge * torch.where(mean_var > 0, mean_var, torch.ones_like(mean_var))
    eye = torch.eye(moments.head_dim, dtype=sigma.dtype, device=sigma.device)
    weight = torch.linalg.solve(sigma + reg[..., None, None] * eye, delta.unsqueeze(-1)).squeeze(-1)
    bias = -(weight * midpoint).sum(-1)
    separation = (weight * delta).sum(-1)
    return HeadProbe(weight, bias, separation, ridge)


class ProbeAccuracy(SummedStatistics):
    """Streaming per-head probe accuracy: integer ``correct`` and ``total`` counts per ``(layer, head)``.

    A positive example is correct when its score is ``> 0``, a negative one when it is ``<= 0``.
    The probe is fixed at construction (fit it on the reduced training moments so every process
    holds the same probe); only the counts are merged, reduced and saved.

    Example:
        >>> val = ProbeAccuracy(fit_probes(moments))
        >>> val.update(pos_acts, neg_acts)
        >>> val.accuracy().shape
        torch.Size([layers, heads])
    """

    _what = "probe-accuracy"
    _plural = "probe accuracies"

    def __init__(self, probe: HeadProbe) -> None:
        self.probe = probe
        shape = (probe.n_layers, probe.n_heads)
        with torch.inference_mode(False):
            self.tensors: dict[str, torch.Tensor] = {
                "correct": torch.zeros(shape, dtype=torch.int64, device=probe.weight.device),
                "total": torch.zeros(shape, dtype=torch.int64, device=probe.weight.device),
            }

    def update(self, pos: torch.Tensor | Mapping[str, torch.Tensor], neg: torch.Tensor | Mapping[str, torch.Tensor]) -> None:
        """Count a batch of positive and one of negative validation activations."""
        sp, sn = self.probe.scores(pos), self.probe.scores(neg)
        for s in (sp, sn):
            if not torch.isfinite(s).all():
                raise AusteerError("non-finite activations at the attention site (NaN or inf); check the model dtype and inputs")
        self.tensors["correct"].add_((sp > 0).sum(0) + (sn <= 0).sum(0))
        self.tensors["total"].add_(sp.shape[0] + sn.shape[0])

    def accuracy(self) -> torch.Tensor:
        """``correct / total`` per head, float64 ``(layers, heads)``."""
        total = self.tensors["total"]
        if int(total.min()) == 0:
            raise AusteerError("no validation activations were counted; give ITI validation pairs")
        return self.tensors["correct"].double() / total.double()


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
        layout, "iti", ("attention",),
        site_index=torch.zeros(n, dtype=torch.long), layer=layer, unit=unit,
        momentum=torch.zeros(n), scale=torch.zeros(n), shift=shift,
        alpha=alpha, base_model=base_model, token_scope=token_scope,
        metadata={
            "strength": "alpha", "k_heads": int(layers.numel()),
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
    for pos, neg in read_text_pairs(model, tokenizer, pairs, layout, ["attention"], batch_size=batch_size, max_length=max_length):
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
        moments = HeadMoments.from_layout(layout, device=next(model.parameters()).device)
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
    return [{"k_heads": min(int(k), total), "alpha": float(a)} for k, a in itertools.product(grid["k_heads"], grid["alpha"])]


def _build_iti(ctx: FitContext, **hyper) -> SteeringState:
    if ctx.moments is None or ctx.probe_accuracy is None:
        raise AusteerError("ITI needs head moments (training) and a probe accuracy (validation)")
    return with_layout(iti_state(ctx.moments, ctx.probe_accuracy, ctx.layout, **hyper, **state_kwargs(ctx)), ctx)


#: ITI: ``k_heads`` heads by validation probe accuracy, strength ``alpha`` in units of the head's
#: projected standard deviation (Li et al. 2023 use K=48 of 1024 heads and alpha=15 on LLaMA-7B).
ITI = register(Method(
    "iti", ("head_moments", "probe_accuracy"), ("attention",),
    grid={"k_heads": [1, 2, 4, 8, 16, 32, 48], "alpha": [1.0, 2.5, 5.0, 10.0, 15.0, 20.0]},
    quick_grid={"k_heads": [4, 16], "alpha": [5.0, 15.0]},
    strength_key="alpha", points=_iti_points, build=_build_iti, order=10,
))
