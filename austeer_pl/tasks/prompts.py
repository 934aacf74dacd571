"""Prompt text: a task's instruction and prompt, in the model's chat template or raw, and how an answer
is joined to it (after the task's answer prefix, or verbatim in the paper protocol)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from austeer_pl.errors import AusteerError
from austeer_pl.tasks.embedded import SENTIMENT_TASK, sentiment_task
from austeer_pl.tasks.registry import load_task
from austeer_pl.tasks.schema import ContrastivePair, Task, TaskExample


def _with_instruction(instruction: str, prompt: str) -> str:
    if not instruction:
        return prompt
    return instruction + prompt if instruction[-1].isspace() else f"{instruction}\n{prompt}"


def format_prompt(tokenizer: Any, task: Task, prompt: str, *, chat_template: bool | None = None) -> str:
    """The text a model sees before the answer.

    With a chat template: ``apply_chat_template([{"role": "user", "content": instruction + prompt}],
    add_generation_prompt=True, tokenize=False)`` (the assistant turn is the answer slot). Without:
    ``f"{instruction}{prompt}\\n{answer_prefix}"``. Append a choice with :func:`join_answer`. A task's
    few-shot demonstrations come before the prompt: a user turn and an assistant turn each with a chat
    template (the instruction opens the first), ``prompt\\nanswer_prefix answer`` blocks separated by a
    blank line without.

    Args:
        tokenizer: A transformers tokenizer (may be None when ``chat_template`` is False).
        task: Supplies ``instruction`` and ``answer_prefix``.
        prompt: The example's prompt.
        chat_template: True/False forces the mode; None uses the template iff the tokenizer has one.

    Raises:
        AusteerError: ``chat_template=True`` but the tokenizer has no chat template.

    Example:
        >>> task = Task("demo", (), instruction="Answer briefly.\\n")
        >>> format_prompt(None, task, "Is the sky blue?", chat_template=False)
        'Answer briefly.\\nIs the sky blue?\\nAnswer:'
    """
    if task.protocol == "paper":
        return prompt  # the paper feeds its prompts raw: no template, no instruction, no prefix
    has_template = bool(getattr(tokenizer, "chat_template", None))
    use_template = has_template if chat_template is None else bool(chat_template)
    # Few-shot demonstrations come first, each a prompt and its answer; the instruction opens the first turn.
    turns = [*task.demonstrations, (prompt, None)]
    if not use_template:
        blocks = [f"{p}\n{task.answer_prefix}" for p, _ in turns]
        shown = [join_answer(b, a) for b, (_, a) in zip(blocks[:-1], turns[:-1])]
        return _with_instruction(task.instruction, "\n\n".join([*shown, blocks[-1]]))
    if not has_template:
        raise AusteerError(
            "chat_template=True but the tokenizer has no chat template; set chat_template to false or None"
        )
    messages = []
    for i, (p, answer) in enumerate(turns):
        messages.append({"role": "user", "content": _with_instruction(task.instruction, p) if i == 0 else p})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    # enable_thinking=False: Qwen3's template then answers directly (other templates ignore the flag).
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    if not isinstance(text, str):
        raise AusteerError(
            f"the tokenizer's apply_chat_template returned {type(text).__name__}, not text; set chat_template to false"
        )
    # The assistant turn is the answer slot: no answer prefix after the template (measured on
    # SmolLM2 / Rotten Tomatoes validation: 0.50 with "Answer:" appended, 0.59 without).
    return text


_MARK = "\x00austeer-example\x00"  # stands for the example's prompt; no real prompt holds it


def prompt_prefix(tokenizer: Any, task: Task, prompts: Sequence[str]) -> str | None:
    """The text before the example in ``task``'s formatted prompts (the chat template's head, the
    instruction and any few-shot demonstration turns): scoring computes it once per batch
    (:func:`~austeer_pl.scoring.loglik.choice_logprobs`). None when there is none (no template,
    instruction or demonstrations), under the paper protocol, or when no prompt starts with it in either
    formatting mode.

    Example:
        >>> prompt_prefix(None, few_shot_task, [format_prompt(None, few_shot_task, "Is it?", chat_template=False)])
        'Is the sky blue?\nAnswer: yes\n\n'
    """
    if not prompts or task.protocol == "paper":
        return None
    modes = (True, False) if getattr(tokenizer, "chat_template", None) else (False,)
    for mode in modes:
        head, mark, _ = format_prompt(tokenizer, task, _MARK, chat_template=mode).partition(_MARK)
        if mark and head and any(p.startswith(head) for p in prompts):
            return head
    return None


def join_for(task: Task, prompt_text: str, choice: str) -> str:
    """``prompt_text`` followed by ``choice`` as ``task`` joins them: without a separator under the
    paper protocol (its answers are written to follow the prompt), else :func:`join_answer`."""
    return prompt_text + choice if task.protocol == "paper" else join_answer(prompt_text, choice)


def join_answer(prompt_text: str, choice: str) -> str:
    """Append an answer to formatted prompt text.

    Choices are stored without surrounding whitespace. They are joined with one space when the text
    ends in a non-space character (``"...Answer:"`` + ``" yes"``) and directly when it ends in
    whitespace or is empty (``"...<|im_start|>assistant\\n"`` + ``"yes"``), with and without a chat template.

    Args:
        prompt_text: Output of :func:`format_prompt`.
        choice: The answer text.

    Example:
        >>> join_answer("Q: Is it?\\nAnswer:", "yes"), join_answer("<|im_start|>assistant\\n", "yes")
        ('Q: Is it?\\nAnswer: yes', '<|im_start|>assistant\\nyes')
    """
    if not prompt_text or prompt_text[-1].isspace():
        return prompt_text + choice
    return f"{prompt_text} {choice}"


def load_behaviour_task(spec: str, *, seed: int = 0) -> Task:
    """``sentiment`` or any :func:`~austeer_pl.tasks.load_task` spec (a ``prompt, positive, negative`` file)."""

    if str(spec).strip().lower() == SENTIMENT_TASK:
        return sentiment_task()
    return load_task(spec, seed=seed)


def behaviour_prompts(
    tokenizer, task: Task, examples: Sequence[TaskExample], *, chat_template: bool | None = None
) -> list[str]:
    """The distinct formatted prompts of ``examples``, in first-seen order (what generation starts from).

    Example:
        >>> behaviour_prompts(tok, task, parts["val"])[0]
        '<|im_start|>user\\nGive a short review of ...<|im_end|>\\n<|im_start|>assistant\\n'
    """
    seen = dict.fromkeys(format_prompt(tokenizer, task, ex.prompt, chat_template=chat_template) for ex in examples)
    return list(seen)


def pair_texts(
    tokenizer, task: Task, pairs: Sequence[ContrastivePair], *, chat_template: bool | None = None
) -> list[tuple[str, str]]:
    """``(prompt + positive, prompt + negative)`` texts of pairs, formatted as in fitting, for :func:`~austeer_pl.core.pairs.fit_state`."""
    out = []
    for p in pairs:
        text = format_prompt(tokenizer, task, p.prompt, chat_template=chat_template)
        out.append((join_answer(text, p.positive), join_answer(text, p.negative)))
    return out
