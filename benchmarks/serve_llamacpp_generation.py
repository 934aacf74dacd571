"""llama.cpp generation speed, merged GGUF vs. base: 8 prompts x 64 greedy tokens, 7 interleaved rounds.

The same benchmark state as serve_llamacpp.py (k = 100, alpha 2) is folded into the embedded Q4_1 GGUF;
reported: tokens per second of each, time per token merged / base, the export time and the file sizes.

    PYTHONPATH=<llama-cpp-python> python benchmarks/serve_llamacpp_generation.py
"""

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_cpp import Llama

from austeer_pl.core.embedded import embedded_gguf_path
from austeer_pl.core.fileio import write_json_atomic
from austeer_pl.core.models import load_model
from austeer_pl.export.gguf import export_gguf

import _common as C

model, tok = load_model("smollm2-135m-instruct")
sel, layout = C.fitted_ranking(model, tok, n_pairs=200)
state = C.state_from(sel, layout, 100, alpha=2.0)
tmp = Path(tempfile.mkdtemp())
merged = tmp / "m.gguf"
t = time.perf_counter()
export_gguf(state, embedded_gguf_path(), merged)
export_s = time.perf_counter() - t
eng = {
    n: Llama(model_path=str(p), n_ctx=512, n_threads=2, verbose=False, seed=0)
    for n, p in (("base", embedded_gguf_path()), ("merged", merged))
}
prompts = [p["prompt"] for p in C.default_pairs(tok, 8)]
times = {"base": [], "merged": []}
toks = {"base": 0, "merged": 0}
for r in range(7):
    for name in ("base", "merged") if r % 2 == 0 else ("merged", "base"):
        t = time.perf_counter()
        for text in prompts:
            out = eng[name].create_completion(text, max_tokens=64, temperature=0.0)
            toks[name] += out["usage"]["completion_tokens"]
        times[name].append(time.perf_counter() - t)
per_token = {n: [t / (toks[n] / 7) for t in times[n]] for n in times}
ratios = sorted(m / b for m, b in zip(per_token["merged"], per_token["base"]))
res = {
    "export_gguf_seconds": export_s,
    "gguf_bytes": merged.stat().st_size,
    "base_bytes": embedded_gguf_path().stat().st_size,
    "rounds": 7,
    "prompts": len(prompts),
    "max_tokens": 64,
    "tokens": toks,
    "seconds": times,
    "per_token_merged_over_base": {"median": ratios[3], "min": ratios[0], "max": ratios[-1]},
    "tokens_per_second": {n: toks[n] / sum(times[n]) for n in times},
}
print(json.dumps(res, indent=1))
write_json_atomic("benchmarks/results/serve_llamacpp_generation.json", res)
