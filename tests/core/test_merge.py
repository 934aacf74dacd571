"""Folding a steering state into the weights: the merged model equals the hooked one, on every architecture."""

from __future__ import annotations

import copy
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn

from austeer_pl import (
    AusteerError,
    LayoutSpec,
    SteeringState,
    accumulate_momentum,
    locate_units,
    select_units,
)
from austeer_pl.core.merge import check_foldable, merge_into
from austeer_pl.core.projections import ffn_output_projection
from austeer_pl.core.strength import GateStrength, ScalarStrength, fold_strength
from austeer_pl.methods.block import block_austeer_state
from austeer_pl.methods.sadi import sadi_state

from helpers import (
    ALL_ARCHS,
    MOE_ARCHS,
    make_model,
    make_tokenizer,
    random_state,
    residual_shift,
    review_pairs,
    tiny_config,
)

# Architectures whose attention output and FFN down projections carry a bias (shifts fold there).
BIASED = ("gpt2", "gpt_neox", "opt")


def ids(n=2, length=7, seed=0):
    return torch.randint(3, 60, (n, length), generator=torch.Generator().manual_seed(seed))


def hooked_and_merged(model, state, x, layout=None):
    """(unsteered, hooked, merged) logits; the merge goes into a deep copy."""
    with torch.no_grad():
        base = model(x).logits
        with state.apply(model, layout=layout):
            hooked = model(x).logits
        merged_model = copy.deepcopy(model)
        assert merge_into(state, merged_model, layout=layout) is merged_model
        merged = merged_model(x).logits
    return base, hooked, merged, merged_model


def generate(model, x, **kwargs):
    return model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=6,
        do_sample=False,
        use_cache=True,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        **kwargs,
    )


# ============================================================================ exactness
@pytest.mark.parametrize("site", ["attention", "ffn"])
@pytest.mark.parametrize("arch", ALL_ARCHS + MOE_ARCHS)
def test_merged_equals_hooked_float64_forward_and_generate(arch, site):
    model = make_model(arch).double()
    layout = locate_units(model)
    state = random_state(layout, [site], shifts=arch in BIASED)
    x = ids()
    base, hooked, merged, merged_model = hooked_and_merged(model, state, x)
    assert (hooked - base).abs().max() > 1e-3  # the edit is real
    torch.testing.assert_close(merged, hooked, rtol=0, atol=1e-10)
    # During generation with the KV cache every step is steered the same way.
    with torch.no_grad(), state.apply(model):
        want = generate(model, x[:1])
    got = generate(merged_model, x[:1])
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_merged_equals_hooked_float32_both_sites():
    model = make_model("llama")
    state = random_state(locate_units(model), ["attention", "ffn"])
    base, hooked, merged, _ = hooked_and_merged(model, state, ids(3, 11))
    assert (hooked - base).abs().max() > 1e-3
    torch.testing.assert_close(merged, hooked, rtol=0, atol=1e-5)


def test_shifts_fold_into_biases_of_a_biased_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        attention_bias=True,
        mlp_bias=True,
    )
    model = transformers.LlamaForCausalLM(config).eval().double()
    for p in model.parameters():  # random biases, so that scaling them matters
        if p.dim() == 1:
            p.data.normal_()
    state = random_state(locate_units(model), ["attention", "ffn"], shifts=True)
    base, hooked, merged, merged_model = hooked_and_merged(model, state, ids())
    assert (hooked - base).abs().max() > 1e-3
    torch.testing.assert_close(merged, hooked, rtol=0, atol=1e-10)
    before = model.model.layers[0].self_attn.o_proj.bias
    assert not torch.equal(merged_model.model.layers[0].self_attn.o_proj.bias, before)


def test_merge_touches_only_the_projections_of_steered_layers():
    model = make_model("llama")
    layout = locate_units(model)
    state = random_state(layout, ["ffn"])
    state = replace(state, scale=torch.where(state.layer == 1, state.scale, torch.zeros_like(state.scale)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_into(state, model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"model.layers.1.mlp.down_proj.weight"}
    rows = state.unit[state.layer == 1]
    w0, w1 = before["model.layers.1.mlp.down_proj.weight"], model.model.layers[1].mlp.down_proj.weight
    untouched = torch.ones(w0.shape[0], dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(w1[untouched], w0[untouched])


def test_method_states_fold():
    """AUSteer, block-level AUSteer, SADI (both sites) and a learned scalar strength, as the package builds them."""
    model = make_model("llama")
    layout = locate_units(model)
    acc = accumulate_momentum(
        model, make_tokenizer(), review_pairs(), sites=["attention", "ffn", "residual"], batch_size=4
    )
    austeer = SteeringState.from_selection(select_units(acc, 12, ["attention", "ffn"]), layout, alpha=8.0)
    scalar = fold_strength(austeer, ScalarStrength(austeer.scale * torch.linspace(-3, 3, austeer.k)))
    states = {
        "austeer": austeer,
        "austeer_block": block_austeer_state(acc, layout, k_blocks=2, alpha=8.0, sites=["attention", "ffn"]),
        "sadi": sadi_state(acc, layout, site="attention", k_heads=2, delta=3.0),
        "sadi_ffn": sadi_state(acc, layout, site="ffn", k_units=10, delta=3.0),
        "scalar": scalar,
    }
    model = model.double()
    for name, state in states.items():
        base, hooked, merged, _ = hooked_and_merged(model, state, ids())
        assert (hooked - base).abs().max() > 1e-4, name
        torch.testing.assert_close(merged, hooked, rtol=0, atol=1e-10, msg=name)


# ============================================================================ LayoutSpec and the generic search
class Block(nn.Module):
    def __init__(self, hidden, inner, squash_output=False):
        super().__init__()
        self.mixer = nn.ModuleDict({"value": nn.Linear(hidden, hidden), "out": nn.Linear(hidden, hidden)})
        self.feed = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(), nn.Linear(inner, hidden))
        self.squash_output = squash_output

    def forward(self, x):
        x = x + self.mixer["out"](torch.tanh(self.mixer["value"](x)))
        y = self.feed(x)
        return x + (torch.tanh(y) if self.squash_output else y)


class OwnProjection(nn.Module):
    """A custom projection class: a weight merge_into cannot know the orientation of."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)

    def forward(self, x):
        return x @ self.weight.T


class Toy(nn.Module):
    """A model no built-in table knows: its sites are found through a LayoutSpec only."""

    def __init__(self, squash_output=False, own_projection=False):
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(model_type="toy", hidden_size=16, num_attention_heads=2)
        self.embed = nn.Embedding(64, 16)
        self.blocks = nn.ModuleList([Block(16, 24, squash_output) for _ in range(2)])
        if own_projection:
            for block in self.blocks:
                block.mixer["out"] = OwnProjection(16, 16)
        self.head = nn.Linear(16, 64)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return SimpleNamespace(logits=self.head(x))


SPEC = LayoutSpec(layers="blocks", attention="mixer.out", ffn="feed")


def test_layout_spec_model_merges_with_generic_search():
    model = Toy().double().eval()
    layout = locate_units(model, SPEC)
    assert ffn_output_projection(model.blocks[0].feed, 16) is model.blocks[0].feed[2]
    state = random_state(layout, ["attention", "ffn"], shifts=True)
    base, hooked, merged, _ = hooked_and_merged(model, state, ids(), layout=SPEC)
    assert (hooked - base).abs().max() > 1e-3
    torch.testing.assert_close(merged, hooked, rtol=0, atol=1e-10)


def test_layout_recorded_in_the_state_is_used():
    model = Toy().double().eval()
    state = random_state(
        locate_units(model, SPEC),
        ["attention", "ffn"],
        layout={"layers": "blocks", "attention": "mixer.out", "ffn": "feed"},
    )
    with torch.no_grad(), state.apply(model):
        hooked = model(ids()).logits
    merged = merge_into(state, copy.deepcopy(model))  # no layout argument: the state's own
    with torch.no_grad():
        torch.testing.assert_close(merged(ids()).logits, hooked, rtol=0, atol=1e-10)


def test_layout_spec_pointing_at_the_down_projection_itself():
    model = Toy().double().eval()
    spec = LayoutSpec(layers="blocks", attention="mixer.out", ffn="feed.2")
    state = random_state(locate_units(model, spec), ["ffn"])
    _, hooked, merged, _ = hooked_and_merged(model, state, ids(), layout=spec)
    torch.testing.assert_close(merged, hooked, rtol=0, atol=1e-10)


# ============================================================================ refusals
def gate_state(model, state):
    gate = GateStrength(locate_units(model).site("residual").size, state.scale, layer=0, width=4)
    return fold_strength(state, gate)


def shared_o_proj(model):
    model.model.layers[1].self_attn.o_proj.weight = model.model.layers[0].self_attn.o_proj.weight
    return model


def _unit_twice(model, state):
    unit = state.unit.clone()
    unit[1] = unit[0]
    return replace(state, unit=unit)


ATTN_FFN, FFN, ATTN = ("attention", "ffn"), ("ffn",), ("attention",)
_NO_FFN = LayoutSpec(layers="model.layers", attention="self_attn.o_proj", ffn="mlp.act_fn")

# (case, sites of the random state, how to edit it, how to make the model, LayoutSpec, first words of the message)
REFUSALS = [
    ("gate", ATTN_FFN, gate_state, None, None, "this state's learned gate computes its strengths from each input"),
    (
        "prompt scope",
        ATTN_FFN,
        lambda m, s: replace(s, token_scope="prompt"),
        None,
        None,
        "this state steers only the prompt tokens",
    ),
    (
        "generated scope",
        ATTN_FFN,
        lambda m, s: replace(s, token_scope="generated"),
        None,
        None,
        "this state steers only the generated tokens",
    ),
    (
        "residual shift (CAA)",
        ATTN_FFN,
        lambda m, s: residual_shift(m),
        None,
        None,
        "this state edits the residual stream",
    ),
    (
        "residual scale",
        ATTN_FFN,
        lambda m, s: replace(residual_shift(m), scale=torch.ones(32), shift=torch.zeros(32)),
        None,
        None,
        "this state edits the residual stream",
    ),
    (
        "attention shift without bias",
        ATTN,
        lambda m, s: replace(s, shift=torch.ones(s.k)),
        None,
        None,
        "this state adds a shift at the attention site of layer 0",
    ),
    (
        "ffn shift without bias",
        FFN,
        lambda m, s: replace(s, shift=torch.ones(s.k)),
        None,
        None,
        "this state adds a shift at the ffn site of layer 0",
    ),
    (
        "non-finite (edited after loading)",
        ATTN_FFN,
        lambda m, s: (s.scale.__setitem__(0, float("nan")), s)[1],
        None,
        None,
        "this state holds non-finite edits",
    ),
    ("unit twice", ATTN_FFN, _unit_twice, None, None, "this state edits some unit twice"),
    ("another model", ATTN_FFN, None, lambda: make_model("gpt2"), None, "steering state is for a 'llama' model"),
    (
        "shared weight",
        ATTN_FFN,
        None,
        lambda: shared_o_proj(make_model("llama")),
        None,
        "the weight of 'model.layers.0.self_attn.o_proj' is shared with",
    ),
    (
        "no FFN projection",
        FFN,
        None,
        None,
        _NO_FFN,
        "cannot find the projection that produces the output of the FFN block",
    ),
    (
        "attention not a Linear or Conv1D",
        ATTN,
        None,
        lambda: Toy(own_projection=True),
        SPEC,
        "the attention site module 'blocks.0.mixer.out' (OwnProjection) is not a Linear",
    ),
]


@pytest.mark.parametrize(
    ("sites", "edit", "make", "spec", "words"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_refusals_leave_the_model_untouched(sites, edit, make, spec, words):
    llama = make_model("llama") if make is None or spec is None else make()
    state = random_state(locate_units(llama, spec), list(sites))
    if edit is not None:
        state = edit(llama, state)
    model = make() if make is not None else llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AusteerError) as err:
        merge_into(state, model, layout=spec)
    message = str(err.value)
    assert message.startswith(words), message
    assert "\n" not in message and (
        "hooks" in message or "LayoutSpec" in message or "fitted on" in message or "fit it again" in message
    )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_ffn_whose_last_projection_is_not_its_output_is_refused():
    model = Toy(squash_output=False).double()
    model.blocks[0].feed.append(nn.Tanh())  # the FFN output is now tanh(down(...)): no row scale reproduces it
    state = random_state(locate_units(model, SPEC), ["ffn"])
    with pytest.raises(AusteerError, match="set LayoutSpec"):
        merge_into(state, model, layout=SPEC)


def test_check_foldable_accepts_zero_edits_elsewhere():
    model = make_model("llama")
    state = random_state(locate_units(model), ["attention"])
    caa = residual_shift(model)
    both = SteeringState(
        sites=("attention", "residual"),
        site_index=torch.cat([state.site_index, torch.ones(caa.k, dtype=torch.long)]),
        layer=torch.cat([state.layer, caa.layer]),
        unit=torch.cat([state.unit, caa.unit]),
        momentum=torch.cat([state.momentum, caa.momentum]),
        scale=torch.cat([state.scale, caa.scale]),
        shift=torch.cat([state.shift, torch.zeros(caa.k)]),
        alpha=1.0,
        architecture="llama",
        n_layers=state.n_layers,
        site_sizes={"attention": 32, "residual": 32},
    )
    check_foldable(both)  # residual units that change nothing do not block the merge
    with pytest.raises(AusteerError, match="residual stream"):
        check_foldable(replace(both, shift=torch.cat([state.shift, caa.shift])))


def test_moe_merge_scales_every_experts_rows_with_the_default_experts_kernel():
    # transformers' own (grouped matmul) experts kernel, float32: the merged model is the hooked one.
    torch.manual_seed(0)
    config = tiny_config("qwen2_moe")
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    state = random_state(locate_units(model), ["ffn"], per_layer=4)
    base, hooked, merged, merged_model = hooked_and_merged(model, state, ids(3, 9))
    assert (hooked - base).abs().max() > 1e-3
    torch.testing.assert_close(merged, hooked, rtol=0, atol=1e-5)
    block = merged_model.model.layers[0].mlp
    unit = int(state.unit[0])
    factor = 1 + float(state.scale[0])
    original = model.model.layers[0].mlp
    torch.testing.assert_close(block.experts.down_proj[:, unit], original.experts.down_proj[:, unit] * factor)
    torch.testing.assert_close(
        block.shared_expert.down_proj.weight[unit], original.shared_expert.down_proj.weight[unit] * factor
    )


def test_moe_shift_is_refused_and_the_model_untouched():
    model = make_model("mixtral")
    state = random_state(locate_units(model), ["ffn"])
    state = replace(state, shift=torch.ones(state.k))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AusteerError, match="the sum over a mixture of experts, which no bias absorbs"):
        merge_into(state, model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
