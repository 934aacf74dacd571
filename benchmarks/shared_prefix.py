"""7. Below the plain-forward limit: the shared-prefix momentum pass vs the two-full-sequence pass.

Both variants get the same pre-tokenized batches (16 pairs) of the default task and feed the same
``MomentumAccumulator``; they alternate batch by batch. ``full``: ``pair_readers()[0]`` (positive and
negative full sequences, 32 rows, one forward). ``shared``: ``pair_readers()[1]`` (the
prompt once - 16 rows - with its KV cache, then the answers from it in rounds over those rows).
Also checked: the momentum is identical (counts, the top-k units, sums within tolerance).
Target: time(shared) / time(full) <= 0.6.

    python benchmarks/shared_prefix.py [--quick] [--device cuda] [--pairs 64] [--sites attention,ffn]
"""

from __future__ import annotations

import _common as C

READ_FULL, READ_SHARED = C.pair_readers()
import torch

from austeer_pl import MomentumAccumulator, locate_units, select_units
from austeer_pl.core.prefix import split_shared_prefix


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=None, help="default 64, --quick 16")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--sites", default="attention,ffn")
    p.add_argument("--k", type=int, default=100, help="top-k compared between the two passes")
    args = p.parse_args()
    device = C.setup(args)
    n_pairs = args.pairs or (16 if args.quick else 64)
    rounds = args.repeats
    sites = [s for s in args.sites.split(",") if s]
    model, tok = C.load(args)
    info = C.machine(device)
    layout = locate_units(model)
    pairs = C.default_pairs(tok, n_pairs)
    batches = C.encode_batches(tok, pairs, args.batch_size, device)
    sizes = {s: layout.site(s).size for s in sites}
    accs: dict[str, MomentumAccumulator] = {}

    def acc_for(name: str, i: int) -> MomentumAccumulator:
        if i == 0:
            accs[name] = MomentumAccumulator(sizes, layout.n_layers, device=device)
        return accs[name]

    @torch.inference_mode()
    def full(i: int):
        pos, neg = batches[i]
        acc_for("full", i).update(*READ_FULL(model, layout, sites, pos, neg))

    @torch.inference_mode()
    def shared(i: int):
        pos, neg = batches[i]
        acc_for("shared", i).update(*READ_SHARED(model, layout, sites, pos, neg, pad_id=tok.pad_token_id))

    # Work in tokens: full = every row padded to the batch width; shared = prompts (once) + answers.
    full_tokens = shared_tokens = 0
    for pos, neg in batches:
        full_tokens += 2 * pos["input_ids"].shape[0] * max(pos["input_ids"].shape[1], neg["input_ids"].shape[1])
        rows = lambda b: [r[m.bool()].tolist() for r, m in zip(b["input_ids"].cpu(), b["attention_mask"].cpu())]
        pr, a, b = split_shared_prefix(rows(pos), rows(neg))
        shared_tokens += len(pr) * max(map(len, pr)) + 2 * len(a) * max(max(map(len, a)), max(map(len, b)))

    print(f"{n_pairs} pairs, {len(batches)} batches of {args.batch_size}, sites {sites}, {rounds} rounds")
    times = C.interleave({"full": full, "shared": shared}, rounds, device, steps=len(batches), label="shared prefix")
    ratio = C.paired_ratio(times, "shared", "full")

    a, b = accs["full"], accs["shared"]
    counts_differ = sum(
        int((a.tensors[k] != b.tensors[k]).sum()) for k in a.tensors if a.tensors[k].dtype == torch.int64
    )
    count_entries = sum(int(a.tensors[k].numel()) for k in a.tensors if a.tensors[k].dtype == torch.int64)
    max_sum_diff = max(
        float((a.tensors[k] - b.tensors[k]).abs().max()) for k in a.tensors if a.tensors[k].dtype == torch.float64
    )
    max_rel_diff = max(
        float((a.tensors[k] - b.tensors[k]).abs().max() / a.tensors[k].abs().max().clamp(min=1e-30))
        for k in a.tensors
        if a.tensors[k].dtype == torch.float64
    )
    same_top = {}
    for sign in ("promote", "both"):
        sa, sb = select_units(a, args.k, sites, sign), select_units(b, args.k, sites, sign)
        same_top[sign] = sa.coordinates() == sb.coordinates()
    results = {
        "n_pairs": n_pairs,
        "sites": sites,
        "padded_tokens_full": full_tokens,
        "padded_tokens_shared": shared_tokens,
        "full": C.summary(times["full"]),
        "shared": C.summary(times["shared"]),
        "shared_over_full": ratio,
        "momentum": {
            "count_entries_differing": counts_differ,
            "count_entries": count_entries,
            "max_abs_sum_difference": max_sum_diff,
            "max_sum_difference_relative_to_largest_sum": max_rel_diff,
            f"same_top{args.k}_units_in_order": same_top,
        },
        "target": {"shared_over_full_max": 0.6, "met": ratio["median"] <= 0.6},
    }
    print()
    print(
        C.table(
            ["pass", "s / pass (median)", "pairs/s", "tokens computed", "time / full (median)", "min-max"],
            [
                [
                    "full (2 sequences)",
                    C.median(times["full"]),
                    n_pairs / C.median(times["full"]),
                    full_tokens,
                    1.0,
                    "-",
                ],
                [
                    "shared prefix",
                    C.median(times["shared"]),
                    n_pairs / C.median(times["shared"]),
                    shared_tokens,
                    ratio["median"],
                    f"{ratio['min']:.3f}-{ratio['max']:.3f}",
                ],
            ],
        )
    )
    print(
        f"\nmomentum: {counts_differ}/{count_entries} count entries differ, max |sum difference| {max_sum_diff:.2e} ({max_rel_diff:.1e} of the largest sum), "
        f"same top-{args.k} units in order: {same_top}"
    )
    print(f"shared / full = {ratio['median']:.3f} (target <= 0.6: {'met' if ratio['median'] <= 0.6 else 'NOT met'})")
    note = C.contention_note(info)
    if note:
        print(note)
    C.finish("shared_prefix", args, info, results)


if __name__ == "__main__":
    main()
