"""Tasks: labelled examples, contrastive pairs, prompts, and one registry of task sources.

* :mod:`~austeer_pl.tasks.schema`: the records (:class:`TaskExample`, :class:`ContrastivePair`, :class:`Task`) and their row validators;
* :mod:`~austeer_pl.tasks.registry`: :func:`load_task`, the one entry point over every source:
  :mod:`~austeer_pl.tasks.embedded` (Rotten Tomatoes, the sentiment behaviour task), :mod:`~austeer_pl.tasks.files`
  (JSONL, JSON, CSV, BIG-bench), :mod:`~austeer_pl.tasks.hub` (hub data sets), :mod:`~austeer_pl.tasks.paper` (the paper's protocol);
* :mod:`~austeer_pl.tasks.splits` (deterministic splits, pairs), :mod:`~austeer_pl.tasks.prompts` (prompt formatting),
  :mod:`~austeer_pl.tasks.config` (the recorded :class:`DataConfig`).

Only the standard library is imported here (``datasets`` when a hub task is loaded).
"""

from __future__ import annotations

from austeer_pl.tasks.config import DataConfig
from austeer_pl.tasks.embedded import (
    RT_CHOICES,
    RT_INSTRUCTION,
    RT_PROMPT,
    SENTIMENT_ANSWER_PREFIX,
    SENTIMENT_MAX_WORDS,
    SENTIMENT_MIN_WORDS,
    SENTIMENT_TASK,
    detokenize_review,
    load_rotten_tomatoes,
    sentiment_prompts,
    sentiment_task,
)
from austeer_pl.tasks.files import (
    LOCAL_FILE_HINT,
    LOCAL_SUFFIXES,
    load_bigbench_task,
    load_local_task,
)
from austeer_pl.tasks.hub import HubTask, load_hub_task, local_hub_rows
from austeer_pl.tasks.hub_rows import (
    boolq_examples,
    copa_examples,
    generic_examples,
    gsm8k_examples,
    mawps_examples,
    svamp_examples,
    winogrande_examples,
)
from austeer_pl.tasks.prompts import (
    behaviour_prompts,
    format_prompt,
    join_answer,
    join_for,
    load_behaviour_task,
    pair_texts,
)
from austeer_pl.tasks.registry import (
    EMBEDDED_TASKS,
    TASK_NAMES,
    TASK_PROTOCOLS,
    is_named_task,
    load_task,
)
from austeer_pl.tasks.schema import (
    DEFAULT_ANSWER_PREFIX,
    NEGATIVE_MODES,
    SPLIT_NAMES,
    TASK_SCORINGS,
    ContrastivePair,
    Task,
    TaskExample,
    numeric_choices,
)
from austeer_pl.tasks.splits import make_pairs, split_examples

__all__ = [
    "DEFAULT_ANSWER_PREFIX",
    "EMBEDDED_TASKS",
    "LOCAL_FILE_HINT",
    "LOCAL_SUFFIXES",
    "NEGATIVE_MODES",
    "RT_CHOICES",
    "RT_INSTRUCTION",
    "RT_PROMPT",
    "SENTIMENT_ANSWER_PREFIX",
    "SENTIMENT_MAX_WORDS",
    "SENTIMENT_MIN_WORDS",
    "SENTIMENT_TASK",
    "SPLIT_NAMES",
    "TASK_NAMES",
    "TASK_PROTOCOLS",
    "TASK_SCORINGS",
    "ContrastivePair",
    "DataConfig",
    "HubTask",
    "Task",
    "TaskExample",
    "behaviour_prompts",
    "boolq_examples",
    "copa_examples",
    "detokenize_review",
    "format_prompt",
    "generic_examples",
    "gsm8k_examples",
    "is_named_task",
    "join_answer",
    "join_for",
    "load_behaviour_task",
    "load_bigbench_task",
    "load_hub_task",
    "load_local_task",
    "load_rotten_tomatoes",
    "load_task",
    "local_hub_rows",
    "make_pairs",
    "mawps_examples",
    "numeric_choices",
    "pair_texts",
    "sentiment_prompts",
    "sentiment_task",
    "split_examples",
    "svamp_examples",
    "winogrande_examples",
]
