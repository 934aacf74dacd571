"""``python analyze.py NAME [options]``: parse, run one analysis of :mod:`~austeer_pl.analyses.units` (or the
behaviour strength curve of :mod:`~austeer_pl.analyses.behaviour`), write its JSON and PNG, log them to W&B."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from austeer_pl.analyses.behaviour import add_behaviour_arguments, behaviour_main
from austeer_pl.analyses.context import SITE_CHOICES, AnalysisOptions, prepare
from austeer_pl.analyses.plots import PLOTS
from austeer_pl.analyses.units import (
    combinations,
    dimension_sweep,
    sign_policies,
    strength_convergence,
    token_promotion,
)
from austeer_pl.cli.rundir import claim_run_dir, task_stem
from austeer_pl.cli.runtime import (
    OneLineParser,
    add_output_options,
    list_type,
    quiet,
    run_main,
)
from austeer_pl.cli.tracking import log_result_wandb, resolve_wandb_mode
from austeer_pl.core.fileio import json_output, png_output, write_json_output
from austeer_pl.errors import AusteerError

ANALYSES: tuple[str, ...] = ("sweep", "combinations", "strength", "tokens", "sign")
ALIASES = {
    "dimension_sweep": "sweep",
    "dimensions": "sweep",
    "combination": "combinations",
    "strength_convergence": "strength",
    "kl": "strength",
    "token_promotion": "tokens",
    "promotion": "tokens",
    "promotion_vs_suppression": "sign",
    "sign_policy": "sign",
}


# ============================================================================ W&B
def _scalars(result: dict[str, Any]) -> dict[str, float]:
    name = result["analysis"]
    out: dict[str, float] = {}
    if name == "sweep":
        out = {
            "sweep/unsteered_accuracy": result["unsteered"]["accuracy"],
            "sweep/block_accuracy": result["whole_block"]["accuracy"],
            "sweep/best_unit_accuracy": result["summary"]["best_unit_accuracy"],
            "sweep/n_units_beating_block": result["summary"]["n_units_beating_block_accuracy"],
        }
    elif name == "combinations":
        out = {"combinations/best_positive_accuracy": max(p["accuracy"] for p in result["positive"])}
    elif name == "strength":
        kls = [p["kl_mean"] for p in result["points"] if p["kl_mean"] is not None]
        out = {"strength/kl_at_max_alpha": kls[-1] if kls else float("nan")}
    elif name == "tokens":
        out = {"tokens/mean_abs_change": result["mean_abs_change"]}
    elif name == "sign":
        out = {f"sign/best_{s}_accuracy": r["accuracy"] for s, r in result["best"].items()}
    return out


def log_wandb(
    result: dict[str, Any], png: Path, json_path: Path, *, mode: str, project: str, run_dir: Path
) -> str | None:
    """Log an analysis's plot, headline numbers and JSON to a W&B run (see :func:`~austeer_pl.cli.runtime.log_result_wandb`)."""

    return log_result_wandb(
        result, png, json_path, mode=mode, project=project, run_dir=run_dir, scalars=_scalars(result)
    )


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model, data and output")

    g.add_argument(
        "--model", "--model.model_name", dest="model", default=None, help="base model (default: smollm2-135m-instruct)"
    )
    g.add_argument("--task", "--data.task", dest="task", default="rotten_tomatoes", help="task spec (see README)")
    g.add_argument("--seed", "--data.seed", dest="seed", type=int, default=0, help="split seed")
    g.add_argument("--split", default="val", choices=["val", "test"], help="examples to score (default: validation)")
    g.add_argument(
        "--max_train_pairs",
        "--data.max_train_pairs",
        dest="max_train_pairs",
        type=int,
        default=None,
        help="training pairs of the momentum pass (default: the data module's)",
    )
    g.add_argument("--max_examples", type=int, default=None, help="examples to score (default: the data module's cap)")
    add_output_options(g, name="NAME")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="analyze.py", description="The AUSteer paper's activation-unit analyses; each writes JSON and a PNG plot."
    )
    sub = p.add_subparsers(dest="name", metavar="NAME", parser_class=OneLineParser)
    ints, floats = list_type(int, "list"), list_type(float, "list")

    s = sub.add_parser("sweep", aliases=["dimension_sweep"], help="one AU at a time within a block vs. the whole block")
    s.add_argument("--site", default="attention", choices=["attention", "ffn"])
    s.add_argument("--layer", type=int, default=None, help="block layer (default: the best block by mean |m|)")
    s.add_argument("--head", type=int, default=None, help="attention head (default: the best head of --layer)")
    s.add_argument(
        "--stride", type=int, default=None, help="sweep every n-th unit (default: at most --max_units units)"
    )
    s.add_argument("--max_units", type=int, default=64)
    s.add_argument("--alpha", type=float, default=2.0)

    s = sub.add_parser("combinations", help="positive AUs together, then with negative-momentum AUs added")
    s.add_argument("--site", default="attention", choices=list(SITE_CHOICES))
    s.add_argument("--sizes", type=ints, default=[1, 2, 4, 8, 16, 32])
    s.add_argument("--negatives", type=ints, default=[0, 1, 2, 4, 8, 16, 32])
    s.add_argument("--base", type=int, default=None, help="positive set the negatives join (default: the largest size)")
    s.add_argument("--alpha", type=float, default=2.0)
    s.add_argument("--negative_rule", default="signed", choices=["signed", "amplify"])

    s = sub.add_parser("strength", aliases=["strength_convergence"], help="KL(steered || unsteered) as alpha grows")
    s.add_argument("--site", default="attention", choices=list(SITE_CHOICES))
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--sign", default="promote", choices=["promote", "both"])
    s.add_argument("--alpha_min", type=float, default=10.0)
    s.add_argument("--alpha_max", type=float, default=1e5)
    s.add_argument("--n_alpha", type=int, default=9)

    s = sub.add_parser(
        "tokens", aliases=["token_promotion"], help="tokens one AU raises and lowers at the answer position"
    )
    s.add_argument("--site", default="attention", choices=["attention", "ffn"])
    s.add_argument("--layer", type=int, default=None)
    s.add_argument("--unit", type=int, default=None)
    s.add_argument("--alpha", type=float, default=20.0)
    s.add_argument("--top_n", type=int, default=10)

    s = sub.add_parser(
        "sign", aliases=["promotion_vs_suppression"], help="promote vs. both sign policies at the same k"
    )
    s.add_argument("--site", default="attention", choices=list(SITE_CHOICES))
    s.add_argument("--ks", type=ints, default=[5, 10, 20, 50, 100])
    s.add_argument("--alpha", type=floats, default=[1.0, 2.0])

    for action in {id(a): a for a in sub.choices.values()}.values():  # aliases share their parser
        _common(action)
    # Behaviour in free text: judge score and perplexity against alpha (its own options; no momentum pass here).

    add_behaviour_arguments(
        sub.add_parser("behaviour", help="judge score and perplexity vs. alpha in free text, AUSteer and CAA")
    )
    return p


def run_analysis(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one analysis from parsed arguments: prepare, analyse, write JSON and PNG, log to W&B."""

    name = ALIASES.get(name, name)
    if name not in ANALYSES:
        raise AusteerError(f"unknown analysis '{name}'; choose one of {', '.join(ANALYSES)}")
    for key in ("max_train_pairs", "max_examples", "batch_size", "max_length"):
        value = getattr(args, key)
        if value is not None and value <= 0:
            raise AusteerError(f"--{key} must be positive, got {value}")
    stem = task_stem(args.task)
    out = Path(args.out or Path("runs") / "analyses" / f"{name}-{stem}.json")
    png = Path(args.plot or out.with_suffix(".png"))
    if out.absolute() == png.absolute():
        raise AusteerError(f"--out and --plot are the same file {out}; give the plot its own path")
    reads = [args.task, args.model]
    out_file = json_output(out, "analysis JSON", overwrite=args.overwrite).check(inputs=reads)
    png_file = png_output(png, "analysis plot", overwrite=args.overwrite).check(inputs=reads)
    if args.wandb_mode not in ("offline", "online", "disabled"):
        raise AusteerError(f"--wandb_mode must be offline, online or disabled, not '{args.wandb_mode}'")
    if args.wandb_mode == "online":
        args.wandb_mode = resolve_wandb_mode("online", "offline")
    quiet()
    opts = AnalysisOptions(
        model=args.model,
        task=args.task,
        seed=args.seed,
        split=args.split,
        max_train_pairs=args.max_train_pairs,
        max_examples=args.max_examples,
        batch_size=args.batch_size,
        max_length=args.max_length,
        chat_template={"on": True, "off": False, "auto": None, None: None}[args.chat_template],
        dtype=args.dtype,
        device=args.device,
        cache_dir=args.cache_dir,
    )
    ctx = prepare(opts)
    started = time.perf_counter()
    if name == "sweep":
        result = dimension_sweep(
            ctx,
            site=args.site,
            layer=args.layer,
            head=args.head,
            stride=args.stride,
            max_units=args.max_units,
            alpha=args.alpha,
        )
    elif name == "combinations":
        result = combinations(
            ctx,
            site=args.site,
            sizes=args.sizes,
            negatives=args.negatives,
            base=args.base,
            alpha=args.alpha,
            negative_rule=args.negative_rule,
        )
    elif name == "strength":
        result = strength_convergence(
            ctx,
            site=args.site,
            k=args.k,
            sign=args.sign,
            alpha_min=args.alpha_min,
            alpha_max=args.alpha_max,
            n_alpha=args.n_alpha,
        )
    elif name == "tokens":
        result = token_promotion(
            ctx, site=args.site, layer=args.layer, unit=args.unit, alpha=args.alpha, top_n=args.top_n
        )
    else:
        result = sign_policies(ctx, site=args.site, ks=args.ks, alphas=args.alpha)
    result["analysis_seconds"] = time.perf_counter() - started
    result["plot"] = str(png)
    write_json_output(out_file, result)
    PLOTS[name](result, png_file)
    if args.wandb_mode != "disabled":
        run = claim_run_dir(f"analyze-{name}", args.task, args.run_dir)
        try:
            log_wandb(result, png, out, mode=args.wandb_mode, project=args.wandb_project, run_dir=run.path)
        finally:
            run.release()
    print(f"{name}: wrote {out} and {png}")
    return result


def analyze(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.name:
        parser.error(f"name an analysis: one of {', '.join((*ANALYSES, 'behaviour'))}")
    if args.name == "behaviour":
        return behaviour_main(args)
    return run_analysis(args.name, args)


def analyze_main(argv: Sequence[str] | None = None) -> int:
    """``analyze.py``: 0 on success, 2 with a one-line ``error: ...`` on bad input."""

    return run_main(lambda: analyze(argv))


__all__ = [
    "ALIASES",
    "ANALYSES",
    "analyze",
    "analyze_main",
    "build_parser",
    "log_wandb",
    "run_analysis",
]
