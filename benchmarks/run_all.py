"""Run every benchmark in sequence (each in its own process) and collect the JSON results.

    python benchmarks/run_all.py [--quick] [--device cuda] [--threads 1] [--outdir benchmarks/results]
                                 [--only fit_throughput,shared_prefix] [--skip fit_memory]

Options other than --outdir/--only/--skip are passed through to every script.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ("fit_throughput", "shared_prefix", "vs_paper", "steer_generate", "state_io", "scaling", "fit_memory")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--outdir", default=str(HERE / "results"))
    p.add_argument("--only", default="")
    p.add_argument("--skip", default="")
    args, rest = p.parse_known_args()
    names = [n for n in (args.only.split(",") if args.only else ORDER) if n and n not in args.skip.split(",")]
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    for name in names:
        cmd = [sys.executable, "-u", str(HERE / f"{name}.py"), *rest, "--out", str(outdir / f"{name}.json")]
        print(f"\n=== {name}: {' '.join(cmd[2:])}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd)
        print(f"=== {name}: exit {proc.returncode} after {time.perf_counter() - start:.0f} s", flush=True)
        if proc.returncode:
            sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
