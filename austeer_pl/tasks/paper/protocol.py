"""The paper protocol as data: one :class:`PaperProtocol` record per task (hub set, prompt builder,
answer strings, scoring kind, read position, sizes, each with the paper file and line it
reproduces), and the fifteen settings of ``reproduce.sh`` with the accuracies they logged."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from austeer_pl.errors import AusteerError
from austeer_pl.tasks.hub import HUB_TASKS, HubTask
from austeer_pl.tasks.paper.prompts import (
    BOOLQ_FIELDS,
    BOOLQ_TEMPLATE,
    COPA_FIELDS,
    COPA_TEMPLATE,
    MATH_FIELDS,
    MATH_TEMPLATE,
    SVAMP_FIELDS,
    SVAMP_TEMPLATE,
    WINOGRANDE_FIELDS,
    WINOGRANDE_TEMPLATE,
    boolq_prompt,
    copa_prompt,
    math_prompt,
    svamp_prompt,
    winogrande_prompt,
)
from austeer_pl.tasks.schema import TaskExample

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
    def hub(self) -> HubTask:
        """The hub data set holding the paper's files: the task's one entry in :data:`~austeer_pl.tasks.hub.HUB_TASKS`."""
        return HUB_TASKS[self.task]

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


_READ_WORD = (
    "the last token of prompt + {what}, the whole text tokenized with the tokenizer's special tokens and cut to its first "
    f"{READ_MAX_TOKENS} tokens (steer.py:212-218, 232)"
)


PAPER_PROTOCOLS: dict[str, PaperProtocol] = {
    "boolq": PaperProtocol(
        task="boolq",
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
        read=_READ_WORD.format(
            what="'Yes'/'No' glued to 'Answer:' (no space); a passage longer than the cut loses the answer"
        ),
        logged_sizes=(2000, 3270),
        source="utils/load_dataset.py:103-132",
    ),
    "copa": PaperProtocol(
        task="copa",
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
        read=_READ_WORD.format(
            what="str(Answer) glued to 'Answer:' (e.g. '145.0', read at its last digit), or a lone space"
        ),
        logged_sizes=(700, 300),
        source="utils/load_dataset.py:276-318",
    ),
    "mawps": PaperProtocol(
        task="mawps",
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
        read=_READ_WORD.format(
            what="the whole reference solution ('2 + 4 = 6 #### 6', read at its final number), or five spaces"
        ),
        logged_sizes=(1417, 355),
        source="utils/load_dataset.py:320-358",
    ),
    "gsm8k": PaperProtocol(
        task="gsm8k",
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
        raise AusteerError(
            f"task {task!r} has no paper protocol; use one of {', '.join(PAPER_TASKS)} or --data.protocol default"
        )
    return PAPER_PROTOCOLS[key]


def check_protocol(protocol: str) -> str:
    """``protocol`` if it is ``default`` or ``paper``; an AusteerError naming both otherwise."""
    if protocol not in PROTOCOLS:
        raise AusteerError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return protocol


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
    "MINILM_BATCH_SIZE",
    "PAPER_COMMIT",
    "PAPER_KINDS",
    "PAPER_PROTOCOLS",
    "PAPER_REPO",
    "PAPER_SETTINGS",
    "PAPER_TASKS",
    "PROTOCOLS",
    "READ_MAX_TOKENS",
    "SCREEN_PAIRS",
    "WRONG_METHODS",
    "PaperExample",
    "PaperProtocol",
    "PaperSetting",
    "PaperSizes",
    "check_protocol",
    "paper_protocol",
    "paper_setting",
]
