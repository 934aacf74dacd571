"""Quantised bases (torchao int8 weight-only on the CPU): fit and steer through hooks, export a LoRA
adapter from the dequantised weights, refuse merging in one line."""

from __future__ import annotations

import copy

import pytest
import torch

from austeer_pl import AusteerError, SteeringState, accumulate_momentum, locate_units
from austeer_pl.core.models import load_model
from austeer_pl.core.quant import dequantized, quantization_kwargs
from austeer_pl.errors import SettingError
from austeer_pl.fit.config import ModelConfig

from helpers import TEXTS, fitted_state, make_tokenizer, random_pairs, random_state, write_less_task

pytest.importorskip("torchao")


@pytest.fixture
def quantized(tiny_dir):
    model, _ = load_model(str(tiny_dir), quantize="int8")
    weight = model.model.layers[0].self_attn.o_proj.weight
    assert type(weight) is not torch.nn.Parameter and dequantized(weight).dtype == torch.float32
    return model


def float_copy(model):
    """The quantised model's architecture with plain float weights equal to its dequantised ones."""
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if isinstance(module, torch.nn.Linear) and type(module.weight) is not torch.nn.Parameter:
            module.weight = torch.nn.Parameter(dequantized(module.weight).detach().clone(), requires_grad=False)
    return plain


def test_fit_statistics_and_steering_run_on_a_quantized_base(quantized):
    tok = make_tokenizer()
    acc = accumulate_momentum(quantized, tok, random_pairs(9), sites=["attention", "ffn"], batch_size=4)
    assert acc.n == 9 and torch.isfinite(acc.momentum("attention")).all()
    state = fitted_state(float_copy(quantized), k=6)
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        base = quantized(**batch).logits
        with state.apply(quantized):
            steered = quantized(**batch).logits
        after = quantized(**batch).logits
    assert (steered - base).abs().max() > 1e-3 and torch.equal(after, base)


def test_merging_is_refused_and_a_lora_adapter_reproduces_the_edit(quantized, tmp_path):
    peft = pytest.importorskip("peft")
    state = random_state(locate_units(quantized), ["attention", "ffn"], base_model="TINY")
    with pytest.raises(AusteerError, match="holds quantized weights") as err:
        state.merge_into(quantized)
    assert "\n" not in str(err.value) and "--format peft" in str(err.value)
    folder = state.to_peft(quantized, tmp_path / "adapter")
    plain = float_copy(quantized)
    x = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with state.apply(plain):
            want = plain(x).logits
        got = peft.PeftModel.from_pretrained(copy.deepcopy(plain), str(folder))(x).logits
        with state.apply(quantized):
            on_quantized = quantized(x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # the adapter is the edit of these very weights
    torch.testing.assert_close(on_quantized, want, rtol=0, atol=1e-3)  # the int8 kernel rounds differently


def test_train_py_fits_a_quantized_base(tiny_dir, tmp_path):
    from austeer_pl.cli.train import train_main

    task = write_less_task(tmp_path / "less.jsonl", 40)
    code = train_main(
        ["--model.model_name", str(tiny_dir), "--model.quantize", "int8", "--data.task", str(task),
         "--data.batch_size", "8", "--data.max_val_examples", "12", "--data.max_test_examples", "6",
         "--model.k", "[2, 4]", "--model.alpha", "[2.0]", "--export_anyway", "true", "--wandb_mode", "disabled",
         "--export_dir", str(tmp_path / "state"), "--run_dir", str(tmp_path / "run")]
    )  # fmt: skip
    assert code == 0
    assert SteeringState.from_pretrained(tmp_path / "state").k in (2, 4)


def test_bad_quantizations_are_one_line():
    with pytest.raises(SettingError, match="setting 'quantize' is 'int3'"):
        ModelConfig(quantize="int3")
    if not torch.cuda.is_available():
        with pytest.raises(AusteerError, match="needs bitsandbytes on a CUDA GPU"):
            quantization_kwargs("bnb-nf4")
