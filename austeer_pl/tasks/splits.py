"""Deterministic splits (a task's own, or carved by seed) and contrastive pairs: each training example
becomes prompt + right answer vs. prompt + one wrong answer (``sample``) or every wrong one (``all``)."""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterable

from austeer_pl.errors import AusteerError
from austeer_pl.tasks.schema import NEGATIVE_MODES, ContrastivePair, TaskExample


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    if val_fraction > 0 and n_val == 0 and n >= 3:
        n_val = 1
    if test_fraction > 0 and n_test == 0 and n >= 3:
        n_test = 1
    return n_val, n_test


def split_examples(
    examples: Iterable[TaskExample],
    *,
    seed: int,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    max_train: int | None = None,
    max_val: int | None = None,
    max_test: int | None = None,
    keep_lone_split: bool = False,
) -> dict[str, list[TaskExample]]:
    """Split examples into disjoint ``train``, ``val`` and ``test`` lists, deterministically for ``seed``.

    Examples are ordered by uid, then shuffled with ``seed``; ``val_fraction`` and ``test_fraction``
    of them (rounded, at least one each when nonzero and there are 3 or more examples) go to val and
    test, the rest to train. When examples carry predefined splits (uid prefix ``train:``, and
    ``validation:`` and/or ``test:``) those are used instead: train comes from ``train``; with both
    held-out splits, val from ``validation`` and test from ``test``; with one, it is carved into val
    and test in the ratio ``val_fraction : test_fraction``. The ``max_*`` caps are applied last (to
    the shuffled lists), so changing ``max_train`` leaves val and test unchanged.

    Args:
        examples: The task's examples.
        seed: Shuffling seed.
        val_fraction: Share of examples for validation.
        test_fraction: Share of examples for test.
        max_train: Keep at most this many training examples (None: all).
        max_val: Keep at most this many validation examples.
        max_test: Keep at most this many test examples.
        keep_lone_split: When every example names the same split, keep it there (a command that
            reads only the test rows of a file of test rows) instead of splitting by the fractions.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``.

    Raises:
        AusteerError: Bad fractions or caps, or too few examples to split.

    Example:
        >>> parts = split_examples(load_task("rotten_tomatoes").examples, seed=0, max_train=64)
        >>> len(parts["train"]), len(parts["val"]), len(parts["test"])
        (64, 1706, 1706)
    """
    for label, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(fraction, int | float) or isinstance(fraction, bool) or not 0 <= fraction < 1:
            raise AusteerError(f"{label}={fraction!r} must be a number in [0, 1); e.g. 0.2")
    if val_fraction + test_fraction >= 1:
        raise AusteerError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction:g} leaves no training examples; make their sum below 1"
        )
    for label, cap in (("max_train", max_train), ("max_val", max_val), ("max_test", max_test)):
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
            raise AusteerError(f"{label}={cap!r} must be a non-negative integer or None")
    pool = sorted(examples, key=lambda ex: ex.uid)
    if not pool:
        raise AusteerError("no examples to split; check that the task loaded any")
    rng = random.Random(seed)
    groups: dict[str | None, list[TaskExample]] = {}
    for ex in pool:
        groups.setdefault(ex.split, []).append(ex)
    unlabelled = groups.pop(None, [])
    labelled = {"val" if name == "validation" else name: rows for name, rows in groups.items()}
    if len(labelled) == 1 and not unlabelled and not keep_lone_split:
        only = next(iter(labelled))
        warnings.warn(
            f"every example is labelled split '{only}'; the labels are ignored and the examples are split by "
            f"val_fraction={val_fraction:g} and test_fraction={test_fraction:g}",
            stacklevel=2,
        )
        labelled = {}
        unlabelled = pool
    if not labelled:
        rng.shuffle(unlabelled)
        n_val, n_test = _split_sizes(len(unlabelled), val_fraction, test_fraction)
        if len(unlabelled) - n_val - n_test < 1:
            raise AusteerError(
                f"only {len(unlabelled)} examples: too few for val_fraction={val_fraction:g} and test_fraction={test_fraction:g}; "
                "add examples or lower the fractions"
            )
        test, val, train = unlabelled[:n_test], unlabelled[n_test : n_test + n_val], unlabelled[n_test + n_val :]
    else:
        # Labelled rows stay in their split (a row marked test never reaches training); the
        # unlabelled rows fill the splits that no row names, by the fractions.
        parts = {name: list(labelled.get(name, [])) for name in ("train", "val", "test")}
        for rows in parts.values():
            rng.shuffle(rows)
        missing = [name for name in ("train", "val", "test") if name not in labelled]
        rng.shuffle(unlabelled)
        if unlabelled and missing:
            fractions = {"val": val_fraction, "test": test_fraction}
            if "train" in missing:
                n_val = round(len(unlabelled) * val_fraction) if "val" in missing else 0
                n_test = round(len(unlabelled) * test_fraction) if "test" in missing else 0
                sizes = {"test": n_test, "val": n_val}
            else:
                held = [name for name in missing]
                total = sum(fractions[name] for name in held)
                n_test = (
                    0
                    if "test" not in held
                    else (
                        len(unlabelled)
                        if len(held) == 1
                        else round(len(unlabelled) * test_fraction / total)
                        if total
                        else 0
                    )
                )
                sizes = {"test": n_test, "val": len(unlabelled) - n_test if "val" in held else 0}
            start = 0
            for name in ("test", "val"):
                parts[name] += unlabelled[start : start + sizes[name]]
                start += sizes[name]
            parts["train"] += unlabelled[start:]
        elif unlabelled:
            parts["train"] += unlabelled
        elif "train" in labelled and len(missing) == 1:
            # One held-out split named: carve it into val and test by the fractions' ratio.
            held = parts["val"] or parts["test"]
            total = val_fraction + test_fraction
            n_test = 0 if total == 0 else round(len(held) * test_fraction / total)
            if val_fraction > 0 and test_fraction > 0 and len(held) >= 2:
                n_test = min(max(n_test, 1), len(held) - 1)
            n_val = 0 if total == 0 else len(held) - n_test
            parts["val"], parts["test"] = held[:n_val], held[n_val : n_val + n_test]
        train, val, test = parts["train"], parts["val"], parts["test"]
    return {
        "train": train if max_train is None else train[:max_train],
        "val": val if max_val is None else val[:max_val],
        "test": test if max_test is None else test[:max_test],
    }


def make_pairs(
    examples: Iterable[TaskExample], *, negatives: str = "sample", seed: int = 0, max_pairs: int | None = None
) -> list[ContrastivePair]:
    """Contrastive pairs (prompt, right choice, wrong choice) from examples.

    Args:
        examples: The examples, in the order the pairs should follow.
        negatives: ``"sample"``: one wrong choice per example, drawn with ``seed`` (and the
            example's uid, so the draw does not depend on order); ``"all"``: one pair for every
            wrong choice, in choice order.
        seed: Seed of the ``"sample"`` draws.
        max_pairs: Keep only the first ``max_pairs`` pairs (None: all).

    Returns:
        The pairs, grouped by example in input order.

    Raises:
        AusteerError: Unknown ``negatives`` or a bad ``max_pairs``.

    Example:
        >>> ex = TaskExample("2 + 2 =", ("4", "5", "6"), 0, "demo:0")
        >>> [p.negative for p in make_pairs([ex], negatives="all")]
        ['5', '6']
    """
    if negatives not in NEGATIVE_MODES:
        raise AusteerError(f"negatives={negatives!r} is not supported; use one of {', '.join(NEGATIVE_MODES)}")
    if max_pairs is not None and (isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1):
        raise AusteerError(f"max_pairs={max_pairs!r} must be a positive integer or None")
    pairs: list[ContrastivePair] = []
    for ex in examples:
        if getattr(ex, "negative", None) is not None and getattr(ex, "positive", None) is not None:
            # The paper protocol's examples carry the training pair's own strings (BoolQ trains on
            # "Yes"/"No" and scores " yes"/" no"; numeric tasks have one chosen wrong answer).
            pairs.append(
                ContrastivePair(prompt=ex.prompt, positive=ex.positive, negative=ex.negative, example_uid=ex.uid)
            )
            if max_pairs is not None and len(pairs) >= max_pairs:
                return pairs[:max_pairs]
            continue
        wrong = ex.wrong_choices
        chosen = wrong if negatives == "all" else (random.Random(f"{seed}:{ex.uid}").choice(wrong),)
        pairs.extend(
            ContrastivePair(prompt=ex.prompt, positive=ex.target, negative=neg, example_uid=ex.uid) for neg in chosen
        )
        if max_pairs is not None and len(pairs) >= max_pairs:
            return pairs[:max_pairs]
    return pairs
