"""What a method costs outside its task: its chosen state's side effects on ordinary requests.

For each state: the mean per-token KL of the next-token distribution to the unsteered model on the
unsteered model's own answers to eight generic requests (:data:`~austeer_pl.fit.gridscore.GENERIC_PROMPTS`,
teacher-forced: :func:`~austeer_pl.fit.gridscore.harm_kl`, the harm budget's measure), and the free
greedy generations of the same requests, steered: their perplexity under the unsteered model (the
geometric mean over requests) and their distinct-2; and, given a task the method was not fitted for,
the accuracy on its examples and the change from the unsteered model's (:func:`off_task`).
``evaluate.py --compare`` puts them in each method's row beside its test accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from austeer_pl.core.sites import ModelLayout
from austeer_pl.fit.choose import predictions
from austeer_pl.fit.gridscore import GENERIC_PROMPTS, generic_texts, harm_kl
from austeer_pl.scoring.evaluate import default_scoring
from austeer_pl.scoring.fluency import distinct_n, mean_perplexity, perplexity
from austeer_pl.scoring.generation import generate_new_text
from austeer_pl.tasks.prompts import format_prompt
from austeer_pl.tasks.schema import Task, TaskExample

__all__ = ["off_task", "side_effects"]


def off_task(
    model: nn.Module,
    tokenizer,
    layout: ModelLayout,
    states: Mapping[str, Any],
    task: Task,
    examples: Sequence[TaskExample],
    *,
    chat_template: bool | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
) -> dict[str, dict[str, float]]:
    """``{name: {"off_task_accuracy", "off_task_change"}}``: each state's accuracy on ``examples`` of a task it
    was not fitted for, scored as that task is scored, and its change from the unsteered model's."""
    prompts = [format_prompt(tokenizer, task, ex.prompt, chat_template=chat_template) for ex in examples]
    answers = torch.tensor([ex.answer for ex in examples])
    scoring = default_scoring(task)

    def accuracy(state) -> float:
        steered = state if state is not None and state.k else None
        preds = predictions(
            model,
            tokenizer,
            task,
            steered,
            examples,
            prompts,
            scoring=scoring,
            batch_size=batch_size,
            max_length=max_length,
            layout=layout,
        )
        return float(preds.eq(answers).double().mean())

    base = accuracy(None)
    out = {}
    for name, state in states.items():
        value = base if state is None or not state.k else accuracy(state)
        out[name] = {"off_task_accuracy": value, "off_task_change": value - base}
    return out


def side_effects(
    model: nn.Module,
    tokenizer,
    layout: ModelLayout,
    states: Mapping[str, Any],
    *,
    max_new_tokens: int = 32,
    chat_template: bool | None = None,
) -> dict[str, dict[str, float | None]]:
    """``{name: {"kl_ordinary_text", "perplexity", "distinct_2"}}`` for each state (None: unsteered); a value
    that could not be measured is None (never NaN in a JSON report)."""
    names = list(states)
    texts = generic_texts(tokenizer, model, max_new_tokens=max_new_tokens, chat_template=chat_template)
    kl = harm_kl(model, tokenizer, layout, [states[n] for n in names], texts, replay=False)
    plain = Task("generic", ())
    prompts = [format_prompt(tokenizer, plain, p, chat_template=chat_template) for p in GENERIC_PROMPTS]
    out: dict[str, dict[str, float | None]] = {}
    for j, name in enumerate(names):
        state = states[name]
        steered = state if state is not None and state.k else None
        texts_out = generate_new_text(
            model, tokenizer, prompts, state=steered, layout=layout, max_new_tokens=max_new_tokens
        )
        ppl = mean_perplexity(perplexity(model, tokenizer, prompts, texts_out))
        d2 = float(distinct_n(texts_out, 2))
        # The teacher-forced KL steers every token as a prompt token: a state that steers only generated
        # tokens is not measured there (None), nor is any state when no ordinary text was generated.
        measured = bool(texts) and (steered is None or steered.token_scope != "generated")
        out[name] = {
            "kl_ordinary_text": float(kl[j]) if measured else None,
            "perplexity": ppl if math.isfinite(ppl) else None,
            "distinct_2": d2 if math.isfinite(d2) else None,
        }
    return out
