"""Prompting a task instead of (or before) steering it: a zero-shot instruction and few-shot demonstrations.

Both are data settings (:class:`~austeer_pl.tasks.config.DataConfig` ``instruction`` and ``shots``), so a
prompted task is fitted, evaluated and compared like any other, and a state fitted on a prompted task
records its prompt:

* ``instruction="auto"`` puts :func:`zero_shot_instruction` (the task's one-sentence description, and the
  answers to choose from when every example offers the same ones) before the task's own instruction;
  any other text is put there as written.
* ``shots=n`` shows ``n`` demonstrations before every prompt: training examples with their right answer,
  drawn by the split seed and balanced over the right answers (:func:`draw_demonstrations`).

Example:
    >>> task, splits = DataConfig(task="rotten_tomatoes", instruction="auto", shots=4).load()
    >>> len(task.demonstrations), task.instruction[:40]
    (4, 'Classify the sentiment of a movie review')
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from austeer_pl.errors import AusteerError
from austeer_pl.tasks.schema import Task, TaskExample

__all__ = ["AUTO_INSTRUCTION", "draw_demonstrations", "prompted_task", "zero_shot_instruction"]

#: The ``instruction`` value that asks for :func:`zero_shot_instruction`.
AUTO_INSTRUCTION = "auto"
#: Answers are listed in the zero-shot instruction when every example offers the same set of at most this many.
MAX_LISTED_CHOICES = 10


def zero_shot_instruction(task: Task) -> str:
    """The zero-shot instruction of ``task``: its description, then the answers to choose from (a
    multiple-choice task whose examples all offer the same few answers), ending in a blank line.

    Example:
        >>> zero_shot_instruction(rotten_tomatoes)
        'Classify the sentiment of a movie review as positive or negative. Answer with one word: negative or positive.\\n\\n'
    """
    parts = []
    if task.description:
        parts.append(task.description.rstrip(" .") + ".")
    sets = {tuple(sorted(ex.choices)) for ex in task.examples}
    if not task.behaviour and len(sets) == 1:
        (choices,) = sets
        if len(choices) <= MAX_LISTED_CHOICES and all(len(c.split()) <= 3 for c in choices):
            words = "one word" if all(len(c.split()) == 1 for c in choices) else "one of"
            parts.append(f"Answer with {words}: {' or '.join(choices)}.")
    if not parts:
        parts.append("Choose the best answer.")
    return " ".join(parts) + "\n\n"


def draw_demonstrations(train: Sequence[TaskExample], shots: int, seed: int) -> tuple[tuple[str, str], ...]:
    """``shots`` training examples as ``(prompt, right answer)``, balanced over the right answers.

    The right answers are taken in turn (sorted by text), each from its own examples shuffled by
    ``seed``, and the demonstrations are then shuffled by ``seed`` so that no answer always comes last.
    The draw for ``n`` shots starts with the draw for fewer only when the classes divide evenly; it is a
    function of the training split, the seed and ``shots`` alone.

    Raises:
        AusteerError: fewer training examples than ``shots``.
    """
    if shots <= 0:
        return ()
    if shots > len(train):
        raise AusteerError(
            f"shots={shots} needs {shots} training examples, but the training split has {len(train)}; lower --data.shots"
        )
    rng = random.Random(f"demonstrations:{seed}")
    by_answer: dict[str, list[TaskExample]] = {}
    for ex in train:
        by_answer.setdefault(ex.target, []).append(ex)
    pools = [by_answer[key] for key in sorted(by_answer)]
    for pool in pools:
        rng.shuffle(pool)
    picked: list[TaskExample] = []
    cursor = [0] * len(pools)
    while len(picked) < shots:
        for i, pool in enumerate(pools):
            if len(picked) < shots and cursor[i] < len(pool):
                picked.append(pool[cursor[i]])
                cursor[i] += 1
    rng.shuffle(picked)
    return tuple((ex.prompt, ex.target) for ex in picked)


def prompted_task(task: Task, train: Sequence[TaskExample], *, instruction: str | None, shots: int, seed: int) -> Task:
    """``task`` with the prompt of the data settings ``instruction`` and ``shots`` (see the module docstring).

    Raises:
        AusteerError: the paper protocol (its prompts are the paper code's, fed raw).
    """
    if instruction is None and not shots:
        return task
    if task.protocol == "paper":
        raise AusteerError(
            "the paper protocol feeds the paper code's prompts raw; drop --data.instruction and --data.shots"
        )
    changes: dict[str, object] = {}
    if instruction is not None:
        extra = zero_shot_instruction(task) if instruction.strip().lower() == AUTO_INSTRUCTION else instruction
        if extra and not extra[-1].isspace():
            extra += "\n"
        changes["instruction"] = extra + task.instruction
    if shots:
        changes["demonstrations"] = draw_demonstrations(train, shots, seed)
    return dataclasses.replace(task, **changes)
