"""Rows to examples: which hub rows the paper protocol uses, as what, and as which strings."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any

from austeer_pl.errors import AusteerError
from austeer_pl.tasks.hub import fetch_hub
from austeer_pl.tasks.paper.answers import extract_number_paper, number_value
from austeer_pl.tasks.paper.prompts import (
    boolq_truth,
    copa_fields,
    copa_prompt,
    math_answer,
    svamp_answer,
    winogrande_answer,
)
from austeer_pl.tasks.paper.protocol import PaperExample, paper_protocol
from austeer_pl.tasks.paper.wrong import wrong_answers
from austeer_pl.tasks.schema import Task


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
    build = functools.partial(copa_prompt, csv_split=csv_split) if protocol.task == "copa" else protocol.build_prompt

    if not protocol.numeric:
        out = []
        for i, role in roles:
            row = data[i]
            prompt = build(row)
            if protocol.task == "boolq":
                right = int(boolq_truth(row))  # choice 1 is ' yes'
                positive, negative = ("Yes", "No") if right else ("No", "Yes")
            elif protocol.task == "copa":
                right = int(copa_fields(row, csv_split=csv_split)["label"])
                positive, negative = protocol.train_answers[right], protocol.train_answers[1 - right]
            else:
                right = winogrande_answer(row)
                positive, negative = protocol.train_answers[right], protocol.train_answers[1 - right]
            out.append(
                PaperExample(
                    prompt=prompt,
                    choices=protocol.eval_answers,
                    answer=right,
                    uid=f"{role}:{i}",
                    positive=positive,
                    negative=negative,
                    kind="generate1",
                )
            )
        return out

    answer_of = svamp_answer if protocol.task == "svamp" else functools.partial(math_answer, task=protocol.task)
    # The pool of wrong answers is the split as the paper reads it (its cap applied), computed
    # before any row is set aside for validation.
    pool = sizes.loaded(n_rows) if split == protocol.train_split else sizes.tested(n_rows)
    answers = [answer_of(data[i]) for i in range(pool)]
    wrong, method = (
        wrong_answers(answers, blank=protocol.blank, method=wrong_method)
        if pool >= 2
        else ([protocol.blank] * pool, None)
    )
    out = []
    for i, role in roles:
        row = data[i]
        right_text = answers[i] if i < pool else answer_of(row)
        if role != "train" and number_value(extract_number_paper(right_text)) is None:
            # The paper extracts the reference number of test rows only (main_test.py:149, 167).
            raise AusteerError(
                f"{protocol.task} {split} row {i}: answer {right_text[:60]!r} holds no number; the paper's scoring needs one"
            )
        # A validation row past the paper's cap (GSM8K) needs only its right answer.
        wrong_text = wrong[i] if i < pool else protocol.blank
        out.append(
            PaperExample(
                prompt=build(row),
                choices=(right_text, wrong_text),
                answer=0,
                uid=f"{role}:{i}",
                positive=right_text,
                negative=wrong_text,
                kind="numeric",
                trigger=protocol.trigger,
                wrong_method=method if i < pool else None,
            )
        )
    return out


def load_paper_task(
    name: str,
    *,
    cache_dir: Any = None,
    wrong_method: str = "auto",
    csv_split: bool = True,
    val_overlap: bool = False,
    files: Any = None,
) -> Task:
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
    rows = fetch_hub(protocol.hub.path, protocol.hub.config, splits, hub_split=None, cache_dir=cache_dir, files=files)
    examples = [
        ex
        for split in splits
        if split in rows
        for ex in paper_examples(
            protocol.task, rows[split], split, wrong_method=wrong_method, csv_split=csv_split, val_overlap=val_overlap
        )
    ]
    if not examples:
        raise AusteerError(f"dataset {protocol.hub.path!r} gave no rows for the paper protocol; check the hub data set")
    return Task(
        name=protocol.task,
        examples=tuple(examples),
        scoring="generate" if protocol.numeric else "choice",
        instruction="",
        answer_prefix="",
        protocol="paper",
    )


__all__ = [
    "load_paper_task",
    "paper_examples",
    "split_roles",
]
