"""``python analyze.py behaviour``: fit AUSteer (and CAA, optionally ITI) on a behaviour task, then draw
the judge score and perplexity against the strength on the same held-out prompts
(:func:`~austeer_pl.analyses.curve.strength_curve`), written as JSON and PNG and logged to W&B.

A behaviour task is the ``prompt, positive, negative`` schema of :mod:`austeer_pl.tasks` (a prompt and
two continuations, one with the behaviour); generation and judging are :mod:`austeer_pl.scoring`'s,
the budgeted choice :mod:`austeer_pl.fit.judged`'s; ``docs/behaviour.md`` walks through them.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from austeer_pl.analyses.curve import strength_curve
from austeer_pl.cli.rundir import claim_run_dir, task_stem
from austeer_pl.cli.runtime import (
    OneLineParser,
    add_output_options,
    parse_list,
    quiet,
    run_main,
)
from austeer_pl.cli.tracking import log_result_wandb
from austeer_pl.core.fileio import json_output, png_output
from austeer_pl.core.models import load_model
from austeer_pl.core.pairs import accumulate_momentum
from austeer_pl.core.pins import check_model
from austeer_pl.core.sites import ModelLayout, locate_units
from austeer_pl.core.state import SteeringState
from austeer_pl.errors import AusteerError
from austeer_pl.fit.judged import DEFAULT_BUDGET
from austeer_pl.methods.caa import caa_candidate_layers, caa_state
from austeer_pl.scoring.judges import (
    load_judge,
)
from austeer_pl.tasks.config import DataConfig
from austeer_pl.tasks.pins import check_task
from austeer_pl.tasks.prompts import behaviour_prompts, pair_texts
from austeer_pl.tasks.splits import make_pairs


def add_behaviour_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every option of ``analyze.py behaviour`` (a complete set: do not add the other analyses' common options)."""
    p.add_argument(
        "--steering", required=True, help="steering state folder (the state to sweep, e.g. written by train.py)"
    )
    p.add_argument(
        "--caa",
        default=None,
        help="a CAA state folder to sweep beside it (default: fit CAA on the same training pairs)",
    )
    p.add_argument(
        "--iti",
        default=None,
        help="an ITI state folder to sweep beside them (e.g. from evaluate.py --compare --methods iti --export_dir)",
    )
    p.add_argument(
        "--iti_alphas", default=None, help="ITI strengths, e.g. 0,5,15 (default: 0, 0.5, 1, 2, 4 x its alpha)"
    )
    p.add_argument(
        "--task",
        "--data.task",
        dest="task",
        default=None,
        help="behaviour task (default: the one the state was fitted on; sentiment or a prompt,positive,negative file)",
    )
    p.add_argument(
        "--model",
        "--model.model_name",
        dest="model",
        default=None,
        help="base model (default: the one the state names)",
    )
    p.add_argument(
        "--judge", default="vader", help="vader, vader:negative or a local sequence-classification model folder"
    )
    p.add_argument(
        "--split", default="val", choices=["val", "test"], help="prompts to generate from (default: validation)"
    )
    p.add_argument("--seed", type=int, default=None, help="split seed (default: the fit's)")
    p.add_argument("--max_prompts", type=int, default=32, help="distinct held-out prompts to generate from")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument(
        "--alphas", default=None, help="alphas of the state, e.g. 0,1,2,4 (default: 0, 0.5, 1, 2, 4 x its alpha)"
    )
    p.add_argument(
        "--caa_multipliers",
        default=None,
        help="CAA multipliers, e.g. 0,1,2,4 (default: 0, 0.5, 1, 2, 4 x its multiplier)",
    )
    p.add_argument("--caa_layer", type=int, default=None, help="layer of a fitted CAA (default: a third of the way in)")
    p.add_argument(
        "--max_train_pairs", type=int, default=None, help="pairs of a fitted CAA (default: the fit's, else 128)"
    )
    p.add_argument(
        "--prompting",
        default="zero_shot,few_shot",
        help="prompting baselines beside the curves: zero_shot (the task's instruction), few_shot (--shots "
        "demonstrations), both by default; 'none' for neither",
    )
    p.add_argument("--shots", type=int, default=4, help="demonstrations of the few_shot baseline (default 4)")
    p.add_argument(
        "--budget", type=float, default=DEFAULT_BUDGET, help="fluency budget drawn on the plot (perplexity ratio)"
    )
    p.add_argument(
        "--allow_changed_inputs",
        action="store_true",
        help="go on even if the state's task file or base model changed since the fit (a warning)",
    )

    add_output_options(p, name="behaviour")
    return p


def _optional_list(text: str | None, flag: str) -> list[float] | None:
    return None if text is None else parse_list(text, flag, float)


def fit_caa(
    model: nn.Module,
    tokenizer,
    texts: Sequence[tuple[str, str]],
    *,
    layer: int | None = None,
    multiplier: float = 1.0,
    layout=None,
    batch_size: int = 16,
    base_model: str = "",
) -> SteeringState:
    """A CAA state from ``(positive_text, negative_text)`` pairs (residual mean difference at ``layer``, default a third in)."""

    if not isinstance(layout, ModelLayout):
        layout = locate_units(model, layout)
    acc = accumulate_momentum(model, tokenizer, texts, sites=["residual"], batch_size=batch_size, layout=layout)
    if layer is None:
        layer = caa_candidate_layers(layout.n_layers, [1 / 3])[0]
    return caa_state(acc, layout, layer=layer, multiplier=multiplier, base_model=base_model)


def _prompting(args: argparse.Namespace) -> list[str]:
    text = str(getattr(args, "prompting", "none") or "none").strip().lower()
    names = [] if text == "none" else parse_list(text, "--prompting", str)
    bad = [n for n in names if n not in ("zero_shot", "few_shot")]
    if bad:
        raise AusteerError(f"--prompting: unknown baseline(s) {', '.join(bad)}; choose zero_shot, few_shot or none")
    if "few_shot" in names and getattr(args, "shots", 4) <= 0:
        raise AusteerError(f"--shots must be positive, got {args.shots}")
    return names


def behaviour_main(args: argparse.Namespace) -> dict[str, Any]:
    """``analyze.py behaviour``: sweep alpha for a state and CAA on the same held-out prompts; JSON + PNG.

    ``args`` holds the options of :func:`add_behaviour_arguments`. The prompts are the distinct
    formatted prompts of the first ``--max_prompts`` examples of the split (the split the state's
    fit recorded). Without ``--caa`` a CAA state is fitted on the training pairs of the same
    split (multiplier 1). Output paths are checked before any work.

    Example:
        >>> parser = add_behaviour_arguments(argparse.ArgumentParser())
        >>> behaviour_main(parser.parse_args(["--steering", "runs/sentiment/state"]))
    """

    for key in ("max_prompts", "max_new_tokens", "batch_size", "max_train_pairs", "max_length"):
        value = getattr(args, key, None)
        if value is not None and value <= 0:
            raise AusteerError(f"--{key} must be positive, got {value}")
    state = SteeringState.from_pretrained(args.steering)
    caa = SteeringState.from_pretrained(args.caa) if args.caa else None
    # The fit's recorded data config rebuilds its splits (as evaluate.py does); another task keeps its fractions.
    config = DataConfig.of_state(state.metadata, task=args.task, seed=args.seed)
    data = config.to_dict()
    task_spec = config.task
    stem = task_stem(str(task_spec))
    out = Path(args.out or Path("runs") / "analyses" / f"behaviour-{stem}.json")
    png = Path(args.plot or out.with_suffix(".png"))
    model_name = args.model or state.base_model
    if not model_name:
        raise AusteerError("the state does not name its base model; pass --model")
    reads = [args.steering, args.caa, getattr(args, "iti", None), task_spec, model_name, args.judge]
    out_file = json_output(out, "strength curve", overwrite=args.overwrite).check(inputs=reads)
    png_file = png_output(png, "strength curve plot", overwrite=args.overwrite).check(inputs=reads)
    alphas = _optional_list(args.alphas, "--alphas")
    _prompting(args)  # a bad baseline list is one line before any work
    multipliers = _optional_list(args.caa_multipliers, "--caa_multipliers")
    judge = load_judge(args.judge)
    quiet()
    check_task(state.metadata.get("inputs"), config, allow=args.allow_changed_inputs)
    seed = config.seed
    task, splits = config.load()
    examples = splits[args.split][: args.max_prompts]
    if not examples:
        raise AusteerError(f"the {args.split} split of '{task_spec}' is empty; choose another split or task")
    model, tokenizer = load_model(model_name, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir)
    layout = locate_units(model)
    state.check_compatible(layout)
    check_model(
        state.metadata.get("inputs"), model_name, model, allow=args.allow_changed_inputs, cache_dir=args.cache_dir
    )
    chat = {"on": True, "off": False, "auto": None, None: data.get("chat_template")}[args.chat_template]
    prompts = behaviour_prompts(tokenizer, task, examples, chat_template=chat)
    max_length = args.max_length or data.get("max_length")
    caa_info: dict[str, Any] = {"source": str(args.caa)} if caa is not None else {}
    if caa is None and state.method != "caa":
        n_pairs = args.max_train_pairs or data.get("max_train_pairs") or 128
        pairs = make_pairs(splits["train"], seed=seed, max_pairs=n_pairs)
        started = time.perf_counter()
        caa = fit_caa(
            model,
            tokenizer,
            pair_texts(tokenizer, task, pairs, chat_template=chat),
            layer=args.caa_layer,
            layout=layout,
            batch_size=args.batch_size,
            base_model=model_name,
        )
        caa_info = {
            "source": "fitted",
            "n_pairs": len(pairs),
            "layer": caa.metadata.get("layer"),
            "fit_seconds": time.perf_counter() - started,
        }
    states = {state.method: state}
    sweep: dict[str, list[float]] = {}
    if alphas is not None:
        sweep[state.method] = alphas
    if caa is not None and state.method != "caa":
        states["caa"] = caa
        if multipliers is not None:
            sweep["caa"] = multipliers
    if getattr(args, "iti", None):
        states["iti"] = SteeringState.from_pretrained(args.iti)
        iti_alphas = _optional_list(getattr(args, "iti_alphas", None), "--iti_alphas")
        if iti_alphas is not None:
            sweep["iti"] = iti_alphas
    info = {
        "task": str(task_spec),
        "task_name": task.name,
        "base_model": model_name,
        "split": args.split,
        "seed": seed,
        "steering": str(args.steering),
        "caa": caa_info,
    }
    prompted = {}
    for name in _prompting(args):  # the same requests, prompted: the same examples of the same split
        settings = {"instruction": "auto"} if name == "zero_shot" else {"shots": args.shots}
        variant, parts = config.replace(**settings).load()
        prompted[name] = behaviour_prompts(
            tokenizer, variant, parts[args.split][: args.max_prompts], chat_template=chat
        )
        info[f"{name}_settings"] = settings
    result = strength_curve(
        model,
        tokenizer,
        states,
        prompts,
        judge,
        alphas=sweep or None,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        max_length=max_length,
        layout=layout,
        budget=args.budget,
        out=out_file,
        plot=png_file,
        info=info,
        prompted=prompted,
    )
    if getattr(args, "wandb_mode", "disabled") != "disabled":
        run = claim_run_dir("analyze-behaviour", str(task_spec), args.run_dir)
        try:
            log_result_wandb(
                {"analysis": "behaviour", **result},
                png,
                out,
                mode=args.wandb_mode,
                project=args.wandb_project,
                run_dir=run.path,
            )
        finally:
            run.release()
    print(f"behaviour: wrote {out} and {png}")
    return result


def behaviour_cli(argv: Sequence[str] | None = None) -> int:
    """``analyze.py behaviour`` on its own: 0 on success, 2 with a one-line ``error: ...`` on bad input."""

    parser = add_behaviour_arguments(
        OneLineParser(
            prog="analyze.py behaviour", description="Judge score and perplexity against alpha (AUSteer and CAA)."
        )
    )
    return run_main(lambda: behaviour_main(parser.parse_args(argv)))


__all__ = [
    "add_behaviour_arguments",
    "behaviour_cli",
    "behaviour_main",
    "fit_caa",
]
