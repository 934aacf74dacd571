"""Selection regret: what the validation pick gives on test, against the best grid point (the oracle).

``score`` runs one configuration (task, split seed, training pairs): the momentum pass over the
training pairs (per-pair differences kept for the stability measurement), every point of the
union of today's grid and the new default grid built as ``train.py`` builds it, and every point's
per-example decision statistics on validation *and* test (:class:`~austeer_pl.fit.gridscore.GridScorer`),
plus each point's KL on ordinary text (:func:`~austeer_pl.fit.gridscore.harm_kl`). Test statistics
are never shown to a selection rule; they give the oracle and the chosen points' test accuracy.

``report`` replays the selection rules on the saved statistics with the product's own code
(:func:`austeer_pl.fit.choose.choose`, :func:`austeer_pl.fit.choose.pick`), so a rule's result here is
exactly what ``train.py`` would choose on the same statistics:

* ``before``: today's rule: validation accuracy on the first 100 validation examples over today's six
  points, ties to fewer units, a state exported whatever the result;
* ``after``: the new default (:meth:`austeer_pl.fit.config.SelectionConfig.choose_kwargs`) and its variants
  (criterion, halving, harm budget, verdict) over the new grid.

Stability: Jaccard overlap of the top-k units between bootstrap resamples of the training pairs, for
the momentum ranking and for stability selection (units ranked by how often they are in the top-k
of inner bootstrap resamples), at several pair counts.

    python benchmarks/selection.py score --task rotten_tomatoes --seed 0 --pairs 256
    python benchmarks/selection.py report
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from austeer_pl.core.fileio import write_json_atomic

OUT = ROOT / "benchmarks" / "results" / "selection"
OLD_GRID = {"site": ["attention"], "k": [10, 50], "alpha": [4.0, 16.0, 64.0]}


def new_grid() -> dict:
    from austeer_pl.methods import AusteerGrid

    DEFAULT_GRID = AusteerGrid().as_grid()

    return DEFAULT_GRID


def _tag(task: str, seed: int, pairs: int) -> str:
    name = Path(task).parent.name if task.endswith(".json") else Path(task).name
    return f"{name}-seed{seed}-n{pairs}"


# ---------------------------------------------------------------------------- stability
def _ranked(d: dict[str, torch.Tensor], sites, weights: torch.Tensor | None, k: int) -> set[tuple[int, int, int]]:
    """Top-k units by momentum (sign policy promote) of the pairs ``d`` weighted by integer ``weights``."""
    from austeer_pl.core.momentum import MomentumAccumulator
    from austeer_pl.core.selection import rank_units

    any_site = next(iter(d.values()))
    acc = MomentumAccumulator({s: d[s].shape[2] for s in sites}, any_site.shape[1])
    rows = (
        torch.arange(any_site.shape[0])
        if weights is None
        else torch.repeat_interleave(torch.arange(any_site.shape[0]), weights)
    )
    acc.update({s: d[s][rows] for s in sites}, {s: torch.zeros_like(d[s][rows]) for s in sites})
    sel = rank_units(acc, sites, "promote").head(k)
    return set(zip(sel.site_index.tolist(), sel.layer.tolist(), sel.unit.tolist()))


def _stable(d, sites, weights, k: int, inner: int, generator) -> set:
    """Stability selection: the k units most often in the top-k of ``inner`` bootstrap resamples of the (resampled) pairs."""
    n = int(weights.sum()) if weights is not None else next(iter(d.values())).shape[0]
    base = (
        torch.arange(next(iter(d.values())).shape[0])
        if weights is None
        else torch.repeat_interleave(torch.arange(len(weights)), weights)
    )
    counts: dict[tuple, int] = {}
    for _ in range(inner):
        draw = base[torch.randint(0, n, (n,), generator=generator)]
        w = torch.bincount(draw, minlength=next(iter(d.values())).shape[0])
        for unit in _ranked(d, sites, w, k):
            counts[unit] = counts.get(unit, 0) + 1
    return set(sorted(counts, key=lambda u: (-counts[u], u))[:k])


def stability(
    d: dict[str, torch.Tensor], sites, ks, ns, *, outer: int = 6, inner: int = 10, seed: int = 0
) -> list[dict]:
    """Mean pairwise Jaccard of top-k sets over ``outer`` bootstrap resamples of the first N pairs."""
    out = []
    for n in ns:
        sub = {s: t[:n] for s, t in d.items()}
        if next(iter(sub.values())).shape[0] < n:
            continue
        for k in ks:
            g = torch.Generator().manual_seed(seed)
            plain, stable = [], []
            for _ in range(outer):
                w = torch.bincount(torch.randint(0, n, (n,), generator=g), minlength=n)
                plain.append(_ranked(sub, sites, w, k))
                stable.append(_stable(sub, sites, w, k, inner, g))
            jac = lambda sets: (
                sum(len(a & b) / len(a | b) for a, b in itertools.combinations(sets, 2)) / math.comb(len(sets), 2)
            )
            out.append({"n_pairs": n, "k": k, "jaccard_momentum": jac(plain), "jaccard_stability": jac(stable)})
            print(
                f"  stability n={n} k={k}: momentum {out[-1]['jaccard_momentum']:.3f}  stability selection {out[-1]['jaccard_stability']:.3f}",
                flush=True,
            )
    return out


# ---------------------------------------------------------------------------- score one configuration
def momentum_pass(model, tok, layout, task, config, train, sites):
    """The momentum accumulator over ``config``'s training pairs, and each pair's difference ``pos - neg`` per site."""
    from austeer_pl.core.momentum import MomentumAccumulator
    from austeer_pl.core.pairs import read_text_pairs
    from austeer_pl.tasks import format_prompt, join_answer, make_pairs

    pairs = make_pairs(train, negatives=config.negatives, seed=config.seed, max_pairs=config.max_train_pairs)
    texts = {p.prompt: format_prompt(tok, task, p.prompt, chat_template=config.chat_template) for p in pairs}
    rows = [(join_answer(texts[p.prompt], p.positive), join_answer(texts[p.prompt], p.negative)) for p in pairs]
    acc = MomentumAccumulator({s: layout.site(s).size for s in sites}, layout.n_layers)
    diffs = {s: [] for s in sites}
    for pos, neg in read_text_pairs(model, tok, rows, layout, sites, batch_size=16, max_length=config.max_length):
        acc.update(pos, neg)
        for s in sites:
            diffs[s].append(pos[s].float() - neg[s].float())
    return acc, {s: torch.cat(v) for s, v in diffs.items()}


def build_states(model, layout, acc, points):
    """AUSteer's state for each ``(site, k, alpha)`` point, built as ``train.py`` builds its grid."""
    from austeer_pl.core.models import model_name_of
    from austeer_pl.fit.statistics import rank_site_options
    from austeer_pl.methods.registry import FitContext, build_state

    options = [(s, (s,)) for s in sorted({p[0] for p in points})]
    rankings = rank_site_options(acc, options, "promote", max(p[1] for p in points))
    ctx = FitContext(layout=layout, acc=acc, rankings=rankings, base_model=model_name_of(model), sign="promote")
    return [build_state("austeer", ctx, site=s, k=k, alpha=a) for s, k, a in points]


def score(args) -> None:
    from austeer_pl.core.models import load_model
    from austeer_pl.core.sites import locate_units
    from austeer_pl.fit.choose import Candidate
    from austeer_pl.fit.gridscore import GridScorer, generic_texts, harm_kl
    from austeer_pl.tasks import format_prompt
    from austeer_pl.tasks.config import DataConfig

    torch.manual_seed(0)
    tag = _tag(args.task, args.seed, args.pairs)
    out = Path(args.out) if args.out else OUT / f"{tag}.json"
    config = DataConfig(
        task=args.task,
        seed=args.seed,
        max_train_pairs=args.pairs,
        max_val_examples=args.val,
        max_test_examples=args.test,
    )
    task, splits = config.load()
    model, tok = load_model("smollm2-135m-instruct")
    layout = locate_units(model)
    sites = ("attention", "ffn")
    started = time.perf_counter()
    acc, d = momentum_pass(model, tok, layout, task, config, splits["train"], sites)
    pass_seconds = time.perf_counter() - started
    print(
        f"{tag}: {acc.n} pairs in {pass_seconds:.0f} s; val {len(splits['val'])}, test {len(splits['test'])}",
        flush=True,
    )

    if args.stability_only:
        ns = [n for n in (64, 128, 256, 512) if n <= acc.n]
        result = {
            "task": args.task,
            "seed": args.seed,
            "pairs": acc.n,
            "pass_seconds": pass_seconds,
            "stability": stability(d, ("attention",), [10, 50], ns) + stability(d, ("ffn",), [10], ns),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, result)
        return
    grids = [OLD_GRID, new_grid()]
    points = sorted(
        {(s, int(k), float(a)) for g in grids for s in g["site"] for k in g["k"] for a in g["alpha"]},
        key=lambda p: (p[0] != "attention", p[1], p[2]),
    )
    cands = [Candidate("unsteered", {}, None)] + [
        Candidate("austeer", {"site": s, "k": k, "alpha": a}, state)
        for (s, k, a), state in zip(points, build_states(model, layout, acc, points))
    ]
    scorer = GridScorer(model, tok, layout, task, batch_size=args.batch_size, max_length=config.max_length)
    result = {
        "task": args.task,
        "seed": args.seed,
        "pairs": acc.n,
        "pass_seconds": pass_seconds,
        "candidates": [c.hyper for c in cands],
    }
    for split in ("val", "test"):
        examples = list(splits[split])
        prompts = [format_prompt(tok, task, ex.prompt, chat_template=config.chat_template) for ex in examples]
        t = time.perf_counter()
        stats = scorer.score([c.state for c in cands], examples, prompts)
        result[f"{split}_seconds"] = time.perf_counter() - t
        result[split] = [[[round(float(v), 5) for v in row] for row in cand] for cand in stats.tolist()]
        print(
            f"  {split}: {len(cands)} points x {len(examples)} examples in {result[f'{split}_seconds']:.0f} s",
            flush=True,
        )
    t = time.perf_counter()
    generic = generic_texts(tok, model)
    result["harm_kl"] = harm_kl(model, tok, layout, [c.state for c in cands], generic).tolist()
    result["harm_seconds"] = time.perf_counter() - t
    if args.generations:
        from austeer_pl.scoring.generation import generate_new_text as generate_texts
        from austeer_pl.tasks import Task

        asks = [
            "Review: a gorgeous, moving film.\nIs the sentiment of this review positive or negative?",
            "Write one sentence about the sea.",
        ]
        asks = [format_prompt(tok, Task("generic", ()), a, chat_template=True) for a in asks]
        result["generations"] = []
        for c in cands:
            with c.state.apply(model, layout=layout) if c.state is not None else _null():
                result["generations"].append(generate_texts(model, tok, asks, max_new_tokens=24))
    ns = [n for n in (64, 128, 256, 512) if n <= acc.n]
    result["stability"] = stability(d, ("attention",), [10, 50], ns) if args.stability else []
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    print(f"  written {out}", flush=True)


# ---------------------------------------------------------------------------- replay the rules
def _choose(result, rule: dict):
    """Run the product's chooser on saved statistics; returns ``(chosen index, GridChoice or None)``."""
    from austeer_pl.fit.choose import Candidate, choose, pick

    hyper = result["candidates"]
    in_grid = [
        i
        for i, h in enumerate(hyper)
        if not h
        or (h["site"] in rule["grid"]["site"] and h["k"] in rule["grid"]["k"] and h["alpha"] in rule["grid"]["alpha"])
    ]
    cands = []
    for i in in_grid:
        h = hyper[i]
        cands.append(Candidate("austeer" if h else "unsteered", h, None if not h else _Units(h["k"], h["alpha"])))
    val = torch.tensor(result["val"], dtype=torch.float64)[in_grid, : rule.get("n_val") or None]
    if rule["name"].startswith("before"):
        acc = val[:, :, 0].mean(1).tolist()
        steered = list(range(1, len(cands)))
        return in_grid[pick(cands, acc, steered)], None
    harm = torch.tensor(result["harm_kl"], dtype=torch.float64)[in_grid]
    g = choose(
        cands,
        val.shape[1],
        lambda idx, lo, hi: val[list(idx), lo:hi],
        criterion=rule["criterion"],
        halving=rule["halving"],
        min_examples=rule.get("min_examples", 16),
        eta=rule.get("eta", 3),
        harm=lambda idx: harm[list(idx)],
        harm_budget=rule["harm_budget"],
        level=rule["level"],
        correction=rule.get("correction", "grid"),
    )
    index = g.best if rule.get("export_anyway") and g.best is not None else g.index
    return in_grid[index], g


def _null():
    from contextlib import nullcontext

    return nullcontext()


class _Units:
    """Stands in for a state in replayed choices: :func:`pick`'s tie rule reads ``k`` and ``alpha`` only."""

    def __init__(self, k: int, alpha: float) -> None:
        self.k, self.alpha = k, alpha


def rules() -> list[dict]:
    from austeer_pl.fit.config import SelectionConfig

    DEFAULT_SELECTION = SelectionConfig().choose_kwargs()

    grid = new_grid()
    base = {"grid": grid, **DEFAULT_SELECTION}
    out = [
        {"name": "before (accuracy, 6 points, 100 val)", "grid": OLD_GRID, "n_val": 100},
        {
            "name": "before grid, all val, accuracy",
            "grid": OLD_GRID,
            "criterion": "accuracy",
            "halving": False,
            "harm_budget": None,
            "level": 1.0,
        },
    ]
    for crit in ("accuracy", "margin", "loss"):
        out.append(
            {
                **base,
                "name": f"{crit}, full grid, no verdict",
                "criterion": crit,
                "halving": False,
                "harm_budget": None,
                "level": 1.0,
            }
        )
    out.append({**base, "name": "loss, halving, no verdict", "halving": True, "harm_budget": None, "level": 1.0})
    out.append({**base, "name": "loss, halving, harm budget, no verdict", "halving": True, "level": 1.0})
    for budget in (0.25, 1.0):
        out.append({**base, "name": f"loss, halving, harm budget {budget:g}, verdict", "harm_budget": budget})
    out.append({**base, "name": "accuracy, halving, harm budget, verdict", "criterion": "accuracy"})
    out.append({**base, "name": "loss, halving, harm budget, verdict (Bonferroni over the grid)", "correction": "grid"})
    out.append(
        {
            **base,
            "name": "accuracy, halving, harm budget, verdict (final-round correction)",
            "criterion": "accuracy",
            "correction": "final",
        }
    )
    out.append(
        {
            **base,
            "name": "margin, halving, harm budget, verdict (final-round correction)",
            "criterion": "margin",
            "correction": "final",
        }
    )
    out.append({**base, "name": "after (default: loss, halving, harm budget, verdict)"})
    out.append({**base, "name": "after, --export_anyway", "export_anyway": True})
    return out


def report(args) -> None:
    files = sorted(Path(p) for p in (args.files or [str(f) for f in OUT.glob("*.json") if f.name != "report.json"]))
    rows = []
    for f in files:
        result = json.loads(f.read_text())
        if "val" not in result:  # a stability-only run
            continue
        test = torch.tensor(result["test"], dtype=torch.float64)[:, :, 0].mean(1)
        union_oracle = float(test.max())
        hyper = result["candidates"]
        grid = new_grid()
        new_idx = [
            i
            for i, h in enumerate(hyper)
            if not h or (h["site"] in grid["site"] and h["k"] in grid["k"] and h["alpha"] in grid["alpha"])
        ]
        entry = {
            "config": f.stem,
            "n_val": len(result["val"][0]),
            "n_test": len(result["test"][0]),
            "unsteered": float(test[0]),
            "oracle": union_oracle,
            "oracle_new_grid": float(test[new_idx].max()),
            "rules": {},
        }
        for rule in rules():
            index, g = _choose(result, rule)
            entry["rules"][rule["name"]] = {
                "chosen": hyper[index] or "no steering",
                "test_accuracy": float(test[index]),
                "regret": union_oracle - float(test[index]),
                "harm_kl": result["harm_kl"][index],
                "helps": None if g is None else g.helps,
                "evaluations": None if g is None else g.scored_evaluations,
            }
        rows.append(entry)
    names = [r["name"] for r in rules()]
    for e in rows:  # one line per rule is easier to read than one column per rule
        print(f"{e['config']}: unsteered {e['unsteered']:.3f}, oracle {e['oracle']:.3f}")
        for n in names:
            r = e["rules"][n]
            print(
                f"   {n:55s} {r['test_accuracy']:.3f} regret {r['regret']:+.3f} kl {r['harm_kl']:.2f} helps {r['helps']} evals {r['evaluations']} {r['chosen']}"
            )
    main = [n for n in names if n.startswith(("before (", "after"))] + ["loss, halving, harm budget, no verdict"]
    lines = [
        "| config | n val / test | unsteered | oracle | " + " | ".join(main) + " |",
        "| --- " * (4 + len(main)) + "|",
    ]
    for e in rows:
        cells = []
        for n in main:
            r = e["rules"][n]
            label = (
                "no steering"
                if r["chosen"] == "no steering"
                else f"{r['chosen']['site'][:3]} k={r['chosen']['k']} a={r['chosen']['alpha']:g}"
            )
            cells.append(f"{r['test_accuracy']:.3f} ({label})")
        lines.append(
            f"| {e['config']} | {e['n_val']} / {e['n_test']} | {e['unsteered']:.3f} | {e['oracle']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    groups = {
        "all configurations": rows,
        "rotten_tomatoes": [e for e in rows if e["config"].startswith("rotten_tomatoes")],
    }
    groups["BIG-bench"] = [e for e in rows if e not in groups["rotten_tomatoes"]]
    mean = []
    for group, members in groups.items():
        if not members or (
            group == "all configurations" and len(members) in (len(groups["rotten_tomatoes"]), len(groups["BIG-bench"]))
        ):
            continue
        mean += [
            "",
            f"{group} ({len(members)}):",
            "",
            "| rule | mean regret (oracle - chosen) | mean gain over unsteered | worst gain | configs declared no help | mean KL of the chosen | mean evaluations |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for n in names:
            rs = [e["rules"][n] for e in members]
            gains = [r["test_accuracy"] - e["unsteered"] for r, e in zip(rs, members)]
            evals = [r["evaluations"] for r in rs if r["evaluations"] is not None]
            mean.append(
                f"| {n} | {sum(r['regret'] for r in rs) / len(rs):.3f} | {sum(gains) / len(gains):+.3f} | {min(gains):+.3f} | "
                f"{sum(1 for r in rs if r['chosen'] == 'no steering')} / {len(rs)} | {sum(r['harm_kl'] for r in rs) / len(rs):.2f} | "
                f"{sum(evals) / len(evals) if evals else float('nan'):.0f} |"
            )
    text = "\n".join(lines + mean)
    print(text)
    write_json_atomic(OUT / "report.json", {"rows": rows, "table": text})


def config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options that name one configuration (task, split seed, pairs, split sizes); ``selection_learned.py`` shares them."""
    parser.add_argument("--task", default="rotten_tomatoes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--test", type=int, default=250)
    return parser


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = config_arguments(sub.add_parser("score"))
    s.add_argument("--batch_size", type=int, default=8)
    s.add_argument("--stability", action="store_true")
    s.add_argument(
        "--stability_only", action="store_true", help="only the pass and the top-k overlap (no grid scoring)"
    )
    s.add_argument(
        "--generations", action="store_true", help="also keep each point's greedy answers to two ordinary prompts"
    )
    s.add_argument("--out", default=None)
    r = sub.add_parser("report")
    r.add_argument("files", nargs="*")
    args = p.parse_args(argv)
    score(args) if args.cmd == "score" else report(args)


if __name__ == "__main__":
    main()
