"""5. Scaling: fitting time and steering overhead as k grows and as the steered layers grow.

* Fitting: the momentum pass reads every unit of every layer whatever k is, so only the
  selection (global top-k) and the state construction depend on k; both are timed per k, next to
  the pass time over ``--pairs`` pairs (attention+ffn, batch 16).
* Steering overhead (steered / unsteered, paired medians): one forward over 8 default-task
  prompts, and greedy generation of ``--new_tokens`` tokens at batch 1, for
  - k = 1, 10, 100, 1000 (real top-k states: units wherever the ranking puts them);
  - k = 100 units spread evenly over 1, 5, 15, 30 evenly spaced layers (the best 100/L of each).

    python benchmarks/scaling.py [--quick] [--device cuda]
"""

from __future__ import annotations

import _common as C

READ_FULL, READ_SHARED = C.pair_readers()
import torch

from austeer_pl import MomentumAccumulator, SteeringState, select_units


def spaced(n_layers: int, count: int) -> list[int]:
    if count >= n_layers:
        return list(range(n_layers))
    return sorted({round(i * (n_layers - 1) / max(count - 1, 1)) for i in range(count)})


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--ks", default="1,10,100,1000")
    p.add_argument("--layer_counts", default="1,5,15,30")
    p.add_argument("--pairs", type=int, default=None, help="pairs of the timed pass (default 32, --quick 16)")
    p.add_argument("--new_tokens", type=int, default=None, help="default 32, --quick 8")
    p.add_argument("--fit_pairs", type=int, default=200)
    args = p.parse_args()
    device = C.setup(args)
    n_pairs = args.pairs or (16 if args.quick else 32)
    new_tokens = args.new_tokens or (8 if args.quick else 32)
    rounds = args.repeats if args.quick else max(args.repeats, 5)
    model, tok = C.load(args)
    info = C.machine(device)
    selection, layout = C.fitted_ranking(model, tok, n_pairs=args.fit_pairs)
    sites = ("attention", "ffn")
    results: dict = {"pairs": n_pairs, "new_tokens": new_tokens, "fit": {}, "by_k": {}, "by_layers": {}}

    # ---- fitting: the pass (independent of k), then selection + state per k
    pairs = C.default_pairs(tok, n_pairs)
    batches = C.encode_batches(tok, pairs, 16, device)
    acc_box = {}

    @torch.inference_mode()
    def fit_pass():
        acc = MomentumAccumulator({s: layout.site(s).size for s in sites}, layout.n_layers, device=device)
        for pos, neg in batches:
            acc.update(*READ_FULL(model, layout, sites, pos, neg))
        acc_box["acc"] = acc

    pass_s = C.interleave({"pass": fit_pass}, 1, device, warmup=False)["pass"][0]
    acc = acc_box["acc"]
    fit_rows = []
    for k in [int(x) for x in args.ks.split(",")]:

        def select(k=k):
            sel = select_units(acc, k, list(sites), "both")
            SteeringState.from_selection(sel, layout, alpha=2.0)

        t = C.interleave({"select": select}, 10, device)["select"]
        results["fit"][str(k)] = {"pass_s": pass_s, "select_and_state": C.summary(t)}
        fit_rows.append([k, pass_s, 1000 * C.median(t), pass_s + C.median(t)])

    # ---- steering overhead
    fwd_batch = C.prompt_batch(tok, pairs[:8], device)
    gen_batch = C.prompt_batch(tok, pairs[:1], device)

    @torch.inference_mode()
    def forward():
        model(**fwd_batch, use_cache=False)

    @torch.inference_mode()
    def generate():
        model.generate(
            **gen_batch,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )

    def overhead(state) -> dict:
        steer = C.Steer(model, layout, state)
        out = {
            "k": state.k,
            "hooked_modules": sum(len(v) for v in state.layers_by_site().values()),
            "layers": sorted({l for ls in state.layers_by_site().values() for l in ls}),
        }
        for name, fn, r in (("forward_b8", forward, 2 * rounds), ("generate_b1", generate, rounds)):
            times = C.interleave({"unsteered": fn, "steered": steer.wrap(fn)}, r, device)
            out[name] = {
                "unsteered": C.summary(times["unsteered"]),
                "steered": C.summary(times["steered"]),
                "ratio": C.paired_ratio(times, "steered", "unsteered"),
            }
        return out

    k_rows, l_rows = [], []
    for k in [int(x) for x in args.ks.split(",")]:
        r = overhead(C.state_from(selection, layout, k))
        results["by_k"][str(k)] = r
        k_rows.append(
            [
                k,
                r["hooked_modules"],
                len(r["layers"]),
                r["forward_b8"]["ratio"]["median"],
                r["generate_b1"]["ratio"]["median"],
            ]
        )
        print(f"  k={k}: {k_rows[-1]}", flush=True)
    for count in [int(x) for x in args.layer_counts.split(",")]:
        layers = spaced(layout.n_layers, count)
        r = overhead(C.state_from(selection, layout, 100, layers=layers))
        results["by_layers"][str(count)] = r
        l_rows.append(
            [count, r["hooked_modules"], r["forward_b8"]["ratio"]["median"], r["generate_b1"]["ratio"]["median"]]
        )
        print(f"  layers={count}: {l_rows[-1]}", flush=True)

    print()
    print(f"fitting ({n_pairs} pairs, attention+ffn; the pass does not depend on k):")
    print(C.table(["k", "pass s", "select + state ms", "fit total s"], fit_rows))
    print("\nsteering overhead vs k (steered / unsteered, median of paired rounds):")
    print(C.table(["k", "hooked modules", "layers", "forward b8", f"generate b1 ({new_tokens} tok)"], k_rows))
    print("\nsteering overhead vs steered layers (k = 100 spread evenly over L evenly spaced layers):")
    print(C.table(["layers L", "hooked modules", "forward b8", f"generate b1 ({new_tokens} tok)"], l_rows))
    note = C.contention_note(info)
    if note:
        print(note)
    C.finish("scaling", args, info, results)


if __name__ == "__main__":
    main()
