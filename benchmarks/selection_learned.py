"""The learned strengths in the regret table: what each variant gives on test, against the grid's oracle.

For one configuration already scored by ``benchmarks/selection.py score`` (same task, split seed,
pairs and split sizes), this script takes the point the default rule chooses with
``--export_anyway`` (the state a learned variant starts from in ``train.py``: the best steered
point), and trains each learned-strength variant on it with the product's own
:class:`~austeer_pl.fit.strength.StrengthTrainer` and the data module's own strength batches, exactly as
the strength phase of ``train.py`` does (same learning rate, batches, epochs, validation sums).

Every epoch runs (no early stop) and is scored on validation, so the report can replay two
epoch-choice rules on the saved history: the first round's rule (validation accuracy, ties to the
lower loss, patience 2) and the grid's criterion, which ``train.py`` now uses (the lowest
validation choice log-loss; here also within the harm budget). Test is scored for the epochs those rules choose, and never takes part in a choice.

    python benchmarks/selection_learned.py score --task rotten_tomatoes --seed 0 --pairs 256 --val 150 --test 150
    python benchmarks/selection_learned.py report
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from austeer_pl.core.fileio import write_json_atomic
from austeer_pl.fit.config import SelectionConfig

DEFAULT_SELECTION = SelectionConfig().choose_kwargs()

OUT = ROOT / "benchmarks" / "results" / "selection"
# (name, kind, loss, kl_weight): scalar/gate x nll/choice x KL weight 1 (the default) / 0.1.
# The first round's best variant first (the runs are long on a CPU; each is written when done).
VARIANTS = [
    (f"{kind}_{loss}_kl{kl:g}", kind, loss, kl)
    for loss, kl in (("choice", 0.1), ("nll", 1.0), ("choice", 1.0), ("nll", 0.1))
    for kind in ("gate", "scalar")
]
HARM_BUDGET = DEFAULT_SELECTION["harm_budget"]


def score(args) -> None:
    import selection as sel

    from austeer_pl.core.models import load_model
    from austeer_pl.core.sites import locate_units
    from austeer_pl.fit.gridscore import generic_texts, harm_kl
    from austeer_pl.fit.strength import StrengthTrainer
    from austeer_pl.lightning.datamodule import ContrastivePairDataModule
    from austeer_pl.tasks.config import DataConfig

    tag = sel._tag(args.task, args.seed, args.pairs)
    grid_file = OUT / f"{tag}.json"
    if not grid_file.exists():
        raise SystemExit(
            f"error: {grid_file} is missing; run benchmarks/selection.py score with the same --task/--seed/--pairs first"
        )
    grid = json.loads(grid_file.read_text())
    rule = {"name": "after, --export_anyway", "grid": sel.new_grid(), **DEFAULT_SELECTION, "export_anyway": True}
    index, _ = sel._choose(grid, rule)
    point = grid["candidates"][index]
    test_grid = torch.tensor(grid["test"], dtype=torch.float64)[:, :, 0].mean(1)

    torch.manual_seed(0)
    config = DataConfig(
        task=args.task,
        seed=args.seed,
        max_train_pairs=args.pairs,
        max_val_examples=args.val,
        max_test_examples=args.test,
    )
    task, splits = config.load()
    if (len(splits["val"]), len(splits["test"])) != (len(grid["val"][0]), len(grid["test"][0])):
        raise SystemExit(
            f"error: --val/--test give {len(splits['val'])}/{len(splits['test'])} examples but {grid_file.name} has "
            f"{len(grid['val'][0])}/{len(grid['test'][0])}; pass the sizes it was scored with"
        )
    model, tok = load_model("smollm2-135m-instruct")
    layout = locate_units(model)
    acc, _ = sel.momentum_pass(model, tok, layout, task, config, splits["train"], ("attention", "ffn"))
    base = sel.build_states(model, layout, acc, [(point["site"], point["k"], point["alpha"])])[0]

    dm = ContrastivePairDataModule(
        task=args.task,
        seed=args.seed,
        max_train_pairs=args.pairs,
        max_val_examples=args.val,
        max_test_examples=args.test,
    )
    dm.tokenizer = tok
    dm.setup("fit")
    bs = dm.hparams.eval_batch_size
    held = {split: (list(splits[split]), dm.prompt_texts(splits[split])) for split in ("val", "test")}
    generic = generic_texts(tok, model)
    print(
        f"{tag}: starting point {point} (test {float(test_grid[index]):.3f} in {grid_file.name}); {len(dm.train_examples)} training examples",
        flush=True,
    )

    out = Path(args.out) if args.out else OUT / f"learned-{tag}.json"
    result = (
        json.loads(out.read_text())
        if out.exists()
        else {"task": args.task, "seed": args.seed, "pairs": acc.n, "variants": {}}
    )
    result.update(
        point=point,
        rule_test_accuracy=float(test_grid[index]),
        oracle=float(test_grid.max()),
        unsteered=float(test_grid[0]),
        n_val=len(held["val"][0]),
        n_test=len(held["test"][0]),
        n_train_examples=len(dm.train_examples),
        epochs=args.epochs,
    )
    hp = {"lr": 0.01, "patience": 2, "gate_width": 16}  # AUSteerModule's defaults
    wanted = [v for v in VARIANTS if not args.variants or v[0] in args.variants]
    start: dict[str, tuple] = {}  # epoch 0 is the rule itself: scored once per strength kind
    for name, kind, loss, kl in wanted:
        if name in result["variants"] and not args.redo:
            continue
        started = time.perf_counter()
        trainer = StrengthTrainer(
            model,
            layout,
            base,
            kind,
            lr=hp["lr"],
            kl_weight=kl,
            loss=loss,
            patience=hp["patience"],
            gate_width=hp["gate_width"],
        )
        sums = lambda split: trainer.validation_sums(
            tok, task, *held[split], scoring="loglik", batch_size=bs, max_length=dm.hparams.max_length
        )
        history, weights = [], []
        train_seconds = 0.0
        for epoch in range(args.epochs + 1):
            if epoch:
                t = time.perf_counter()
                trainer.stopped = False  # every epoch trains; the product's patience is replayed in the report
                for batch in dm.strength_batches(epoch):
                    trainer.step(dm.collate_examples_train(batch))
                train_seconds += time.perf_counter() - t
            if epoch == 0 and kind in start:
                val, kl0 = start[kind][0], start[kind][2]
            else:
                val = sums("val")
                kl0 = float(harm_kl(model, tok, layout, [_live_state(trainer)], generic)[0])
                if epoch == 0:
                    start[kind] = (val, StrengthTrainer.record(sums("test")), kl0)
            weights.append(trainer._snapshot())
            history.append({"epoch": epoch, "val": StrengthTrainer.record(val), "test": None, "harm_kl": kl0})
            print(
                f"  {name} epoch {epoch}: val acc {history[-1]['val']['val_accuracy']:.3f} loss {history[-1]['val']['val_choice_loss']:.4f}  "
                f"kl {kl0:.3f}  ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
            if epoch == 0:
                trainer.begin(val)
            else:
                trainer.end_epoch(epoch, val)
        # Test is scored only for the epochs a rule chooses (validation alone decides which).
        history[0]["test"] = start[kind][1]
        for epoch in sorted({accuracy_epoch(history, loss=loss), loss_epoch(history, HARM_BUDGET)} - {0}):
            trainer.fn.load_state_dict(weights[epoch])
            history[epoch]["test"] = StrengthTrainer.record(sums("test"))
            print(f"  {name} epoch {epoch}: test acc {history[epoch]['test']['val_accuracy']:.3f}", flush=True)
        result["variants"][name] = {
            "kind": kind,
            "loss": loss,
            "kl_weight": kl,
            "history": history,
            "train_seconds": train_seconds,
            "seconds": time.perf_counter() - started,
        }
        OUT.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, result)
        print(
            f"  {name}: {result['variants'][name]['seconds']:.0f} s (training {train_seconds:.0f} s); written {out}",
            flush=True,
        )


def _live_state(trainer):
    """The trainer's current weights folded into a state (for the harm measurement), leaving the trainer as it is."""
    saved = trainer.best
    trainer.best = {"weights": trainer._snapshot(), "val_accuracy": 0.0, "epoch": -1}
    try:
        return trainer.fold()
    finally:
        trainer.best = saved


# ---------------------------------------------------------------------------- epoch-choice rules
def accuracy_epoch(history: list[dict], patience: int = 2, loss: str = "choice") -> int:
    """``StrengthTrainer``'s accuracy rule replayed (the first round's; ``criterion="accuracy"``): a later epoch replaces the best only with higher validation
    accuracy, or equal with a lower value of the trained loss; training stops after ``patience`` epochs without one."""
    tie = "val_nll" if loss == "nll" else "val_choice_loss"
    best, bad = 0, 0
    for h in history[1:]:
        b = history[best]["val"]
        if (h["val"]["val_accuracy"], -h["val"][tie]) > (b["val_accuracy"], -b[tie]):
            best, bad = h["epoch"], 0
        else:
            bad += 1
            if bad >= patience:
                break
    return best


def loss_epoch(history: list[dict], harm_budget: float | None = None) -> int:
    """The grid's criterion: the epoch with the lowest validation choice log-loss (within the harm budget; epoch 0 always is a candidate)."""
    ok = [h for h in history if h["epoch"] == 0 or harm_budget is None or h["harm_kl"] <= harm_budget]
    return min(ok, key=lambda h: (h["val"]["val_choice_loss"], h["epoch"]))["epoch"]


def report(args) -> None:
    import selection as sel

    files = sorted(
        Path(p) for p in (args.files or [str(f) for f in OUT.glob("learned-*.json") if f.name != "learned-report.json"])
    )
    lines = [
        "| config | variant | best epoch: accuracy rule / log-loss rule | val acc: alpha*m -> learned (accuracy rule / log-loss rule) | test acc: rule | learned (accuracy rule) | learned (log-loss rule, train.py's) | regret to the grid oracle (log-loss rule) | KL of the learned state (log-loss rule) | train s |",
        "| --- " * 10 + "|",
    ]
    summary: dict[str, list] = {}
    for f in files:
        r = json.loads(f.read_text())
        config = sel._tag(r["task"], r["seed"], r["pairs"])
        for name, v in r["variants"].items():
            h = v["history"]
            a, b = accuracy_epoch(h, loss=v["loss"]), loss_epoch(h, HARM_BUDGET)
            ta, tb = h[a]["test"]["val_accuracy"], h[b]["test"]["val_accuracy"]
            summary.setdefault(name, []).append(
                (
                    ta - r["rule_test_accuracy"],
                    tb - r["rule_test_accuracy"],
                    r["oracle"] - ta,
                    r["oracle"] - tb,
                    h[b]["harm_kl"],
                )
            )
            lines.append(
                f"| {config} | {name} | {a} / {b} | {h[0]['val']['val_accuracy']:.3f} -> {h[a]['val']['val_accuracy']:.3f} / {h[b]['val']['val_accuracy']:.3f} | "
                f"{r['rule_test_accuracy']:.3f} | {ta:.3f} | {tb:.3f} | {r['oracle'] - tb:+.3f} | {h[b]['harm_kl']:.2f} | {v['train_seconds']:.0f} |"
            )
    mean = [
        "",
        "| variant | configs | mean test gain over alpha*m (accuracy epoch rule) | (log-loss epoch rule) | mean regret (accuracy rule) | (log-loss rule) | mean KL (log-loss rule) |",
        "| --- " * 7 + "|",
    ]
    for name, rows in summary.items():
        m = lambda i: sum(x[i] for x in rows) / len(rows)
        mean.append(f"| {name} | {len(rows)} | {m(0):+.3f} | {m(1):+.3f} | {m(2):.3f} | {m(3):.3f} | {m(4):.2f} |")
    text = "\n".join(lines + mean)
    print(text)
    write_json_atomic(OUT / "learned-report.json", {"table": text})


def main(argv=None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    import selection as sel

    s = sel.config_arguments(sub.add_parser("score"))
    s.add_argument("--epochs", type=int, default=3)
    s.add_argument(
        "--variants", nargs="*", default=None, help=f"names among {', '.join(v[0] for v in VARIANTS)} (default: all)"
    )
    s.add_argument("--redo", action="store_true", help="score variants already in the output again")
    s.add_argument("--out", default=None)
    r = sub.add_parser("report")
    r.add_argument("files", nargs="*")
    args = p.parse_args(argv)
    score(args) if args.cmd == "score" else report(args)


if __name__ == "__main__":
    main()
