"""Fluency of generated text, measured under the *unsteered* model (remove every steering hook first).

* :func:`perplexity`: per generation, ``exp(mean NLL)`` of its continuation tokens given its
  prompt. The prompt is tokenized with the tokenizer's special tokens and the continuation
  without, and their ids are concatenated (the convention of :mod:`austeer_pl.scoring.loglik`); the NLL
  of continuation token ``t`` is ``-log softmax(logits at t - 1)[t]``. An empty continuation
  has no tokens and gets ``nan``.
* :func:`mean_perplexity`: the summary used in reports, the geometric mean of the finite
  per-generation perplexities, ``exp(mean over generations of mean token NLL)``: every
  generation weighs the same whatever its length, and one degenerate generation cannot dominate.
* :func:`distinct_n`: distinct-n (Li et al., 2016) per generation, ``distinct n-grams / n-grams``
  over lower-cased whitespace words, averaged over generations with at least one n-gram
  (1.0: no repeated n-gram; low values flag loops such as ``"great great great"``).

Example:
    >>> perplexity(model, tokenizer, ["Review:"], [" A fine film."])
    tensor([23.4])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from austeer_pl.core.placement import input_device
from austeer_pl.core.reading import padded_logits
from austeer_pl.core.tokens import encode_answers, pad_id_of, pad_ids, truncate_left
from austeer_pl.errors import AusteerError


@torch.inference_mode()
def continuation_nll(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL (nats, float64) and token count of each continuation given its prompt.

    One forward pass per batch over left-padded ``prompt + continuation`` ids; only the last
    ``max continuation length + 1`` positions' logits are computed and the NLL is masked to each
    row's continuation tokens. Rows are batched in order of length (less padding) and returned in
    input order. With ``max_length`` the sequence keeps its last ``max_length`` ids.

    Example:
        >>> nll, n = continuation_nll(model, tok, ["Q:"], [" yes"])
    """
    if len(prompts) != len(continuations):
        raise AusteerError(
            f"{len(prompts)} prompts but {len(continuations)} continuations; give one continuation per prompt"
        )
    if batch_size <= 0:
        raise AusteerError(f"batch_size must be positive, got {batch_size}")
    n = len(prompts)
    total = torch.zeros(n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.long)
    # An empty continuation (or one that adds no token to its prompt) has no tokens to score.
    whole = (
        tokenizer([p + c for p, c in zip(prompts, continuations)], add_special_tokens=True)["input_ids"] if n else []
    )
    alone = tokenizer(list(prompts), add_special_tokens=True)["input_ids"] if n else []
    scored = [
        i
        for i in range(n)
        if continuations[i] and not (len(whole[i]) <= len(alone[i]) and whole[i] == alone[i][: len(whole[i])])
    ]
    if not scored:
        return total, count
    device = input_device(model)
    pad = pad_id_of(tokenizer)
    prompt_ids, cont_ids = encode_answers(tokenizer, [prompts[i] for i in scored], [continuations[i] for i in scored])
    seqs, lengths = [[] for _ in range(n)], [0] * n
    for i, p, c in zip(scored, prompt_ids, cont_ids):
        seqs[i] = truncate_left(p + c, max_length)
        lengths[i] = min(len(c), max(len(seqs[i]) - 1, 0))
    order = sorted((i for i in scored if lengths[i] > 0), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = pad_ids([seqs[i] for i in rows], pad, side="left", device=device)
        span = max(lengths[i] for i in rows)
        logits = padded_logits(model, ids, mask, span + 1)
        # Position t predicts token t + 1: the last `span` tokens are predicted by the `span` positions before the end.
        logits = logits[:, -(span + 1) : -1].float()
        target = ids[:, -span:]
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
        ).view(len(rows), span)
        lens = torch.tensor([lengths[i] for i in rows], device=nll.device)
        keep = torch.arange(span, device=nll.device).unsqueeze(0) >= (span - lens).unsqueeze(1)
        index = torch.tensor(rows)
        total[index] = torch.where(keep, nll.double(), 0.0).sum(-1).cpu()  # where, not *: a pad position may hold nan
        count[index] = lens.cpu()
    return total, count


def perplexity(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
) -> torch.Tensor:
    """Perplexity of each continuation given its prompt: ``exp(mean NLL of its tokens)``.

    Run it on the unsteered model (no steering hooks): fluency is judged by the model the
    steering departs from. The continuation's tokens are the joined text's ids after the prompt's
    (:func:`~austeer_pl.core.tokens.encode_answers`); empty continuations give ``nan``. Batched: one forward pass per
    ``batch_size`` rows (see :func:`continuation_nll`).

    Args:
        model: the unsteered causal LM.
        tokenizer: its tokenizer.
        prompts: the texts the generations followed (as the model saw them).
        continuations: the generated new text of each prompt.
        batch_size: rows per forward pass.
        max_length: keep the last ``max_length`` ids of each row.

    Returns:
        float64 ``(n,)`` perplexities (``nan`` for empty continuations).

    Example:
        >>> perplexity(model, tok, ["Review:"], [" A fine film."])
        tensor([23.4], dtype=torch.float64)
    """
    total, count = continuation_nll(
        model, tokenizer, prompts, continuations, batch_size=batch_size, max_length=max_length
    )
    out = torch.full_like(total, math.nan)
    has = count > 0
    out[has] = torch.exp(total[has] / count[has].double())
    return out


def mean_perplexity(values: torch.Tensor | Sequence[float]) -> float:
    """Geometric mean of the finite per-generation perplexities (``nan`` when there are none).

    Example:
        >>> mean_perplexity([4.0, 16.0])
        8.0
    """
    t = torch.as_tensor(values, dtype=torch.float64).flatten()
    t = t[torch.isfinite(t)]
    return float(torch.exp(torch.log(t).mean())) if t.numel() else math.nan


def distinct_n_scores(texts: Sequence[str], n: int = 2) -> list[float]:
    """Distinct-n of each text: distinct n-grams / n-grams of its lower-cased whitespace words.

    A text with fewer than ``n`` words has no n-gram and gets ``nan``.

    Example:
        >>> distinct_n_scores(["a b a b", "one"], 2)
        [0.6666666666666666, nan]
    """
    if n < 1:
        raise AusteerError(f"distinct-n needs n >= 1, got {n}")
    out = []
    for text in texts:
        words = str(text).lower().split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        out.append(len(set(grams)) / len(grams) if grams else math.nan)
    return out


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Mean distinct-n over the texts that have at least one n-gram (``nan`` when none has).

    Example:
        >>> distinct_n(["a b a b", "x y z"], 2)
        0.8333333333333333
    """
    scores = [s for s in distinct_n_scores(texts, n) if not math.isnan(s)]
    return sum(scores) / len(scores) if scores else math.nan


__all__ = [
    "continuation_nll",
    "distinct_n",
    "distinct_n_scores",
    "mean_perplexity",
    "perplexity",
]
