"""Accuracy of a (steered or unsteered) model on a task's examples.

Three scorings: ``loglik`` picks the choice with the highest log-likelihood (single- or
multi-token choices); ``generate`` generates greedily and counts an exact match (numerically for
math tasks: the last number of the generation); ``paper`` is the paper code's own (greedy
generation of its ``max_new_tokens``, lowercase exact match on one token or its number extraction:
:func:`austeer_pl.tasks.paper.paper_prediction`), the default of a task in the paper protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from austeer_pl.core.state import SteeringState
from austeer_pl.errors import AusteerError
from austeer_pl.scoring.generation import generate_new_text, generation_prediction
from austeer_pl.scoring.loglik import choice_logprobs
from austeer_pl.scoring.statistics import wilson_interval
from austeer_pl.tasks.paper.answers import paper_max_new_tokens, paper_prediction
from austeer_pl.tasks.prompts import format_prompt, join_for, prompt_prefix
from austeer_pl.tasks.schema import Task, TaskExample

SCORINGS = ("loglik", "generate", "paper")


def default_scoring(task: Task) -> str:
    if task.protocol == "paper":
        return "paper"
    return "generate" if task.scoring == "generate" else "loglik"


def check_scoring(scoring: str) -> str:
    if scoring not in SCORINGS:
        raise AusteerError(f"unknown scoring '{scoring}'; choose one of {', '.join(SCORINGS)}")
    return scoring


def answer_suffixes(prompt_text: str, choices: Sequence[str], task: Task | None = None) -> list[str]:
    """Each choice as the text that follows ``prompt_text`` (the joining rule of the task, :func:`~austeer_pl.tasks.join_for`)."""
    return [join_for(task or _DEFAULT, prompt_text, c)[len(prompt_text) :] for c in choices]


_DEFAULT = Task("default", ())


def prompt_texts(tokenizer, task: Task, examples: Sequence[TaskExample], chat_template: bool | None) -> list[str]:
    return [format_prompt(tokenizer, task, ex.prompt, chat_template=chat_template) for ex in examples]


def predict(
    model: nn.Module,
    tokenizer,
    task: Task,
    examples: Sequence[TaskExample],
    prompts: Sequence[str],
    *,
    scoring: str,
    batch_size: int = 16,
    max_length: int | None = None,
    max_new_tokens: int | None = None,
) -> torch.Tensor:
    """Predicted choice index per example (-1 when a generation matches no choice)."""
    check_scoring(scoring)
    if not examples:
        return torch.empty(0, dtype=torch.long)
    if scoring == "paper":
        config = getattr(model, "config", None)
        tokens = max_new_tokens or paper_max_new_tokens(
            task.name, str(getattr(config, "name_or_path", "")), getattr(config, "model_type", None)
        )
        texts = generate_new_text(
            model, tokenizer, prompts, max_new_tokens=tokens, batch_size=batch_size, max_length=max_length
        )
        return torch.tensor([paper_prediction(ex, t) for t, ex in zip(texts, examples)], dtype=torch.long)
    if scoring == "loglik":
        answers = [answer_suffixes(p, ex.choices, task) for p, ex in zip(prompts, examples)]
        scores = choice_logprobs(
            model,
            tokenizer,
            prompts,
            answers,
            batch_size=batch_size,
            max_length=max_length,
            prefix=prompt_prefix(tokenizer, task, prompts),
        )
        return torch.stack([s.argmax() for s in scores])
    numeric = task.scoring == "generate"
    if max_new_tokens is None:
        longest = max(
            len(t) for ex in examples for t in tokenizer(list(ex.choices), add_special_tokens=False)["input_ids"]
        )
        max_new_tokens = 16 if numeric else longest + 2
    texts = generate_new_text(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length
    )
    return torch.tensor(
        [generation_prediction(t, ex.choices, numeric=numeric) for t, ex in zip(texts, examples)], dtype=torch.long
    )


def class_label(ex: TaskExample, by_text: bool) -> str:
    return ex.target if by_text else f"choice {ex.answer}"


def accuracy_summary(examples: Sequence[TaskExample], preds: torch.Tensor) -> dict[str, Any]:
    """Accuracy with a 95% Wilson interval and per-class accuracy.

    Classes are the right answers' texts when a task has at most 10 distinct ones (yes/no,
    positive/negative), else the right answer's position among the choices.
    """
    answers = torch.tensor([ex.answer for ex in examples], dtype=torch.long)
    correct = preds.eq(answers)
    n, c = len(examples), int(correct.sum())
    ci = wilson_interval(c, n)
    by_text = len({ex.target for ex in examples}) <= 10
    per_class: dict[str, dict[str, float | int]] = {}
    labels = [class_label(ex, by_text) for ex in examples]
    for label in sorted(set(labels)):
        rows = torch.tensor([l == label for l in labels])
        k, m = int(correct[rows].sum()), int(rows.sum())
        per_class[label] = {"accuracy": k / m, "correct": k, "n": m}
    return {
        "accuracy": c / n if n else 0.0,
        "correct": c,
        "n": n,
        "per_example_correct": correct.long().tolist(),
        "ci_low": ci.low,
        "ci_high": ci.high,
        "unanswered": int(preds.eq(-1).sum()),
        "per_class": per_class,
    }


def evaluate_examples(
    model: nn.Module,
    tokenizer,
    task: Task,
    examples: Sequence[TaskExample],
    *,
    state: SteeringState | None = None,
    scoring: str | None = None,
    chat_template: bool | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    progress=None,
) -> dict[str, Any]:
    """Accuracy of ``model`` (steered with ``state`` when given) on ``examples``.

    Example:
        >>> evaluate_examples(model, tok, task, parts["test"], state=state)["accuracy"]
        0.71
    """
    if not examples:
        raise AusteerError("no examples to evaluate; check the split and --limit")
    scoring = check_scoring(scoring or default_scoring(task))
    prompts = prompt_texts(tokenizer, task, examples, chat_template)
    preds = []
    ctx = state.apply(model) if state is not None else nullcontext()
    with ctx:
        for start in range(0, len(examples), batch_size):
            chunk = slice(start, start + batch_size)
            preds.append(
                predict(
                    model,
                    tokenizer,
                    task,
                    examples[chunk],
                    prompts[chunk],
                    scoring=scoring,
                    batch_size=batch_size,
                    max_length=max_length,
                )
            )
            if progress is not None:
                progress(len(preds[-1]))
    return accuracy_summary(examples, torch.cat(preds))
