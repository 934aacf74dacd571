"""Tiny random models built from configs, and a tiny tokenizer: no downloads."""

from __future__ import annotations

import string

import pytest
import torch
import transformers

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
    raise ValueError(arch)


ALL_ARCHS = ("llama", "gemma2", "gpt2", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "gpt_neox", "opt")
CORE_ARCHS = ("llama", "gemma2", "gpt2")


def make_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config(arch)
    config._attn_implementation = "eager"
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


@pytest.fixture(params=CORE_ARCHS)
def core_model(request):
    return make_model(request.param)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


def write_less_task(path, n: int, seed: int = 0):
    """A synthetic two-choice task file ("is a less than b", yes/no): ``n`` rows, seeded."""
    import json
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


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama and the tiny tokenizer saved as a model folder (loaded as users load models)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def write_custom_code_folder(folder, marker, *, kind: str = "causal"):
    """A model folder whose config needs its own Python code (``auto_map`` to ``evil.py``, an
    unregistered ``model_type``); importing ``evil.py`` writes ``marker``. Loading it with
    ``trust_remote_code`` unset makes transformers ask on stdin, and "y" would run the file."""
    import json
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
