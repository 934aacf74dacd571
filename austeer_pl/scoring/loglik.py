"""Scoring multiple-choice examples: log-likelihood of each choice, or greedy generation.

A choice's ids are the ids of the joined text ``prompt + choice`` after the prompt
(:func:`~austeer_pl.core.tokens.encode_answers`), the same rule as in fitting. Batches are
left-padded, so every answer ends at the last position and only the last few positions' logits
are computed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from austeer_pl.core.tokens import check_generation_length, encode_answers, encode_segments, pad_id_of, pad_ids, truncate_left
from austeer_pl.errors import AusteerError
from austeer_pl.core.reading import position_ids_from_mask


@torch.inference_mode()
def choice_logprobs(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[Sequence[str]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
) -> list[torch.Tensor]:
    """Log-likelihood of each answer given its prompt, summed over the answer's tokens.

    Args:
        model: a causal LM (steered or not).
        tokenizer: its tokenizer.
        prompts: formatted prompt texts.
        answers: for each prompt, the answer texts exactly as they follow the prompt (see
            :func:`austeer_pl.tasks.sources.join_answer`).
        batch_size: sequences per forward pass.
        max_length: truncate sequences from the left to this many tokens.

    Returns:
        One float32 tensor of ``len(answers[i])`` log-likelihoods per prompt.

    Example:
        >>> choice_logprobs(model, tok, ["Q: 2+2?\\nA:"], [[" 4", " 5"]])
        [tensor([-1.2, -3.4])]
    """
    if len(prompts) != len(answers):
        raise ValueError("one list of answers per prompt")
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    flat_answers = [a for group in answers for a in group]
    owner = [i for i, group in enumerate(answers) for _ in group]
    if any(not a for a in flat_answers):
        raise AusteerError("an answer choice tokenizes to nothing; give non-empty choices")
    pair_prompt_ids, answer_ids = encode_answers(tokenizer, [prompts[i] for i in owner], flat_answers)
    out = torch.empty(len(flat_answers), dtype=torch.float32)
    prompt_ids = {}
    for j, i in enumerate(owner):
        prompt_ids.setdefault(i, pair_prompt_ids[j])
    # One forward per prompt when every choice is one token after the same prompt ids.
    single = all(len(a) == 1 for a in answer_ids) and all(pair_prompt_ids[j] == prompt_ids[owner[j]] for j in range(len(owner)))

    if single:
        # One forward pass per prompt: every choice is a single token predicted at its last position.
        targets = torch.tensor([a[0] for a in answer_ids])
        rows_of = [[] for _ in prompts]
        for j, i in enumerate(owner):
            rows_of[i].append(j)
        for start in range(0, len(prompts), batch_size):
            chunk = range(start, min(start + batch_size, len(prompts)))
            ids, mask = pad_ids([truncate_left(prompt_ids.get(i, []), max_length) for i in chunk], pad, device=device)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), logits_to_keep=1, use_cache=False).logits
            logp = torch.log_softmax(logits[:, -1].float(), dim=-1).cpu()
            cols = [j for i in chunk for j in rows_of[i]]
            rows = torch.tensor([i - start for i in chunk for _ in rows_of[i]])
            out[cols] = logp[rows, targets[cols]]
    else:
        seqs = [truncate_left(pair_prompt_ids[j] + answer_ids[j], max_length) for j in range(len(flat_answers))]
        lengths = [min(len(a), len(s) - 1) for a, s in zip(answer_ids, seqs)]
        for start in range(0, len(seqs), batch_size):
            chunk = range(start, min(start + batch_size, len(seqs)))
            ids, mask = pad_ids([seqs[j] for j in chunk], pad, device=device)
            span = max(lengths[j] for j in chunk)
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), logits_to_keep=span + 1, use_cache=False
            ).logits
            # Position t predicts token t + 1: the last `span` tokens are predicted by the `span` positions before the end.
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            target = ids[:, -span:]
            picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, span)
            lens = torch.tensor([lengths[j] for j in chunk], device=picked.device)
            keep = torch.arange(span, device=picked.device).unsqueeze(0) >= (span - lens).unsqueeze(1)
            out[list(chunk)] = torch.where(keep, picked, 0.0).sum(-1).float().cpu()  # where, not *: a pad position may hold NaN
    if bool(torch.isnan(out).any()):
        bad = int(torch.isnan(out).nonzero()[0, 0])
        raise AusteerError(
            f"the model gave NaN log-probabilities (first for the answer {flat_answers[bad]!r} of prompt {owner[bad]}); "
            "its weights or the steering state hold NaN or overflow in this dtype: check the model, or use --dtype float32"
        )
    result, offset = [], 0
    for group in answers:
        result.append(out[offset : offset + len(group)])
        offset += len(group)
    return result


@torch.inference_mode()
def generate_texts(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 16,
    max_length: int | None = None,
) -> list[str]:
    """Greedy continuations of each prompt (left-padded batches, KV cache on)."""
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    prompt_ids = [truncate_left(p, max_length) for p in encode_segments(tokenizer, prompts, special=True)]
    check_generation_length(model, prompt_ids, max_new_tokens)
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompt_ids[start : start + batch_size]
        ids, mask = pad_ids(chunk, pad, device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        texts.extend(tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True))
    return texts


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _normalise(text: str) -> str:
    return re.sub(r"[^\w\s]", "", text).strip().lower()


def parse_number(text: str) -> float | None:
    """The answer number of a generation: the last number (after ``####`` where present, as GSM8K
    writes answers), commas as thousands separators. A model that reasons before answering ends with
    the answer, so the first number would be a step of the reasoning.

    Example:
        >>> parse_number("3 apples and 4 pears make 7"), parse_number("... #### 1,200 (done in 2 steps)")
        (7.0, 1200.0)
    """
    head, sep, tail = text.partition("####")
    source = tail if sep else head
    matches = _NUMBER.findall(source)
    if not matches:
        return None
    try:
        return float(matches[0 if sep else -1].replace(",", ""))
    except ValueError:
        return None


def generation_prediction(text: str, choices: Sequence[str], *, numeric: bool = False) -> int:
    """Which choice a generated text gives, or -1 when none (exact match after normalisation).

    Numeric tasks compare the first number in the text with each choice's number. Other tasks take
    the choice the text starts with (the longest one when several match).
    """
    if numeric:
        value = parse_number(text)
        if value is None:
            return -1
        for i, choice in enumerate(choices):
            target = parse_number(choice)
            if target is not None and math.isclose(value, target, rel_tol=1e-6, abs_tol=1e-6):
                return i
        return -1
    said = _normalise(text)
    best, best_len = -1, -1
    for i, choice in enumerate(choices):
        c = _normalise(choice)
        if c and (said == c or said.startswith(c + " ")) and len(c) > best_len:
            best, best_len = i, len(c)
    return best


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> Interval:
    """Wilson score interval for a proportion (95% by default); ``(0, 1)`` when ``n == 0``.

    Example:
        >>> wilson_interval(80, 100)
        Interval(low=0.711..., high=0.866...)
    """
    if n <= 0:
        return Interval(0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(max(0.0, centre - half), min(1.0, centre + half))
