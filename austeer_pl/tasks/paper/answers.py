"""How the paper reads an answer out of a generation and scores it (``main_test.py``, ``utils/utils.py``),
with the code's own quirks reproduced, and how many tokens it lets a model generate."""

from __future__ import annotations

import re

from austeer_pl.errors import AusteerError
from austeer_pl.tasks.paper.protocol import PaperExample, paper_protocol

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


def number_value(text: str | None) -> float | None:
    """The value of a number the paper extracted (None for none, or for a fraction it cannot parse)."""
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
    reference_value = number_value(extract_number_paper(reference))
    if reference_value is None:
        raise AusteerError(f"reference answer {reference[:60]!r} holds no number; the paper's scoring needs one")
    predicted = number_value(extract_number_paper(truncate_at_trigger(generated.strip(), trigger)))
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


__all__ = [
    "extract_number_paper",
    "number_value",
    "paper_choice_correct",
    "paper_max_new_tokens",
    "paper_numeric_correct",
    "paper_prediction",
    "truncate_at_trigger",
]
