"""1. Fitting throughput: the momentum pass vs a plain batched forward over the same batches.

Variants, all under ``torch.inference_mode()`` on the same pre-tokenized batches (16 pairs = 32 rows
per forward, positive and negative rows in one pass, as ``accumulate_momentum`` does):

* ``causal_lm``: ``model(input_ids, attention_mask)``, no hooks: the full CausalLM forward (LM head included).
* ``base_model``: ``model.model(...)``, no hooks: decoder layers + final norm, no LM head.
* ``momentum``: ``ActivationReader`` (hooks at every layer's sites, stops after the last decoder layer)
  + ``MomentumAccumulator.update``: the real fitting step.
* ``momentum_shared``: the same statistics with the shared-prefix reader (``austeer_pl.core.prefix``).

The momentum pass skips the LM head, so it beats ``causal_lm`` for free; ``base_model`` is the honest
"plain forward" yardstick. Target: throughput(momentum) / throughput(base_model) >= 0.90.

    python benchmarks/fit_throughput.py [--quick] [--device cuda] [--pairs 64] [--sites attention,ffn]
"""

from __future__ import annotations

import _common as C

READ_FULL, READ_SHARED = C.pair_readers()
import torch

from austeer_pl import MomentumAccumulator, locate_units


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=None, help="pairs per pass (default 64, --quick 16)")
    p.add_argument("--batch_size", type=int, default=16, help="pairs per forward")
    p.add_argument("--sites", default="attention,ffn")
    p.add_argument("--no_shared", action="store_true", help="skip the shared-prefix variant")
    args = p.parse_args()
    device = C.setup(args)
    n_pairs = args.pairs or (16 if args.quick else 64)
    sites = [s for s in args.sites.split(",") if s]
    model, tok = C.load(args)
    info = C.machine(device)
    layout = locate_units(model)
    pairs = C.default_pairs(tok, n_pairs)
    batches = C.encode_batches(tok, pairs, args.batch_size, device)
    joined = []
    for pos, neg in batches:
        width = max(pos["input_ids"].shape[1], neg["input_ids"].shape[1])
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))
        joined.append(
            (
                torch.cat([pad(pos["input_ids"]), pad(neg["input_ids"])]),
                torch.cat([pad(pos["attention_mask"]), pad(neg["attention_mask"])]),
            )
        )
    n_tokens = C.count_tokens(batches)
    n_padded = sum(int(ids.numel()) for ids, _ in joined)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    sizes = {s: layout.site(s).size for s in sites}

    accs: dict[str, MomentumAccumulator] = {}

    def fresh(name: str, i: int) -> MomentumAccumulator:
        if i == 0 or name not in accs:  # a new accumulator at the start of each pass
            accs[name] = MomentumAccumulator(sizes, layout.n_layers, device=device)
        return accs[name]

    @torch.inference_mode()
    def causal_lm(i: int):
        ids, mask = joined[i]
        model(input_ids=ids, attention_mask=mask, use_cache=False)

    @torch.inference_mode()
    def base_model(i: int):
        ids, mask = joined[i]
        base(input_ids=ids, attention_mask=mask, use_cache=False)

    @torch.inference_mode()
    def momentum(i: int):
        pos, neg = batches[i]
        fresh("momentum", i).update(*READ_FULL(model, layout, sites, pos, neg))

    @torch.inference_mode()
    def momentum_shared(i: int):
        pos, neg = batches[i]
        fresh("momentum_shared", i).update(*READ_SHARED(model, layout, sites, pos, neg, pad_id=tok.pad_token_id))

    variants = {"causal_lm": causal_lm, "base_model": base_model, "momentum": momentum}
    if not args.no_shared and READ_SHARED is not None:
        variants["momentum_shared"] = momentum_shared
    print(
        f"{n_pairs} pairs in {len(batches)} batches of {args.batch_size}, {n_tokens} real tokens ({n_padded} with padding), sites {sites}, {args.repeats} rounds"
    )
    times = C.interleave(variants, args.repeats, device, steps=len(batches), label="fit")

    rows, results = (
        [],
        {
            "n_pairs": n_pairs,
            "batch_size": args.batch_size,
            "sites": sites,
            "real_tokens": n_tokens,
            "padded_tokens": n_padded,
            "variants": {},
        },
    )
    for name, ts in times.items():
        med = C.median(ts)
        vs_base = C.paired_ratio(times, "base_model", name)  # throughput ratio = time(base) / time(variant)
        vs_lm = C.paired_ratio(times, "causal_lm", name)
        results["variants"][name] = {
            **C.summary(ts),
            "pairs_per_s": n_pairs / med,
            "tokens_per_s": n_tokens / med,
            "throughput_vs_base_model": vs_base,
            "throughput_vs_causal_lm": vs_lm,
        }
        rows.append([name, med, n_pairs / med, n_tokens / med, vs_base["median"], vs_lm["median"]])
    m = results["variants"]["momentum"]["throughput_vs_base_model"]["median"]
    results["target"] = {"momentum_vs_base_model_min": 0.90, "met": m >= 0.90}
    print()
    print(
        C.table(
            ["variant", "s / pass (median)", "pairs/s", "tokens/s", "throughput vs base_model", "vs causal_lm"], rows
        )
    )
    print(f"\nmomentum / base_model throughput = {m:.3f} (target >= 0.90: {'met' if m >= 0.90 else 'NOT met'})")
    note = C.contention_note(info)
    if note:
        print(note)
    C.finish("fit_throughput", args, info, results)


if __name__ == "__main__":
    main()
