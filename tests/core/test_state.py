"""Saving and loading a steering state: identical logits, refusals, byte-stable files."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest
import torch

import austeer_pl.core.stateio
from austeer_pl import (
    AusteerError,
    SteeringState,
)
from austeer_pl.core.stateio import CONFIG_NAME, WEIGHTS_NAME

from helpers import (
    CORE_ARCHS,
    ROOT,
    TEXTS,
    fitted_state,
    make_model,
    make_tokenizer,
    tiny_config,
)


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_save_load_identical_logits_in_fresh_model(arch, tmp_path):
    model = make_model(arch)
    state = fitted_state(model, k=7, alpha=3.0, sign="promote", metadata={"task": "unit-test"})
    batch = make_tokenizer()(TEXTS, return_tensors="pt", padding=True)
    with state.apply(model), torch.no_grad():
        expected = model(**batch).logits
    folder = state.save_pretrained(tmp_path / "state")
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert [p.name for p in tmp_path.iterdir()] == ["state"]  # no temporary leftovers
    config = json.loads((folder / CONFIG_NAME).read_text())
    for key in (
        "format_version",
        "package_version",
        "base_model",
        "architecture",
        "n_layers",
        "site_sizes",
        "sites",
        "k",
        "alpha",
        "sign_policy",
        "token_scope",
        "metadata",
        "method",
    ):
        assert key in config
    assert config["k"] == 7 and config["architecture"] == arch and config["metadata"]["task"] == "unit-test"

    fresh = make_model(arch)  # same seed, new object
    loaded = SteeringState.from_pretrained(folder)
    with loaded.apply(fresh), torch.no_grad():
        got = fresh(**batch).logits
    assert torch.equal(got, expected)
    assert loaded.coordinates() == state.coordinates()
    # The export holds the small state only, never base weights.
    from safetensors import safe_open

    with safe_open(folder / WEIGHTS_NAME, "pt") as f:
        assert sorted(f.keys()) == sorted(["site_index", "layer", "unit", "momentum", "scale", "shift"])


def test_state_for_another_model_is_rejected():
    state = fitted_state(make_model("llama"), k=3)
    with pytest.raises(AusteerError, match=r"'llama' model.*'gpt2'"):
        state.apply(make_model("gpt2"))
    import transformers

    cfg = tiny_config("llama")
    cfg.num_hidden_layers = 2
    with pytest.raises(AusteerError, match=r"3 layers.*has 2"):
        state.apply(transformers.AutoModelForCausalLM.from_config(cfg))
    cfg = tiny_config("llama")
    cfg.num_attention_heads, cfg.num_key_value_heads = 8, 4  # head_dim follows hidden/heads: 8 x 4 = 32 still
    cfg.head_dim = 8
    with pytest.raises(AusteerError, match=r"expects 32 attention units.*has 64"):
        state.apply(transformers.AutoModelForCausalLM.from_config(cfg))


def test_state_files_missing_or_altered(tmp_path):
    state = fitted_state(make_model("llama"), k=3)
    folder = state.save_pretrained(tmp_path / "s")
    with pytest.raises(AusteerError, match="does not exist"):
        SteeringState.from_pretrained(tmp_path / "nope")

    weights = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(weights[:-3])
    with pytest.raises(AusteerError, match="altered or truncated"):
        SteeringState.from_pretrained(folder)
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(AusteerError, match=f"missing {WEIGHTS_NAME}"):
        SteeringState.from_pretrained(folder)

    folder = state.save_pretrained(tmp_path / "s")  # overwrite works
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AusteerError, match="invalid JSON") as err:
        SteeringState.from_pretrained(folder)
    assert "\n" not in str(err.value)

    folder = state.save_pretrained(tmp_path / "s")
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["format_version"] = 99
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AusteerError, match="format version 99"):
        SteeringState.from_pretrained(folder)


def test_saving_the_same_state_gives_the_same_bytes(tmp_path):
    """safetensors writes its metadata map in a random order; the saved file is made canonical
    (keys sorted), so a state's sha256 names its content."""
    state = fitted_state(make_model("llama"), k=3)
    files = [state.save_pretrained(tmp_path / f"s{i}") / WEIGHTS_NAME for i in range(6)]
    assert len({f.read_bytes() for f in files}) == 1
    raw = files[0].read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"]) and len(header["__metadata__"]) >= 2
    loaded = SteeringState.from_pretrained(files[0].parent)
    assert torch.equal(loaded.scale, state.scale) and torch.equal(loaded.unit, state.unit)


def test_failed_save_leaves_previous_state(tmp_path, monkeypatch):
    state = fitted_state(make_model("llama"), k=3)
    folder = state.save_pretrained(tmp_path / "s")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(austeer_pl.core.stateio, "save_file", boom)
    with pytest.raises(AusteerError, match="disk is full"):
        state.with_alpha(9.0).save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_state_size_for_k100(tmp_path):
    model = make_model("llama")  # 3 layers x (32 + 32) units
    state = fitted_state(model, k=100, sites=("attention", "ffn"))
    folder = state.save_pretrained(tmp_path / "s")
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 8_000, size


def test_apply_and_load_do_not_import_lightning(tmp_path):
    state = fitted_state(make_model("llama"), k=3)
    state.save_pretrained(tmp_path / "s")
    code = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from helpers import make_model
import austeer_pl
state = austeer_pl.SteeringState.from_pretrained({str(tmp_path / "s")!r})
with state.apply(make_model('llama')):
    pass
bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'wandb', 'datasets')]
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], check=True)
