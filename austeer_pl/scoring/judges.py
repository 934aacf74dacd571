"""Judging generated text: a pluggable behaviour scorer.

A :class:`Judge` turns texts into one number each (higher: more of the wanted behaviour) and
calls a text *positive* when its score reaches the judge's ``threshold``. Built in:

* :class:`VaderJudge`: sentiment with VADER (PyPI ``vadersentiment``; the lexicon ships inside
  the package, nothing is downloaded). The score is VADER's ``compound`` in ``[-1, 1]`` and a
  text is positive when ``compound >= 0.05`` (VADER's own convention). ``target="negative"``
  scores ``-compound`` instead, so "positive" then means "negative sentiment".
* :class:`CallableJudge`: any Python function of texts (batched or one text at a time), e.g. a
  keyword rule for refusals or an API call you make yourself.
* :class:`ClassifierJudge`: a local transformers sequence-classification model folder; the score
  is the softmax probability of the behaviour's label, positive at ``>= 0.5``.

:func:`load_judge` resolves a spec (``"vader"``, ``"vader:negative"``, a classifier folder, a
callable or a judge) into a judge.

Fluency beside the judge is :mod:`austeer_pl.scoring.fluency`.

Example:
    >>> judge = load_judge("vader")
    >>> judge.judge(["What a wonderful film.", "Dull and tedious."]).positive
    [True, False]
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from austeer_pl.core.models import load_error
from austeer_pl.errors import AusteerError

#: VADER's convention: compound >= 0.05 is positive, <= -0.05 negative, neutral between.
VADER_THRESHOLD = 0.05
JUDGE_SPECS = ("vader", "vader:positive", "vader:negative", "PATH (a sequence-classification model folder)")


@dataclass(frozen=True)
class JudgeResult:
    """Scores of some texts and which of them show the behaviour (``score >= threshold``)."""

    scores: list[float]
    positive: list[bool]

    @property
    def n_positive(self) -> int:
        return sum(self.positive)


@runtime_checkable
class JudgeLike(Protocol):
    """What the rest of austeer-pl needs of a judge."""

    name: str
    score_name: str
    threshold: float

    def score(self, texts: Sequence[str]) -> list[float]: ...

    def judge(self, texts: Sequence[str]) -> JudgeResult: ...


class Judge:
    """Base class of judges: subclasses implement :meth:`score`.

    Attributes:
        name: short name recorded in reports (``"vader"``, ``"classifier:PATH"``, ...).
        score_name: what the score is (``"compound"``, ``"p(POSITIVE)"``, ...).
        threshold: a text shows the behaviour when its score is at least this.
    """

    name = "judge"
    score_name = "score"
    threshold = 0.0

    def score(self, texts: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def judge(self, texts: Sequence[str]) -> JudgeResult:
        """Scores of ``texts`` and, for each, whether it shows the behaviour."""
        texts = list(texts)
        scores = [float(s) for s in self.score(texts)]
        if len(scores) != len(texts):
            raise AusteerError(
                f"judge '{self.name}' returned {len(scores)} scores for {len(texts)} texts; return one score per text"
            )
        for value in scores:
            if not math.isfinite(value):
                raise AusteerError(
                    f"judge '{self.name}' returned a non-finite score ({value}); return a finite number per text"
                )
        return JudgeResult(scores, [s >= self.threshold for s in scores])

    def __call__(self, texts: Sequence[str]) -> list[float]:
        return self.score(texts)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "score_name": self.score_name, "threshold": self.threshold}


class VaderJudge(Judge):
    """Sentiment with VADER: the ``compound`` score, positive at ``>= 0.05``.

    Args:
        target: ``"positive"`` (score = compound) or ``"negative"`` (score = -compound, so the
            share "positive" is the share of negative-sentiment texts).

    Example:
        >>> VaderJudge().score(["good"])  # the lexicon valence 1.9, normalised: 1.9 / sqrt(1.9**2 + 15)
        [0.4404]
    """

    score_name = "compound"
    threshold = VADER_THRESHOLD

    def __init__(self, target: str = "positive") -> None:
        if target not in ("positive", "negative"):
            raise AusteerError(f"the VADER judge's target must be positive or negative, not '{target}'")
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # noqa: PLC0415 - the VADER judge only
        except ImportError:
            raise AusteerError("the vader judge needs the vadersentiment package: pip install vadersentiment") from None
        self._analyzer = SentimentIntensityAnalyzer()
        self.target = target
        self._sign = 1.0 if target == "positive" else -1.0
        self.name = "vader" if target == "positive" else "vader:negative"
        if target == "negative":
            self.score_name = "-compound"

    def score(self, texts: Sequence[str]) -> list[float]:
        return [self._sign * float(self._analyzer.polarity_scores(str(t))["compound"]) for t in texts]


class CallableJudge(Judge):
    """Any function as a judge.

    Args:
        fn: ``fn(list_of_texts) -> sequence of numbers`` (``batched=True``) or
            ``fn(text) -> number`` (``batched=False``); booleans count as 1 and 0.
        threshold: texts scoring at least this show the behaviour (default 0.5: a probability
            or a 0/1 rule).
        name: recorded in reports.
        score_name: what the score is.
        batched: whether ``fn`` takes a list of texts.

    Example:
        >>> refuses = CallableJudge(lambda t: "I can't" in t or "I cannot" in t, batched=False, name="refusal")
        >>> refuses.judge(["I cannot help with that.", "Sure, here it is."]).positive
        [True, False]
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        threshold: float = 0.5,
        name: str = "callable",
        score_name: str = "score",
        batched: bool = True,
    ) -> None:
        if not callable(fn):
            raise AusteerError(f"a callable judge needs a function, got {type(fn).__name__}")
        self.fn = fn
        self.threshold = float(threshold)
        self.name = name
        self.score_name = score_name
        self.batched = batched

    def score(self, texts: Sequence[str]) -> list[float]:
        texts = list(texts)
        raw = self.fn(texts) if self.batched else [self.fn(t) for t in texts]
        if isinstance(raw, torch.Tensor):
            raw = raw.detach().flatten().tolist()
        try:
            return [float(v) for v in raw]
        except (TypeError, ValueError):
            raise AusteerError(
                f"judge '{self.name}' must return numbers (or booleans), got {type(raw).__name__}"
            ) from None


class ClassifierJudge(Judge):
    """A local transformers sequence-classification model as a judge.

    The score of a text is the softmax probability of ``positive_label`` (the sigmoid of the
    single logit for one-label models); a text is positive at ``>= threshold``. Texts are scored
    in right-padded batches (the model finds each row's last token from the pad token).

    Args:
        path: a folder written by ``save_pretrained`` (model and tokenizer); only local files are read.
        positive_label: the label that means the behaviour: a name in ``config.id2label``
            (case-insensitive) or an index. Default: the one label named like ``positive``/``pos``,
            else index 1 of a two-label model.
        threshold: probability at which a text counts as positive.
        batch_size: texts per forward pass.
        device: where to run the classifier (default: the CPU).
        max_length: truncate longer texts to this many tokens.

    Example:
        >>> judge = ClassifierJudge("models/sst2-distilbert", positive_label="POSITIVE")
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        positive_label: str | int | None = None,
        threshold: float = 0.5,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        max_length: int = 512,
    ) -> None:

        folder = Path(path)
        if not folder.is_dir():
            raise AusteerError(
                f"no classifier at {folder}: the folder does not exist; pass a folder written by save_pretrained"
            )
        try:  # custom code is never run: transformers would ask on stdin, and a "y" would run the folder's Python
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                str(folder), local_files_only=True, trust_remote_code=False
            )
        except (OSError, ValueError, KeyError) as err:
            raise load_error(
                err, f"the classifier judge {folder}", "pass a folder with its config, weights and tokenizer"
            ) from None
        self.model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token_id is None:
                raise AusteerError(
                    f"the tokenizer in {folder} has neither a pad nor an eos token; set one and save it again"
                )
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.label_index = self._resolve_label(positive_label)
        n_labels = int(self.model.config.num_labels)
        label_name = (
            (self.model.config.id2label or {}).get(self.label_index, str(self.label_index)) if n_labels > 1 else "1"
        )
        self.name = f"classifier:{folder}"
        self.score_name = f"p({label_name})"
        self.threshold = float(threshold)
        if batch_size <= 0:
            raise AusteerError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self.max_length = max_length

    def _resolve_label(self, positive_label: str | int | None) -> int:
        n = int(self.model.config.num_labels)
        id2label = {int(k): str(v) for k, v in (self.model.config.id2label or {}).items()}
        if n == 1:
            return 0
        if isinstance(positive_label, int) and not isinstance(positive_label, bool):
            if not 0 <= positive_label < n:
                raise AusteerError(
                    f"positive_label={positive_label} is out of range for a {n}-label classifier; use 0..{n - 1}"
                )
            return positive_label
        if isinstance(positive_label, str):
            hits = [i for i, name in id2label.items() if name.lower() == positive_label.lower()]
            if not hits:
                raise AusteerError(
                    f"the classifier has no label '{positive_label}' (its labels: {', '.join(id2label.values())}); pass one of them"
                )
            return hits[0]
        hits = [i for i, name in id2label.items() if name.lower() in ("positive", "pos")]
        if len(hits) == 1:
            return hits[0]
        if n == 2:
            return 1
        raise AusteerError(
            f"cannot tell which of the classifier's {n} labels ({', '.join(id2label.values())}) is the behaviour; pass positive_label"
        )

    @torch.inference_mode()
    def score(self, texts: Sequence[str]) -> list[float]:
        texts = list(texts)
        device = next(self.model.parameters()).device
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            ).to(device)
            logits = self.model(**batch).logits.float()
            if logits.shape[-1] == 1:
                probs = torch.sigmoid(logits[:, 0])
            else:
                probs = torch.softmax(logits, dim=-1)[:, self.label_index]
            out.extend(probs.cpu().tolist())
        return out


def load_judge(spec: str | os.PathLike | JudgeLike | Callable[..., Any] | None = "vader", **kwargs: Any) -> JudgeLike:
    """A judge from a spec.

    Args:
        spec: ``"vader"`` / ``"vader:positive"`` (positive sentiment), ``"vader:negative"``, the
            path of a local sequence-classification model folder (:class:`ClassifierJudge`), a
            judge (returned as is) or a callable of a list of texts (:class:`CallableJudge`).
        **kwargs: passed to :class:`ClassifierJudge` or :class:`CallableJudge`.

    Raises:
        AusteerError: an unknown spec.

    Example:
        >>> load_judge("vader:negative").name
        'vader:negative'
    """
    if spec is None:
        spec = "vader"
    if isinstance(spec, Judge) or (isinstance(spec, JudgeLike) and not isinstance(spec, str | os.PathLike)):
        return spec
    if callable(spec) and not isinstance(spec, str | os.PathLike):
        return CallableJudge(spec, **kwargs)
    text = str(spec).strip()
    if text.lower() in ("vader", "vader:positive"):
        return VaderJudge("positive")
    if text.lower() == "vader:negative":
        return VaderJudge("negative")
    path = Path(text).expanduser()
    if path.is_dir():
        return ClassifierJudge(path, **kwargs)
    raise AusteerError(
        f"unknown judge '{text}': not vader, vader:negative or an existing classifier folder; pass one of {', '.join(JUDGE_SPECS)}"
    )


__all__ = [
    "JUDGE_SPECS",
    "VADER_THRESHOLD",
    "CallableJudge",
    "ClassifierJudge",
    "Judge",
    "JudgeLike",
    "JudgeResult",
    "VaderJudge",
    "load_judge",
]
