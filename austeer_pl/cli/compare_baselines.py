"""``evaluate.py --compare``'s rows beside the registry's methods: prompting, calibration, prompting + AUSteer.

Run after the methods' fit and test, on the same frozen model, processes and examples
(:mod:`austeer_pl.fit.baselines`, :mod:`austeer_pl.fit.calibration`). Each row has the fields of a
method's row; a prompt's row adds what the prompt costs (``prompt_tokens``, ``added_prompt_tokens``),
the calibration row its offsets. ``prompted_austeer`` returns its state, whose side effects are measured
with the methods'.
"""

from __future__ import annotations

from typing import Any

from austeer_pl.core.fileio import jsonable
from austeer_pl.fit.baselines import FEW_SHOT_GRID, PROMPT_BASELINES, QUICK_FEW_SHOT_GRID, PromptBaselines
from austeer_pl.fit.calibration import Calibration, position_leak
from austeer_pl.methods.registry import FITTED, UNSTEERED
from austeer_pl.scoring.evaluate import accuracy_summary

__all__ = ["baseline_rows", "method_row"]


def method_row(
    name: str,
    hyper: dict[str, Any],
    val_accuracy: float,
    predictions,
    examples,
    *,
    parts: dict[str, float],
    val_seconds: float,
    test_seconds: float = 0.0,
    n_steered: int = 0,
    grid: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One row of the comparison: a method's (or a baseline's) choice, test accuracy and costs."""
    summary = accuracy_summary(examples, predictions)
    return {
        "name": name,
        "hyperparameters": jsonable(hyper),
        "val_accuracy": val_accuracy,
        "test_accuracy": summary["accuracy"],
        "ci_low": summary["ci_low"],
        "ci_high": summary["ci_high"],
        "n_test": summary["n"],
        "test": summary,
        "n_steered_activations": n_steered,
        "state_bytes": 0,
        "state_dir": None,
        "fit_seconds": sum(parts.values()),
        "fit_seconds_parts": parts,
        "val_seconds": val_seconds,
        "test_seconds": test_seconds,
        "grid": grid or [],
        **extra,
    }


def _row(name: str, hyper: dict[str, Any], val_accuracy: float, predictions, examples, seconds: float, **extra) -> dict:
    """A baseline's row: all its time is its tuning."""
    return method_row(
        name, hyper, val_accuracy, predictions, examples, parts={"tuning": seconds}, val_seconds=seconds, **extra
    )


def _prompt_extra(result) -> dict[str, Any]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "added_prompt_tokens": result.added_prompt_tokens,
        "prompts_truncated": result.truncated,
    }


def baseline_rows(session, wanted: tuple[str, ...], *, quick: bool, shots: tuple[int, ...] | None = None):
    """The rows of the ``wanted`` baselines (:data:`~austeer_pl.fit.baselines.PROMPT_BASELINES`),
    ``{name: state}`` of those that steer, and ``{name: reason}`` of those that could not run, after
    ``session`` (the comparison's fit) has tested its methods."""
    wanted = tuple(b for b in PROMPT_BASELINES if b in wanted)
    rows: list[dict[str, Any]] = []
    states: dict[str, Any] = {}
    omitted: dict[str, str] = {}
    if not wanted:
        return rows, states, omitted
    data = session.data
    test = data.splits["test"]
    prompts = PromptBaselines(
        session.model,
        session.tokenizer,
        session.layout,
        data,
        session.coll,
        scoring=session.scoring,
        criterion=session.criterion,
        selection=session.config.selection,
    )
    zero = few = None
    if {"zero_shot", "prompted_austeer"} & set(wanted):
        zero = prompts.zero_shot()
    if {"few_shot", "prompted_austeer"} & set(wanted):
        few = prompts.few_shot(shots or (QUICK_FEW_SHOT_GRID if quick else FEW_SHOT_GRID))
    for result in (zero, few):
        if result is not None and result.name in wanted:
            rows.append(
                _row(
                    result.name,
                    result.settings,
                    result.val_accuracy,
                    result.test_predictions,
                    test,
                    result.seconds,
                    grid=result.grid,
                    **_prompt_extra(result),
                )
            )
    if "few_shot" in wanted and few is None:
        omitted["few_shot"] = "no training examples to draw demonstrations from"
    if "calibrated" in wanted and session.scoring != "loglik":  # offsets on log-likelihoods: loglik scoring only
        omitted["calibrated"] = (
            f"offsets on choice log-likelihoods; this comparison scores by {session.scoring} (use --scoring loglik)"
        )
    elif "calibrated" in wanted and (leak := position_leak(data.splits["val"], test)):
        omitted["calibrated"] = leak
    elif "calibrated" in wanted:
        cal = Calibration.fit(session.model, session.tokenizer, data, session.coll)
        rows.append(_row("calibrated", {"offsets": cal.describe()}, cal.val_accuracy, cal.test_predictions, test, 0.0))
    if "prompted_austeer" in wanted:
        assert zero is not None
        best = prompts.better(zero, few)
        fitted = prompts.prompted_austeer(best, session.config)
        result = fitted.results[FITTED]
        state = result.chosen.state
        row = _row(
            "prompted_austeer",
            {**best.settings, **result.chosen.hyper},
            result.val_accuracy,
            result.test_predictions,
            test,
            best.seconds + float(fitted.summary.get("fit_seconds") or 0.0) + result.tuning_seconds,
            n_steered=result.chosen.n_steered,
            grid=result.grid,
            **_prompt_extra(best),
            prompt_test_accuracy=accuracy_summary(test, fitted.results[UNSTEERED].test_predictions)["accuracy"],
        )
        rows.append(row)
        states["prompted_austeer"] = state
    return rows, states, omitted
