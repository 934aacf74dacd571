"""6. Against the paper's public-code way of reading activations: time and peak memory, as ratios.

The "paper way" runs one example per forward pass (the positive and the negative text of each
pair separately, the full CausalLM forward with its default arguments), keeps the whole-sequence
activations that hooks at every layer's attention and ffn sites store, and slices the last token
afterwards; the momentum is computed from the kept last-token values at the end. Two flavours:

* ``paper_per_example``: the whole sequences of one forward are kept until that forward is sliced;
* ``paper_keep_all``: the whole sequences of every example are kept until the end of the pass.

Ours: ``accumulate_momentum``'s batched pass (16 pairs per forward, last token only, no LM head),
and the shared-prefix pass. Same pairs for all; times interleaved in one process; peak memory
(RSS above the loaded and warmed-up model on CPU, peak allocated on GPU) measured in a fresh subprocess per variant.

    python benchmarks/vs_paper.py [--quick] [--device cuda] [--pairs 32]
"""

from __future__ import annotations

import json
import subprocess
import sys

import _common as C

READ_FULL, READ_SHARED = C.pair_readers()
import torch

from austeer_pl import MomentumAccumulator, locate_units
from austeer_pl.core.sites import register_site_hook

SITES = ("attention", "ffn")
VARIANTS = ("paper_per_example", "paper_keep_all", "ours_batched", "ours_shared_prefix")
if READ_SHARED is None:  # an older checkout, without the shared-prefix reader
    VARIANTS = VARIANTS[:3]


def paper_way(model, tok, layout, pairs, keep_all: bool, device) -> MomentumAccumulator:
    """The reference implementation's pattern: batch 1, full sequences stored by hooks, sliced afterwards."""
    current: dict[tuple[str, int], torch.Tensor] = {}

    def keep(site, layer):
        def fn(x):
            current[(site, layer)] = x.detach().clone()  # the whole (1, seq, units) sequence

        return fn

    handles = [register_site_hook(layout.site(s), l, keep(s, l)) for s in SITES for l in range(layout.n_layers)]
    kept: list[dict] = []
    last: dict[str, list[torch.Tensor]] = {"pos": [], "neg": []}

    def slice_last(full: dict) -> dict[str, torch.Tensor]:
        return {s: torch.stack([full[(s, l)][0, -1] for l in range(layout.n_layers)]).float() for s in SITES}

    try:
        with torch.no_grad():
            for pair in pairs:
                for side in ("pos", "neg"):
                    inputs = tok(pair[side], return_tensors="pt").to(device)
                    model(**inputs)
                    if keep_all:
                        kept.append((side, dict(current)))
                    else:
                        last[side].append(slice_last(current))
                    current.clear()
    finally:
        for h in handles:
            h.remove()
    for side, full in kept:  # sliced afterwards
        last[side].append(slice_last(full))
    kept.clear()
    acc = MomentumAccumulator({s: layout.site(s).size for s in SITES}, layout.n_layers, device=device)
    pos = {s: torch.stack([a[s] for a in last["pos"]]) for s in SITES}
    neg = {s: torch.stack([a[s] for a in last["neg"]]) for s in SITES}
    acc.update(pos, neg)
    return acc


def make_runner(name, model, tok, layout, pairs, device):
    if name.startswith("paper"):
        return lambda: paper_way(model, tok, layout, pairs, name == "paper_keep_all", device)
    batches = C.encode_batches(tok, pairs, 16, device)

    @torch.inference_mode()
    def ours():
        acc = MomentumAccumulator({s: layout.site(s).size for s in SITES}, layout.n_layers, device=device)
        for pos, neg in batches:
            if name == "ours_batched":
                acc.update(*READ_FULL(model, layout, SITES, pos, neg))
            else:
                acc.update(*READ_SHARED(model, layout, SITES, pos, neg, pad_id=tok.pad_token_id))
        return acc

    return ours


def child(args) -> None:
    """One variant, once, in this fresh process; print its peak memory as JSON."""
    device = C.setup(args)
    model, tok = C.load(args)
    layout = locate_units(model)
    pairs = C.default_pairs(tok, args.pairs_n)
    run = make_runner(args.child, model, tok, layout, pairs, device)
    C.warm(model, tok, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    base_rss = C.rss_bytes()
    C.reset_peak_rss()
    run()
    out = {"rss_before": base_rss, "peak_rss": C.peak_rss_bytes()}
    if device.type == "cuda":
        out.update(gpu_before=base, gpu_peak=torch.cuda.max_memory_allocated(device))
    print("RESULT " + json.dumps(out))


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=None, help="default 32, --quick 8")
    p.add_argument("--child", default=None, help=argparse_hidden())
    p.add_argument("--pairs_n", type=int, default=None, help=argparse_hidden())
    p.add_argument("--no_memory", action="store_true", help="skip the subprocess memory runs")
    args = p.parse_args()
    if args.child:
        child(args)
        return
    device = C.setup(args)
    n_pairs = args.pairs or (8 if args.quick else 32)
    model, tok = C.load(args)
    info = C.machine(device)
    layout = locate_units(model)
    pairs = C.default_pairs(tok, n_pairs)
    runners = {name: make_runner(name, model, tok, layout, pairs, device) for name in VARIANTS}
    accs = {name: fn() for name, fn in runners.items()}  # also the warm-up
    times = C.interleave(runners, args.repeats, device, warmup=False, label="vs paper")

    # Same statistics? (batched rows are padded, the paper's are not: float32 noise can flip a sign)
    ref = accs["paper_per_example"]
    agree = {}
    for name, acc in accs.items():
        diff = sum(
            int((acc.tensors[k] != ref.tensors[k]).sum()) for k in ref.tensors if ref.tensors[k].dtype == torch.int64
        )
        total = sum(int(ref.tensors[k].numel()) for k in ref.tensors if ref.tensors[k].dtype == torch.int64)
        agree[name] = {"count_entries_differing": diff, "count_entries": total}

    memory = {}
    if not args.no_memory:
        for name in VARIANTS:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                name,
                "--pairs_n",
                str(n_pairs),
                "--device",
                args.device,
                "--dtype",
                args.dtype,
            ]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{name} child failed:\n{proc.stderr[-3000:]}")
            memory[name] = json.loads(line[len("RESULT ") :])
            m = memory[name]
            m["pass_bytes"] = (
                (m["gpu_peak"] - m["gpu_before"]) if "gpu_peak" in m else (m["peak_rss"] - m["rss_before"])
            )
            print(
                f"  [memory] {name}: peak {m.get('gpu_peak', m['peak_rss']) / 2**20:.0f} MiB, pass {m['pass_bytes'] / 2**20:.0f} MiB",
                flush=True,
            )

    rows, results = [], {"pairs": n_pairs, "sites": list(SITES), "variants": {}}
    for name in VARIANTS:
        r = {
            **C.summary(times[name]),
            "time_vs_ours_batched": C.paired_ratio(times, name, "ours_batched"),
            **agree[name],
        }
        if memory:
            r["memory"] = memory[name]
        results["variants"][name] = r
        mem = memory.get(name, {})
        rows.append(
            [
                name,
                C.median(times[name]),
                r["time_vs_ours_batched"]["median"],
                mem.get("gpu_peak", mem.get("peak_rss", 0)) / 2**20 if mem else "-",
                mem["pass_bytes"] / 2**20 if mem else "-",
                (mem["pass_bytes"] / max(memory["ours_batched"]["pass_bytes"], 1)) if mem else "-",
                f"{agree[name]['count_entries_differing']}/{agree[name]['count_entries']}",
            ]
        )
    print()
    print(
        C.table(
            [
                "variant",
                "s (median)",
                "time / ours_batched",
                "peak MiB",
                "pass MiB (above model)",
                "pass mem / ours_batched",
                "counts != paper",
            ],
            rows,
        )
    )
    note = C.contention_note(info)
    if note:
        print(note)
    C.finish("vs_paper", args, info, results)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
