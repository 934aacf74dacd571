"""3. Steered generation and a single steered forward pass vs unsteered.

A real fitted state: momentum over 200 default-task pairs at the attention and ffn sites (cached,
see ``_common.fitted_ranking``), top ``k = 100`` units by |momentum|. Greedy decoding of exactly 64
new tokens (``min_new_tokens = max_new_tokens``) from default-task prompts, batch 1 and batch 8
(left-padded), steered vs unsteered, interleaved; plus one forward pass over the same prompts.
The hooks are applied before and removed after each timed steered call (not timed: see
``state_io.py`` for the apply time). Target: steered / unsteered <= 1.05.

    python benchmarks/steer_generate.py [--quick] [--device cuda] [--k 100] [--new_tokens 64]
"""

from __future__ import annotations

import torch

import _common as C


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--new_tokens", type=int, default=None, help="default 64, --quick 16")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--fit_pairs", type=int, default=200)
    args = p.parse_args()
    device = C.setup(args)
    new_tokens = args.new_tokens or (16 if args.quick else 64)
    gen_rounds = args.repeats if args.quick else max(args.repeats, 5)
    fwd_rounds = 3 * gen_rounds
    model, tok = C.load(args)
    info = C.machine(device)
    selection, layout = C.fitted_ranking(model, tok, n_pairs=args.fit_pairs)
    state = C.state_from(selection, layout, args.k)
    steer = C.Steer(model, layout, state)
    hooked = sum(len(v) for v in state.layers_by_site().values())
    pairs = C.default_pairs(tok, 64)
    results = {
        "k": args.k,
        "new_tokens": new_tokens,
        "hooked_modules": hooked,
        "layers_by_site": state.layers_by_site(),
        "cases": {},
    }
    rows = []
    for bs in [int(b) for b in args.batches.split(",")]:
        batch = C.prompt_batch(tok, pairs[:bs], device)

        @torch.inference_mode()
        def generate():
            out = model.generate(
                **batch,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            assert out.shape[1] == batch["input_ids"].shape[1] + new_tokens
            return out

        @torch.inference_mode()
        def forward():
            model(**batch, use_cache=False)

        for what, fn, rounds in (("generate", generate, gen_rounds), ("forward", forward, fwd_rounds)):
            times = C.interleave({"unsteered": fn, "steered": steer.wrap(fn)}, rounds, device, label=f"{what} b{bs}")
            ratio = C.paired_ratio(times, "steered", "unsteered")
            case = f"{what}_batch{bs}"
            results["cases"][case] = {
                "prompt_tokens": int(batch["input_ids"].shape[1]),
                "unsteered": C.summary(times["unsteered"]),
                "steered": C.summary(times["steered"]),
                "steered_over_unsteered": ratio,
            }
            per = f"{1000 * C.median(times['unsteered']) / new_tokens:.1f} ms/token" if what == "generate" else ""
            rows.append(
                [
                    case,
                    C.median(times["unsteered"]),
                    C.median(times["steered"]),
                    ratio["median"],
                    f"{ratio['min']:.3f}-{ratio['max']:.3f}",
                    per,
                ]
            )
    worst = max(c["steered_over_unsteered"]["median"] for k, c in results["cases"].items() if k.startswith("generate"))
    results["target"] = {"generate_steered_over_unsteered_max": 1.05, "met": worst <= 1.05}
    print()
    print(f"k = {args.k} units in {hooked} hooked modules; {new_tokens} new tokens")
    print(
        C.table(
            ["case", "unsteered s", "steered s", "steered / unsteered (median)", "min-max", "unsteered speed"], rows
        )
    )
    note = C.contention_note(info)
    if note:
        print(note)
    C.finish("steer_generate", args, info, results)


if __name__ == "__main__":
    main()
