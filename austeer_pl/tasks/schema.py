"""The task records: :class:`TaskExample` (a prompt, its choices, the right one), :class:`ContrastivePair`
(prompt + right answer vs. prompt + wrong answer) and :class:`Task`, and the row validators every
source shares, so a bad row is one line naming the file, the row and the field."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from austeer_pl.core.fileio import parse_json
from austeer_pl.errors import AusteerError

TASK_SCORINGS = ("choice", "generate")


SPLIT_NAMES = ("train", "validation", "test")


NEGATIVE_MODES = ("sample", "all")


DEFAULT_ANSWER_PREFIX = "Answer:"


SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}


@dataclass(frozen=True)
class TaskExample:
    """One labelled multiple-choice example.

    Attributes:
        prompt: The question or context, without the answer.
        choices: The candidate answers, stripped of surrounding whitespace, all distinct.
        answer: Index of the right choice in ``choices``.
        uid: A stable id (``"file.jsonl:12"``, ``"strategyqa:3"``, ``"train:41"``); a ``train:``,
            ``validation:`` or ``test:`` prefix marks a predefined split.
    """

    prompt: str
    choices: tuple[str, ...]
    answer: int
    uid: str

    def __post_init__(self) -> None:
        if not isinstance(self.choices, tuple):
            object.__setattr__(self, "choices", tuple(self.choices))
        if len(self.choices) < 2:
            raise AusteerError(
                f"example {self.uid!r}: {len(self.choices)} choice(s); give at least 2 choices (one right, one or more wrong)"
            )
        if (
            isinstance(self.answer, bool)
            or not isinstance(self.answer, int)
            or not 0 <= self.answer < len(self.choices)
        ):
            raise AusteerError(
                f"example {self.uid!r}: answer {self.answer!r} is not a valid index for {len(self.choices)} choices; use 0..{len(self.choices) - 1}"
            )

    @property
    def target(self) -> str:
        """The right choice."""
        return self.choices[self.answer]

    @property
    def wrong_choices(self) -> tuple[str, ...]:
        """The wrong choices, in order."""
        return tuple(c for i, c in enumerate(self.choices) if i != self.answer)

    @property
    def split(self) -> str | None:
        """The predefined split (``"train"``, ``"validation"`` or ``"test"``) named by the uid prefix, if any."""
        head, sep, _ = self.uid.partition(":")
        return head if sep and head in SPLIT_NAMES else None


@dataclass(frozen=True)
class ContrastivePair:
    """A prompt with a right (positive) and a wrong (negative) answer.

    Attributes:
        prompt: The example's prompt (unformatted: pass it through :func:`format_prompt`).
        positive: The right choice.
        negative: A wrong choice.
        example_uid: The uid of the example the pair came from.
    """

    prompt: str
    positive: str
    negative: str
    example_uid: str


@dataclass(frozen=True)
class Task:
    """A named list of examples and how to present them.

    Attributes:
        name: Short task name (``"rotten_tomatoes"``, ``"boolq"``, a file stem...).
        examples: The examples.
        scoring: ``"choice"`` (compare the log-likelihood of each choice) or ``"generate"``
            (generate an answer and match it, numerically for math tasks).
        instruction: Text put before every prompt (empty, or ending in whitespace).
        answer_prefix: Text put after the prompt, before the answer (e.g. ``"Answer:"``).
        behaviour: a behaviour task (the choices are continuations to write, not answers to pick):
            ``train.py`` chooses by a judge of generated text and ``evaluate.py`` reports it.
        protocol: ``default`` (this project's prompts) or ``paper`` (the AUSteer paper code's, see
            :mod:`austeer_pl.tasks.paper`): prompts are fed raw and answers follow them without a separator.
        description: One sentence saying what the task asks (a BIG-bench file's ``description``); the
            zero-shot prompting baseline's instruction is made from it (:mod:`austeer_pl.tasks.prompting`).
        demonstrations: ``(prompt, answer)`` examples shown before every prompt (few-shot prompting:
            chat turns with a chat template, ``prompt / answer prefix answer`` blocks without).
    """

    name: str
    examples: tuple[TaskExample, ...]
    scoring: str = "choice"
    instruction: str = ""
    answer_prefix: str = DEFAULT_ANSWER_PREFIX
    behaviour: bool = False
    protocol: str = "default"
    description: str = ""
    demonstrations: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.examples, tuple):
            object.__setattr__(self, "examples", tuple(self.examples))
        if self.scoring not in TASK_SCORINGS:
            raise AusteerError(
                f"task {self.name!r}: unknown scoring {self.scoring!r}; use one of {', '.join(TASK_SCORINGS)}"
            )


def short_text(value: Any, limit: int = 60) -> str:
    """A one-line repr of ``value``, cut to about ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def canonical_split(name: str) -> str:
    base = re.split(r"[\[+]", str(name), maxsplit=1)[0].strip()
    return SPLIT_ALIASES.get(base.lower(), base)


def example_uid(split: str | None, default_prefix: str, index: int | str) -> str:
    return f"{split}:{index}" if split else f"{default_prefix}:{index}"


def check_choices(choices: Sequence[str], where: str) -> tuple[str, ...]:
    """Strip ``choices`` and check there are at least two, none empty, none repeated."""
    if len(choices) == 0:
        raise AusteerError(f"{where}: choices is empty; give at least 2 choices (one right, one or more wrong)")
    out = []
    for i, choice in enumerate(choices):
        if isinstance(choice, bool) or not isinstance(choice, str | int | float):
            raise AusteerError(
                f"{where}: choice {i} is {type(choice).__name__} {short_text(choice)}; choices must be strings"
            )
        text = choice.strip() if isinstance(choice, str) else _format_number(float(choice))
        if not text:
            raise AusteerError(f"{where}: choice {i} is empty; every choice needs some text")
        out.append(text)
    if len(out) < 2:
        raise AusteerError(
            f"{where}: only 1 choice ({short_text(out[0])}); give at least 2 choices (one right, one or more wrong)"
        )
    seen: set[str] = set()
    for text in out:
        if text in seen:
            raise AusteerError(
                f"{where}: duplicate choice {short_text(text)}; choices must be distinct, remove or reword the repeat"
            )
        seen.add(text)
    return tuple(out)


def _parse_answer(value: Any, choices: tuple[str, ...], where: str) -> int:
    """Read ``answer``: an int index, or a string equal to a choice (else an integer string)."""
    n = len(choices)
    fix = f"give the 0-based index (0..{n - 1}) or the exact text of the right choice"
    if isinstance(value, bool) or value is None:
        raise AusteerError(f"{where}: answer is {short_text(value)}; {fix}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        if not 0 <= value < n:
            raise AusteerError(f"{where}: answer {value} is out of range for {n} choices; {fix}")
        return value
    if isinstance(value, str):
        text = value.strip()
        if text in choices:
            return choices.index(text)
        if re.fullmatch(r"[+-]?\d{1,18}", text):
            return _parse_answer(int(text), choices, where)
        if re.fullmatch(r"[+-]?\d+", text):
            raise AusteerError(f"{where}: answer {short_text(text)} is out of range for {n} choices; {fix}")
        if not text:
            raise AusteerError(f"{where}: answer is empty; {fix}")
        raise AusteerError(
            f"{where}: answer {short_text(text)} is not among the choices {short_text(list(choices), 120)}; {fix}"
        )
    raise AusteerError(f"{where}: answer is {type(value).__name__} {short_text(value)}; {fix}")


def _parse_choices_cell(value: Any, where: str) -> list[Any]:
    """Choices from a JSON list, or from a CSV cell (a JSON-encoded list or ``a|b|c``)."""
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            parsed = parse_json(text, f"{where}: choices", fix="write it as a JSON list or as a|b|c")
            if not isinstance(parsed, list):
                raise AusteerError(f"{where}: choices must be a list; write it as a JSON list or as a|b|c")
            return parsed
        return [] if not text else [part for part in text.split("|")]
    raise AusteerError(f"{where}: choices is {type(value).__name__} {short_text(value)}; give a list of strings")


def required_field(row: Mapping[str, Any], name: str, where: str, fields: str) -> Any:
    if name not in row or row[name] is None:
        raise AusteerError(f"{where}: missing field '{name}'; each row needs the fields {fields}")
    return row[name]


def required_text(row: Mapping[str, Any], name: str, where: str, fields: str) -> str:
    value = required_field(row, name, where, fields)
    if not isinstance(value, str):
        raise AusteerError(
            f"{where}: field '{name}' is {type(value).__name__} {short_text(value)}; it must be a string"
        )
    return value.strip()


RECORD_FIELDS = "prompt, choices, answer (or prompt, positive, negative)"


def record_example(row: Any, where: str, uid: str) -> TaskExample:
    """One example from a row in the generic schema (local files and ``hub:`` datasets)."""
    if not isinstance(row, Mapping):
        raise AusteerError(f"{where}: expected an object with the fields {RECORD_FIELDS}, got {type(row).__name__}")
    prompt = required_text(row, "prompt", where, RECORD_FIELDS)
    if not prompt:
        raise AusteerError(f"{where}: field 'prompt' is empty; give the question or context text")
    if row.get("choices") is not None:
        choices = check_choices(_parse_choices_cell(row["choices"], where), where)
        answer = _parse_answer(required_field(row, "answer", where, RECORD_FIELDS), choices, where)
    elif row.get("positive") is not None or row.get("negative") is not None:
        positive = required_field(row, "positive", where, RECORD_FIELDS)
        negative = required_field(row, "negative", where, RECORD_FIELDS)
        choices = check_choices([positive, negative], where)
        answer = 0
    else:
        raise AusteerError(f"{where}: missing field 'choices'; each row needs the fields {RECORD_FIELDS}")
    split = row.get("split")
    if split is not None and split != "":
        canonical = SPLIT_ALIASES.get(str(split).strip().lower())
        if canonical is None:
            raise AusteerError(
                f"{where}: split {short_text(split)} is not one of {', '.join(SPLIT_NAMES)}; fix or drop the field"
            )
        uid = f"{canonical}:{uid}"
    return TaskExample(prompt=prompt, choices=choices, answer=answer, uid=uid)


def _format_number(value: float) -> str:
    """``72.0`` -> ``"72"``, ``2.5`` -> ``"2.5"``, ``1/3`` -> ``"0.3333333333"``."""
    if math.isfinite(value) and abs(value - round(value)) < 1e-9:
        return str(round(value))
    return format(value, ".10g")


def number_field(value: Any, where: str, field: str) -> float:
    if isinstance(value, bool):
        raise AusteerError(f"{where}: field '{field}' is a boolean; it must be a number")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(",", "").replace("$", "").rstrip(".")
        try:
            number = float(text)
        except ValueError:
            raise AusteerError(
                f"{where}: field '{field}' is {short_text(value)}, not a number; fix the answer value"
            ) from None
    else:
        raise AusteerError(
            f"{where}: field '{field}' is {type(value).__name__} {short_text(value)}; it must be a number"
        )
    if not math.isfinite(number):
        raise AusteerError(f"{where}: field '{field}' is {number}; it must be a finite number")
    return number


def numeric_choices(answer: float, *, uid: str, seed: int = 0) -> tuple[str, str]:
    """The right number and one wrong number, chosen deterministically from ``seed`` and ``uid``.

    The wrong number is the answer plus a nonzero integer offset of at most ``max(3, 20% of |answer|)``,
    kept non-negative when the answer is.

    Args:
        answer: The right numeric answer.
        uid: The example's uid (so each example gets its own offset).
        seed: Changes every offset.

    Returns:
        ``(right, wrong)`` as strings.

    Example:
        >>> numeric_choices(12, uid="train:0", seed=0)[0]
        '12'
    """
    rng = random.Random(f"{seed}:{uid}")
    magnitude = rng.randint(1, max(3, int(abs(answer) * 0.2)))
    offset = magnitude if rng.random() < 0.5 else -magnitude
    wrong = answer + offset
    if answer >= 0 and wrong < 0:
        wrong = answer + magnitude
    right_text, wrong_text = _format_number(answer), _format_number(wrong)
    if wrong_text == right_text:  # only for huge floats where the offset vanishes
        wrong_text = _format_number(answer * 2 + 1)
    return right_text, wrong_text


def split_files(text: str | None) -> list[str]:
    """A comma-separated list of paths (``--data.task_files``), blanks dropped."""
    return [p.strip() for p in str(text or "").split(",") if p.strip()]
