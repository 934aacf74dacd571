"""Shared pieces of the benchmark scripts: options, machine facts, data, timing, tables, JSON.

Every ratio a script reports is measured side by side in one process: the variants run in
interleaved rounds (the order rotates each round), each round gives one paired ratio, and the
median over rounds is reported, with the spread (min/max). On a shared machine (other jobs
running) absolute times move a lot; paired ratios much less.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable as `python benchmarks/<name>.py` from anywhere
    sys.path.insert(0, str(ROOT))

import torch

from austeer_pl.core.fileio import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"
STATE_CACHE = Path(os.environ.get("AUSTEER_BENCH_CACHE", Path.home() / ".cache" / "austeer_pl" / "benchmarks"))


# ---------------------------------------------------------------------------------------- options
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes and few rounds (a smoke run, minutes)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", help="model dtype (float32, bfloat16, float16)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default: 3, --quick: 2)")
    p.add_argument("--out", default=None, help="JSON output path (default: benchmarks/results/<name>.json)")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    return torch.device(args.device)


def load(args: argparse.Namespace):
    """The embedded real model (SmolLM2-135M-Instruct) and its tokenizer, on ``args.device``."""
    from austeer_pl import load_model

    model, tok = load_model(dtype=args.dtype, device=args.device)
    return model, tok


# ---------------------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def finish(name: str, args: argparse.Namespace, info: dict[str, Any], results: dict[str, Any]) -> Path:
    """Write ``{machine, args, results}`` atomically to the JSON output path."""
    info = dict(info)
    info["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    payload = {
        "benchmark": name,
        "when": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "machine": info,
        "args": {k: v for k, v in vars(args).items()},
        "results": results,
    }
    path = Path(args.out) if args.out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, payload)
    print(f"\nwrote {path}")
    return path


# ---------------------------------------------------------------------------------------- data
def default_pairs(tokenizer, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` contrastive pairs of the default task (rotten_tomatoes), chat-formatted.

    Each item has ``prompt`` (formatted prompt text), ``pos`` and ``neg`` (full texts).
    """
    from austeer_pl.tasks import (
        format_prompt,
        join_answer,
        load_task,
        make_pairs,
        split_examples,
    )

    task = load_task("rotten_tomatoes")
    train = split_examples(task.examples, seed=seed, max_train=n)["train"]
    pairs = make_pairs(train, seed=seed, max_pairs=n)
    if len(pairs) < n:
        raise SystemExit(f"only {len(pairs)} training pairs available, asked for {n}")
    out = []
    for p in pairs:
        prompt = format_prompt(tokenizer, task, p.prompt)
        out.append({"prompt": prompt, "pos": join_answer(prompt, p.positive), "neg": join_answer(prompt, p.negative)})
    return out


def encode_batches(tokenizer, pairs: Sequence[dict[str, str]], batch_size: int, device) -> list[tuple[dict, dict]]:
    """Pre-tokenized ``(pos, neg)`` batches (right-padded), as :func:`accumulate_momentum` builds them."""
    from austeer_pl.core.tokens import encode_texts

    batches = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        batches.append(
            (
                encode_texts(tokenizer, [c["pos"] for c in chunk], device=device),
                encode_texts(tokenizer, [c["neg"] for c in chunk], device=device),
            )
        )
    return batches


def count_tokens(batches) -> int:
    return int(sum(int(p["attention_mask"].sum()) + int(n["attention_mask"].sum()) for p, n in batches))


# ---------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleave(
    variants: dict[str, Callable[..., Any]],
    repeats: int,
    device: torch.device,
    *,
    steps: int | None = None,
    warmup: bool = True,
    label: str = "",
) -> dict[str, list[float]]:
    """Seconds per round of each variant, over ``repeats`` interleaved rounds.

    With ``steps`` (e.g. the batches of a pass) each variant is called as ``fn(step)`` and the
    variants alternate at every step (in an order that rotates), so that all of them see the same
    load from other jobs within a fraction of a second; a round's time is the sum over its steps.
    Without ``steps`` each variant is called as ``fn()`` once per round. A variant may be a
    ``(setup, fn, teardown)`` tuple; only ``fn`` is timed.
    """
    names = list(variants)
    calls = [None] if steps is None else list(range(steps))

    def call(name: str, step) -> float:
        fn = variants[name]
        before = after = None
        if isinstance(fn, tuple):  # (setup, fn, teardown): only fn is timed
            before, fn, after = fn
        if before is not None:
            before()
        try:
            return timed(fn if step is None else (lambda: fn(step)), device)
        finally:
            if after is not None:
                after()

    if warmup:
        for name in names:
            call(name, calls[0])
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        gc.collect()
        total = dict.fromkeys(names, 0.0)
        for j, step in enumerate(calls):
            shift = (r + j) % len(names)
            for name in names[shift:] + names[:shift]:
                total[name] += call(name, step)
        for name in names:
            times[name].append(total[name])
        if label:
            print(
                f"  [{label}] round {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names),
                flush=True,
            )
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> dict[str, float]:
    """Median (and min/max) over rounds of ``time[num] / time[den]`` measured in the same round."""
    ratios = [a / b for a, b in zip(times[num], times[den])]
    return {"median": median(ratios), "min": min(ratios), "max": max(ratios)}


def summary(times: Sequence[float]) -> dict[str, float]:
    return {"median_s": median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


# ---------------------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux ``clear_refs``); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------- output
def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (printed, and pasted into the README)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in cells)])


def contention_note(info: dict[str, Any]) -> str:
    load = info.get("load_average_start")
    cores = info.get("cpu_cores") or 1
    if load and load[0] > 0.5 * cores:
        return f"note: 1-min load average {load[0]:.1f} on {cores} cores at start - other jobs share the machine; absolute times are noisy, use the paired ratios"
    return ""


# ---------------------------------------------------------------------------------------- a real fitted state
def fitted_ranking(
    model, tokenizer, *, n_pairs: int = 200, sites: Sequence[str] = ("attention", "ffn"), refit: bool = False
):
    """Every unit of ``sites`` ranked by momentum over ``n_pairs`` default-task pairs (cached on disk).

    The fit itself is not what these scripts time; it is cached under ``STATE_CACHE`` (keyed by the
    pair count and sites) so that the steering benchmarks start in seconds. Returns
    ``(selection, layout)``; ``selection.head(k)`` is the real top-``k`` state's units.
    """
    from safetensors.torch import load_file, save_file

    from austeer_pl import MomentumAccumulator, accumulate_momentum, locate_units
    from austeer_pl.core.selection import rank_units

    layout = locate_units(model)
    STATE_CACHE.mkdir(parents=True, exist_ok=True)
    path = STATE_CACHE / f"momentum_rt_{n_pairs}_{'-'.join(sites)}.safetensors"
    acc = MomentumAccumulator({s: layout.site(s).size for s in sites}, layout.n_layers)
    if path.is_file() and not refit:
        acc.load_state_dict(load_file(str(path)))
    else:
        print(f"fitting momentum on {n_pairs} pairs ({', '.join(sites)}); cached at {path}", flush=True)
        pairs = default_pairs(tokenizer, n_pairs)
        acc = accumulate_momentum(
            model, tokenizer, [(p["pos"], p["neg"]) for p in pairs], sites=sites, batch_size=16, layout=layout
        ).to("cpu")
        tmp = path.with_suffix(".tmp")
        save_file(acc.state_dict(), str(tmp))
        os.replace(tmp, path)
    return rank_units(acc, sites, "both"), layout


def pair_readers():
    """``(full, shared)``: the pass over a batch of encoded full sequences, read as two full sequences
    per pair or from a shared prompt, in whichever checkout runs this (the current one pair reader,
    or an older checkout's functions: ``git worktree add`` it, copy ``benchmarks/`` in, run there).
    ``shared`` is None on code from before the shared-prefix reader. Each is
    ``(model, layout, sites, pos, neg, pad_id) -> (pos_units, neg_units)``."""
    try:
        from austeer_pl.core.pairs import read_pair_batch, rows_batch, split_batch
    except ImportError:  # an older checkout
        from austeer_pl.core.pairs import read_pair_batch as old
        from austeer_pl.core.reading import ActivationReader

        try:
            from austeer_pl.prefix import read_pair_batch_shared_prefix as old_shared
        except ImportError:
            old_shared = None

        def full(model, layout, sites, pos, neg, pad_id=0):
            return old(ActivationReader(model, layout, sites), pos, neg)

        shared = (
            (lambda model, layout, sites, pos, neg, pad_id=0: old_shared(model, layout, sites, pos, neg, pad_id=pad_id))
            if old_shared
            else None
        )
        return full, shared

    def full(model, layout, sites, pos, neg, pad_id=0):
        return read_pair_batch(model, layout, rows_batch(pos, neg), sites)

    def shared(model, layout, sites, pos, neg, pad_id=0):
        return read_pair_batch(model, layout, split_batch(pos, neg, pad_id), sites)

    return full, shared


def momentum_fit(shared: bool):
    """``accumulate_momentum`` reading full sequences (``shared=False``) or shared prefixes."""
    import functools
    import inspect

    from austeer_pl import accumulate_momentum

    if "shared_prefix" in inspect.signature(accumulate_momentum).parameters:
        return functools.partial(accumulate_momentum, shared_prefix=shared)
    if shared:
        raise SystemExit("this checkout's accumulate_momentum has no shared-prefix pass; use --mode full")
    return accumulate_momentum


def state_from(selection, layout, k: int, *, layers: Sequence[int] | None = None, alpha: float = 2.0):
    """An AUSteer state with the top ``k`` units; with ``layers``, the units are spread evenly over
    exactly those layers (the best ``k / len(layers)`` of each, in ranking order)."""
    from austeer_pl import SteeringState
    from austeer_pl.core.selection import Selection

    if layers is not None:
        layers = list(layers)
        quota = {l: k // len(layers) + (1 if i < k % len(layers) else 0) for i, l in enumerate(layers)}
        keep = []
        for i, l in enumerate(selection.layer.tolist()):
            if quota.get(l, 0) > 0:
                quota[l] -= 1
                keep.append(i)
        idx = torch.tensor(keep, dtype=torch.long)
        selection = Selection(
            selection.sites,
            selection.site_index[idx],
            selection.layer[idx],
            selection.unit[idx],
            selection.momentum[idx],
        )
    return SteeringState.from_selection(
        selection.head(k), layout, alpha=alpha, base_model="smollm2-135m-instruct", sign_policy="both"
    )


def prompt_batch(tokenizer, pairs: Sequence[dict[str, str]], device) -> dict[str, torch.Tensor]:
    """The formatted prompts of ``pairs``, left-padded for generation."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer([p["prompt"] for p in pairs], return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


class Steer:
    """``(setup, fn, teardown)`` helper: apply ``state`` before the timed call, remove it after."""

    def __init__(self, model, layout, state) -> None:
        self.model, self.layout, self.state, self.handle = model, layout, state, None

    def on(self) -> None:
        self.handle = self.state.apply(self.model, layout=self.layout)

    def off(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def wrap(self, fn):
        return (self.on, fn, self.off)


def warm(model, tokenizer, device) -> None:
    """One short forward before measuring memory: pages in every weight (safetensors are mmapped,
    so untouched weights are not yet resident) and starts the thread pools."""
    with torch.inference_mode():
        for p in model.parameters():
            p.sum()
        enc = tokenizer(["warm up"], return_tensors="pt").to(device)
        model(**enc)
