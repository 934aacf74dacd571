"""Local task files: JSONL, JSON and CSV rows (``prompt``, ``choices``, ``answer``) and BIG-bench
``task.json`` folders, read strictly (duplicate keys, bad rows and wrong types are one line each)."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from austeer_pl.core.fileio import parse_json
from austeer_pl.errors import AusteerError
from austeer_pl.tasks.schema import (
    RECORD_FIELDS,
    Task,
    TaskExample,
    check_choices,
    record_example,
    short_text,
)

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv")


LOCAL_FILE_HINT = "--data.task path/to/file.jsonl"


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
            f"{where}: duplicate key {short_text(exc.key)} in a JSON object (e.g. a choice listed twice); keep one"
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
        out.append(record_example(_loads(line, where), where, f"{path.name}:{line_no}"))
    return out


def _json_examples(path: Path, data: list[Any]) -> list[TaskExample]:
    return [record_example(row, f"{path}: item {i}", f"{path.name}:{i}") for i, row in enumerate(data)]


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
            out.append(record_example(row, where, f"{path.name}:{reader.line_num}"))
            start = reader.line_num + 1
    except csv.Error as exc:
        hint = "a quote is opened and never closed" if "end of data" in str(exc) else str(exc)
        raise AusteerError(
            f"{path}:{start}: bad CSV ({hint}); close the quote, or double a quote inside a quoted cell"
        ) from None
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
            raise AusteerError(
                f"{path} is a folder without task.json; pass a .jsonl/.json/.csv file or a BIG-bench task folder"
            )
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
            raise AusteerError(
                f"{path}: a JSON object without 'examples'; give a list of rows or a BIG-bench task.json"
            )
        if not isinstance(data, list):
            raise AusteerError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        examples = _json_examples(path, data)
    else:
        raise AusteerError(
            f"{path}: unsupported file type {suffix or '(none)'!r}; use one of {', '.join(LOCAL_SUFFIXES)}"
        )
    if not examples:
        raise AusteerError(f"{path}: no examples (the file is empty); add rows with {RECORD_FIELDS}")
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
            raise AusteerError(
                f"{where}: expected an object with input and target_scores, got {type(example).__name__}"
            )
        scores = example.get("target_scores")
        if scores is None:
            raise AusteerError(
                f"{where}: missing field 'target_scores'; only multiple-choice BIG-bench tasks are supported"
            )
        if not isinstance(scores, Mapping):
            raise AusteerError(f"{where}: 'target_scores' must be an object mapping each choice to 0 or 1")
        text = example.get("input")
        if not isinstance(text, str):
            raise AusteerError(f"{where}: missing field 'input' (or not a string); give the example's input text")
        choices = check_choices(list(scores), where)
        values = list(scores.values())
        for choice, value in zip(choices, values, strict=True):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise AusteerError(
                    f"{where}: score of choice {short_text(choice)} is {short_text(value)}; scores must be 0 or 1"
                )
        right = [i for i, value in enumerate(values) if value == 1]
        if not right:
            raise AusteerError(
                f"{where}: no right answer (no choice scores 1 in target_scores); give exactly one choice the score 1"
            )
        if len(right) > 1:
            names = ", ".join(short_text(choices[i], 30) for i in right)
            raise AusteerError(
                f"{where}: {len(right)} right answers ({names} score 1); give exactly one choice the score 1"
            )
        prompt = text.strip()
        if input_prefix:
            prompt = f"{input_prefix}{prompt}"
        if append:
            prompt = prompt + choice_prefix + choice_prefix.join(choices)
        examples.append(TaskExample(prompt=prompt.strip(), choices=choices, answer=right[0], uid=f"{name}:{index}"))
    description = data.get("description")
    return Task(
        name=name,
        examples=tuple(examples),
        scoring="choice",
        instruction=instruction,
        answer_prefix=output_prefix,
        description=description.strip() if isinstance(description, str) else "",
    )
