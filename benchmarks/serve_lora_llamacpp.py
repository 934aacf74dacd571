"""Serving a state as a llama.cpp LoRA adapter: one base, a strength per request, and what it costs.

A real fitted state (momentum over 200 default-task pairs at the attention and ffn sites, cached,
see ``_common.fitted_ranking``; top ``k`` units, alpha 2) is written as a LoRA adapter GGUF for the
embedded Q4_1 model (``export.py --format gguf-lora``). llama.cpp (llama-cpp-python) loads the base
once with the adapter and scores both answers of ``--n`` held-out default-task pairs; transformers
scores the same pairs with the state's hooks. Reported: how often base + adapter picks what hooked
transformers picks; the same at adapter scale 0.5 against hooks at alpha / 2, switched on the loaded
context without reloading anything (``llama_set_adapters_lora``); and the generation speed of base +
adapter against the base alone (tokens per second, interleaved repeats; goal: at least 0.9).

    pip install llama-cpp-python   # or the wheel built for this machine, on PYTHONPATH
    python benchmarks/serve_lora_llamacpp.py [--quick] [--k 100] [--n 100] [--threads 2]
"""

from __future__ import annotations

import ctypes
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from serve_llamacpp import encode, hf_margins, llama_margins

import _common as C


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--alpha", type=float, default=2.0)
    p.add_argument("--n", type=int, default=None, help="held-out pairs to score (default 100, --quick 16)")
    p.add_argument("--fit_pairs", type=int, default=200)
    p.add_argument("--gen_prompts", type=int, default=8, help="prompts of the generation-speed measurement")
    p.add_argument("--gen_tokens", type=int, default=64, help="new tokens per prompt there")
    args = p.parse_args()
    try:
        import llama_cpp
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("this benchmark needs llama-cpp-python: pip install llama-cpp-python") from None
    from austeer_pl.core.embedded import embedded_gguf_path
    from austeer_pl.export.gguf_lora import export_gguf_lora

    device = C.setup(args)
    n = args.n or (16 if args.quick else 100)
    model, tok = C.load(args)
    info = C.machine(device)
    selection, layout = C.fitted_ranking(model, tok, n_pairs=args.fit_pairs)
    state = C.state_from(selection, layout, args.k, alpha=args.alpha)
    pairs = C.default_pairs(tok, args.fit_pairs + n)[-n:]  # past the fit's pairs (the same seeded order)
    encoded = [encode(tok, pair) for pair in pairs]

    with tempfile.TemporaryDirectory() as tmp:
        lora_path = Path(tmp) / "steer.lora.gguf"
        export_gguf_lora(state, embedded_gguf_path(), lora_path)
        threads = args.threads or torch.get_num_threads()
        base_path = str(embedded_gguf_path())
        started = time.perf_counter()
        steered = Llama(
            model_path=base_path, lora_path=str(lora_path), n_ctx=512, logits_all=True, n_threads=threads, verbose=False
        )
        load_seconds = time.perf_counter() - started
        plain = Llama(model_path=base_path, n_ctx=512, logits_all=True, n_threads=threads, verbose=False)
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(steered._lora_adapter)

        def set_scale(scale: float) -> None:  # per request: the loaded base and adapter stay as they are
            assert llama_cpp.llama_set_adapters_lora(steered._ctx.ctx, adapters, 1, (ctypes.c_float * 1)(scale)) == 0

        margins = {
            "llama.cpp base": llama_margins(plain, encoded),
            "llama.cpp base + adapter": llama_margins(steered, encoded),
        }
        set_scale(0.5)
        margins["llama.cpp base + adapter at scale 0.5"] = llama_margins(steered, encoded)
        set_scale(1.0)
        margins["llama.cpp base + adapter, back at scale 1"] = llama_margins(steered, encoded)
        prompts = [pair["prompt"] for pair in pairs[: args.gen_prompts]]
        tokens_out = {"base": 0, "adapter": 0}

        def generate(name: str, llm) -> None:  # end of text banned: both write exactly gen_tokens tokens a prompt
            for text in prompts:
                out = llm.create_completion(
                    text, max_tokens=args.gen_tokens, temperature=0.0, logit_bias={llm.token_eos(): -1e9}
                )
                tokens_out[name] += int(out["usage"]["completion_tokens"])

        gen_times = C.interleave(
            {
                "generate base": lambda: generate("base", plain),
                "generate base + adapter": lambda: generate("adapter", steered),
            },
            args.repeats,
            device,
            warmup=False,
            label="llama.cpp generation",
        )
        steered.close()
        plain.close()
    margins["transformers unsteered"] = hf_margins(model, encoded, device)
    margins["transformers hooked"] = hf_margins(model, encoded, device, state, layout)
    margins["transformers hooked at alpha / 2"] = hf_margins(
        model, encoded, device, state.with_alpha(args.alpha / 2), layout
    )

    def agree(a: str, b: str) -> float:
        return float(np.mean((margins[a] > 0) == (margins[b] > 0)))

    assert tokens_out["base"] == tokens_out["adapter"], tokens_out  # the same tokens, so time ratios are speed ratios
    speed = C.paired_ratio(gen_times, "generate base", "generate base + adapter")  # adapter tokens/s over base tokens/s
    results = {
        "k": args.k,
        "alpha": args.alpha,
        "n_pairs": n,
        "rank": int(max(int((state.layer == l).sum()) for l in state.layer.unique())),
        "accuracy": {name: float(np.mean(m > 0)) for name, m in margins.items()},
        "adapter_agrees_with_hooked": agree("llama.cpp base + adapter", "transformers hooked"),
        "adapter_at_half_scale_agrees_with_hooked_at_half_alpha": agree(
            "llama.cpp base + adapter at scale 0.5", "transformers hooked at alpha / 2"
        ),
        "scale_back_to_1_reproduces_scale_1": bool(
            np.array_equal(margins["llama.cpp base + adapter"], margins["llama.cpp base + adapter, back at scale 1"])
        ),
        "base_agrees_with_unsteered": agree("llama.cpp base", "transformers unsteered"),
        "adapter_tokens_per_second_over_base": speed,
        "load_seconds_base_plus_adapter": load_seconds,
        "generation": {
            "prompts": len(prompts),
            "max_tokens": args.gen_tokens,
            "tokens": tokens_out,
            "seconds": {name: C.summary(t) for name, t in gen_times.items()},
        },
    }
    print()
    print(C.table(["engine", "accuracy (answer with the larger log-likelihood)"], list(results["accuracy"].items())))
    print(
        f"llama.cpp base + adapter picks what transformers hooked picks on {results['adapter_agrees_with_hooked']:.1%} of {n} pairs"
    )
    print(
        f"at scale 0.5 (set on the loaded context, no reload) it picks what hooks at alpha / 2 pick on "
        f"{results['adapter_at_half_scale_agrees_with_hooked_at_half_alpha']:.1%}; back at scale 1 the margins are "
        f"{'identical' if results['scale_back_to_1_reproduces_scale_1'] else 'NOT identical'} to the first run"
    )
    print(
        f"generation tokens/s, base + adapter over base ({len(prompts)} prompts x {args.gen_tokens} tokens): "
        f"{speed['median']:.3f} ({speed['min']:.3f}-{speed['max']:.3f})"
    )
    note = C.contention_note(info)
    if note:
        print(note)
    C.finish("serve_lora_llamacpp", args, info, results)


if __name__ == "__main__":
    main()
