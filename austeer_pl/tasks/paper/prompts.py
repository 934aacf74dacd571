"""The paper's prompt templates, character for character, and how each task's row gives its fields and answer
(``utils/load_dataset.py`` of the paper code)."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

from austeer_pl.errors import AusteerError


def _field(row: Mapping[str, Any], name: str, task: str, fields: Sequence[str]) -> Any:
    if not isinstance(row, Mapping):
        raise AusteerError(f"{task} row: expected a dict row, got {type(row).__name__}; pass rows as dicts")
    if name not in row or row[name] is None:
        raise AusteerError(
            f"{task} row: missing field '{name}'; the paper protocol reads the fields {', '.join(fields)}"
        )
    return row[name]


def _text(row: Mapping[str, Any], name: str, task: str, fields: Sequence[str]) -> str:
    value = _field(row, name, task, fields)
    if not isinstance(value, str):
        raise AusteerError(f"{task} row: field '{name}' is {type(value).__name__}, not text; it must be a string")
    return value


BOOLQ_FIELDS = ("question", "passage", "answer")
BOOLQ_TEMPLATE = (
    "Is the answer to the question encapsulated in the passage? Please confirm with 'yes' or 'no'."
    "\n\nPassage: {passage}\n\nQuestion: {question}\n\nAnswer:"
)


def boolq_prompt(row: Mapping[str, Any]) -> str:
    """The paper's BoolQ prompt (load_dataset.py:110-112): question and passage stripped, the
    question left as BoolQ writes it (lower case, no question mark)."""
    question = _text(row, "question", "boolq", BOOLQ_FIELDS).strip()
    passage = _text(row, "passage", "boolq", BOOLQ_FIELDS).strip()
    return BOOLQ_TEMPLATE.format(passage=passage, question=question)


def boolq_truth(row: Mapping[str, Any]) -> bool:
    # The paper compares str(answer).strip() with 'True'/'False' and has no other branch.
    text = str(_field(row, "answer", "boolq", BOOLQ_FIELDS)).strip()
    if text not in ("True", "False"):
        raise AusteerError(
            f"boolq row: field 'answer' is {text!r}; it must be true or false (a bool, or 'True'/'False')"
        )
    return text == "True"


COPA_FIELDS = ("premise", "choice1", "choice2", "question", "label")
COPA_TEMPLATE = "Question:\n{premise} Based on the previous passage, choose the most reasonable {question}.\nA:{choice1}\nB:{choice2}\n\nAnswer:\n"


#: The column order of the CSV the paper splits on commas (load_dataset.py:49-50 read columns 0, 2, 3, 4, 5).
COPA_CSV_COLUMNS = ("label", "id", "premise", "question", "choice1", "choice2", "mirrored")


def copa_fields(row: Mapping[str, Any], *, csv_split: bool = True) -> dict[str, str]:
    """``label, premise, question, choice1, choice2`` of a COPA row as the paper sees them.

    The paper reads ``train.csv``/``test.csv`` with ``line.strip().split(',')`` and takes columns
    0, 2, 3, 4 and 5, each stripped (load_dataset.py:49-50 and 61-63): a field that holds a comma
    is split, and the quotes a CSV writer put around it stay. With ``csv_split`` the row is
    written as that CSV line (columns :data:`COPA_CSV_COLUMNS`, minimal quoting, as Python's csv
    module and pandas write) and split the same way, so such rows come out as garbled as in the
    paper; rows without commas or quotes are unaffected. Without it, the fields are taken whole.

    Example:
        >>> copa_fields({"premise": "I was cold, so I shut the window.", "choice1": "a", "choice2": "b",
        ...              "question": "effect", "label": 0})["question"]
        'so I shut the window."'
    """
    for name in COPA_FIELDS:
        _field(row, name, "copa", COPA_FIELDS)
    label = row["label"]
    if isinstance(label, bool) or str(label).strip() not in ("0", "1"):
        raise AusteerError(
            f"copa row: field 'label' is {label!r}; it must be 0 or 1 (unlabelled test rows cannot be used)"
        )
    texts = {name: _text(row, name, "copa", COPA_FIELDS) for name in ("premise", "question", "choice1", "choice2")}
    if not csv_split:
        return {"label": str(label).strip(), **{k: v.strip() for k, v in texts.items()}}
    buffer = io.StringIO()
    values = {"label": label, "id": row.get("id", ""), "mirrored": row.get("mirrored", ""), **texts}
    csv.writer(buffer, lineterminator="\n").writerow([values[name] for name in COPA_CSV_COLUMNS])
    parts = buffer.getvalue().strip().split(",")
    return {
        "label": parts[0].strip(),
        "premise": parts[2].strip(),
        "question": parts[3].strip(),
        "choice1": parts[4].strip(),
        "choice2": parts[5].strip(),
    }


def copa_prompt(row: Mapping[str, Any], *, csv_split: bool = True) -> str:
    """The paper's COPA prompt (load_dataset.py:51 and 64); ``question`` is ``cause`` or ``effect``."""
    f = copa_fields(row, csv_split=csv_split)
    return COPA_TEMPLATE.format(
        premise=f["premise"], question=f["question"], choice1=f["choice1"], choice2=f["choice2"]
    )


WINOGRANDE_FIELDS = ("sentence", "option1", "option2", "answer")
WINOGRANDE_TEMPLATE = "Please fill in the blanks. Write A or B as the answer.\n\nSentence: {sentence}\nA. {option1}\nB. {option2}\nAnswer:"


def winogrande_prompt(row: Mapping[str, Any]) -> str:
    """The paper's Winogrande prompt (load_dataset.py:181-183), every field stripped."""
    values = {
        name: _text(row, name, "winogrande", WINOGRANDE_FIELDS).strip() for name in ("sentence", "option1", "option2")
    }
    return WINOGRANDE_TEMPLATE.format(**values)


def winogrande_answer(row: Mapping[str, Any]) -> int:
    text = str(_field(row, "answer", "winogrande", WINOGRANDE_FIELDS)).strip()
    if text not in ("1", "2"):
        raise AusteerError(
            f"winogrande row: field 'answer' is {text!r}; it must be '1' or '2' (unlabelled test rows cannot be used)"
        )
    return int(text) - 1


SVAMP_FIELDS = ("Body", "Question", "Answer")
SVAMP_TEMPLATE = "Answer the following grade-school math word problem. Reply with only the final answer as a number.\nQuestion: {question}\nAnswer:"


def svamp_prompt(row: Mapping[str, Any]) -> str:
    """The paper's SVAMP prompt (load_dataset.py:297-298): ``Body + " " + Question``, neither
    stripped (the paper ignores the hub's ``question_concat``)."""
    body = _text(row, "Body", "svamp", SVAMP_FIELDS)
    question = _text(row, "Question", "svamp", SVAMP_FIELDS)
    return SVAMP_TEMPLATE.format(question=body + " " + question)


def svamp_answer(row: Mapping[str, Any]) -> str:
    # str() of what the JSON holds: SVAMP's answers are floats, so 145 is written '145.0'.
    value = _field(row, "Answer", "svamp", SVAMP_FIELDS)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise AusteerError(f"svamp row: field 'Answer' is {type(value).__name__}; it must be a number")
    return str(value)


MATH_FIELDS = ("question", "answer")
MATH_TEMPLATE = (
    'Answer the grade school math word problem below, using step-by-step problem-solving process. Print the final answer after "####".'
    "\nquestion: {question}\nanswer: \n"
)


def math_prompt(row: Mapping[str, Any], task: str = "mawps") -> str:
    """The paper's MAWPS and GSM8K prompt (load_dataset.py:343 and 260): the question unstripped,
    then ``"\\nanswer: \\n"`` (a space before the final newline)."""
    return MATH_TEMPLATE.format(question=_text(row, "question", task, MATH_FIELDS))


def math_answer(row: Mapping[str, Any], task: str) -> str:
    return _text(row, "answer", task, MATH_FIELDS)


__all__ = [
    "BOOLQ_FIELDS",
    "BOOLQ_TEMPLATE",
    "COPA_CSV_COLUMNS",
    "COPA_FIELDS",
    "COPA_TEMPLATE",
    "MATH_FIELDS",
    "MATH_TEMPLATE",
    "SVAMP_FIELDS",
    "SVAMP_TEMPLATE",
    "WINOGRANDE_FIELDS",
    "WINOGRANDE_TEMPLATE",
    "boolq_prompt",
    "boolq_truth",
    "copa_fields",
    "copa_prompt",
    "math_answer",
    "math_prompt",
    "svamp_answer",
    "svamp_prompt",
    "winogrande_answer",
    "winogrande_prompt",
]
