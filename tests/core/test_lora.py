"""A steering state as a peft LoRA adapter: peft's own loader gives the hooked model's logits."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from austeer_pl import AusteerError, locate_units
from austeer_pl.core.lora import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, lora_adapter
from austeer_pl.core.strength import GateStrength, fold_strength

from helpers import ALL_ARCHS, fitted_state, make_model, random_state

peft = pytest.importorskip("peft")


def ids(n=2, length=7, seed=0):
    return torch.randint(3, 60, (n, length), generator=torch.Generator().manual_seed(seed))


def with_adapter(model, folder):
    """The base model (a copy) with the adapter loaded by peft itself."""
    return peft.PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).eval()


def hooked(model, state, x):
    with torch.no_grad(), state.apply(model):
        return model(x).logits


def generate(model, x):
    return model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=6,
        do_sample=False,
        use_cache=True,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )


@pytest.mark.parametrize("site", ["attention", "ffn"])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_peft_adapter_equals_hooked_float64(arch, site, tmp_path):
    model = make_model(arch).double()
    state = random_state(locate_units(model), [site], base_model="TINY")
    x = ids()
    with torch.no_grad():
        base = model(x).logits
    want = hooked(model, state, x)
    assert (want - base).abs().max() > 1e-3  # the edit is real
    folder = state.to_peft(model, tmp_path / "adapter")
    steered = with_adapter(model, folder)
    with torch.no_grad():
        got = steered(x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    # Generation with the KV cache is steered at every step, as with hooks.
    with torch.no_grad(), state.apply(model):
        expected = generate(model, x[:1])
    with torch.no_grad():
        out = generate(steered, x[:1])
    assert torch.equal(out.sequences, expected.sequences)
    for a, b in zip(out.logits, expected.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_one_rank_zero_padded_and_the_files_peft_reads(tmp_path):
    model = make_model("llama")
    layout = locate_units(model)
    state = fitted_state(model, k=9, sites=("attention", "ffn"))
    folder = state.to_peft(model, tmp_path / "adapter")
    config = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    tensors = load_file(folder / ADAPTER_WEIGHTS_NAME)
    per_module = {}
    for site, layer, _unit in state.coordinates():
        per_module[(site, layer)] = per_module.get((site, layer), 0) + 1
    assert config["r"] == config["lora_alpha"] == max(per_module.values())
    assert config["peft_type"] == "LORA" and not config["lora_bias"] and not config["fan_in_fan_out"]
    assert len(config["target_modules"]) == len(per_module)
    r = config["r"]
    for name in config["target_modules"]:
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape[0] == b.shape[1] == r
        used = int(a.ne(0).any(1).sum())
        assert used == int(b.ne(0).any(0).sum())
        assert not a[used:].any() and not b[:, used:].any()  # the padding is zeros
    assert layout.n_layers >= 1 and (folder / "README.md").exists()


def test_adapter_scale_half_is_the_state_at_half_alpha(tmp_path):
    model = make_model("llama").double()
    state = fitted_state(model, k=12, alpha=8.0)
    steered = with_adapter(model, state.to_peft(model, tmp_path / "adapter"))
    for module in steered.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.scale_layer(0.5)
    x = ids(3, 9)
    with torch.no_grad():
        got = steered(x).logits
    torch.testing.assert_close(got, hooked(model, state.with_alpha(4.0), x), rtol=0, atol=1e-10)


def test_a_biased_ffn_projection_uses_peft_lora_bias(tmp_path):
    model = make_model("gpt2").double()  # Conv1D projections with biases
    state = random_state(locate_units(model), ["attention", "ffn"], base_model="TINY")
    folder = state.to_peft(model, tmp_path / "adapter")
    config = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    assert config["lora_bias"] and config["fan_in_fan_out"]
    x = ids()
    with torch.no_grad():
        got = with_adapter(model, folder)(x).logits
    torch.testing.assert_close(got, hooked(model, state, x), rtol=0, atol=1e-10)


def test_a_process_without_austeer_pl_gets_the_hooked_logits(tmp_path):
    model = make_model("llama")
    model.save_pretrained(tmp_path / "base")
    state = fitted_state(model, k=10, sites=("attention", "ffn"))
    state.to_peft(model, tmp_path / "adapter")
    x = ids(2, 9)
    torch.save(x, tmp_path / "x.pt")
    code = f"""
import sys, torch, transformers, peft
base = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r}).eval()
model = peft.PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
with torch.no_grad():
    torch.save(model(torch.load({str(tmp_path / "x.pt")!r})).logits, {str(tmp_path / "logits.pt")!r})
assert not [m for m in sys.modules if m.startswith("austeer_pl")]
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    got = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(got, hooked(model, state, x), rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda s, m: replace(s, token_scope="prompt"), "this state steers only the prompt tokens"),
        (lambda s, m: replace(s, shift=torch.ones(s.k)), "this state adds shifts (a + t)"),
        (
            lambda s, m: replace(
                s,
                unit=s.unit[:0],
                site_index=s.site_index[:0],
                layer=s.layer[:0],
                momentum=s.momentum[:0],
                scale=s.scale[:0],
                shift=s.shift[:0],
            ),
            "this state steers no unit",
        ),
        (
            lambda s, m: fold_strength(
                s, GateStrength(locate_units(m).site("residual").size, s.scale, layer=0, width=4)
            ),
            "this state's learned gate",
        ),
    ],
    ids=["token scope", "shift", "empty", "gate"],
)
def test_what_cannot_be_an_adapter_is_refused_in_one_line(edit, words, tmp_path):
    model = make_model("llama")
    state = edit(fitted_state(model, k=6), model)
    with pytest.raises(AusteerError) as err:
        state.to_peft(model, tmp_path / "adapter")
    message = str(err.value)
    assert message.startswith(words) and "\n" not in message, message
    assert not (tmp_path / "adapter").exists()


def test_lora_adapter_leaves_the_model_untouched():
    model = make_model("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = lora_adapter(random_state(locate_units(model), ["attention", "ffn"]), model)
    assert adapter.rank == 5
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.real_model
def test_embedded_model_adapter_equals_hooks_in_float32(tmp_path):
    from austeer_pl.core.models import load_model

    try:
        model, tokenizer = load_model("smollm2-135m-instruct")
    except AusteerError as err:
        pytest.skip(str(err))
    state = random_state(locate_units(model), ["attention", "ffn"], per_layer=2, seed=3, base_model="smollm2")
    state = state.with_alpha(0.1)  # strong enough to move the logits, not to wreck them
    batch = tokenizer(["What a film! It was", "The capital of France is"], return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**batch).logits
        with state.apply(model):
            want = model(**batch).logits
    assert (want - base).abs().max() > 1e-2
    steered = peft.PeftModel.from_pretrained(model, str(state.to_peft(model, tmp_path / "adapter"))).eval()
    with torch.no_grad():
        got = steered(**batch).logits
    torch.testing.assert_close(got, want, rtol=0, atol=2e-4)


def test_a_mixture_of_experts_ffn_edit_is_refused_but_its_attention_edit_is_an_adapter(tmp_path):
    model = make_model("qwen3_moe").double()
    layout = locate_units(model)
    with pytest.raises(AusteerError, match="mixture of experts") as err:
        random_state(layout, ["ffn"]).to_peft(model, tmp_path / "ffn")
    assert "\n" not in str(err.value) and not (tmp_path / "ffn").exists()
    state = random_state(layout, ["attention"], base_model="TINY")
    x = ids()
    with torch.no_grad():
        got = with_adapter(model, state.to_peft(model, tmp_path / "attention"))(x).logits
    torch.testing.assert_close(got, hooked(model, state, x), rtol=0, atol=1e-10)
