"""Scoring many steering states on the same examples for little more than the price of one.

Every grid point of a fit edits a few layers and leaves everything below its first steered layer
exactly as the unsteered model computes it. :class:`LayerReplay` records, during the unsteered
forward passes over a batch, what each decoder layer returned; a steered pass over the same
batch then skips the layers below its first steered layer and starts from the recorded output
(bit-identical to computing them: the same inputs, the same batch, the same kernels). On the
embedded model AUSteer's units sit in the upper half, so a grid point costs about half a forward.

:class:`GridScorer` uses it to turn a list of states into per-example statistics of the
multiple-choice decision: whether the right choice wins, the margin of its log-likelihood over
the best wrong choice, and the choice log-loss ``logsumexp(choices) - log p(right)`` (the
cross-entropy of the decision the log-likelihood scoring makes). The last two are continuous:
they separate grid points a few accuracy points apart on a hundred examples, where accuracy
cannot. :func:`harm_kl` measures what a state does to ordinary text.

Replay holds for teacher-forced scoring only (``loglik``): a generated continuation depends on the
state, so what the unsteered pass recorded would not be the same input.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from austeer_pl.core.placement import input_device
from austeer_pl.core.reading import is_unreplayed, padded_logits
from austeer_pl.core.sites import ModelLayout
from austeer_pl.core.tokens import encode_answers, pad_id_of, pad_ids
from austeer_pl.errors import AusteerError
from austeer_pl.scoring.evaluate import answer_suffixes
from austeer_pl.scoring.generation import generate_new_text
from austeer_pl.scoring.loglik import (
    DECISION_STATISTICS,
    choice_logprobs,
    decision_statistics,
)
from austeer_pl.tasks.prompts import format_prompt, prompt_prefix
from austeer_pl.tasks.schema import Task


def first_layer(state: Any) -> int:
    """The lowest decoder layer a state edits (0 for a state without units, which is never replayed)."""
    return int(state.layer.min()) if state is not None and state.k > 0 else 0


class LayerReplay:
    """Record the decoder layers' outputs of unsteered passes; replay them below a steered layer.

    Forward passes are counted by a pre-hook on the model, so a scorer that runs several forwards
    per batch (long answers) replays each from its own recording.

    Example:
        >>> replay = LayerReplay(model, layout, max_layer=12)
        >>> with replay.recording():
        ...     base = score(model)          # unsteered: records layers 0..11
        >>> with replay.replaying(12), state.apply(model):
        ...     steered = score(model)       # layers 0..11 are not computed
    """

    def __init__(self, model: nn.Module, layout: ModelLayout, max_layer: int) -> None:
        self.model = model
        self.layers = layout.layers
        self.max_layer = min(int(max_layer), len(self.layers))
        self.records: list[list[Any]] = []
        self._calls = 0

    def _count(self, *_args, **_kwargs) -> None:
        if not is_unreplayed():  # a shared prefix's prefill computes every layer, every time
            self._calls += 1

    @contextmanager
    def recording(self):
        """Unsteered passes; each forward's layer outputs (below ``max_layer``) are kept."""
        self.records = []
        self._calls = 0
        handles = [self.model.register_forward_pre_hook(self._count)]

        def keep(index):
            def hook(_module, _args, output):
                if is_unreplayed():
                    return
                forward = self._calls - 1
                while len(self.records) <= forward:
                    self.records.append([None] * self.max_layer)
                self.records[forward][index] = output

            return hook

        handles += [self.layers[i].register_forward_hook(keep(i)) for i in range(self.max_layer)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def replaying(self, start: int):
        """Passes that skip layers ``0..start-1``: they return the recorded output of layer ``start - 1``."""
        start = min(int(start), self.max_layer)
        if start <= 0:
            yield self
            return
        self._calls = 0
        handle = self.model.register_forward_pre_hook(self._count)

        def skipping(layer):
            own = vars(layer).get("forward")  # an instance forward (e.g. accelerate's dispatch wrapper) is kept
            computed = own if own is not None else type(layer).forward.__get__(layer)

            def skipped(*args, **kwargs):
                if is_unreplayed():
                    return computed(*args, **kwargs)
                forward = self._calls - 1
                if forward >= len(self.records):
                    raise AusteerError(
                        "a replayed pass ran more forwards than its recording; replay only the passes that were recorded"
                    )
                return self.records[forward][start - 1]

            return own, skipped

        patched = [(layer, *skipping(layer)) for layer in self.layers[:start]]
        for layer, _own, skipped in patched:
            layer.forward = skipped  # an instance attribute shadows the class's forward
        try:
            yield self
        finally:
            handle.remove()
            for layer, own, _skipped in patched:
                if own is None:
                    del layer.forward
                else:
                    layer.forward = own


class GridScorer:
    """Per-example decision statistics of many states on the same examples (see the module docs).

    Args:
        model, tokenizer, layout: the frozen model, its tokenizer and located units.
        task: the task (its answer-joining rule).
        batch_size: examples per batch (each batch is recorded once and replayed for every state).
        max_length: truncate sequences from the left to this many tokens.
        replay: skip the layers below each state's first steered layer (exact; on by default).
    """

    def __init__(
        self,
        model,
        tokenizer,
        layout: ModelLayout,
        task,
        *,
        batch_size: int = 32,
        max_length: int | None = None,
        replay: bool = True,
    ) -> None:
        self.model, self.tokenizer, self.layout, self.task = model, tokenizer, layout, task
        self.batch_size = batch_size
        self.max_length = max_length
        self.replay = replay

    def _logprobs(self, examples, prompts) -> list[torch.Tensor]:

        answers = [answer_suffixes(p, ex.choices, self.task) for p, ex in zip(prompts, examples)]
        return choice_logprobs(
            self.model,
            self.tokenizer,
            prompts,
            answers,
            batch_size=self.batch_size,
            max_length=self.max_length,
            prefix=prompt_prefix(self.tokenizer, self.task, prompts),
        )

    def score(self, states: Sequence[Any], examples, prompts) -> torch.Tensor:
        """``(len(states), len(examples), 3)`` float64 statistics (:data:`DECISION_STATISTICS`); a None state is the unsteered model."""
        out = torch.empty(len(states), len(examples), len(DECISION_STATISTICS), dtype=torch.float64)
        if not examples or not states:
            return out
        answers = [ex.answer for ex in examples]
        starts = [first_layer(s) for s in states]
        top = max(starts) if self.replay else 0
        replay = LayerReplay(self.model, self.layout, top)
        for lo in range(0, len(examples), self.batch_size):
            hi = min(lo + self.batch_size, len(examples))
            ex, pr = examples[lo:hi], prompts[lo:hi]
            with replay.recording() if top > 0 else nullcontext():
                base = decision_statistics(self._logprobs(ex, pr), answers[lo:hi])
            for j, state in enumerate(states):
                if state is None or state.k == 0:
                    out[j, lo:hi] = base
                    continue
                with replay.replaying(starts[j] if self.replay else 0), state.apply(self.model, layout=self.layout):
                    out[j, lo:hi] = decision_statistics(self._logprobs(ex, pr), answers[lo:hi])
        return out


# ---------------------------------------------------------------------------- harm to ordinary text
#: Ordinary requests, none about any task: the steered model's next-token distribution on the
#: unsteered model's own answers to them is compared with the unsteered one (:func:`harm_kl`).
GENERIC_PROMPTS = (
    "Write one sentence about the sea.",
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain what a noun is to a child.",
    "Describe your favourite season and why.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
    "Write a short thank-you note to a friend.",
)


def generic_texts(
    tokenizer, model, *, max_new_tokens: int = 32, batch_size: int = 8, chat_template: bool | None = None
) -> list[tuple[str, str]]:
    """``(prompt, continuation)``: each :data:`GENERIC_PROMPTS` formatted as a user turn, with the unsteered model's greedy answer."""

    plain = Task("generic", ())
    prompts = [format_prompt(tokenizer, plain, p, chat_template=chat_template) for p in GENERIC_PROMPTS]
    continuations = generate_new_text(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [(p, c) for p, c in zip(prompts, continuations) if c.strip()]


@torch.inference_mode()
def harm_kl(
    model,
    tokenizer,
    layout: ModelLayout,
    states: Sequence[Any],
    texts: Sequence[tuple[str, str]],
    *,
    replay: bool = True,
) -> torch.Tensor:
    """``(len(states),)`` float64: mean per-token KL(unsteered || steered) of the next-token distribution
    over the continuations of ``texts`` (teacher-forced; see :func:`generic_texts`). 0 for None.

    One batch holds every text; the unsteered pass is recorded once and replayed below each state's
    first steered layer.
    """

    out = torch.zeros(len(states), dtype=torch.float64)
    if not texts or not states:
        return out
    device = input_device(model)
    prompt_ids, cont_ids = encode_answers(tokenizer, [p for p, _ in texts], [c for _, c in texts])
    seqs = [p + c for p, c in zip(prompt_ids, cont_ids)]
    ids, mask = pad_ids(seqs, pad_id_of(tokenizer), device=device)
    span = max(len(c) for c in cont_ids)
    lens = torch.tensor([len(c) for c in cont_ids], device=device)
    keep = torch.arange(span, device=device).unsqueeze(0) >= (span - lens).unsqueeze(
        1
    )  # (B, span): continuation positions

    def logp() -> torch.Tensor:
        logits = padded_logits(model, ids, mask, span + 1)
        return torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts token t + 1

    starts = [first_layer(s) for s in states]
    top = max(starts) if replay else 0
    rec = LayerReplay(model, layout, top)
    with rec.recording() if top > 0 else nullcontext():
        base = logp()
    p = base.exp()
    for j, state in enumerate(states):
        if state is None or state.k == 0:
            continue
        with rec.replaying(starts[j] if replay else 0), state.apply(model, layout=layout):
            steered = logp()
        kl = (p * (base - steered)).sum(-1)  # (B, span)
        out[j] = float(kl[keep].double().mean())
    return out


__all__ = [
    "GENERIC_PROMPTS",
    "GridScorer",
    "LayerReplay",
    "first_layer",
    "generic_texts",
    "harm_kl",
]
