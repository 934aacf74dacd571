"""``python evaluate.py``: score a fitted state (or the unsteered model) on a task's test split, with
McNemar's test against the unsteered answers; ``--behaviour`` for free-text steering, ``--compare``
for every method fitted side by side (:mod:`austeer_pl.cli.compare`), ``--dump_examples`` to see
the prompts.

Bad input prints one ``error: ...`` line and exits with status 2.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from austeer_pl.cli.compare import compare_main_args
from austeer_pl.cli.evaluate_parser import evaluate_parser
from austeer_pl.cli.runtime import placement_of, quiet, run_main
from austeer_pl.core.embedded import DEFAULT_MODEL
from austeer_pl.core.fileio import (
    json_output,
    jsonl_output,
    write_json_output,
    write_jsonl_output,
)
from austeer_pl.core.models import load_model, load_tokenizer
from austeer_pl.core.pins import check_model
from austeer_pl.core.sites import LayoutSpec, locate_units
from austeer_pl.core.state import SteeringState
from austeer_pl.core.tokens import encode_pairs
from austeer_pl.errors import AusteerError
from austeer_pl.methods.registry import FITTED
from austeer_pl.scoring.behaviour import behaviour_report
from austeer_pl.scoring.evaluate import (
    answer_suffixes,
    default_scoring,
    evaluate_examples,
)
from austeer_pl.scoring.statistics import mcnemar
from austeer_pl.tasks.config import DataConfig
from austeer_pl.tasks.pins import check_task
from austeer_pl.tasks.prompts import behaviour_prompts, format_prompt, join_for
from austeer_pl.tasks.splits import make_pairs


def evaluate(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = evaluate_parser().parse_args(argv)
    if args.compare:
        return compare_main_args(args)
    if args.dump_examples and not args.steering:
        return dump_examples(args)
    if not args.steering:
        raise AusteerError(
            "--steering DIR is required (a folder written by train.py); or use --compare, or --dump_examples with --task"
        )
    if args.limit is not None and args.limit <= 0:
        raise AusteerError(f"--limit must be positive, got {args.limit}")
    if args.batch_size <= 0:
        raise AusteerError(f"--batch_size must be positive, got {args.batch_size}")

    quiet()

    state = SteeringState.from_pretrained(args.steering)
    config = DataConfig.of_state(
        state.metadata, task=args.task, seed=args.seed, protocol=args.protocol, task_files=args.task_files
    )
    model_name = args.model or state.base_model
    if not model_name:
        raise AusteerError("the state does not name its base model; pass --model")
    report_out = None
    if args.report:
        report_out = json_output(args.report, "evaluation report", overwrite=args.overwrite).check(
            inputs=[args.steering, config.task, *config.file_list, model_name, args.judge]
        )
    pins = state.metadata.get("inputs")
    check_task(pins, config, allow=args.allow_changed_inputs)
    seed = config.seed
    task, splits = config.load(need=(args.split,))
    examples = splits[args.split]
    if args.limit is not None:
        examples = examples[: args.limit]
    if not examples:
        raise AusteerError(f"the {args.split} split of '{config.task}' is empty; choose another split or task")
    task_spec = config.task
    data = config.to_dict()
    chat = {"on": True, "off": False, "auto": None, None: data.get("chat_template")}[args.chat_template]
    model, tokenizer = load_model(
        model_name, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir, **placement_of(args)
    )

    if args.layout_layers:
        state.layout = {"layers": args.layout_layers, "attention": args.layout_attention, "ffn": args.layout_ffn}
    elif args.layout_attention or args.layout_ffn:
        raise AusteerError("--layout_attention/--layout_ffn need --layout_layers (the path of the decoder layer list)")
    state.check_compatible(locate_units(model, LayoutSpec.from_dict(state.layout) if state.layout else None))
    check_model(pins, model_name, model, allow=args.allow_changed_inputs, cache_dir=args.cache_dir)
    if args.scoring == "judge" or (args.scoring is None and task.behaviour):
        return _evaluate_behaviour(args, state, task, examples, model, tokenizer, chat, config, report_out)
    scorings = ["loglik", "generate"] if args.scoring == "both" else [args.scoring or default_scoring(task)]

    # A learned strength is reported beside the fixed rule it started from, on the same examples.
    learned = state.strength.get("kind", "momentum") != "momentum" and state.method == FITTED
    variants = [
        ("unsteered", None),
        *([("momentum_rule", state.momentum_rule())] if learned else []),
        ("steered", state),
    ]
    results: dict[str, Any] = {}
    started = time.perf_counter()
    with Progress(transient=True, disable=not sys.stderr.isatty()) as bar:
        for scoring in scorings:
            for label, st in variants:
                job = bar.add_task(f"{label} ({scoring})", total=len(examples))
                results[(scoring, label)] = evaluate_examples(
                    model,
                    tokenizer,
                    task,
                    examples,
                    state=st,
                    scoring=scoring,
                    chat_template=chat,
                    batch_size=args.batch_size,
                    max_length=data.get("max_length"),
                    progress=lambda n, job=job: bar.advance(job, n),
                )
    primary = scorings[0]
    report = {
        "task": task_spec,
        "split": args.split,
        "seed": seed,
        "base_model": model_name,
        "steering": str(args.steering),
        "method": state.method,
        "scoring": primary,
        "n_examples": len(examples),
        "n_steered_activations": state.k,
        "n_units_total": sum(state.site_sizes[s] for s in state.sites) * state.n_layers,
        "k": state.k,
        "alpha": state.alpha,
        "strength": state.strength.get("kind", "momentum"),
        "sites": list(state.sites),
        "unsteered": results[(primary, "unsteered")],
        "steered": results[(primary, "steered")],
        **({"momentum_rule": results[(primary, "momentum_rule")]} if learned else {}),
        "by_scoring": {s: {label: results[(s, label)] for label, _ in variants} for s in scorings},
        # Is the steered model's gain on these examples more than chance? (paired: the same examples)
        "mcnemar": mcnemar(
            results[(primary, "unsteered")]["per_example_correct"], results[(primary, "steered")]["per_example_correct"]
        ),
        **(
            {"fit_verdict": state.metadata["fit"]["verdict"]}
            if isinstance(state.metadata.get("fit"), dict) and "verdict" in state.metadata["fit"]
            else {}
        ),
        "protocol": config.protocol,
        # The paper code's own logged accuracy for this setting (configs/paper), printed beside this run's.
        **({"paper_accuracy": config.paper_accuracy} if config.paper_accuracy is not None else {}),
        "seconds": time.perf_counter() - started,
    }
    if report_out is not None:
        write_json_output(report_out, report)
    _print_eval_table(report, scorings)
    return report


#: The fields of each ``--dump_examples`` line (also how an earlier dump is recognised).
DUMP_KEYS = ("uid", "prompt", "choices", "answer", "scoring", "pair", "read_position", "read_token", "n_tokens")


def dump_examples(args) -> dict[str, Any]:
    """``evaluate.py --dump_examples OUT.jsonl``: the exact inputs of a split, one line per example:
    ``uid``, ``prompt`` (the text before the answer), ``choices`` (the exact answer strings as they
    follow the prompt), ``answer``, ``scoring``, the training pair's two texts' ends and the position
    and text of the token whose units are read (the last token of prompt + right answer)."""

    if not args.task:
        raise AusteerError("--dump_examples needs --task (or --steering, to read the state's)")
    config = DataConfig(
        task=args.task, seed=args.seed or 0, protocol=args.protocol or "default", task_files=args.task_files
    )
    out = jsonl_output(args.dump_examples, "example dump", DUMP_KEYS, overwrite=args.overwrite).check(
        inputs=[config.task, *config.file_list, args.model]
    )
    quiet()
    task, splits = config.load(need=(args.split,), rows_as_labelled=True)
    examples = splits[args.split][: args.limit] if args.limit else splits[args.split]
    if not examples:
        raise AusteerError(f"the {args.split} split of '{args.task}' is empty; choose another split or task")
    tokenizer = load_tokenizer(args.model or DEFAULT_MODEL, cache_dir=args.cache_dir)
    chat = {"on": True, "off": False, "auto": None, None: None}[args.chat_template]
    prompts = [format_prompt(tokenizer, task, ex.prompt, chat_template=chat) for ex in examples]
    pairs = {p.example_uid: p for p in make_pairs(examples, negatives="sample", seed=config.seed)}
    pos = [join_for(task, t, pairs[ex.uid].positive)[len(t) :] for t, ex in zip(prompts, examples)]
    neg = [join_for(task, t, pairs[ex.uid].negative)[len(t) :] for t, ex in zip(prompts, examples)]
    prompt_ids, pos_ids, _ = encode_pairs(tokenizer, prompts, pos, neg)
    scoring = args.scoring or default_scoring(task)
    rows = []
    for ex, text, p_ids, a_ids, a, b in zip(examples, prompts, prompt_ids, pos_ids, pos, neg):
        ids = p_ids + a_ids
        rows.append(
            {
                "uid": ex.uid,
                "prompt": text,
                "choices": answer_suffixes(text, ex.choices, task),
                "answer": ex.answer,
                "scoring": scoring,
                "pair": {"positive": a, "negative": b},
                "read_position": len(ids) - 1,
                "read_token": tokenizer.decode(ids[-1:]),
                "n_tokens": len(ids),
            }
        )
    write_jsonl_output(out, rows)
    print(
        f"wrote {len(examples)} {args.split} examples of {args.task} ({config.protocol} protocol) to {args.dump_examples}"
    )
    return {"n_examples": len(examples), "path": str(args.dump_examples)}


def _evaluate_behaviour(args, state, task, examples, model, tokenizer, chat, config, report_out) -> dict[str, Any]:
    """Behaviour: the judge score and fluency of greedy generations from held-out prompts, unsteered vs.
    steered (share judged positive with its 95% Wilson interval, mean judge score, perplexity under
    the unsteered model, distinct-2)."""

    if args.max_new_tokens < 1:
        raise AusteerError(f"--max_new_tokens must be positive, got {args.max_new_tokens}")
    started = time.perf_counter()
    prompts = behaviour_prompts(tokenizer, task, examples, chat_template=chat)
    result = behaviour_report(
        model,
        tokenizer,
        state,
        prompts,
        args.judge,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        max_length=config.max_length,
    )
    report = {
        "task": config.task,
        "split": args.split,
        "seed": config.seed,
        "base_model": args.model or state.base_model,
        "steering": str(args.steering),
        "method": state.method,
        "scoring": "judge",
        "n_steered_activations": state.k,
        "k": state.k,
        "alpha": state.alpha,
        **result,
        "seconds": time.perf_counter() - started,
    }
    if report_out is not None:
        write_json_output(report_out, report)

    table = Table(
        title=f"{config.task} ({args.split}, {report['n_prompts']} prompts, judge {args.judge}, {state.k} steered units)",
        title_justify="left",
    )
    for col in ("model", "share positive", "95% CI", "mean score", "perplexity", "distinct-2"):
        table.add_column(col)
    for label in ("unsteered", "steered"):
        r = report[label]
        table.add_row(
            label,
            f"{r['share_positive']:.3f}",
            f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]",
            f"{r['mean_score']:+.3f}",
            f"{r['perplexity']:.2f}",
            f"{r['distinct_2']:.3f}",
        )
    Console().print(table)
    print(f"perplexity ratio steered / unsteered: {report['perplexity_ratio']:.3f}")
    return report


def _print_eval_table(report: dict[str, Any], scorings: list[str]) -> None:

    table = Table(
        title=f"{report['task']} ({report['split']}, n={report['n_examples']}, {report['n_steered_activations']} steered units)",
        title_justify="left",
    )
    for col in ("scoring", "model", "accuracy", "95% CI", "per class"):
        table.add_column(col)
    for s in scorings:
        for label in report["by_scoring"][s]:
            r = report["by_scoring"][s][label]
            if label == "steered" and report.get("strength", "momentum") != "momentum":
                label = f"steered ({report['strength']})"
            per = ", ".join(f"{k}: {v['accuracy']:.2f}" for k, v in r["per_class"].items())
            table.add_row(s, label, f"{r['accuracy']:.3f}", f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]", per)
    Console().print(table)
    test = report.get("mcnemar")
    if test is not None:
        gain = report["steered"]["accuracy"] - report["unsteered"]["accuracy"]
        print(
            f"steered vs. unsteered on the same {report['n_examples']} examples: {gain:+.3f} ({test['gained']} gained, {test['lost']} lost), "
            f"McNemar exact p = {test['p_value']:.3g}: "
            + ("significant at 0.05" if test["significant_at_0.05"] else "not significant at 0.05")
        )
    verdict = report.get("fit_verdict")
    if verdict is not None and not report["n_steered_activations"]:
        print(f"the fit exported no steering: {verdict.get('reason')}")
    if report.get("paper_accuracy") is not None:
        print(
            f"paper code's logged accuracy (reproduce_result.log): {report['paper_accuracy']:.3f}; this run, steered: {report['steered']['accuracy']:.3f}"
            " (hyperparameters chosen on validation here, on test in the paper code)"
        )


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """``evaluate.py``: 0 on success, 2 with one ``error: ...`` line on bad input or a disk fault."""
    return run_main(lambda: evaluate(argv))


__all__ = [
    "DUMP_KEYS",
    "dump_examples",
    "evaluate",
    "evaluate_main",
]
