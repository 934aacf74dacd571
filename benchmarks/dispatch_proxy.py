"""Where the momentum pass's time goes when a forward is bound by dispatch, not arithmetic.

On a GPU the embedded model's forward is bound by kernel launches (each op's Python and dispatch
work), and there the momentum pass measured 0.85 of a plain forward (``results/gpu_h100``). This
script rebuilds that regime on the CPU: a random model with SmolLM2's depth (30 layers) but widths
of 64, fed 2 rows of 8 tokens, so that a forward costs only its per-op work. It times, side by
side, a plain decoder forward, the same forward with 60 hooks that do nothing (one per layer and
site, as the reader registers), with hand-minimal capture hooks, and the real ``ActivationReader``.

    python benchmarks/dispatch_proxy.py [--threads 1] [--repeats 300]
"""

from __future__ import annotations

import torch

from austeer_pl import ActivationReader, locate_units
from austeer_pl.core.reading import (
    StopForward,
    last_token_index,
    position_ids_from_mask,
)
from austeer_pl.core.sites import register_site_hook

import _common as C


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--tokens", type=int, default=8)
    args = p.parse_args()
    if args.repeats is None:
        args.repeats = 60 if args.quick else 300
    if args.threads is None:
        args.threads = 1
    device = C.setup(args)
    info = C.machine(device)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=args.width,
        intermediate_size=2 * args.width,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    )
    model = LlamaForCausalLM(cfg).eval().to(device)
    layout = locate_units(model)
    sites = ("attention", "ffn")
    rows, tokens = args.rows, args.tokens
    ids = torch.randint(5, 1000, (rows, tokens), device=device)
    mask = torch.ones_like(ids)
    reader = ActivationReader(model, layout, sites)

    def plain():
        model.model(input_ids=ids, attention_mask=mask, use_cache=False)

    def noop_hooks():
        handles = [register_site_hook(layout.site(s), l, lambda x: None) for s in sites for l in range(layout.n_layers)]
        try:
            plain()
        finally:
            for h in handles:
                h.remove()

    def minimal_capture():  # the least Python a capture can do: one index_select per hook, no checks
        flat = torch.arange(rows, device=device) * tokens + last_token_index(mask)
        slabs = {s: torch.empty(layout.n_layers, rows, layout.site(s).size, device=device) for s in sites}
        handles = []

        def pre(slab):
            def hook(_module, args):
                torch.index_select(args[0].view(-1, slab.shape[1]), 0, flat, out=slab)

            return hook

        def post(slab):
            def hook(_module, _args, out):
                torch.index_select(out.view(-1, slab.shape[1]), 0, flat, out=slab)

            return hook

        for l in range(layout.n_layers):
            handles.append(layout.site("attention").modules[l].register_forward_pre_hook(pre(slabs["attention"][l])))
            handles.append(layout.site("ffn").modules[l].register_forward_hook(post(slabs["ffn"][l])))

        def stop(*_):
            raise StopForward

        handles.append(layout.layers[-1].register_forward_hook(stop))
        try:
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
        except StopForward:
            pass
        finally:
            for h in handles:
                h.remove()

    variants = {
        "plain": plain,
        "noop_hooks": noop_hooks,
        "minimal_capture": minimal_capture,
        "reader": lambda: reader(ids, mask),
    }
    with torch.inference_mode():
        times = C.interleave(variants, args.repeats, device)
    results = {"layers": args.layers, "width": args.width, "rows": rows, "tokens": tokens, "variants": {}}
    table = []
    for name, ts in times.items():
        ratio = C.paired_ratio(times, name, "plain")
        results["variants"][name] = {**C.summary(ts), "time_over_plain": ratio}
        table.append([name, 1e3 * C.median(ts), ratio["median"], 1 / ratio["median"]])
    print(f"{args.layers} layers, width {args.width}, {rows} rows x {tokens} tokens, {args.repeats} interleaved rounds")
    print(C.table(["variant", "ms (median)", "time / plain", "throughput / plain"], table))
    C.finish("dispatch_proxy", args, info, results)


if __name__ == "__main__":
    main()
