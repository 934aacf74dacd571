"""The whole ``python train.py`` (model load, momentum pass, grid, export) before and after issue 13, in one run.

``before`` spells out the first round's defaults (attention, k 10/50, alpha 4/16/64: six points
scored by accuracy on 100 validation examples, every point on every example, no harm bound, no
verdict, batches of 32); ``after`` is today's ``python train.py`` (24 points plus no steering,
successive halving on 200 examples, harm screening, verdict, replayed scoring). The two run as
separate processes in alternating order, so both see the same machine; the ratio is per round.

    python benchmarks/fit_time.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from austeer_pl.core.fileio import write_json_atomic

BEFORE = [
    "--model.site",
    "attention",
    "--model.k",
    "[10, 50]",
    "--model.alpha",
    "[4, 16, 64]",
    "--model.criterion",
    "accuracy",
    "--model.halving",
    "false",
    "--model.harm_budget",
    "null",
    "--model.verdict_level",
    "1",
    "--model.replay",
    "false",
    "--data.max_val_examples",
    "100",
    "--data.eval_batch_size",
    "32",
]


def fit(extra: list[str], folder: Path) -> dict:
    started = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--run_dir",
            str(folder / "run"),
            "--export_dir",
            str(folder / "state"),
            "--wandb_mode",
            "disabled",
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    fit = json.loads((folder / "state" / "steering_config.json").read_text())["metadata"]["fit"]
    return {
        "seconds": seconds,
        "pass_seconds": fit.get("fit_seconds"),
        "k": len(fit.get("grid", [])),
        "chosen_val_accuracy": fit.get("val_accuracy"),
        "grid_points": len(fit.get("grid", [])),
        "evaluations": (fit.get("verdict") or {}).get("evaluations"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fit_time.json"))
    args = p.parse_args()
    rounds = []
    for r in range(args.rounds):
        order = [("before", BEFORE), ("after", [])] if r % 2 == 0 else [("after", []), ("before", BEFORE)]
        row = {}
        for name, extra in order:
            with tempfile.TemporaryDirectory() as tmp:
                row[name] = fit(extra, Path(tmp))
            print(
                f"round {r}: {name}: {row[name]['seconds']:.0f} s ({row[name]['grid_points']} grid points)", flush=True
            )
        row["ratio_after_before"] = row["after"]["seconds"] / row["before"]["seconds"]
        rounds.append(row)
        print(f"round {r}: after / before = {row['ratio_after_before']:.2f}", flush=True)
    write_json_atomic(args.out, {"rounds": rounds})


if __name__ == "__main__":
    main()
