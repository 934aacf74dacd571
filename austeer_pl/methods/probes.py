"""ITI's per-head statistics, streaming and mergeable like :mod:`austeer_pl.core.momentum`:
:class:`HeadMoments` keeps per-head first and second moments of the two classes over the training
pairs, :func:`fit_probes` fits a ridge probe per head from them, and :class:`ProbeAccuracy` counts
each probe's validation accuracy; the sums add across processes with ``reduce_(all_reduce)``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from austeer_pl.core.momentum import SummedStatistics
from austeer_pl.core.sites import ModelLayout
from austeer_pl.errors import AusteerError


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

    def _heads(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = _acts(x)
        width = self.n_heads * self.head_dim
        if x.dim() != 3 or x.shape[1:] != (self.n_layers, width):
            raise ValueError(f"expected attention activations (batch, {self.n_layers}, {width}), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise AusteerError(
                "non-finite activations at the attention site (NaN or inf); load the model in float32 "
                "or bfloat16 instead of float16, and check the inputs"
            )
        return x.to(self.tensors["sum"].device, torch.float64).view(
            x.shape[0], self.n_layers, self.n_heads, self.head_dim
        )

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

    def update(
        self, pos: torch.Tensor | Mapping[str, torch.Tensor], neg: torch.Tensor | Mapping[str, torch.Tensor]
    ) -> None:
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

    def update(
        self, pos: torch.Tensor | Mapping[str, torch.Tensor], neg: torch.Tensor | Mapping[str, torch.Tensor]
    ) -> None:
        """Count a batch of positive and one of negative validation activations."""
        sp, sn = self.probe.scores(pos), self.probe.scores(neg)
        for s in (sp, sn):
            if not torch.isfinite(s).all():
                raise AusteerError(
                    "non-finite activations at the attention site (NaN or inf); check the model dtype and inputs"
                )
        self.tensors["correct"].add_((sp > 0).sum(0) + (sn <= 0).sum(0))
        self.tensors["total"].add_(sp.shape[0] + sn.shape[0])

    def accuracy(self) -> torch.Tensor:
        """``correct / total`` per head, float64 ``(layers, heads)``."""
        total = self.tensors["total"]
        if int(total.min()) == 0:
            raise AusteerError("no validation activations were counted; give ITI validation pairs")
        return self.tensors["correct"].double() / total.double()


__all__ = [
    "HeadMoments",
    "HeadProbe",
    "ProbeAccuracy",
    "fit_probes",
]
