"""Serving a merged GGUF with llama.cpp: same choices as the hooked model, no overhead.

A real fitted state (momentum over 200 default-task pairs at the attention and ffn sites, cached,
see ``_common.fitted_ranking``; top ``k`` units, alpha 2) is folded into the embedded Q4_1 GGUF
with ``austeer_pl.export.merged.export_gguf``. llama.cpp (llama-cpp-python) then scores the
log-likelihood of both answers of ``--n`` default-task pairs with the base GGUF and the merged
one; transformers scores the same pairs unsteered and with the state's hooks. Reported: each
engine's choice accuracy, how often llama.cpp-merged picks what transformers-hooked picks, the
spread between the two engines' log-likelihood margins (llama.cpp quantizes activations, so they
never agree to the last digit), and the merged/base time ratio in llama.cpp (target: 1.0, the
edit is in the weights). Last, a control vector (a random shift of layer ``--cv_layer``'s output,
written by ``export_control_vector``) is loaded into llama.cpp as its ``--control-vector`` loader
does, and the change it makes to the logits is compared with the hooked residual shift at that
layer and at its neighbours (llama.cpp's ``direction.N`` lands on the output of layer N).

    pip install llama-cpp-python   # or the wheel built for this machine
    python benchmarks/serve_llamacpp.py [--quick] [--k 100] [--n 64] [--threads 2]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

import _common as C


def answer_logprob(logits: np.ndarray, ids: list[int], start: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= start, from per-position logits (position t predicts t + 1)."""
    z = logits[start - 1 : len(ids) - 1].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(logp[np.arange(len(z)), ids[start:]].sum())


def encode(tok, pair) -> tuple[list[int], list[list[int]]]:
    prompt = tok(pair["prompt"], add_special_tokens=False)["input_ids"]
    full = [tok(pair[key], add_special_tokens=False)["input_ids"] for key in ("pos", "neg")]
    assert all(f[: len(prompt)] == prompt for f in full), "the answer must extend the prompt's tokens"
    return prompt, full


def hf_margins(model, encoded, device, state=None, layout=None) -> np.ndarray:
    """log p(right) - log p(wrong) of each encoded pair in transformers, hooked by ``state`` when given."""
    out = []
    with torch.inference_mode():
        handle = state.apply(model, layout=layout) if state is not None else None
        try:
            for prompt, full in encoded:
                lp = [
                    answer_logprob(
                        model(torch.tensor([ids], device=device)).logits[0].float().cpu().numpy(), ids, len(prompt)
                    )
                    for ids in full
                ]
                out.append(lp[0] - lp[1])
        finally:
            if handle is not None:
                handle.remove()
    return np.array(out)


def llama_margins(llm, encoded) -> np.ndarray:
    """The same margins from a llama.cpp context (llama-cpp-python ``Llama`` with ``logits_all``)."""
    out = []
    for prompt, full in encoded:
        lp = []
        for ids in full:
            llm.reset()
            llm.eval(ids)
            lp.append(answer_logprob(np.asarray(llm.scores[: len(ids)]), ids, len(prompt)))
        out.append(lp[0] - lp[1])
    return np.array(out)


def control_vector_check(llm, model, tok, layout, layer: int, path: Path) -> dict:
    """Logit change of a control vector in llama.cpp vs. the hooked residual shift at ``layer`` and its neighbours."""
    import ctypes

    import gguf
    import llama_cpp

    from austeer_pl import SteeringState
    from austeer_pl.export.gguf import export_control_vector

    size, n_layers = layout.site("residual").size, layout.n_layers

    def shift_state(at: int) -> SteeringState:
        shift = torch.randn(size, generator=torch.Generator().manual_seed(0)) * 2.0
        return SteeringState(
            sites=("residual",),
            site_index=torch.zeros(size, dtype=torch.long),
            layer=torch.full((size,), at),
            unit=torch.arange(size),
            momentum=torch.zeros(size),
            scale=torch.zeros(size),
            shift=shift,
            alpha=1.0,
            architecture=layout.architecture,
            n_layers=n_layers,
            site_sizes={"residual": size},
            method="caa",
        )

    export_control_vector(shift_state(layer), path)
    data = np.zeros(size * (n_layers - 1), dtype=np.float32)  # llama.cpp's buffer starts at layer 1
    for t in gguf.GGUFReader(path).tensors:
        k = int(t.name.split(".")[1])
        data[(k - 1) * size : k * size] += t.data
    ids = tok("The movie was wonderful and I", add_special_tokens=False)["input_ids"]

    def llama_logits() -> np.ndarray:
        llm.reset()
        llm.eval(ids)
        return np.asarray(llm.scores[: len(ids)]).copy()

    base = llama_logits()
    buf = (ctypes.c_float * data.size).from_buffer(data)
    assert llama_cpp.llama_set_adapter_cvec(llm.ctx, buf, data.size, size, 1, n_layers - 1) == 0
    delta = llama_logits() - base
    llama_cpp.llama_set_adapter_cvec(llm.ctx, None, 0, size, 1, n_layers - 1)  # clear it
    corr = {}
    with torch.inference_mode():
        x = torch.tensor([ids], device=model.device)
        hf_base = model(x).logits[0].float().cpu().numpy()
        for at in (layer - 1, layer, layer + 1):
            with shift_state(at).apply(model, layout=layout):
                hf = model(x).logits[0].float().cpu().numpy() - hf_base
            corr[at] = float(np.corrcoef(delta.ravel(), hf.ravel())[0, 1])
    return {
        "layer": layer,
        "correlation_with_hooked_shift_at_layer": corr,
        "max_abs_logit_change": float(np.abs(delta).max()),
    }


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--alpha", type=float, default=2.0)
    p.add_argument("--n", type=int, default=None, help="pairs to score (default 64, --quick 16)")
    p.add_argument("--fit_pairs", type=int, default=200)
    p.add_argument("--cv_layer", type=int, default=10)
    p.add_argument("--gen_prompts", type=int, default=8, help="prompts of the generation-speed measurement")
    p.add_argument("--gen_tokens", type=int, default=64, help="new tokens per prompt there")
    args = p.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("this benchmark needs llama-cpp-python: pip install llama-cpp-python") from None
    from austeer_pl.core.embedded import embedded_gguf_path
    from austeer_pl.export.gguf import export_gguf

    device = C.setup(args)
    n = args.n or (16 if args.quick else 64)
    model, tok = C.load(args)
    info = C.machine(device)
    selection, layout = C.fitted_ranking(model, tok, n_pairs=args.fit_pairs)
    state = C.state_from(selection, layout, args.k, alpha=args.alpha)
    pairs = C.default_pairs(tok, args.fit_pairs + n)[-n:]  # past the fit's pairs (the same seeded order)
    encoded = [encode(tok, pair) for pair in pairs]

    with tempfile.TemporaryDirectory() as tmp:
        merged_path = Path(tmp) / "merged.gguf"
        export_gguf(state, embedded_gguf_path(), merged_path)
        threads = args.threads or torch.get_num_threads()
        engines = {
            name: Llama(model_path=str(path), n_ctx=512, logits_all=True, n_threads=threads, verbose=False, seed=0)
            for name, path in (("base", embedded_gguf_path()), ("merged", merged_path))
        }

        margins: dict[str, np.ndarray] = {}
        variants = {
            "llama.cpp base": lambda: margins.__setitem__("llama.cpp base", llama_margins(engines["base"], encoded)),
            "llama.cpp merged": lambda: margins.__setitem__(
                "llama.cpp merged", llama_margins(engines["merged"], encoded)
            ),
        }
        times = C.interleave(variants, args.repeats, device, warmup=False, label="llama.cpp")
        # Generation speed: greedy completions of the same prompts, base and merged interleaved.
        prompts = [pair["prompt"] for pair in pairs[: args.gen_prompts]]
        tokens_out = {"base": 0, "merged": 0}

        def generate(name: str) -> None:
            for text in prompts:
                out = engines[name].create_completion(text, max_tokens=args.gen_tokens, temperature=0.0)
                tokens_out[name] += int(out["usage"]["completion_tokens"])

        gen_times = C.interleave(
            {"generate base": lambda: generate("base"), "generate merged": lambda: generate("merged")},
            args.repeats,
            device,
            warmup=False,
            label="llama.cpp generation",
        )
        margins["transformers unsteered"] = hf_margins(model, encoded, device)
        margins["transformers hooked"] = hf_margins(model, encoded, device, state, layout)
        control = control_vector_check(engines["base"], model, tok, layout, args.cv_layer, Path(tmp) / "cv.gguf")
        for llm in engines.values():
            llm.close()
    ratio = C.paired_ratio(times, "llama.cpp merged", "llama.cpp base")
    gen_ratio = C.paired_ratio(gen_times, "generate merged", "generate base")
    agree = float(np.mean((margins["llama.cpp merged"] > 0) == (margins["transformers hooked"] > 0)))
    spread = np.abs(margins["llama.cpp merged"] - margins["transformers hooked"])
    shift_hf = np.abs(margins["transformers hooked"] - margins["transformers unsteered"]).mean()
    results = {
        "k": args.k,
        "alpha": args.alpha,
        "n_pairs": n,
        "accuracy": {name: float(np.mean(m > 0)) for name, m in margins.items()},
        "merged_agrees_with_hooked": agree,
        "margin_abs_diff_merged_vs_hooked": {"mean": float(spread.mean()), "max": float(spread.max())},
        "margin_abs_change_by_steering_transformers": float(shift_hf),
        "llama_cpp_merged_over_base_time": ratio,
        "llama_cpp_generation_merged_over_base_time": gen_ratio,
        "generation": {
            "prompts": len(prompts),
            "max_tokens": args.gen_tokens,
            "tokens": tokens_out,
            "seconds": {name: C.summary(t) for name, t in gen_times.items()},
        },
        "llama_cpp_seconds": {name: C.summary(t) for name, t in times.items()},
        "control_vector": control,
    }
    print()
    print(
        C.table(
            ["engine", "accuracy (answer with the larger log-likelihood)"],
            [[k, v] for k, v in results["accuracy"].items()],
        )
    )
    print(
        f"llama.cpp merged picks what transformers hooked picks on {agree:.1%} of {n} pairs; "
        f"|margin difference| mean {spread.mean():.3g} (steering moves the margin by {shift_hf:.3g} on average)"
    )
    print(f"llama.cpp time merged / base: {ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f})")
    print(
        f"llama.cpp generation time merged / base ({len(prompts)} prompts x {args.gen_tokens} tokens): "
        f"{gen_ratio['median']:.3f} ({gen_ratio['min']:.3f}-{gen_ratio['max']:.3f})"
    )
    print(
        "control vector: correlation of llama.cpp's logit change with the hooked shift at layer "
        + ", ".join(f"{layer}: {c:.3f}" for layer, c in control["correlation_with_hooked_shift_at_layer"].items())
    )
    note = C.contention_note(info)
    if note:
        print(note)
    C.finish("serve_llamacpp", args, info, results)


if __name__ == "__main__":
    main()
