"""2. Fitting memory: peak RSS (CPU) / peak allocated (GPU) of the momentum pass, 200 vs 2,000 pairs.

Each size runs in a fresh subprocess: load the model, build the pairs, run one short forward (pages
in the mmapped weights), then reset the peak
(``/proc/self/clear_refs`` on Linux; ``torch.cuda.reset_peak_memory_stats`` on GPU) and run
``accumulate_momentum`` (attention+ffn, batch 16; ``--mode shared`` uses the shared-prefix pass).
Reported: the absolute peak, and the pass's peak above the memory held before it. The accumulator
holds integer counts and float64 sums per unit, never per pair, so memory should not grow with the
number of pairs; what can grow is the widest batch (longer reviews among more pairs).
Target: peak(2000) / peak(200) - 1 < 5%.

    python benchmarks/fit_memory.py [--quick] [--device cuda] [--sizes 200,2000] [--mode full|shared]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

import _common as C


def child(args) -> None:
    device = C.setup(args)
    model, tok = C.load(args)
    pairs = [(p["pos"], p["neg"]) for p in C.default_pairs(tok, args.child)]
    sites = [s for s in args.sites.split(",") if s]
    widest = max(len(tok(t)["input_ids"]) for pair in pairs for t in pair)
    C.warm(model, tok, device)
    fit = C.momentum_fit(args.mode == "shared")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        gpu_before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = C.rss_bytes()
    resettable = C.reset_peak_rss()
    start = time.perf_counter()
    acc = fit(model, tok, pairs, sites=sites, batch_size=args.batch_size)
    C.sync(device)
    out = {
        "pairs": acc.n,
        "seconds": time.perf_counter() - start,
        "longest_sequence_tokens": widest,
        "rss_before": rss_before,
        "peak_rss": C.peak_rss_bytes(),
        "rss_after": C.rss_bytes(),
        "peak_reset_supported": resettable,
        "accumulator_bytes": sum(t.numel() * t.element_size() for t in acc.tensors.values()),
    }
    if device.type == "cuda":
        out.update(gpu_before=gpu_before, gpu_peak=torch.cuda.max_memory_allocated(device))
    print("RESULT " + json.dumps(out))


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help="pair counts (default 200,2000; --quick 20,200)")
    p.add_argument("--mode", choices=("full", "shared"), default="full")
    p.add_argument("--sites", default="attention,ffn")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--child", type=int, default=None, help=__import__("argparse").SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    device = C.setup(args)
    info = C.machine(device)
    sizes = [int(s) for s in (args.sizes or ("20,200" if args.quick else "200,2000")).split(",")]
    runs = {}
    for n in sizes:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            str(n),
            "--mode",
            args.mode,
            "--sites",
            args.sites,
            "--batch_size",
            str(args.batch_size),
            "--device",
            args.device,
            "--dtype",
            args.dtype,
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        print(f"  [memory] {n} pairs ({args.mode}) ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"child for {n} pairs failed:\n{proc.stderr[-3000:]}")
        r = json.loads(line[len("RESULT ") :])
        r["peak"] = r.get("gpu_peak", r["peak_rss"])
        r["pass_bytes"] = (r["gpu_peak"] - r["gpu_before"]) if "gpu_peak" in r else (r["peak_rss"] - r["rss_before"])
        runs[str(n)] = r
        print(
            f"  [memory] {n} pairs: peak {r['peak'] / 2**20:.1f} MiB, pass {r['pass_bytes'] / 2**20:.1f} MiB, {r['seconds']:.0f} s",
            flush=True,
        )
    lo, hi = runs[str(sizes[0])], runs[str(sizes[-1])]
    growth = hi["peak"] / lo["peak"] - 1
    results = {
        "mode": args.mode,
        "sites": args.sites,
        "batch_size": args.batch_size,
        "runs": runs,
        "peak_growth": growth,
        "target": {"peak_growth_max": 0.05, "met": growth < 0.05},
    }
    kind = "peak allocated (GPU)" if device.type == "cuda" else "peak RSS"
    rows = [
        [
            n,
            r["pairs"],
            r["longest_sequence_tokens"],
            r["peak"] / 2**20,
            r["rss_before"] / 2**20 if "gpu_peak" not in r else r["gpu_before"] / 2**20,
            r["pass_bytes"] / 2**20,
            r["accumulator_bytes"] / 2**20,
            r["seconds"],
        ]
        for n, r in runs.items()
    ]
    print()
    print(
        C.table(
            [
                "pairs",
                "read",
                "longest seq (tokens)",
                f"{kind} MiB",
                "before pass MiB",
                "pass MiB",
                "accumulator MiB",
                "s",
            ],
            rows,
        )
    )
    print(
        f"\npeak growth {sizes[0]} -> {sizes[-1]} pairs: {100 * growth:+.2f}% (target < 5%: {'met' if growth < 0.05 else 'NOT met'})"
    )
    C.finish("fit_memory" if args.mode == "full" else "fit_memory_shared", args, info, results)


if __name__ == "__main__":
    main()
