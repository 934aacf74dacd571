"""Builders the tests share: tiny random models and tokenizers, synthetic tasks and pairs, random states.

No downloads: every model is built from a config with random weights."""

from __future__ import annotations

import json
import pathlib
import string
import threading
import time
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tk_models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from austeer_pl import (
    SteeringState,
    accumulate_momentum,
    locate_units,
    select_units,
)
from austeer_pl.core import embedded

# The repository root (tests/helpers.py lies one folder below it).
ROOT = Path(__file__).resolve().parents[1]


# Texts of different lengths, for padding and batching checks.
TEXTS = ["is it good? yes", "bad film.", "a truly wonderful, moving story!", "no", "what a mess, 2 stars"]

TINY = dict(vocab_size=64)


def tiny_config(arch: str):
    """A 2-3 layer config of each supported architecture (hidden 32)."""
    if arch == "llama":  # grouped-query attention: 4 query heads, 2 key/value heads
        return transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            **TINY,
        )
    if arch == "gemma2":  # head_dim (16) != hidden / n_heads (8)
        return transformers.Gemma2Config(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=8,
            **TINY,
        )
    if arch == "gpt2":
        return transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=1, **TINY
        )
    if arch == "mistral":
        return transformers.MistralConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **TINY,
        )
    if arch == "qwen2":
        return transformers.Qwen2Config(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **TINY,
        )
    if arch == "qwen3":
        return transformers.Qwen3Config(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            **TINY,
        )
    if arch == "gemma3_text":
        return transformers.Gemma3TextConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=8,
            **TINY,
        )
    if arch == "phi3":
        return transformers.Phi3Config(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=1,
            **TINY,
        )
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, **TINY
        )
    if arch == "opt":
        return transformers.OPTConfig(
            hidden_size=32,
            ffn_dim=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=128,
            **TINY,
        )
    if arch == "qwen3_moe":  # every layer sparse: 4 experts, 2 routed per token
        return transformers.Qwen3MoeConfig(
            hidden_size=32,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            **TINY,
        )
    if arch == "mixtral":
        return transformers.MixtralConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            **TINY,
        )
    if arch == "qwen2_moe":  # routed experts plus a gated shared expert
        return transformers.Qwen2MoeConfig(
            hidden_size=32,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            **TINY,
        )
    raise ValueError(arch)


#: Mixture-of-experts models: the FFN site is the sparse block's output, the sum over routed experts.
MOE_ARCHS = ("qwen3_moe", "mixtral", "qwen2_moe")

ALL_ARCHS = ("llama", "gemma2", "gpt2", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "gpt_neox", "opt")


CORE_ARCHS = ("llama", "gemma2", "gpt2")


def make_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config(arch)
    config._attn_implementation = "eager"
    if arch in MOE_ARCHS:  # a plain loop over experts: the grouped matmul kernels take no float64
        config._experts_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval().requires_grad_(False)


def make_tokenizer(padding_side: str = "right"):
    """A character-level fast tokenizer over a 64-symbol vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    symbols = ["<pad>", "<eos>", "<unk>", *list(string.ascii_lowercase + string.digits + " .,?!:'")]
    vocab = {s: i for i, s in enumerate(symbols[:64])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.padding_side = padding_side
    return fast


def write_less_task(path, n: int, seed: int = 0):
    """A synthetic two-choice task file ("is a less than b", yes/no): ``n`` rows, seeded."""
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(
                json.dumps({"prompt": f"is {a} less than {b}", "choices": ["yes", "no"], "answer": 0 if a < b else 1})
                + "\n"
            )
    return path


def write_custom_code_folder(folder, marker, *, kind: str = "causal"):
    """A model folder whose config needs its own Python code (``auto_map`` to ``evil.py``, an
    unregistered ``model_type``); importing ``evil.py`` writes ``marker``. Loading it with
    ``trust_remote_code`` unset makes transformers ask on stdin, and "y" would run the file."""
    from pathlib import Path

    folder = Path(folder)
    model = make_model("llama")
    if kind == "classifier":
        model = transformers.LlamaForSequenceClassification(
            transformers.LlamaConfig(**{**tiny_config("llama").to_dict(), "num_labels": 2})
        )
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "evil"
    config["auto_map"] = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForCausalLM": "evil.EvilModel",
        "AutoModelForSequenceClassification": "evil.EvilModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (folder / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('custom code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    return folder


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over "<unk>", "<eos>", "w2" ... "w99", without a pad token."""
    vocab = {"<unk>": 0, "<eos>": 1} | {f"w{i}": i for i in range(2, 100)}
    backend = Tokenizer(tk_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


class FakeEmbedded:
    """Replaces the GGUF file and the slow GGUF conversion with a tiny random model."""

    def __init__(self, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gguf = tmp_path / "pkg" / embedded.EMBEDDED_GGUF_NAME
        self.gguf.parent.mkdir()
        self.gguf.write_bytes(b"GGUF" + bytes(1000))
        self.cache = tmp_path / "cache"
        self.calls = 0
        self.delay = 0.0
        self._lock = threading.Lock()
        monkeypatch.setattr(embedded, "embedded_gguf_path", lambda: self.gguf)
        monkeypatch.setattr(embedded, "_convert_gguf", self.convert)

    def convert(self, gguf: pathlib.Path):
        assert gguf == self.gguf
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)
        return tiny_model(seed=1), tiny_tokenizer()

    @property
    def target(self) -> pathlib.Path:
        return self.cache / embedded._cache_folder_name(self.gguf)


def random_state(model_layout, sites, *, per_layer=5, shifts=False, seed=1, **kwargs) -> SteeringState:
    """``per_layer`` random distinct units in every layer of each site, with strong random edits."""
    layout, g = model_layout, torch.Generator().manual_seed(seed)
    site_index, layer, unit = [], [], []
    for s, site in enumerate(sites):
        for l in range(layout.n_layers):
            site_index.append(torch.full((per_layer,), s))
            layer.append(torch.full((per_layer,), l))
            unit.append(torch.randperm(layout.site(site).size, generator=g)[:per_layer])
    k = per_layer * layout.n_layers * len(sites)
    scale = torch.randn(k, generator=g) * 2
    shift = torch.randn(k, generator=g) if shifts else torch.zeros(k)
    return SteeringState(
        sites=tuple(sites),
        site_index=torch.cat(site_index),
        layer=torch.cat(layer),
        unit=torch.cat(unit),
        momentum=scale.clone(),
        scale=scale,
        shift=shift,
        alpha=1.0,
        architecture=layout.architecture,
        n_layers=layout.n_layers,
        site_sizes={s: layout.site(s).size for s in sites},
        **kwargs,
    )


def review_pairs(n=12):
    words = ["good", "bad", "fine", "awful", "great", "dull"]
    return [(f"review {i}: {words[i % 6]}? yes", f"review {i}: {words[i % 6]}? no") for i in range(n)]


def residual_shift(model):
    layout = locate_units(model)
    size = layout.site("residual").size
    return SteeringState(
        sites=("residual",),
        site_index=torch.zeros(size, dtype=torch.long),
        layer=torch.ones(size, dtype=torch.long),
        unit=torch.arange(size),
        momentum=torch.zeros(size),
        scale=torch.zeros(size),
        shift=torch.randn(size),
        alpha=1.0,
        architecture=layout.architecture,
        n_layers=layout.n_layers,
        site_sizes={"residual": size},
        method="caa",
    )


def capture_full(model, layout, site, layer, **inputs):
    """Independent oracle: the whole (batch, seq, units) tensor at a site, with a plain hook."""
    box = {}
    module = layout.site(site).modules[layer]

    def keep(x):
        box.setdefault("x", x.detach().clone())

    if layout.site(site).reads_input:
        h = module.register_forward_pre_hook(lambda m, a: keep(a[0]))
    else:
        h = module.register_forward_hook(lambda m, a, o: keep(o if torch.is_tensor(o) else o[0]))
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        h.remove()
    return box["x"], out


def random_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    g = torch.Generator().manual_seed(seed)
    words = ["good", "bad", "fine", "awful", "great", "dull", "nice", "poor"]
    pairs = []
    for i in range(n):
        idx = torch.randint(len(words), (4,), generator=g).tolist()
        prompt = f"review {i}: " + " ".join(words[j] for j in idx[:2]) + "? "
        pairs.append((prompt + words[idx[2]], prompt + words[idx[3]] + " no"))
    return pairs


def fitted_state(model, k=6, alpha=4.0, sites=("attention", "ffn"), sign="both", **kw) -> SteeringState:
    layout = locate_units(model)
    acc = accumulate_momentum(model, make_tokenizer(), random_pairs(9), sites=sites, batch_size=4, layout=layout)
    return SteeringState.from_selection(
        select_units(acc, k, sites, sign), layout, alpha=alpha, base_model="tiny", sign_policy=sign, **kw
    )


def word_examples(lengths, seed: int):
    """Two-choice examples for :func:`tiny_tokenizer` (one token per word): random ``wN`` prompts of the given
    lengths, choices ``w5``/``w6``, right answers alternating."""
    from austeer_pl.tasks import TaskExample

    g = torch.Generator().manual_seed(seed)
    return [
        TaskExample(
            " ".join(f"w{int(x)}" for x in torch.randint(10, 90, (int(n),), generator=g)), ("w5", "w6"), i % 2, f"{i}"
        )
        for i, n in enumerate(lengths)
    ]


def methods_table_module():
    """``benchmarks/methods_table.py`` as a module (a script, not in the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("methods_table", ROOT / "benchmarks" / "methods_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
