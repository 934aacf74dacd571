"""Render the results JSON files as the markdown tables of benchmarks/README.md.

    python benchmarks/report.py [--results benchmarks/results] [--before benchmarks/results/before]

Prints one section per benchmark (AFTER = --results, BEFORE = --before when present).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _common as C

HERE = Path(__file__).resolve().parent


def load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def mib(x: float) -> float:
    return x / 2**20


def fit_throughput(d: dict) -> str:
    r = d["results"]
    rows = []
    order = ["causal_lm", "base_model", "momentum", "momentum_shared"]
    for name, v in sorted(r["variants"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
        rows.append(
            [
                name,
                v["median_s"],
                v["pairs_per_s"],
                v["tokens_per_s"],
                v["throughput_vs_base_model"]["median"],
                v["throughput_vs_causal_lm"]["median"],
            ]
        )
    head = f"{r['n_pairs']} pairs, batches of {r['batch_size']} pairs ({2 * r['batch_size']} rows), sites {'+'.join(r['sites'])}, {r['real_tokens']} real tokens"
    return (
        head
        + "\n\n"
        + C.table(
            ["variant", "s / pass", "pairs/s", "tokens/s", "throughput / base_model", "throughput / causal_lm"], rows
        )
    )


def shared_prefix(d: dict) -> str:
    r = d["results"]
    m = r["momentum"]
    rows = [
        [
            "full (2 sequences)",
            r["full"]["median_s"],
            r["n_pairs"] / r["full"]["median_s"],
            r["padded_tokens_full"],
            1.0,
        ],
        [
            "shared prefix",
            r["shared"]["median_s"],
            r["n_pairs"] / r["shared"]["median_s"],
            r["padded_tokens_shared"],
            r["shared_over_full"]["median"],
        ],
    ]
    top = next(v for k, v in m.items() if k.startswith("same_top"))
    topk = next(k for k in m if k.startswith("same_top"))
    return (
        f"{r['n_pairs']} pairs, sites {'+'.join(r['sites'])}\n\n"
        + C.table(["pass", "s / pass", "pairs/s", "tokens computed (with padding)", "time / full"], rows)
        + f"\n\nratio min-max over rounds: {r['shared_over_full']['min']:.3f}-{r['shared_over_full']['max']:.3f}; "
        f"momentum: {m['count_entries_differing']}/{m['count_entries']} count entries differ, "
        f"max |sum difference| {m['max_abs_sum_difference']:.2g}"
        + (
            f" ({m['max_sum_difference_relative_to_largest_sum']:.1e} of the largest sum)"
            if "max_sum_difference_relative_to_largest_sum" in m
            else ""
        )
        + f", {topk.replace('_', ' ')}: {top}"
    )


def vs_paper(d: dict) -> str:
    r = d["results"]
    rows = []
    base = r["variants"]["ours_batched"].get("memory", {}).get("pass_bytes")
    order = ["paper_per_example", "paper_keep_all", "ours_batched", "ours_shared_prefix"]
    for name, v in sorted(r["variants"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
        mem = v.get("memory", {})
        rows.append(
            [
                name,
                v["median_s"],
                v["time_vs_ours_batched"]["median"],
                mib(mem.get("gpu_peak", mem.get("peak_rss", 0))) if mem else "-",
                mib(mem["pass_bytes"]) if mem else "-",
                mem["pass_bytes"] / base if mem and base else "-",
                f"{v['count_entries_differing']}/{v['count_entries']}",
            ]
        )
    return f"{r['pairs']} pairs, sites {'+'.join(r['sites'])}\n\n" + C.table(
        [
            "variant",
            "s / pass",
            "time / ours_batched",
            "peak MiB",
            "pass MiB above model",
            "pass memory / ours_batched",
            "counts != paper_per_example",
        ],
        rows,
    )


def steer_generate(d: dict) -> str:
    r = d["results"]
    rows = []
    for case, v in sorted(
        r["cases"].items(), key=lambda kv: (kv[0].split("_")[0] != "generate", int(kv[0].rsplit("batch", 1)[1]))
    ):
        rat = v["steered_over_unsteered"]
        rows.append(
            [
                case,
                v["prompt_tokens"],
                v["unsteered"]["median_s"],
                v["steered"]["median_s"],
                rat["median"],
                f"{rat['min']:.3f}-{rat['max']:.3f}",
            ]
        )
    return f"k = {r['k']} ({r['hooked_modules']} hooked modules), {r['new_tokens']} new tokens\n\n" + C.table(
        ["case", "prompt tokens (padded)", "unsteered s", "steered s", "steered / unsteered", "min-max"], rows
    )


def state_io(d: dict) -> str:
    r = d["results"]
    rows = []
    for k, v in sorted(r["states"].items(), key=lambda kv: int(kv[0])):
        rows.append(
            [
                k,
                v["bytes_on_disk"],
                v["files"].get("steering_state.safetensors", 0),
                v["hooked_modules"],
                1000 * v["save"]["median_s"],
                1000 * v["load"]["median_s"],
                1000 * v["apply"]["median_s"],
                1000 * v["load+apply"]["median_s"],
            ]
        )
    return C.table(
        ["k", "bytes on disk", "of which tensors", "hooked modules", "save ms", "load ms", "apply ms", "load+apply ms"],
        rows,
    )


def scaling(d: dict) -> str:
    r = d["results"]
    ks = sorted(r["by_k"], key=int)
    fit_rows = [
        [k, r["fit"][k]["pass_s"], 1000 * r["fit"][k]["select_and_state"]["median_s"]]
        for k in sorted(r["fit"], key=int)
    ]
    k_rows = [
        [
            k,
            r["by_k"][k]["hooked_modules"],
            len(r["by_k"][k]["layers"]),
            r["by_k"][k]["forward_b8"]["ratio"]["median"],
            r["by_k"][k]["generate_b1"]["ratio"]["median"],
        ]
        for k in ks
    ]
    l_rows = [
        [
            n,
            r["by_layers"][n]["hooked_modules"],
            r["by_layers"][n]["forward_b8"]["ratio"]["median"],
            r["by_layers"][n]["generate_b1"]["ratio"]["median"],
        ]
        for n in sorted(r["by_layers"], key=int)
    ]
    return (
        f"Fitting ({r['pairs']} pairs; the pass reads every unit whatever k is):\n\n"
        + C.table(["k", "momentum pass s", "select + build state ms"], fit_rows)
        + "\n\nSteering overhead vs k (steered / unsteered):\n\n"
        + C.table(
            ["k", "hooked modules", "layers", "forward, batch 8", f"generate {r['new_tokens']} tokens, batch 1"], k_rows
        )
        + "\n\nSteering overhead vs number of steered layers (k = 100 spread evenly over L layers):\n\n"
        + C.table(["L", "hooked modules", "forward, batch 8", f"generate {r['new_tokens']} tokens, batch 1"], l_rows)
    )


def fit_memory(d: dict) -> str:
    r = d["results"]
    rows = []
    for n, v in r["runs"].items():
        before = v.get("gpu_before", v["rss_before"])
        rows.append(
            [
                n,
                v["longest_sequence_tokens"],
                mib(v["peak"]),
                mib(before),
                mib(v["pass_bytes"]),
                mib(v["accumulator_bytes"]),
                v["seconds"],
            ]
        )
    return (
        f"mode {r['mode']}, sites {r['sites'].replace(',', '+')}, batch {r['batch_size']}\n\n"
        + C.table(
            ["pairs", "longest sequence (tokens)", "peak MiB", "before pass MiB", "pass MiB", "accumulator MiB", "s"],
            rows,
        )
        + f"\n\npeak growth: {100 * r['peak_growth']:+.2f}%"
    )


SECTIONS = [
    ("fit_throughput", "1. Fitting throughput", fit_throughput),
    ("fit_memory", "2. Fitting memory", fit_memory),
    ("fit_memory_shared", "2b. Fitting memory (shared-prefix pass)", fit_memory),
    (
        "fit_memory_full_mmap",
        "2c. Fitting memory (two full sequences, glibc mmap threshold fixed at 128 KiB)",
        fit_memory,
    ),
    ("steer_generate", "3. Steered generation", steer_generate),
    ("state_io", "4. State size and load-and-apply", state_io),
    ("scaling", "5. Scaling with k and with steered layers", scaling),
    ("vs_paper", "6. Against the paper's public-code way", vs_paper),
    ("shared_prefix", "7. Shared-prefix pass", shared_prefix),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--before", default=str(HERE / "results" / "before"))
    args = p.parse_args()
    for name, title, render in SECTIONS:
        after, before = load(Path(args.results), name), load(Path(args.before), name)
        if after is None and before is None:
            continue
        print(f"### {title}\n")
        for label, d in (("AFTER", after), ("BEFORE", before)):
            if d is None:
                continue
            m = d["machine"]
            load_avg = (
                f"load {m['load_average_start'][0]:.1f} -> {m['load_average_end'][0]:.1f}"
                if m.get("load_average_start") and m.get("load_average_end")
                else ""
            )
            print(
                f"**{label}** (`{d['command']}`, {d['when']}, {m['device']}, {m['torch_threads']} thread(s), {load_avg})\n"
            )
            print(render(d) + "\n")


if __name__ == "__main__":
    main()
