"""export.py: a merged transformers folder, a merged GGUF, a llama.cpp control vector, and every bad input."""

from __future__ import annotations

import copy
import errno
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from austeer_pl import AusteerError, SteeringState, accumulate_momentum, locate_units
from austeer_pl.cli.export import export_main
from austeer_pl.core.fileio import sha256_file
from austeer_pl.core.stateio import WEIGHTS_NAME
from austeer_pl.core.strength import GateStrength, fold_strength
from austeer_pl.export.gguf import (
    _BLOCK_SCALES,
    GGUF_PROVENANCE_KEY,
    export_gguf,
    scale_block_rows,
)
from austeer_pl.methods.caa import caa_state

from helpers import (
    make_model,
    make_tokenizer,
    random_state,
    residual_shift,
    review_pairs,
)

Q = gguf.GGMLQuantizationType
IDS = [[5, 9, 3, 17, 22, 8, 40, 11], [7, 7, 30, 2, 15, 61, 4, 9]]


def run(argv, capsys) -> tuple[int, str]:
    code = export_main([str(a) for a in argv])
    return code, capsys.readouterr().err


def save(state: SteeringState, folder: Path) -> Path:
    state.save_pretrained(folder)
    return folder


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


def load_gguf(path: Path):
    transformers.utils.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


def field_bytes(reader, key: str) -> bytes:
    """A metadata entry exactly as stored (key, type and value); its parts lie back to back in the file."""
    field = reader.fields[key]
    return reader.data[field.offset : field.offset + sum(part.nbytes for part in field.parts)].tobytes()


# ============================================================================ a tiny llama GGUF, written with gguf's writer
def _permute(w: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py), which transformers' GGUF loader undoes."""
    n = n_kv if n_kv != n_head else n_head
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Tensor types of the tiny GGUF: block quants, F16 and F32, as real files mix them.
ATTN_OUTPUT_TYPES = (Q.Q4_1, Q.F16)
FFN_DOWN_TYPES = (Q.Q4_1, Q.Q8_0)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=128,
    )
    sd = {k: v.numpy() for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(64)
    w.add_rope_dimension_count(8)
    w.add_array("general.tags", ["tiny", "test"])

    def add(name, arr, qtype=Q.F32):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, arr.astype(np.float16 if qtype == Q.F16 else np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)

    add("token_embd.weight", sd["model.embed_tokens.weight"], Q.Q8_0)
    for i in range(2):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], 4, 4), Q.Q8_0)
        add(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], 4, 2), Q.Q8_0)
        add(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"], Q.Q4_1)
        add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"], ATTN_OUTPUT_TYPES[i])
        add(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"], Q.Q4_0)
        add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"], Q.Q4_0)
        add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"], FFN_DOWN_TYPES[i])
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    add("output.weight", sd["lm_head.weight"], Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gguf_model(tiny_gguf):
    return load_gguf(tiny_gguf)


def gguf_state(model, *, power_of_two: bool, base_model: str = "") -> SteeringState:
    state = random_state(locate_units(model), ["attention", "ffn"], per_layer=6, seed=3, base_model=base_model)
    if power_of_two:  # factors 1 + s in {2, 0.5, 4, -1, 8, 0.25}: f16 block scales times them stay exact
        scale = torch.tensor([1.0, -0.5, 3.0, -2.0, 7.0, -0.75]).repeat(state.k // 6)
        state = replace(state, scale=scale, momentum=scale.clone())
    return state


# ============================================================================ transformers
_RELOAD = textwrap.dedent(
    """
    import json, sys

    class NoAusteer:  # the exported folder must load with plain transformers
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "austeer_pl":
                raise ImportError("austeer_pl is not needed to load an exported model")

    sys.meta_path.insert(0, NoAusteer())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    AutoTokenizer.from_pretrained(sys.argv[1])
    with torch.no_grad():
        out = model(torch.tensor(json.loads(sys.argv[2]))).logits
    assert not any(m.split(".")[0] == "austeer_pl" for m in sys.modules)
    print(json.dumps(out.double().tolist()))
    """
)


def test_transformers_export_reloads_without_austeer_pl(tiny_dir, tmp_path, capsys):
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    state = random_state(locate_units(base), ["attention", "ffn"], base_model=str(tiny_dir))
    folder = save(state, tmp_path / "state")
    out = tmp_path / "merged"
    code, err = run(["--steering", folder, "--out", out, "--max_shard_size", "40KB"], capsys)
    assert code == 0, err

    config = json.loads((out / "config.json").read_text())
    record = config["austeer_pl"]
    assert record["base_model"] == str(tiny_dir) and record["method"] == "austeer"
    assert record["k"] == state.k and record["alpha"] == state.alpha
    assert record["state_sha256"] == sha256_file(folder / WEIGHTS_NAME)
    assert record["state_sha256"] in (out / "README.md").read_text()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer.json").is_file()

    result = subprocess.run(
        [sys.executable, "-c", _RELOAD, str(out), json.dumps(IDS)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    reloaded = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]), dtype=torch.float32)
    with state.apply(base):
        hooked = logits(base)
    assert (hooked - logits(base)).abs().max() > 1e-3
    torch.testing.assert_close(reloaded, hooked, rtol=0, atol=1e-5)


def test_output_folder_rules(tiny_dir, tmp_path, capsys):
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    folder = save(random_state(locate_units(base), ["ffn"], base_model=str(tiny_dir)), tmp_path / "state")
    out = tmp_path / "merged"
    assert run(["--steering", folder, "--out", out], capsys)[0] == 0
    stamp = (out / "config.json").read_bytes()
    code, err = run(["--steering", folder, "--out", out], capsys)
    assert code == 2 and err.startswith(f"error: {out} already holds a merged model; pass --overwrite")
    assert (out / "config.json").read_bytes() == stamp
    assert run(["--steering", folder, "--out", out, "--overwrite"], capsys)[0] == 0
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    code, err = run(["--steering", folder, "--out", other, "--overwrite"], capsys)
    assert code == 2 and err.startswith(f"error: refusing to write the merged model to {other}")
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


# ============================================================================ bad input, one row each
def _gate(tiny, _gguf):
    state = random_state(locate_units(tiny), ["attention"], base_model="TINY")
    return fold_strength(state, GateStrength(32, state.scale, layer=0, width=4))


def _gpt2(_tiny, _gguf):
    return random_state(locate_units(make_model("gpt2")), ["attention"], base_model="TINY")


def _three_layer_llama(tiny, _gguf):  # the conftest llama has 3 layers, the tiny GGUF 2
    return random_state(locate_units(tiny), ["ffn"], base_model="GGUF")


def _ffn_shift(_tiny, gguf_model):
    state = random_state(locate_units(gguf_model), ["ffn"], base_model="GGUF")
    return replace(state, shift=torch.ones(state.k))


def _caa_layer(layer):
    def make(tiny, _gguf):
        state = residual_shift(tiny)
        return replace(state, layer=torch.full((state.k,), layer), base_model="TINY")

    return make


# (case, state(tiny llama, tiny GGUF model), extra arguments, first words after "error: ")
BAD = [
    ("gate state", _gate, [], "this state's learned gate computes its strengths from each input"),
    (
        "prompt scope",
        lambda t, g: replace(random_state(locate_units(t), ["attention"], base_model="TINY"), token_scope="prompt"),
        [],
        "this state steers only the prompt tokens",
    ),
    ("state for another model", _gpt2, [], "steering state is for a 'gpt2' model"),
    ("residual state as weights", _caa_layer(1), [], "this state edits the residual stream"),
    (
        "gguf from a folder",
        lambda t, g: random_state(locate_units(t), ["ffn"], base_model="TINY"),
        ["--format", "gguf"],
        "--format gguf and gguf-lora need a GGUF base",
    ),
    (
        "gguf of another architecture",
        _gpt2,
        ["--format", "gguf", "--model", "GGUF"],
        "the GGUF base GGUF is a 'llama' model but the steering state is for a 'gpt2' model",
    ),
    (
        "gguf with other layers",
        _three_layer_llama,
        ["--format", "gguf"],
        "the GGUF base GGUF has 2 layers but the steering state is for 3",
    ),
    (
        "gguf shift without bias",
        _ffn_shift,
        ["--format", "gguf"],
        "this state adds a shift at the ffn site of layer 0, but the GGUF has no blk.0.ffn_down.bias",
    ),
    (
        "gguf dtype",
        lambda t, g: random_state(locate_units(g), ["ffn"], base_model="GGUF"),
        ["--format", "gguf", "--dtype", "bf16"],
        "--dtype bf16 is not a GGUF float type",
    ),
    (
        "control vector of scales",
        lambda t, g: random_state(locate_units(t), ["attention"]),
        ["--format", "control-vector"],
        "this state edits the attention site rather than shifting the residual stream",
    ),
    (
        "control vector at layer 0",
        _caa_layer(0),
        ["--format", "control-vector"],
        "this state shifts the output of layer 0",
    ),
    ("unknown format", _caa_layer(1), ["--format", "onnx"], "argument --format: invalid choice"),
]


@pytest.mark.parametrize(("make", "extra", "words"), [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    make, extra, words, tiny_dir, tiny_gguf, gguf_model, tmp_path, capsys
):
    tiny = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    state = make(tiny, gguf_model)
    state = replace(
        state, base_model={"TINY": str(tiny_dir), "GGUF": str(tiny_gguf)}.get(state.base_model, state.base_model)
    )
    folder = save(state, tmp_path / "state")
    out = tmp_path / "out"
    extra = [str(tiny_gguf) if a == "GGUF" else a for a in extra]
    code, err = run(["--steering", folder, "--out", out, *extra], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert err[len("error: ") :].replace(str(tiny_gguf), "GGUF").startswith(words), err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_missing_state_folder(tmp_path, capsys):
    code, err = run(["--steering", tmp_path / "nope", "--out", tmp_path / "out"], capsys)
    assert code == 2 and err.startswith(f"error: no steering state at {tmp_path / 'nope'}")


@pytest.mark.parametrize("fmt", ["transformers", "gguf"])
def test_full_disk_leaves_nothing(fmt, tiny_dir, tiny_gguf, gguf_model, tmp_path, capsys, monkeypatch):
    model = gguf_model if fmt == "gguf" else transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    folder = save(
        random_state(
            locate_units(model), ["attention", "ffn"], base_model=str(tiny_gguf if fmt == "gguf" else tiny_dir)
        ),
        tmp_path / "state",
    )

    def full(*args, **kwargs):
        path = kwargs.get("filename") or (args[1] if len(args) > 1 and isinstance(args[1], (str, Path)) else None)
        if path is not None:
            Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    if fmt == "transformers":
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    else:
        monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    out = tmp_path / ("out.gguf" if fmt == "gguf" else "out")
    code, err = run(["--steering", folder, "--out", out, "--format", fmt], capsys)
    assert code == 2 and err.startswith(f"error: cannot write {out}: the disk is full"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


# ============================================================================ gguf
def _q4_1_fields(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    blocks = data.reshape(data.shape[0], -1, 20)  # Q4_1 block: f16 d, f16 m, 16 bytes of 4-bit values
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
    m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
    return d, m, blocks[..., 4:]


@pytest.mark.parametrize("power_of_two", [True, False], ids=["power-of-two factors", "random factors"])
def test_gguf_export_copies_bytes_and_equals_hooks(power_of_two, tiny_gguf, gguf_model, tmp_path, capsys):
    state = gguf_state(gguf_model, power_of_two=power_of_two, base_model=str(tiny_gguf))
    folder = save(state, tmp_path / "state")
    out = tmp_path / "steered.gguf"
    code, err = run(["--steering", folder, "--out", out, "--format", "gguf"], capsys)
    assert code == 0, err

    src, dst = gguf.GGUFReader(tiny_gguf), gguf.GGUFReader(out)
    assert set(dst.fields) == set(src.fields) | {GGUF_PROVENANCE_KEY}
    for key in src.fields:
        if key != "GGUF.kv_count":
            assert field_bytes(dst, key) == field_bytes(src, key), key
    record = json.loads(dst.fields[GGUF_PROVENANCE_KEY].contents())
    assert record["state_sha256"] == sha256_file(folder / WEIGHTS_NAME) and record["k"] == state.k

    edited = {f"blk.{l}.{t}.weight" for l in range(2) for t in ("attn_output", "ffn_down")}
    new = {t.name: t for t in dst.tensors}
    assert [t.name for t in dst.tensors] == [t.name for t in src.tensors]
    for t in src.tensors:
        if t.name not in edited:
            assert new[t.name].tensor_type == t.tensor_type and np.array_equal(new[t.name].data, t.data), t.name
    # Column scales: the quantized attn_output is dequantized to F32; the F16 one stays F16.
    assert new["blk.0.attn_output.weight"].tensor_type == Q.F32 and new["blk.1.attn_output.weight"].tensor_type == Q.F16
    # Row scales of block quants: the 4-bit values are untouched, d and m are fl16(d * f), fl16(m * f).
    old_t, new_t = next(t for t in src.tensors if t.name == "blk.0.ffn_down.weight"), new["blk.0.ffn_down.weight"]
    assert new_t.tensor_type == Q.Q4_1 and new_t.tensor_type == old_t.tensor_type
    d0, m0, q0 = _q4_1_fields(old_t.data)
    d1, m1, q1 = _q4_1_fields(new_t.data)
    assert np.array_equal(q0, q1)
    factor = np.ones(32)
    sel = (state.site_index == 1) & (state.layer == 0)
    factor[state.unit[sel].numpy()] = (1.0 + state.scale[sel]).double().numpy()  # the hooks' float32 factors
    assert np.array_equal(d1, (d0.astype(np.float64) * factor[:, None]).astype(np.float16))
    assert np.array_equal(m1, (m0.astype(np.float64) * factor[:, None]).astype(np.float16))

    with state.apply(gguf_model):
        hooked = logits(gguf_model)
    edit = (hooked - logits(gguf_model)).abs().max()
    merged = logits(load_gguf(out))
    assert edit > 1e-2
    if power_of_two:  # no format rounding at all: only float32 arithmetic differs
        torch.testing.assert_close(merged, hooked, rtol=0, atol=1e-5)
    else:  # the f16 rounding of the rescaled block scales (relative 2**-11 per weight)
        assert (merged - hooked).abs().max() < 2e-3 * edit


def test_gguf_dtype_float16_for_dequantized_tensors(tiny_gguf, gguf_model, tmp_path):
    state = gguf_state(gguf_model, power_of_two=True)
    out = export_gguf(state, tiny_gguf, tmp_path / "f16.gguf", dtype="F16")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_output.weight"] == Q.F16 and types["blk.0.ffn_down.weight"] == Q.Q4_1
    with state.apply(gguf_model):
        hooked = logits(gguf_model)
    torch.testing.assert_close(logits(load_gguf(out)), hooked, rtol=0, atol=2e-3)


def test_gguf_output_file_rules(tiny_gguf, gguf_model, tmp_path, capsys):
    folder = save(gguf_state(gguf_model, power_of_two=True, base_model=str(tiny_gguf)), tmp_path / "state")
    out = tmp_path / "steered.gguf"
    argv = ["--steering", folder, "--out", out, "--format", "gguf"]
    assert run(argv, capsys)[0] == 0
    code, err = run(argv, capsys)
    assert code == 2 and err.startswith(f"error: {out} already holds a merged GGUF model; pass --overwrite")
    assert run([*argv, "--overwrite"], capsys)[0] == 0
    other = tmp_path / "notes.gguf"
    other.write_text("mine")
    code, err = run(["--steering", folder, "--out", other, "--format", "gguf", "--overwrite"], capsys)
    assert code == 2 and err.startswith(f"error: refusing to replace {other}") and other.read_text() == "mine"
    code, err = run(["--steering", folder, "--out", tiny_gguf, "--format", "gguf", "--overwrite"], capsys)
    assert code == 2 and "is (or holds, or lies in) the input" in err  # the base is an input: never an output


@pytest.mark.parametrize("qtype", sorted(_BLOCK_SCALES))
def test_block_scale_fields_scale_whole_rows(qtype):
    """For every format in the table, rescaling the listed f16 fields by 2**k rescales the row exactly."""
    block, size = gguf.GGML_QUANT_SIZES[Q[qtype]]
    rng = np.random.default_rng(0)
    # Bytes below 0x40 make every f16 read from them finite and small, whatever the layout.
    data = rng.integers(0, 0x40, size=(4, 2 * size), dtype=np.uint8)
    rows, factor = np.array([0, 2]), np.array([2.0, -4.0])
    scaled = scale_block_rows(data, qtype, rows, factor)
    before, after = gguf.quants.dequantize(data, Q[qtype]), gguf.quants.dequantize(scaled, Q[qtype])
    assert after.shape == (4, 2 * block)
    np.testing.assert_array_equal(after[rows], before[rows] * factor[:, None].astype(np.float32))
    assert np.array_equal(scaled[[1, 3]], data[[1, 3]])
    assert np.abs(before[rows]).max() > 0


def test_block_scales_refuse_what_they_cannot_do():
    data = np.zeros((2, 20), dtype=np.uint8)
    data[:, 0:2] = np.array([1000.0], dtype=np.float16).view(np.uint8)
    assert scale_block_rows(data, "Q4_1", np.array([0]), np.array([100.0])) is None  # 1e5 is not a finite f16
    assert scale_block_rows(np.zeros((2, 17), dtype=np.uint8), "MXFP4", np.array([0]), np.array([3.0])) is None


@pytest.mark.real_model
def test_embedded_gguf_export(tmp_path):
    from austeer_pl.core.embedded import embedded_gguf_path

    try:
        source = embedded_gguf_path()
    except AusteerError as err:
        pytest.skip(str(err))
    g = torch.Generator().manual_seed(0)
    unit = torch.cat([torch.randperm(576, generator=g)[:20], torch.randperm(576, generator=g)[:20]])
    scale = torch.randn(40, generator=g)
    state = SteeringState(
        sites=("attention", "ffn"),
        site_index=torch.arange(40) // 20,
        layer=torch.tensor([3] * 20 + [5] * 20),
        unit=unit,
        momentum=scale.clone(),
        scale=scale,
        shift=torch.zeros(40),
        alpha=1.0,
        architecture="llama",
        n_layers=30,
        site_sizes={"attention": 576, "ffn": 576},
        base_model="smollm2-135m-instruct",
    )
    out = export_gguf(state, source, tmp_path / "steered.Q4_1.gguf")
    src, dst = gguf.GGUFReader(source), gguf.GGUFReader(out)
    assert all(field_bytes(dst, k) == field_bytes(src, k) for k in src.fields if k != "GGUF.kv_count")
    new = {t.name: t for t in dst.tensors}
    for t in src.tensors:
        if t.name not in ("blk.3.attn_output.weight", "blk.5.ffn_down.weight"):
            assert new[t.name].tensor_type == t.tensor_type and np.array_equal(new[t.name].data, t.data), t.name
    f = (1.0 + scale).numpy()
    # attention, layer 3: columns of the dequantized Q4_1 tensor, now F32, scaled exactly (one f32 product)
    old = gguf.quants.dequantize(next(t for t in src.tensors if t.name == "blk.3.attn_output.weight").data, Q.Q4_1)
    want = old.copy()
    want[:, unit[:20].numpy()] *= f[:20]
    assert new["blk.3.attn_output.weight"].tensor_type == Q.F32
    np.testing.assert_array_equal(new["blk.3.attn_output.weight"].data, want)
    # ffn, layer 5: Q4_1 rows by their block scales, within the f16 rounding of d*f and m*f
    old_t = next(t for t in src.tensors if t.name == "blk.5.ffn_down.weight")
    d, m, _ = _q4_1_fields(old_t.data)
    rows = unit[20:].numpy()
    got = gguf.quants.dequantize(new["blk.5.ffn_down.weight"].data, Q.Q4_1)[rows]
    exact = gguf.quants.dequantize(old_t.data, Q.Q4_1)[rows].astype(np.float64) * f[20:, None]
    bound = (
        2.0**-11 * np.abs(f[20:, None, None]) * (15 * np.abs(d[rows]) + np.abs(m[rows]))[..., None].astype(np.float64)
        + 2.0**-20
    )
    assert np.all(np.abs(got - exact).reshape(len(rows), -1, 32) <= bound)


# ============================================================================ control vector
def test_control_vector_round_trip_and_llama_cpp_semantics(tmp_path, capsys):
    model = make_model("llama")
    layout = locate_units(model)
    acc = accumulate_momentum(model, make_tokenizer(), review_pairs(), sites=["residual"], batch_size=4)
    caa = caa_state(acc, layout, layer=1, multiplier=3.0)
    folder = save(caa, tmp_path / "caa")
    out = tmp_path / "caa.gguf"
    code, err = run(["--steering", folder, "--out", out, "--format", "control-vector"], capsys)
    assert code == 0, err

    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    assert reader.fields["controlvector.layer_count"].contents() == 1
    (tensor,) = reader.tensors
    assert tensor.name == "direction.1" and tensor.tensor_type == Q.F32 and len(tensor.shape) == 1
    want = np.zeros(32, dtype=np.float32)
    want[caa.unit.numpy()] = caa.shift.numpy()
    assert np.array_equal(tensor.data, want) and np.abs(want).max() > 0

    # llama.cpp adds direction.N to the output of decoder layer N at every token; do that by hand.
    model = model.double()
    directions = {int(t.name.split(".")[1]): torch.from_numpy(np.array(t.data)).double() for t in reader.tensors}
    hooks = [
        model.model.layers[n].register_forward_hook(
            lambda _m, _a, out, v=v: (out[0] + v, *out[1:]) if isinstance(out, tuple) else out + v
        )
        for n, v in directions.items()
    ]
    by_hand = logits(model)
    for h in hooks:
        h.remove()
    with caa.apply(model):
        hooked = logits(model)
    assert (hooked - logits(model)).abs().max() > 1e-3
    torch.testing.assert_close(by_hand, hooked, rtol=0, atol=1e-12)

    code, err = run(["--steering", folder, "--out", out, "--format", "control-vector"], capsys)
    assert code == 2 and err.startswith(f"error: {out} already holds a control vector; pass --overwrite")


# ============================================================================ llama.cpp LoRA adapter
def test_gguf_lora_adapter_reads_back_and_reproduces_the_hooked_edit(tiny_gguf, gguf_model, tmp_path, capsys):
    state = gguf_state(gguf_model, power_of_two=False, base_model=str(tiny_gguf))
    folder = save(state, tmp_path / "state")
    out = tmp_path / "steer.lora.gguf"
    code, err = run(["--steering", folder, "--out", out, "--format", "gguf-lora", "--model", tiny_gguf], capsys)
    assert code == 0, err
    reader = gguf.GGUFReader(out)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    rank = 6  # per_layer units in each site and layer
    assert fields["adapter.lora.alpha"] == rank
    assert json.loads(fields["austeer_pl.provenance"])["state_sha256"] == sha256_file(folder / WEIGHTS_NAME)
    tensors = {t.name: t for t in reader.tensors}
    base = {t.name: t for t in gguf.GGUFReader(tiny_gguf).tensors}
    expected = {f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_output", "ffn_down")}
    assert set(tensors) == {f"{name}.lora_{ab}" for name in expected for ab in "ab"}
    merged = copy.deepcopy(gguf_model)
    for name in expected:
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        n_in, n_out = (int(x) for x in base[name].shape)  # ggml ne: [in, out]
        # What llama.cpp checks: a's ne[0] is the base's ne[0], b's ne[1] its ne[1], a's ne[1] is b's ne[0].
        assert [int(x) for x in a.shape] == [n_in, rank] and [int(x) for x in b.shape] == [rank, n_out]
        delta = torch.from_numpy(np.asarray(b.data, dtype=np.float64) @ np.asarray(a.data, dtype=np.float64))
        layer, kind = int(name.split(".")[1]), name.split(".")[2]
        block = merged.model.layers[layer]
        module = block.self_attn.o_proj if kind == "attn_output" else block.mlp.down_proj
        with torch.no_grad():
            module.weight += delta.float()
    with state.apply(gguf_model):
        hooked = logits(gguf_model)
    assert (hooked - logits(gguf_model)).abs().max() > 1e-3
    torch.testing.assert_close(logits(merged), hooked, rtol=0, atol=1e-5)


def test_gguf_lora_refuses_what_llama_cpp_cannot_add(tiny_gguf, gguf_model, tmp_path, capsys):
    state = gguf_state(gguf_model, power_of_two=False, base_model=str(tiny_gguf))
    shifted = replace(state, shift=torch.ones(state.k))
    out = tmp_path / "x.lora.gguf"
    code, err = run(
        ["--steering", save(shifted, tmp_path / "s"), "--out", out, "--format", "gguf-lora", "--model", tiny_gguf],
        capsys,
    )
    assert code == 2 and "cannot add" in err and len(err.strip().splitlines()) == 1 and not out.exists()
