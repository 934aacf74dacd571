"""Token ids for every path: encode, join a prompt and its answer, cut from the left, pad.

Fitting (the momentum pass, the strength phase), validation, scoring and generation all build
their rows here, so a prompt and an answer become the same ids everywhere.

* An answer's ids are the ids of the joined text ``prompt + answer`` after the prompt
  (:func:`encode_answers`): where a tokenizer merges tokens across the boundary (SentencePiece's
  ``▁``, BPE merges) the prompt's own ids are those the joined text starts with, so the last id
  read is always the answer's last token.
* Long rows are cut from the left (:func:`truncate_left`): the answer end, whose units are read
  and whose log-likelihood is scored, always survives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from austeer_pl.errors import AusteerError


def pad_id_of(tokenizer) -> int:
    """The id padding uses: the pad token, else the end-of-sequence token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise AusteerError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return int(pad)


def encode_segments(tokenizer, texts: Sequence[str], *, special: bool) -> list[list[int]]:
    """Token ids of each text (with the tokenizer's special tokens when ``special``)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=special)["input_ids"]]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_answers(
    tokenizer, prompt_texts: Sequence[str], answers: Sequence[str], *, joined: Sequence[str] | None = None
) -> tuple[list[list[int]], list[list[int]]]:
    """``(prompt_ids, answer_ids)`` of each prompt and the answer that follows it.

    ``joined[i]`` (default ``prompt_texts[i] + answers[i]``) is tokenized whole (with special
    tokens); the prompt's ids are the longest prefix it shares with the prompt tokenized alone,
    capped so that at least one id is left for the answer, and the answer's ids are the rest.
    ``prompt_ids[i] + answer_ids[i]`` is exactly the tokenization of the joined text.

    Raises:
        AusteerError: an answer adds no token to its prompt.

    Example:
        >>> encode_answers(tok, ["Q: ok?\\nAnswer:"], [" yes"])[1]
        [[4754]]
    """
    if len(prompt_texts) != len(answers):
        raise ValueError(f"{len(prompt_texts)} prompts but {len(answers)} answers")
    texts = [p + a for p, a in zip(prompt_texts, answers)] if joined is None else list(joined)
    prompt_alone = encode_segments(tokenizer, list(dict.fromkeys(prompt_texts)), special=True)
    alone = dict(zip(dict.fromkeys(prompt_texts), prompt_alone))
    whole = encode_segments(tokenizer, texts, special=True)
    prompts, rests = [], []
    for text, answer, ids in zip(prompt_texts, answers, whole):
        cut = min(_common_prefix(alone[text], ids), len(ids) - 1)
        if len(ids) <= len(alone[text]) and ids == alone[text][: len(ids)]:
            raise AusteerError(f"answer {answer!r} adds no token to its prompt; give non-empty choices")
        prompts.append(ids[:cut])
        rests.append(ids[cut:])
    return prompts, rests


def encode_pairs(
    tokenizer, prompt_texts: Sequence[str], positives: Sequence[str], negatives: Sequence[str]
) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """``(prompt_ids, positive_ids, negative_ids)`` of contrastive pairs, each answer text the exact
    suffix that follows its prompt. ``prompt + positive`` and ``prompt + negative`` are exactly the
    tokenizations of the two joined texts; the prompt part is what both share (so a shared-prefix
    reader can run it once)."""
    p_pos, pos = encode_answers(tokenizer, prompt_texts, positives)
    p_neg, neg = encode_answers(tokenizer, prompt_texts, negatives)
    prompts, pos_out, neg_out = [], [], []
    for a, ra, b, rb in zip(p_pos, pos, p_neg, neg):
        cut = _common_prefix(a, b)
        prompts.append(a[:cut])
        pos_out.append(a[cut:] + ra)
        neg_out.append(b[cut:] + rb)
    return prompts, pos_out, neg_out


def context_length(model) -> int | None:
    """The longest sequence ``model`` was built for (``max_position_embeddings``), if it says."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_generation_length(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Refuse a generation that cannot fit the model's context (it would run for hours, then fail).

    Example:
        >>> check_generation_length(model, [[1, 2, 3]], 10**9)  # doctest: +SKIP
        AusteerError: --max_new_tokens 1000000000 does not fit the model's context of 8192 tokens ...
    """
    limit = context_length(model)
    longest = max((len(ids) for ids in prompt_ids), default=0)
    if limit is not None and longest + max_new_tokens > limit:
        room = max(limit - longest, 0)
        raise AusteerError(
            f"--max_new_tokens {max_new_tokens} does not fit the model's context of {limit} tokens "
            f"(the longest prompt takes {longest}); use at most {room}, or shorten the prompts with --max_length"
        )


def truncate_left(seq: Sequence[int], max_length: int | None) -> list[int]:
    """Keep the last ``max_length`` ids (the answer end must survive truncation)."""
    seq = list(seq)
    return seq if max_length is None or len(seq) <= max_length else seq[-max_length:]


def truncate_pair_left(prompt: Sequence[int], answer: Sequence[int], limit: int | None) -> tuple[list[int], list[int]]:
    """Keep the last ``limit`` ids of ``prompt + answer``, split back into prompt and answer."""
    prompt, answer = list(prompt), list(answer)
    if limit is None or len(prompt) + len(answer) <= limit:
        return prompt, answer
    cut = len(prompt) + len(answer) - limit
    if cut <= len(prompt):
        return prompt[cut:], answer
    return [], answer[cut - len(prompt) :]


def pad_ids(
    seqs: Sequence[Sequence[int]], pad_id: int, *, side: str = "left", device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists into ``(input_ids, attention_mask)`` on ``side`` (``left`` or ``right``)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be left or right, not {side!r}")
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        if not len(seq):
            continue
        row = torch.as_tensor(list(seq), dtype=torch.long)
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[i, cols] = row
        mask[i, cols] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def pair_rows(
    prompts: Sequence[list[int]],
    positives: Sequence[list[int]],
    negatives: Sequence[list[int]],
    pad_id: int,
    max_length: int | None,
    *,
    side: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``: every prompt + right answer, then every prompt + wrong answer,
    each cut to its last ``max_length`` ids and padded on ``side``."""
    seqs = [truncate_left(list(p) + list(a), max_length) for p, a in zip(prompts, positives)]
    seqs += [truncate_left(list(p) + list(a), max_length) for p, a in zip(prompts, negatives)]
    return pad_ids(seqs, pad_id, side=side)


def encode_texts(
    tokenizer, texts: Sequence[str], *, device: torch.device | str | None = None, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """Tokenize whole texts into one right-padded batch (``input_ids``, ``attention_mask``), each cut
    from the left to its last ``max_length`` tokens (the last token is the one read)."""
    if tokenizer.pad_token_id is None:
        raise AusteerError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
    seqs = [truncate_left(ids, max_length) for ids in encode_segments(tokenizer, list(texts), special=True)]
    ids, mask = pad_ids(seqs, tokenizer.pad_token_id, side="right", device=device)
    return {"input_ids": ids, "attention_mask": mask}


__all__ = [
    "check_generation_length",
    "context_length",
    "encode_answers",
    "encode_pairs",
    "encode_segments",
    "encode_texts",
    "pad_id_of",
    "pad_ids",
    "pair_rows",
    "truncate_left",
    "truncate_pair_left",
]
