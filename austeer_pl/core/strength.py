"""Learned adaptive strength: how hard to push each selected unit, learned with the LLM frozen.

Three strength functions (``--model.strength``):

* ``momentum``: the paper's rule, ``s = alpha * m`` (no parameters, the default);
* ``scalar``: one learned strength per selected unit, initialised at ``alpha * m``;
* ``gate``: an input-conditioned function. At every position it reads the residual stream entering
  decoder layer ``g`` (RMS-normalised) and returns per-unit strengths
  ``s = alpha * m + W2 tanh(W1 h + b1)`` (``W2`` starts at zero, so training starts from the
  momentum rule). Attention is causal and ``g`` is at or before the first steered layer, so the
  strengths used to predict the answer are computed from the prompt alone: the gate never sees the
  answer it is scored on.

Each unit ``a`` becomes ``a + s * a``. The same :class:`~austeer_pl.core.hooks.EditHandle` applies a learned
function during training and after loading, so an exported state reproduces the trained
module's outputs exactly.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from austeer_pl.core.hooks import EditHandle
from austeer_pl.core.placement import input_device
from austeer_pl.core.reading import padded_logits
from austeer_pl.core.sites import ModelLayout
from austeer_pl.errors import AusteerError

STRENGTH_KINDS = ("momentum", "scalar", "gate")
#: Losses of the learned-strength phase: the right answer's negative log-likelihood, or the logistic
#: loss of the right-vs-wrong choice that log-likelihood scoring makes.
STRENGTH_LOSSES = ("nll", "choice")


class ScalarStrength(nn.Module):
    """One learned strength per selected unit."""

    kind = "scalar"

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.scale = nn.Parameter(init.detach().clone().float())

    def forward(self, hidden: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale

    def config(self) -> dict[str, Any]:
        return {"kind": "scalar"}


class GateStrength(nn.Module):
    """Per-position strengths from the residual stream entering decoder layer ``layer``.

    Args:
        hidden_size: width of the residual stream.
        init: ``(k,)`` strengths at initialisation (``alpha * m``).
        layer: the decoder layer whose input is read; at or before the first steered layer.
        width: hidden width of the gate (the parameter count is ``(hidden_size + k + 1) * width + k``).
        seed: seed of the inner layer's random initialisation (its own generator, so every process
            of a DDP run starts from the same gate whatever its global random state).
    """

    kind = "gate"

    def __init__(self, hidden_size: int, init: torch.Tensor, layer: int, width: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.layer = int(layer)
        self.width = int(width)
        self.inner = nn.Linear(hidden_size, width)
        self.outer = nn.Linear(width, init.numel())
        with torch.no_grad():
            generator = torch.Generator().manual_seed(int(seed))
            self.inner.weight.copy_(torch.randn(self.inner.weight.shape, generator=generator) * hidden_size**-0.5)
        nn.init.zeros_(self.inner.bias)
        nn.init.zeros_(self.outer.weight)
        with torch.no_grad():
            self.outer.bias.copy_(init.float())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.float()
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-6)
        return self.outer(torch.tanh(self.inner(h)))

    def config(self) -> dict[str, Any]:
        return {"kind": "gate", "layer": self.layer, "width": self.width, "hidden_size": self.inner.in_features}


def build_strength(
    kind: str,
    init: torch.Tensor,
    layout: ModelLayout,
    steered_layers: list[int],
    *,
    gate_layer: int | None = None,
    gate_width: int = 16,
) -> nn.Module | None:
    """The strength module for ``kind`` (None for ``momentum``)."""
    if kind not in STRENGTH_KINDS:
        raise AusteerError(f"unknown strength function '{kind}'; choose one of {', '.join(STRENGTH_KINDS)}")
    if kind == "momentum":
        return None
    if kind == "scalar":
        return ScalarStrength(init)
    first = min(steered_layers)
    layer = first if gate_layer is None else int(gate_layer)
    if not 0 <= layer <= first:
        raise AusteerError(
            f"--model.gate_layer {layer} must be between 0 and the first steered layer ({first}), so the gate reads its input before any edit"
        )
    hidden = layout.site("residual").size
    return GateStrength(hidden, init, layer, gate_width)


def strength_from_config(config: dict[str, Any], tensors: dict[str, torch.Tensor], k: int) -> GateStrength:
    """Rebuild a saved gate from its closed description and tensors (no pickle, no class paths)."""
    if config.get("kind") != "gate":
        raise AusteerError(
            f"unknown strength function '{config.get('kind')}' in the state; upgrade austeer-pl or export it again"
        )
    try:
        gate = GateStrength(int(config["hidden_size"]), torch.zeros(k), int(config["layer"]), int(config["width"]))
        gate.load_state_dict({name: tensors[name] for name in gate.state_dict()})
    except (KeyError, RuntimeError, ValueError) as err:
        raise AusteerError(
            f"the state's gate parameters do not match its description ({str(err).splitlines()[0]}); export it again"
        ) from None
    return gate.requires_grad_(False)


# ---------------------------------------------------------------------------- the training objective
def strength_objective(
    model: nn.Module,
    layout: ModelLayout,
    state,
    strength: nn.Module,
    batch: dict[str, Any],
    *,
    kl_weight: float = 1.0,
    token_scope: str = "all",
    loss: str = "nll",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, nll, kl)`` of one batch of training examples.

    ``batch`` holds ``n_examples`` (n), ``input_ids``, ``attention_mask`` and ``answer_lengths``, as
    collated by :meth:`~austeer_pl.lightning.module.ContrastivePairDataModule.collate_examples_train`:
    rows ``[:n]`` are prompt + right answer, rows ``[n:]`` (if any) the same prompts + a wrong
    answer, all left-padded so that the answers end at the last position.

    * ``nll``: the right answer's negative log-likelihood under the steered model (summed over its
      tokens, averaged over examples).
    * ``kl``: KL(unsteered || steered) of the next-token distribution at the position that
      predicts the right answer's first token.
    * ``loss="nll"`` (the default): ``nll + kl_weight * kl``; the wrong-answer rows are not run.
    * ``loss="choice"``: ``-log sigmoid(log p(right) - log p(wrong)) + kl_weight * kl``: the logistic
      loss of the two-way decision that log-likelihood scoring makes. Raising the right answer alone
      can raise the wrong one with it; this loss moves only their difference.

    Only ``strength``'s parameters receive gradients (the LLM is frozen and its reference pass
    runs without a graph).

    Raises:
        AusteerError: an unknown ``loss``, or ``"choice"`` on a batch without wrong-answer rows.
    """

    if loss not in STRENGTH_LOSSES:
        raise AusteerError(f"unknown strength loss '{loss}'; choose one of {', '.join(STRENGTH_LOSSES)}")
    device = input_device(model)
    n = int(batch["n_examples"])
    ids, mask, lengths = batch["input_ids"], batch["attention_mask"], batch["answer_lengths"]
    if loss == "choice" and ids.shape[0] != 2 * n:
        raise AusteerError(
            "the choice loss needs a wrong answer per example; collate the batch with collate_examples_train"
        )
    if loss == "nll" and ids.shape[0] != n:
        # The right answers only, without the pad columns that only the wrong answers needed.
        first = int(mask[:n].ne(0).any(0).long().argmax())
        ids, mask, lengths = ids[:n, first:], mask[:n, first:], lengths[:n]
    ids, mask, lengths = ids.to(device), mask.to(device), lengths.to(device)
    span = int(lengths.max())
    with EditHandle(model, layout, state, strength, token_scope):
        logits = padded_logits(model, ids, mask, span + 1).float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = logp.gather(-1, ids[:, -span:].unsqueeze(-1)).squeeze(-1)
    keep = torch.arange(span, device=device).unsqueeze(0) >= (span - lengths).unsqueeze(1)
    answer_logp = (picked * keep).sum(-1)  # (rows,) log-likelihood of each row's answer
    nll = -answer_logp[:n].mean()
    rows = torch.arange(n, device=device)
    answer_pos = (span - lengths)[:n]  # position (in the kept window) that predicts the first answer token
    with torch.no_grad():
        ref = torch.log_softmax(padded_logits(model, ids[:n], mask[:n], span + 1).float()[rows, answer_pos], dim=-1)
    steered = torch.log_softmax(logits[rows, answer_pos], dim=-1)
    kl = torch.sum(ref.exp() * (ref - steered), dim=-1).mean()
    task = nll if loss == "nll" else nn.functional.softplus(answer_logp[n:] - answer_logp[:n]).mean()
    return task + kl_weight * kl, nll, kl


def fold_strength(state, strength: nn.Module, metadata: dict[str, Any] | None = None):
    """``state`` with a learned strength function folded in, ready to save and apply without training code.

    A scalar becomes the state's ``scale`` (a plain state that any AUSteer loader applies); a gate
    is stored as ``strength_tensors`` with its closed description.
    """
    metadata = dict(state.metadata if metadata is None else metadata)
    if isinstance(strength, GateStrength):
        tensors = {k: v.detach().float().cpu().clone() for k, v in strength.state_dict().items()}
        return replace(state, strength=strength.config(), strength_tensors=tensors, metadata=metadata)
    if isinstance(strength, ScalarStrength):
        return replace(
            state, scale=strength.scale.detach().float().cpu().clone(), strength={"kind": "scalar"}, metadata=metadata
        )
    raise AusteerError(f"cannot fold a {type(strength).__name__} into a state")


def learned_fit_metadata(
    state,
    kind: str,
    *,
    val_accuracy: float,
    best_epoch: int,
    history: list[dict[str, float]],
    lr: float,
    kl_weight: float,
    loss: str = "nll",
) -> dict[str, Any]:
    """``state.metadata`` with its ``fit`` record extended by a learned-strength phase (the fixed
    rule's validation accuracy is kept as ``val_accuracy_momentum_rule``)."""
    fit = dict(state.metadata.get("fit", {}))
    fit.update(
        strength=kind,
        val_accuracy_momentum_rule=fit.get("val_accuracy"),
        val_accuracy=val_accuracy,
        strength_best_epoch=best_epoch,
        strength_history=history,
        strength_lr=lr,
        kl_weight=kl_weight,
        strength_loss=loss,
    )
    return {**state.metadata, "fit": fit}


def average_gradients(params, all_reduce_sum, n_local: int) -> None:
    """Turn each process's mean-over-its-rows gradient into the mean over the global batch.

    Every gradient is weighted by this process's share of the rows (``n_local / n_global``) and
    summed across processes, so uneven shards (the last batch of an epoch) weigh every example the
    same as a single process would. A process with no rows contributes zeros.
    """
    params = list(params)
    ref = params[0]
    n_global = float(all_reduce_sum(torch.tensor([float(n_local)], dtype=torch.float64, device=ref.device)))
    weight = n_local / n_global if n_global else 0.0
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.mul_(weight)
        p.grad.copy_(all_reduce_sum(p.grad))
