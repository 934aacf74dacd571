"""Each hub data set's rows, in its own schema, as :class:`~austeer_pl.tasks.schema.TaskExample` records
(the default protocol): one converter per data set, strict about missing fields and unlabelled rows,
and the generic schema of ``hub:owner/name``."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from austeer_pl.errors import AusteerError
from austeer_pl.tasks.schema import (
    TaskExample,
    check_choices,
    example_uid,
    number_field,
    numeric_choices,
    record_example,
    required_field,
    required_text,
    short_text,
)


def _rows(rows: Iterable[Mapping[str, Any]], dataset: str, split: str | None):
    for index, row in enumerate(rows):
        where = f"{dataset} {split} row {index}" if split else f"{dataset} row {index}"
        if not isinstance(row, Mapping):
            raise AusteerError(f"{where}: expected a dict row, got {type(row).__name__}; pass rows as dicts")
        yield index, row, where, example_uid(split, dataset, index)


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
        question = required_text(row, "question", where, fields).rstrip("?").strip()
        passage = required_text(row, "passage", where, fields)
        answer = required_field(row, "answer", where, fields)
        if isinstance(answer, str) and answer.strip().lower() in ("true", "false"):
            answer = answer.strip().lower() == "true"
        if answer not in (True, False, 0, 1):
            raise AusteerError(f"{where}: field 'answer' is {short_text(answer)}; it must be true or false")
        if not question or not passage:
            raise AusteerError(f"{where}: empty question or passage; give both")
        prompt = f"Passage: {passage}\nQuestion: {_capitalise(question)}?"
        out.append(TaskExample(prompt=prompt, choices=("no", "yes"), answer=int(bool(answer)), uid=uid))
    return out


def copa_examples(rows: Iterable[Mapping[str, Any]], *, split: str | None = None, seed: int = 0) -> list[TaskExample]:
    """Examples from COPA rows (``premise``, ``choice1``, ``choice2``, ``question``, ``label``): Balanced COPA
    (``pkavumba/balanced-copa``, the set the paper reads) or SuperGLUE's.

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
        premise = required_text(row, "premise", where, fields)
        choices = check_choices(
            [required_text(row, "choice1", where, fields), required_text(row, "choice2", where, fields)], where
        )
        kind = required_text(row, "question", where, fields).lower()
        if kind not in questions:
            raise AusteerError(f"{where}: field 'question' is {short_text(kind)}; it must be 'cause' or 'effect'")
        label = required_field(row, "label", where, fields)
        if isinstance(label, bool) or label not in (0, 1):
            raise AusteerError(
                f"{where}: field 'label' is {short_text(label)}; it must be 0 or 1 (unlabelled test rows cannot be used)"
            )
        prompt = f"Premise: {premise}\n{questions[kind]}\nOption 1: {choices[0]}\nOption 2: {choices[1]}"
        out.append(TaskExample(prompt=prompt, choices=choices, answer=int(label), uid=uid))
    return out


def winogrande_examples(
    rows: Iterable[Mapping[str, Any]], *, split: str | None = None, seed: int = 0
) -> list[TaskExample]:
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
        sentence = required_text(row, "sentence", where, fields)
        if "_" not in sentence:
            raise AusteerError(f"{where}: field 'sentence' has no '_' blank; mark the blank with an underscore")
        choices = check_choices(
            [required_text(row, "option1", where, fields), required_text(row, "option2", where, fields)], where
        )
        answer = str(required_field(row, "answer", where, fields)).strip()
        if answer not in ("1", "2"):
            raise AusteerError(
                f"{where}: field 'answer' is {short_text(answer)}; it must be '1' or '2' (unlabelled test rows cannot be used)"
            )
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
        body = required_text(row, "Body", where, fields)
        question = required_text(row, "Question", where, fields)
        answer = number_field(required_field(row, "Answer", where, fields), where, "Answer")
        if not question:
            raise AusteerError(f"{where}: field 'Question' is empty; give the question text")
        out.append(_numeric_example(f"{body} {question}".strip(), answer, uid, seed))
    return out


def mawps_examples(rows: Iterable[Mapping[str, Any]], *, split: str | None = None, seed: int = 0) -> list[TaskExample]:
    """Examples from ``garrethlee/MAWPS`` rows (``question``, ``answer`` ending in ``#### N``), the data set
    the paper reads; rows in ``MU-NLPC/Calc-mawps``'s schema (``result_float`` or ``result``) are read too.

    Example:
        >>> mawps_examples([{"question": "Tom has 2 apples and buys 3 more. How many?", "answer": "2 + 3 = 5 #### 5"}])[0].choices[0]
        '5'
    """
    fields = "question, answer (ending in '#### N'; or result_float, result)"
    out = []
    for _, row, where, uid in _rows(rows, "mawps", split):
        question = required_text(row, "question", where, fields)
        if not question:
            raise AusteerError(f"{where}: field 'question' is empty; give the problem text")
        if row.get("answer") is not None:
            answer = _final_answer(required_text(row, "answer", where, fields), where)
        else:
            name = "result_float" if row.get("result_float") is not None else "result"
            answer = number_field(required_field(row, name, where, fields), where, name)
        out.append(_numeric_example(question, answer, uid, seed))
    return out


_FINAL_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def gsm8k_examples(rows: Iterable[Mapping[str, Any]], *, split: str | None = None, seed: int = 0) -> list[TaskExample]:
    """Examples from ``openai/gsm8k`` (config ``main``) rows (``question``, ``answer`` ending in ``#### N``).

    Example:
        >>> gsm8k_examples([{"question": "2 + 2?", "answer": "2 + 2 = 4\\n#### 4"}])[0].choices[0]
        '4'
    """
    fields = "question, answer"
    out = []
    for _, row, where, uid in _rows(rows, "gsm8k", split):
        question = required_text(row, "question", where, fields)
        if not question:
            raise AusteerError(f"{where}: field 'question' is empty; give the problem text")
        out.append(
            _numeric_example(question, _final_answer(required_text(row, "answer", where, fields), where), uid, seed)
        )
    return out


def _final_answer(solution: str, where: str) -> float:
    """The number after a worked solution's ``####`` (GSM8K and MAWPS write ``... #### N``)."""
    match = _FINAL_ANSWER.search(solution)
    if match is None:
        raise AusteerError(f"{where}: field 'answer' has no '#### <number>' final answer; end it with '#### N'")
    return number_field(match.group(1), where, "answer")


def generic_examples(
    rows: Iterable[Mapping[str, Any]], *, split: str | None = None, seed: int = 0, dataset: str = "dataset"
) -> list[TaskExample]:
    """Examples from rows in the generic schema (``prompt, choices, answer`` or ``prompt, positive, negative``).

    This is the schema of ``hub:owner/name`` datasets and of local files.

    Example:
        >>> generic_examples([{"prompt": "2 + 2 =", "choices": ["4", "5"], "answer": "4"}])[0].answer
        0
    """
    return [record_example(row, where, uid) for _, row, where, uid in _rows(rows, dataset, split)]


__all__ = [
    "boolq_examples",
    "copa_examples",
    "generic_examples",
    "gsm8k_examples",
    "mawps_examples",
    "svamp_examples",
    "winogrande_examples",
]
