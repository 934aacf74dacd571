"""Composing steering states: weighted edits add, as LoRA adapters compose."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from austeer_pl import AusteerError, SteeringState, locate_units
from austeer_pl.core.compose import combine
from austeer_pl.core.strength import GateStrength, fold_strength

from helpers import make_model, random_state


def ids(n=2, length=7, seed=0):
    return torch.randint(3, 60, (n, length), generator=torch.Generator().manual_seed(seed))


def two_states(model, overlap=True):
    layout = locate_units(model)
    a = random_state(layout, ["attention", "ffn"], per_layer=4, seed=1, base_model="TINY")
    sites = ["attention", "ffn"] if overlap else ["ffn", "attention"]
    b = random_state(layout, sites, per_layer=4, seed=1 if overlap else 2, base_model="TINY")
    if overlap:  # the same units, other edits: every unit is in both
        b = replace(b, scale=torch.randn(b.k, generator=torch.Generator().manual_seed(5)))
    return a, b


def test_combination_is_the_sum_of_the_weighted_edits_unit_by_unit():
    model = make_model("llama")
    layout = locate_units(model)
    a = random_state(layout, ["attention"], per_layer=3, seed=1)
    b = random_state(layout, ["attention", "ffn"], per_layer=3, seed=2)
    both = combine([a, b], [2.0, -0.5])
    want: dict[tuple[str, int, int], float] = {}
    for state, w in ((a, 2.0), (b, -0.5)):
        for (site, layer, unit), scale in zip(state.coordinates(), state.scale.tolist()):
            want[(site, layer, unit)] = want.get((site, layer, unit), 0.0) + w * scale
    got = dict(zip(both.coordinates(), both.scale.tolist()))
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-6)
    assert both.alpha == 1.0 and both.method == "austeer" and both.k == len(want)


def test_operators_agree_with_combine():
    model = make_model("llama")
    a, b = two_states(model, overlap=False)
    for got, want in (
        (a + b, combine([a, b])),
        (a - b, combine([a, b], [1, -1])),
        (0.5 * a, combine([a], [0.5])),
        (a * 0.5, combine([a], [0.5])),
        (-a, combine([a], [-1])),
        (sum([a, b]), combine([a, b])),
    ):
        assert got.coordinates() == want.coordinates()
        assert torch.equal(got.scale, want.scale)


def test_hooked_merged_and_two_peft_adapters_agree(tmp_path):
    peft = pytest.importorskip("peft")
    model = make_model("qwen2").double()
    a, b = two_states(model, overlap=False)
    w = (1.0, 0.5)
    both = combine([a, b], w)
    x = ids()
    with torch.no_grad(), both.apply(model):
        hooked = model(x).logits
    with torch.no_grad():
        merged = both.merge_into(copy.deepcopy(model))(x).logits
    torch.testing.assert_close(merged, hooked, rtol=0, atol=1e-10)
    a.to_peft(model, tmp_path / "a")
    b.to_peft(model, tmp_path / "b")
    steered = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "a"), adapter_name="a")
    steered.load_adapter(str(tmp_path / "b"), adapter_name="b")
    steered.base_model.set_adapter(["a", "b"])
    for module in steered.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            for name, weight in zip(("a", "b"), w):
                if name in module.scaling:
                    module.set_scale(name, weight)
    with torch.no_grad():
        adapters = steered(x).logits
    # A unit in both states gets w1 g1 + w2 g2, which the combination stores in float32 (the state's
    # format); the two adapters add the two terms in float64. So: float32 rounding of the sum.
    torch.testing.assert_close(adapters, hooked, rtol=0, atol=1e-6)
    assert (adapters - hooked).abs().max() < 1e-3 * (hooked - model(x).logits).abs().max()
    # ...and the combination as one adapter.
    one = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(both.to_peft(model, tmp_path / "both")))
    with torch.no_grad():
        torch.testing.assert_close(one(x).logits, hooked, rtol=0, atol=1e-10)


def test_a_combination_saves_loads_and_rescales(tmp_path):
    model = make_model("llama")
    a, b = two_states(model)
    both = a + b
    loaded = SteeringState.from_pretrained(both.save_pretrained(tmp_path / "s"))
    assert loaded.coordinates() == both.coordinates() and torch.equal(loaded.scale, both.scale)
    assert torch.allclose(both.with_alpha(3.0).scale, 3 * both.scale)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda s, m: replace(s, base_model="other/model"), "cannot combine states of different base models"),
        (lambda s, m: replace(s, token_scope="prompt"), "cannot combine states of a different token scope"),
        (
            lambda s, m: random_state(locate_units(make_model("gpt2")), ["attention"]),
            "cannot combine states of a different architecture",
        ),
        (
            lambda s, m: fold_strength(
                s, GateStrength(locate_units(m).site("residual").size, s.scale, layer=0, width=4)
            ),
            "a learned gate computes its strengths from each input",
        ),
    ],
    ids=["base model", "token scope", "architecture", "gate"],
)
def test_incompatible_states_are_refused_in_one_line(change, words):
    model = make_model("llama")
    a, b = two_states(model)
    with pytest.raises(AusteerError) as err:
        combine([a, change(b, model)])
    message = str(err.value)
    assert message.startswith(words) and "\n" not in message, message


def test_bad_weights_are_refused():
    model = make_model("llama")
    a, b = two_states(model)
    for weights, words in (([1.0], "2 states but 1 weights"), ([1.0, float("nan")], "the weights must be finite")):
        with pytest.raises(AusteerError, match=words):
            combine([a, b], weights)
    with pytest.raises(AusteerError, match="nothing to combine"):
        combine([])
    with pytest.raises(TypeError):
        a + 1
