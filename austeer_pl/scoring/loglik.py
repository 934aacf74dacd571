"""Scoring multiple-choice examples: log-likelihood of each choice, or greedy generation.

A choice's ids are the ids of the joined text ``prompt + choice`` after the prompt
(:func:`~austeer_pl.core.tokens.encode_answers`), the same rule as in fitting. Batches are
left-padded, so every answer ends at the last position and only the last few positions' logits
are computed.

On the CPU (where the momentum pass shares prompts too: :func:`~austeer_pl.core.prefix.use_shared_prefix`)
nothing is computed twice:

- A ``prefix`` that every prompt starts with (the chat template's head, the instruction and a few-shot
  prompt's demonstrations: :func:`~austeer_pl.tasks.prompts.prompt_prefix`) is prefilled once per batch,
  and the rest of each prompt continued from its KV cache
  (:func:`~austeer_pl.core.kvcache.prefix_last_logits`). A row whose ids do not start with the prefix's
  (truncated, or tokenized across the boundary) is scored whole.
- Multi-token choices: each prompt is computed once for all its choices, which continue its cache
  (:func:`~austeer_pl.core.kvcache.shared_prompt_logprobs`), unless a row is truncated or a choice's
  first token merges with the prompt's last.

The same scores to float tolerance (about 1e-5 in float32), the same decisions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from austeer_pl.core.kvcache import prefix_last_logits, shared_prompt_logprobs
from austeer_pl.core.placement import input_device
from austeer_pl.core.prefix import use_shared_prefix
from austeer_pl.core.reading import padded_logits
from austeer_pl.core.tokens import (
    encode_answers,
    encode_segments,
    pad_id_of,
    pad_ids,
    truncate_left,
)
from austeer_pl.errors import AusteerError


@torch.inference_mode()
def choice_logprobs(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[Sequence[str]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    prefix: str | None = None,
    shared_prefix: bool | str = "auto",
) -> list[torch.Tensor]:
    """Log-likelihood of each answer given its prompt, summed over the answer's tokens.

    Args:
        model: a causal LM (steered or not).
        tokenizer: its tokenizer.
        prompts: formatted prompt texts.
        answers: for each prompt, the answer texts exactly as they follow the prompt (see
            :func:`austeer_pl.tasks.join_answer`).
        batch_size: sequences per forward pass.
        max_length: truncate sequences from the left to this many tokens.
        prefix: text the prompts start with, computed once per batch (see the module docs).
        shared_prefix: compute the prefix, and each prompt of multi-token choices, once (``True``), or
            score every ``prompt + answer`` whole (``False``); ``"auto"``: on the CPU only.

    Returns:
        One float32 tensor of ``len(answers[i])`` log-likelihoods per prompt.

    Example:
        >>> choice_logprobs(model, tok, ["Q: 2+2?\\nA:"], [[" 4", " 5"]])
        [tensor([-1.2, -3.4])]
    """
    if len(prompts) != len(answers):
        raise ValueError("one list of answers per prompt")
    device = input_device(model)
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
    use_prefix = use_shared_prefix(shared_prefix, device)
    shared = None
    if prefix and use_prefix:
        shared = encode_segments(tokenizer, [prefix], special=True)[0]
    # One forward per prompt when every choice is one token after the same prompt ids.
    single = all(len(a) == 1 for a in answer_ids) and all(
        pair_prompt_ids[j] == prompt_ids[owner[j]] for j in range(len(owner))
    )

    if single:
        # One forward pass per prompt: every choice is a single token predicted at its last position.
        targets = torch.tensor([a[0] for a in answer_ids])
        rows_of = [[] for _ in prompts]
        for j, i in enumerate(owner):
            rows_of[i].append(j)
        for start in range(0, len(prompts), batch_size):
            chunk = range(start, min(start + batch_size, len(prompts)))
            rows = [truncate_left(prompt_ids.get(i, []), max_length) for i in chunk]
            logp = torch.log_softmax(_tail_logits(model, rows, pad, shared, 1)[:, -1].float(), dim=-1).cpu()
            cols = [j for i in chunk for j in rows_of[i]]
            rows = torch.tensor([i - start for i in chunk for _ in rows_of[i]])
            out[cols] = logp[rows, targets[cols]]
    else:
        todo = list(range(len(flat_answers)))
        if use_prefix and _prompts_shareable(pair_prompt_ids, answer_ids, owner, prompt_ids, max_length):
            todo = _shared_prompts(model, prompts, answers, prompt_ids, answer_ids, pad, shared, batch_size, out)
        _whole(model, pair_prompt_ids, answer_ids, todo, pad, shared, batch_size, max_length, out)
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


def _prompts_shareable(pair_prompt_ids, answer_ids, owner, prompt_ids, max_length) -> bool:
    """Every answer follows its prompt's own ids (no token across the boundary) and nothing is truncated."""
    return all(
        pair_prompt_ids[j] == prompt_ids[i]
        and (max_length is None or len(prompt_ids[i]) + len(answer_ids[j]) <= max_length)
        for j, i in enumerate(owner)
    )


def _shared_prompts(model, prompts, answers, prompt_ids, answer_ids, pad, shared, batch_size, out) -> list[int]:
    """Score batches of prompts once each for all their answers (:func:`shared_prompt_logprobs`), into
    ``out``; the flat indices of the answers left to score whole (a model that cannot share a cache)."""
    first = [0]
    for group in answers:
        first.append(first[-1] + len(group))
    todo: list[int] = []
    for start in range(0, len(prompts), batch_size):
        chunk = range(start, min(start + batch_size, len(prompts)))
        flat = [list(range(first[i], first[i + 1])) for i in chunk]
        got = shared_prompt_logprobs(
            model, [prompt_ids[i] for i in chunk], [[answer_ids[j] for j in js] for js in flat], pad, prefix=shared
        )
        if got is None:
            todo.extend(j for js in flat for j in js)
            continue
        for js, scores in zip(flat, got):
            out[js] = scores
    return todo


def _whole(model, pair_prompt_ids, answer_ids, todo, pad, shared, batch_size, max_length, out) -> None:
    """Score the answers ``todo`` as whole ``prompt + answer`` rows (left-padded, truncated to
    ``max_length``), into ``out``."""
    seqs = {j: truncate_left(pair_prompt_ids[j] + answer_ids[j], max_length) for j in todo}
    lengths = {j: min(len(answer_ids[j]), len(seqs[j]) - 1) for j in todo}
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        rows = [seqs[j] for j in chunk]
        span = max(lengths[j] for j in chunk)
        logits = _tail_logits(model, rows, pad, shared, span + 1)
        # Position t predicts token t + 1: the last `span` tokens are predicted by the `span` positions before the end.
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        target, _ = pad_ids([r[-span:] for r in rows], pad, device=logp.device)  # the last `span` ids, left-padded
        picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, span)
        lens = torch.tensor([lengths[j] for j in chunk], device=picked.device)
        keep = torch.arange(span, device=picked.device).unsqueeze(0) >= (span - lens).unsqueeze(1)
        out[list(chunk)] = (
            torch.where(keep, picked, 0.0).sum(-1).float().cpu()
        )  # where, not *: a pad position may hold NaN


def _tail_logits(
    model: nn.Module, rows: list[list[int]], pad: int, prefix: list[int] | None, keep: int
) -> torch.Tensor:
    """``(len(rows), keep, vocab)`` logits at each row's last ``keep`` tokens (left-padded rows, as
    :func:`~austeer_pl.core.reading.padded_logits`); rows that start with ``prefix`` and hold ``keep``
    tokens after it continue its cache."""
    n = len(prefix) if prefix else 0
    cont = [j for j, r in enumerate(rows) if n and len(r) >= n + keep and r[:n] == prefix]
    shared = None
    if cont and prefix:
        shared = prefix_last_logits(model, prefix, [rows[j][n:] for j in cont], pad, keep=keep)
    if shared is not None and keep == 1:
        shared = shared.unsqueeze(1)
    if shared is None:
        ids, mask = pad_ids(rows, pad, device=input_device(model))
        return padded_logits(model, ids, mask, keep)
    if len(cont) == len(rows):
        return shared
    whole = sorted(set(range(len(rows))) - set(cont))
    ids, mask = pad_ids([rows[j] for j in whole], pad, device=shared.device)
    out = shared.new_empty(len(rows), *shared.shape[1:])
    out[cont] = shared
    out[whole] = padded_logits(model, ids, mask, keep).to(out.device)
    return out


#: The per-example statistics of a scored choice, in the order of :meth:`GridScorer.score`'s last axis.
DECISION_STATISTICS = ("correct", "margin", "loss")


def decision_statistics(scores: Sequence[torch.Tensor], answers: Sequence[int]) -> torch.Tensor:
    """``(n, 3)`` float64: correct (0/1), margin and choice log-loss of each example's choice log-likelihoods.

    The prediction is ``argmax`` (the first of tied choices), as in :func:`~austeer_pl.scoring.evaluate.predict`.
    """
    if not scores:
        return torch.empty(0, len(DECISION_STATISTICS), dtype=torch.float64)
    # One padded (n, choices) table: padding is -inf, so it never wins, never is the best wrong
    # choice, and adds exp(-inf) = 0 to the logsumexp.
    table = torch.nn.utils.rnn.pad_sequence([sc.double() for sc in scores], batch_first=True, padding_value=-math.inf)
    rows, answer = torch.arange(len(scores)), torch.as_tensor(list(answers), dtype=torch.long)
    right = table[rows, answer]
    wrong = table.index_put((rows, answer), torch.tensor(-math.inf, dtype=torch.float64))
    best_wrong = wrong.max(dim=1).values
    margin = torch.where(torch.isfinite(best_wrong), right - best_wrong, torch.zeros_like(right))
    out = torch.stack([table.argmax(dim=1).eq(answer).double(), margin, torch.logsumexp(table, dim=1) - right], dim=1)
    return out
