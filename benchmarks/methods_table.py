"""The methods table from the committed ``evaluate.py --compare`` reports of ``benchmarks/methods_table.sh``.

    .venv/bin/python benchmarks/methods_table.py --results benchmarks/results/methods_table \
        --markdown docs/methods_table.md --plot docs/methods_table.png --readme benchmarks/README.md

For each task, one row per method over the seeds found: the mean test accuracy and its change from the
unsteered model in points, the paired McNemar tests (each seed's test examples pooled: every example was
scored by every method) against the unsteered model and against the best other method of the task (the
highest mean test accuracy, unsteered excluded), and the side effects beside the gain: KL to the unsteered
model on ordinary text, perplexity of free generation, the accuracy change on the side task, the prompt
tokens added to every request and the activations steered. The plot puts each method's gain against its
side effects, one point per method and task; an overview (one gain per method and task) opens the page and,
with ``--readme``, replaces the text between a README's overview markers. Cells still missing are listed, never
filled in.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from austeer_pl.analyses.plots import pyplot, save_plot
from austeer_pl.core.fileio import write_json_atomic
from austeer_pl.core.output import Output
from austeer_pl.errors import AusteerError
from austeer_pl.scoring.statistics import mcnemar

TASKS = ("rotten_tomatoes", "sentiment", "strategyqa", "implicatures")
SEEDS = (0, 1, 2)
PROMPTS = ("zero_shot", "few_shot", "calibrated")  # they reach only the task's own requests


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text`` (the package's :class:`Output` rule: never a folder)."""
    output = Output(path, "methods table", lambda _path: True, overwrite=True).check()
    with output.writing() as tmp:
        tmp.write_text(text)


def load(results: Path) -> dict[str, dict[int, dict]]:
    cells: dict[str, dict[int, dict]] = {}
    for path in sorted(results.glob("*-seed*.json")):
        task, seed = path.stem.rsplit("-seed", 1)
        cells.setdefault(task, {})[int(seed)] = json.loads(path.read_text())
    return cells


# What the parts of one cell must share: the same task, split, model, data and test examples.
SAME = ("kind", "task", "task_name", "split", "seed", "base_model", "scoring", "grid_preset", "data", "n_train_pairs",
        "n_val", "n_test", "test_uids_sha256", "n_units_total", "world_size")  # fmt: skip


def merge_parts(parts: list[dict], order: list[str] | None = None) -> dict:
    """One cell's report from the reports of its parts (``evaluate.py --compare`` runs with disjoint
    ``--methods`` subsets, each with ``unsteered``: ``SPLIT_TASKS`` in ``methods_table.sh``).

    A method's row does not depend on the other methods of its run (tested in
    ``tests/cli/test_compare.py``), so the union of the parts' rows is the whole cell's. The parts must
    agree on :data:`SAME` and on the unsteered row's scores of every test example, and no other method may
    be in two parts. The merged ``total_seconds`` is the parts' sum (each repeats the shared pass). Rows
    follow ``order`` (method names) where given, else the parts' order.
    """
    if len(parts) < 2:
        raise ValueError("merge needs two or more parts")
    first = parts[0]
    for i, part in enumerate(parts[1:], 2):
        for key in SAME:
            if part.get(key) != first.get(key):
                raise ValueError(f"part {i} differs from part 1 in {key!r}: they are not parts of one cell")
    base = [next((m for m in part["methods"] if m["name"] == "unsteered"), None) for part in parts]
    if any(b is None for b in base):
        raise ValueError("every part must include 'unsteered' (it checks that the parts scored the same examples)")
    if any(b["test"]["per_example_correct"] != base[0]["test"]["per_example_correct"] for b in base[1:]):
        raise ValueError("the parts' unsteered rows score the test examples differently: not parts of one cell")
    methods = [base[0]]
    for part in parts:
        for m in part["methods"]:
            if m["name"] == "unsteered":
                continue
            if any(m["name"] == seen["name"] for seen in methods):
                raise ValueError(f"method {m['name']!r} is in two parts")
            methods.append(m)
    if order:
        methods.sort(key=lambda m: order.index(m["name"]) if m["name"] in order else len(order))
    merged = {key: value for key, value in first.items() if key not in ("methods", "omitted", "grids")}
    merged["methods"] = methods
    merged["grids"] = {k: v for part in parts for k, v in (part.get("grids") or {}).items()}
    merged["omitted"] = {k: v for part in parts for k, v in (part.get("omitted") or {}).items()}
    merged["total_seconds"] = sum(part.get("total_seconds", 0.0) for part in parts)
    merged["parts"] = [
        {"methods": [m["name"] for m in part["methods"]], "total_seconds": part.get("total_seconds")} for part in parts
    ]
    return merged


def _mean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.fmean(values) if values else None


def _omitted(reports: dict[int, dict]) -> dict[str, dict]:
    """``{method: {"seeds": [...], "why": reason}}`` for the methods a cell refused (one reason per seed kept:
    the first; the refusal rules depend on the task, not the seed)."""
    out: dict[str, dict] = {}
    for seed in sorted(reports):
        for name, why in (reports[seed].get("omitted") or {}).items():
            out.setdefault(name, {"seeds": [], "why": why})["seeds"].append(seed)
    return out


def summarise(task: str, reports: dict[int, dict]) -> dict:
    seeds = sorted(reports)
    names = [m["name"] for m in reports[seeds[0]]["methods"]]
    rows = {}
    for name in names:
        per_seed = [next(m for m in reports[s]["methods"] if m["name"] == name) for s in seeds]
        correct = [c for m in per_seed for c in m["test"]["per_example_correct"]]
        effects = [m.get("side_effects") or {} for m in per_seed]
        rows[name] = {
            "test_accuracy": _mean([m["test_accuracy"] for m in per_seed]),
            "test_accuracy_per_seed": [m["test_accuracy"] for m in per_seed],
            "val_accuracy": _mean([m["val_accuracy"] for m in per_seed]),
            "correct": correct,
            "kl_ordinary_text": _mean([e.get("kl_ordinary_text") for e in effects]),
            "perplexity": _mean([e.get("perplexity") for e in effects]),
            "distinct_2": _mean([e.get("distinct_2") for e in effects]),
            "off_task_change": _mean([e.get("off_task_change") for e in effects]),
            "off_task": next((e.get("off_task") for e in effects if e.get("off_task")), None),
            "added_prompt_tokens": _mean([m.get("added_prompt_tokens") for m in per_seed]),
            "steered": _mean([m["n_steered_activations"] for m in per_seed]),
            "chosen": [m["hyperparameters"] for m in per_seed],
        }
    base = rows["unsteered"]
    best = max((n for n in rows if n != "unsteered"), key=lambda n: rows[n]["test_accuracy"])
    for name, row in rows.items():
        row["gain_points"] = 100 * (row["test_accuracy"] - base["test_accuracy"])
        row["p_vs_unsteered"] = None if name == "unsteered" else mcnemar(base["correct"], row["correct"])["p_value"]
        others = [n for n in rows if n not in (name, "unsteered")]
        rival = max(others, key=lambda n: rows[n]["test_accuracy"]) if others else None
        row["best_other"] = rival
        row["p_vs_best_other"] = None if rival is None else mcnemar(rows[rival]["correct"], row["correct"])["p_value"]
    first = reports[seeds[0]]
    return {
        "task": task,
        "seeds": seeds,
        "n_test": [reports[s]["n_test"] for s in seeds],
        "n_val": [reports[s]["n_val"] for s in seeds],
        "n_train_pairs": first["n_train_pairs"],
        "cell_minutes": [round(reports[s].get("total_seconds", 0.0) / 60, 1) for s in seeds],
        "base_model": first["base_model"],
        "best": best,
        "omitted": _omitted(reports),
        "rows": {n: {k: v for k, v in r.items() if k != "correct"} for n, r in rows.items()},
    }


def _f(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _p(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1e}" if value < 1e-3 else f"{value:.3f}"


HEADER = """# When does steering beat asking? The methods table

Written by `benchmarks/methods_table.py` from the `evaluate.py --compare` reports in
`benchmarks/results/methods_table/` (run them with `bash benchmarks/methods_table.sh`; the sizes and settings are
in that script). Each method is tuned on validation only and tested on the same held-out examples. *gain*: test
accuracy minus the unsteered model's, in points, averaged over the seeds; *p*: McNemar's exact test on the pooled
test examples of every seed, against the unsteered model and against the best other method of the task (in
brackets); *KL text*: KL to the unsteered model on ordinary requests (nats/token); *ppl*: perplexity of free
generation; *off-task*: accuracy change on a task the method was not fitted for (points); *+prompt tokens*: tokens
the method adds to every request; *steered*: activations edited. Prompts and calibration offsets reach only the
task's own requests, so they have no side effects on others; their cost is their prompt.

![test gain against side effects, one point per method and task](methods_table.png)
"""


START, END = "<!-- methods table overview: start -->", "<!-- methods table overview: end -->"


def overview(summaries: list[dict]) -> str:
    """One row per method, one column per task: the gain in points (``*``: p < 0.05 against the unsteered
    model; bold: the task's best), with the side-task change in brackets for a steered method and the prompt
    tokens added for a prompt; the unsteered row holds the accuracy the gains are measured from."""
    names = list(dict.fromkeys(n for s in summaries for n in s["rows"]))
    header = "| method | " + " | ".join(s["task"] for s in summaries) + " |"
    lines = [header, "| --- |" + " ---: |" * len(summaries)]
    for name in names:
        cells = []
        for s in summaries:
            r = s["rows"].get(name)
            if r is None:
                cells.append("not run" if name in s.get("omitted", {}) else "-")
                continue
            if name == "unsteered":
                cells.append(f"{r['test_accuracy']:.3f}")
                continue
            star = "\\*" if r["p_vs_unsteered"] is not None and r["p_vs_unsteered"] < 0.05 else ""
            gain = f"{r['gain_points']:+.1f}{star}"
            gain = f"**{gain}**" if name == s["best"] else gain
            if r["off_task_change"] is not None and name not in PROMPTS:
                gain += f" [{100 * r['off_task_change']:+.1f}]"
            if r["added_prompt_tokens"]:
                gain += f" ({r['added_prompt_tokens']:.0f} tok)"
            cells.append(gain)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def with_overview(readme: str, table: str, where: str) -> str:
    """``readme`` with the text between its overview markers replaced by ``table``."""
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise AusteerError(
            f"{where} has no one pair of '{START}' ... '{END}' markers; add them where the overview goes"
        )
    head, rest = readme.split(START)
    return head + START + "\n" + table + "\n" + END + rest.split(END, 1)[1]


OVERVIEW_NOTE = (
    "Gain over the unsteered model in test points, the mean of the seeds (`*`: McNemar p < 0.05 on the pooled "
    "test examples; bold: the task's best method); in brackets a steered method's accuracy change on the side "
    "task, in points; in parentheses the tokens a prompt adds to every request. The unsteered row is its accuracy."
)


def overview_block(summaries: list[dict]) -> str:
    """The overview with its legend: what opens the page and what ``--readme`` puts between the markers."""
    return OVERVIEW_NOTE + "\n\n" + overview(summaries)


def markdown(summaries: list[dict], missing: list[str]) -> str:
    lines = [HEADER, overview_block(summaries), ""]
    for s in summaries:
        lines += [
            f"### {s['task']} (seeds {', '.join(map(str, s['seeds']))}; test n = {'/'.join(map(str, s['n_test']))}, "
            f"val n = {'/'.join(map(str, s['n_val']))}, {s['n_train_pairs']} training pairs; best: {s['best']}; "
            f"minutes per cell: {'/'.join(map(str, s['cell_minutes']))})",
            "",
            "| method | test acc | gain (pts) | p vs unsteered | p vs best other | KL text | ppl | off-task (pts) | +prompt tokens | steered |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, r in s["rows"].items():
            off = None if r["off_task_change"] is None else 100 * r["off_task_change"]
            lines.append(
                f"| {name} | {r['test_accuracy']:.3f} | {r['gain_points']:+.1f} | {_p(r['p_vs_unsteered'])} | "
                f"{_p(r['p_vs_best_other'])} ({r['best_other']}) | {_f(r['kl_ordinary_text'], '.3f')} | "
                f"{_f(r['perplexity'], '.2f')} | {_f(off, '+.1f')} | {_f(r['added_prompt_tokens'], '.0f')} | "
                f"{_f(r['steered'], '.0f')} |"
            )
        if s.get("omitted"):
            lines += [
                "",
                "Not run: "
                + "; ".join(
                    f"{name} (seeds {', '.join(map(str, o['seeds']))}), since {o['why']}"
                    for name, o in s["omitted"].items()
                )
                + ".",
            ]
        lines.append("")
    if missing:
        lines += ["Cells not run yet: " + ", ".join(missing) + ".", ""]
    return "\n".join(lines)


def plot_points(summaries: list[dict]) -> list[dict]:
    """One point per method and task (unsteered, the origin, left out): the gain in points against the KL on
    ordinary text and against the side-task change in points; prompts and calibration sit at 0 on both, since
    they reach only the task's own requests, and a side effect not measured sits at 0 too."""
    points = []
    for s in summaries:
        for name, r in s["rows"].items():
            if name == "unsteered":
                continue
            prompt = name in PROMPTS
            kl, side = r["kl_ordinary_text"], r["off_task_change"]
            points.append(
                {
                    "task": s["task"],
                    "method": name,
                    "prompt": prompt,
                    "gain_points": r["gain_points"],
                    "kl_ordinary_text": 0.0 if prompt or kl is None else kl,
                    "off_task_points": 0.0 if prompt or side is None else 100 * side,
                }
            )
    return points


def plot(summaries: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    markers = dict(zip(TASKS, "osD^"))
    points = plot_points(summaries)
    names = sorted({p["method"] for p in points})
    colours = {n: plt.cm.tab20(i % 20) for i, n in enumerate(names)}
    for p in points:
        for ax, x in ((axes[0], p["kl_ordinary_text"]), (axes[1], p["off_task_points"])):
            ax.scatter(
                x,
                p["gain_points"],
                marker=markers.get(p["task"], "o"),
                facecolors="none" if p["prompt"] else colours[p["method"]],
                edgecolors=colours[p["method"]],
                s=50,
                label=p["method"],
            )
    axes[0].set_xlabel("KL to unsteered on ordinary text (nats/token; prompts: 0, they reach only the task)")
    axes[1].set_xlabel("accuracy change on the side task (points; prompts: 0)")
    axes[0].set_ylabel("test accuracy gain over unsteered (points)")
    for ax in axes:
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(0, color="grey", lw=0.8)
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(6, len(handles)), fontsize=8)
    tasks = ", ".join(f"{t} ({markers.get(t, 'o')})" for t in [s["task"] for s in summaries])
    fig.suptitle(f"Target gain against side effects, one point per method and task: {tasks}", fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    save_plot(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(ROOT / "benchmarks/results/methods_table"))
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--json", default=None, help="the summary as JSON (default: RESULTS/summary.json)")
    parser.add_argument("--plot", default=None)
    parser.add_argument("--readme", default=None, help="put the overview table between this file's overview markers")
    parser.add_argument("--merge", nargs="+", default=None, metavar="PART", help="merge these part reports ...")
    parser.add_argument("--into", default=None, help="... into this cell report, and exit")
    parser.add_argument("--order", default=None, help="the merged rows' order: comma-separated method names")
    args = parser.parse_args(argv)
    if args.merge:
        if not args.into:
            parser.error("--merge needs --into REPORT")
        try:
            order = args.order.split(",") if args.order else None
            merged = merge_parts([json.loads(Path(p).read_text()) for p in args.merge], order)
            write_json_atomic(Path(args.into), merged, what="methods table cell")
        except (OSError, ValueError, AusteerError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        return 0
    results = Path(args.results)
    cells = load(results)
    summaries = [summarise(t, cells[t]) for t in [*TASKS, *sorted(set(cells) - set(TASKS))] if t in cells]
    missing = [f"{t} seed {s}" for t in TASKS for s in SEEDS if s not in cells.get(t, {})]
    text = markdown(summaries, missing)
    print(text)
    if args.readme:
        try:
            readme = Path(args.readme)
            updated = with_overview(readme.read_text(), overview_block(summaries), args.readme)
        except (OSError, AusteerError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    write_json_atomic(Path(args.json or results / "summary.json"), {"tasks": summaries}, what="methods table summary")
    if args.markdown:
        write_text(Path(args.markdown), text)
    if args.plot and summaries:
        plot(summaries, Path(args.plot))
    if args.readme:
        write_text(Path(args.readme), updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
