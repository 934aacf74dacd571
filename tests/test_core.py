"""The steering core against exact oracles on tiny random models."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import austeer_pl.core.stateio
from austeer_pl import (
    ActivationReader,
    AusteerError,
    LayoutSpec,
    MomentumAccumulator,
    SteeringState,
    accumulate_momentum,
    locate_units,
    select_units,
)
from austeer_pl.core.reading import last_token_index, position_ids_from_mask
from austeer_pl.core.selection import rank_units
from austeer_pl.core.stateio import CONFIG_NAME, WEIGHTS_NAME

from conftest import ALL_ARCHS, CORE_ARCHS, make_model, make_tokenizer, tiny_config

TEXTS = ["is it good? yes", "bad film.", "a truly wonderful, moving story!", "no", "what a mess, 2 stars"]


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


# ---------------------------------------------------------------------------- locating units
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_locate_units_sizes(arch):
    model = make_model(arch)
    layout = locate_units(model)
    config = tiny_config(arch)
    n_heads = getattr(config, "num_attention_heads", None) or config.n_head
    head_dim = getattr(config, "head_dim", None) or 32 // n_heads
    assert layout.n_layers == (getattr(config, "num_hidden_layers", None) or config.n_layer)
    assert layout.site("attention").size == n_heads * head_dim
    assert (layout.n_heads, layout.head_dim) == (n_heads, head_dim)
    assert layout.site("ffn").size == 32
    assert layout.site("residual").size == 32

    # The attention site is the *input* of the output projection: projecting it gives the module's output.
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    x, _ = capture_full(model, layout, "attention", 0, input_ids=ids)
    proj = layout.site("attention").modules[0]
    box = {}
    h = proj.register_forward_hook(lambda m, a, o: box.update(y=o))
    model(input_ids=ids)
    h.remove()
    assert torch.allclose(proj(x), box["y"], atol=1e-6)

    # The residual site of layer i is hidden_states[i + 1] (the last one is normed in some models).
    out = model(input_ids=ids, output_hidden_states=True)
    r0, _ = capture_full(model, layout, "residual", 0, input_ids=ids)
    assert torch.allclose(r0, out.hidden_states[1], atol=1e-6)

    # The FFN output joins the residual stream (for pre-norm models without a post-FFN norm).
    if arch in ("llama", "mistral", "qwen2", "qwen3"):
        f0, _ = capture_full(model, layout, "ffn", 0, input_ids=ids)
        attn_out = {}
        h = model.model.layers[0].self_attn.register_forward_hook(lambda m, a, o: attn_out.update(y=o[0]))
        model(input_ids=ids)
        h.remove()
        assert torch.allclose(out.hidden_states[0] + attn_out["y"] + f0, out.hidden_states[1], atol=1e-5)


def test_unknown_architecture_error_and_override():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(6, 4)
            self.ff = nn.Linear(4, 4)

        def forward(self, x):
            return x + self.ff(self.out(torch.cat([x, x[..., :2]], -1)))

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {"model_type": "custom", "hidden_size": 4, "num_attention_heads": 2})()
            self.blocks = nn.ModuleList([Block(), Block()])

    model = Custom()
    with pytest.raises(AusteerError, match="LayoutSpec") as err:
        locate_units(model)
    assert "\n" not in str(err.value)
    layout = locate_units(model, LayoutSpec(layers="blocks", attention="out", ffn="ff"))
    assert layout.site("attention").size == 6 and layout.head_dim == 3 and layout.n_layers == 2
    with pytest.raises(AusteerError, match="site 'bogus'"):
        layout.site("bogus")


# ---------------------------------------------------------------------------- reading
def test_last_token_index_and_positions():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 3, 3]
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2, 2], [0, 0, 0, 1], [0, 1, 2, 3]]


@pytest.mark.parametrize("arch", CORE_ARCHS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_invariance(arch, side):
    model = make_model(arch)
    tok = make_tokenizer(padding_side=side)
    layout = locate_units(model)
    reader = ActivationReader(model, layout, ["attention", "ffn", "residual"])
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        together = reader(batch["input_ids"], batch["attention_mask"])
        for i, text in enumerate(TEXTS):
            alone = tok([text], return_tensors="pt")
            single = reader(alone["input_ids"], alone["attention_mask"])
            for site in together:
                assert torch.allclose(together[site][i], single[site][0], atol=1e-5), (site, i)
            # ...and equals the independent full-sequence capture at the last token.
            x, _ = capture_full(model, layout, "ffn", 1, **alone)
            assert torch.allclose(single["ffn"][0, 1], x[0, -1], atol=1e-6)


# ---------------------------------------------------------------------------- momentum
def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    g = torch.Generator().manual_seed(seed)
    words = ["good", "bad", "fine", "awful", "great", "dull", "nice", "poor"]
    pairs = []
    for i in range(n):
        idx = torch.randint(len(words), (4,), generator=g).tolist()
        prompt = f"review {i}: " + " ".join(words[j] for j in idx[:2]) + "? "
        pairs.append((prompt + words[idx[2]], prompt + words[idx[3]] + " no"))
    return pairs


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_momentum_matches_plain_loop(arch):
    model = make_model(arch).double()  # float64 so that batched and single-row values agree to ~1e-15
    tok = make_tokenizer()
    layout = locate_units(model)
    pairs = make_pairs(13)
    sites = ["attention", "ffn"]
    acc = accumulate_momentum(model, tok, pairs, sites=sites, batch_size=4, layout=layout)
    assert acc.n == 13

    for site in sites:
        size = layout.site(site).size
        P = [[0] * size for _ in range(layout.n_layers)]
        Q = [[0] * size for _ in range(layout.n_layers)]
        sum_d = torch.zeros(layout.n_layers, size, dtype=torch.float64)
        for pos_text, neg_text in pairs:
            for layer in range(layout.n_layers):
                xp, _ = capture_full(model, layout, site, layer, **tok([pos_text], return_tensors="pt"))
                xn, _ = capture_full(model, layout, site, layer, **tok([neg_text], return_tensors="pt"))
                d = (xp[0, -1] - xn[0, -1]).tolist()
                for u, value in enumerate(d):
                    P[layer][u] += value > 0
                    Q[layer][u] += value < 0
                sum_d[layer] += xp[0, -1] - xn[0, -1]
        p, q = acc.counts(site)
        assert p.tolist() == P and q.tolist() == Q
        expected_m = [
            [(P[l][u] if P[l][u] >= Q[l][u] else -Q[l][u]) / 13 for u in range(size)] for l in range(layout.n_layers)
        ]
        assert torch.allclose(acc.momentum(site).double(), torch.tensor(expected_m, dtype=torch.float64), atol=1e-7)
        # Gemma's RMSNorm computes in float32 whatever the model's dtype (transformers >= 5.2x), so its
        # shared-prefix and full-sequence paths agree to float32 rounding only.
        atol = 1e-6 if arch.startswith("gemma") else 1e-9
        assert torch.allclose(acc.mean_difference(site), sum_d / 13, atol=atol)


def test_momentum_merge_equals_union():
    model = make_model("llama").double()  # float64: batch grouping moves only the last bits, below the tolerance
    tok = make_tokenizer()
    pairs = make_pairs(11, seed=3)
    whole = accumulate_momentum(model, tok, pairs, sites=["attention", "ffn"], batch_size=3)
    a = accumulate_momentum(model, tok, pairs[:5], sites=["attention", "ffn"], batch_size=2)
    b = accumulate_momentum(model, tok, pairs[5:], sites=["attention", "ffn"], batch_size=4)
    a.merge_(b)
    for key, value in whole.tensors.items():
        if value.dtype == torch.int64:
            assert torch.equal(value, a.tensors[key]), key
        else:
            assert torch.allclose(value, a.tensors[key], rtol=1e-9, atol=1e-9), key
    # State dict round trip.
    fresh = MomentumAccumulator({"attention": 32, "ffn": 32}, 3)
    fresh.load_state_dict(a.state_dict())
    assert torch.equal(fresh.momentum("attention"), a.momentum("attention"))


def test_momentum_rejects_non_finite_and_empty():
    acc = MomentumAccumulator({"ffn": 4}, n_layers=2)
    with pytest.raises(AusteerError, match="no contrastive pairs"):
        acc.momentum("ffn")
    good = torch.zeros(3, 2, 4)
    bad = good.clone()
    bad[1, 0, 2] = float("nan")
    with pytest.raises(AusteerError, match="non-finite"):
        acc.update({"ffn": good}, {"ffn": bad})
    assert acc.n == 0 and int(acc.counts("ffn")[0].sum()) == 0


# ---------------------------------------------------------------------------- selection
def handmade_accumulator() -> MomentumAccumulator:
    """Two layers of 3 units over N = 4 pairs, with ties on |m| broken by effect size, then position."""
    acc = MomentumAccumulator({"attention": 3, "ffn": 3}, n_layers=2)
    # P and Q per (layer, unit); d values are chosen so that the sums are easy to reason about.
    d_attn = torch.tensor(
        [
            [[1.0, -1.0, 2.0], [1.0, 1.0, -1.0]],
            [[1.0, -1.0, 2.0], [1.0, 1.0, -1.0]],
            [[1.0, -1.0, 2.0], [1.0, -1.0, -1.0]],
            [[-1.0, 1.0, 2.0], [0.0, -1.0, -1.0]],
        ]
    )  # m: L0 = [.75, -.75, 1], L1 = [.75, .5, -1]
    d_ffn = torch.tensor(
        [
            [[3.0, 0.0, 0.0], [1.0, 0.0, 0.0]],
            [[3.0, 0.0, 0.0], [1.0, 0.0, 0.0]],
            [[3.0, 0.0, 0.0], [1.0, 0.0, 0.0]],
            [[3.0, 0.0, 0.0], [1.0, 0.0, 0.0]],
        ]
    )  # m: L0 = [1, 0, 0], L1 = [1, 0, 0]; both units have d constant (infinite effect size)
    acc.update(
        {"attention": d_attn, "ffn": d_ffn}, {"attention": torch.zeros_like(d_attn), "ffn": torch.zeros_like(d_ffn)}
    )
    return acc


def test_selection_order_and_policies():
    acc = handmade_accumulator()
    assert acc.momentum("attention").tolist() == [[0.75, -0.75, 1.0], [0.75, 0.5, -1.0]]  # P == Q counts as positive
    ranked = rank_units(acc, ["attention", "ffn"], sign="both")
    coords = ranked.coordinates()
    # |m| = 1: attention L0u2 (d constant 2: infinite effect), attention L1u2 (constant -1), ffn L0u0, ffn L1u0 -
    # all with infinite effect size, so position order decides: site, then layer, then unit.
    assert coords[:4] == [("attention", 0, 2), ("attention", 1, 2), ("ffn", 0, 0), ("ffn", 1, 0)]
    # |m| = .75: attention L0u0 and L0u1 (effect .5/sqrt(.75)... equal), L1u0 (d=[1,1,1,0]: larger effect size).
    assert coords[4] == ("attention", 1, 0)
    assert coords[5:7] == [("attention", 0, 0), ("attention", 0, 1)]
    promote = select_units(acc, 4, ["attention", "ffn"], "promote").coordinates()
    assert promote == [("attention", 0, 2), ("ffn", 0, 0), ("ffn", 1, 0), ("attention", 1, 0)]
    assert all(m > 0 for m in select_units(acc, 5, ["attention", "ffn"], "promote").momentum.tolist())
    # Selection is nested and single-site selection ignores the other site.
    assert select_units(acc, 2, ["attention"], "both").coordinates() == [("attention", 0, 2), ("attention", 1, 2)]


@pytest.mark.parametrize("k", [0, -1, 13])
def test_selection_k_out_of_range(k):
    with pytest.raises(AusteerError, match="out of range"):
        select_units(handmade_accumulator(), k, ["attention", "ffn"], "both")


def test_selection_more_than_positive_units():
    with pytest.raises(AusteerError, match="positive momentum"):
        select_units(handmade_accumulator(), 6, ["attention"], "promote")
    with pytest.raises(AusteerError, match="sign policy"):
        select_units(handmade_accumulator(), 1, ["attention"], "negate")


# ---------------------------------------------------------------------------- steering
def fitted_state(model, k=6, alpha=4.0, sites=("attention", "ffn"), sign="both", **kw) -> SteeringState:
    layout = locate_units(model)
    acc = accumulate_momentum(model, make_tokenizer(), make_pairs(9), sites=sites, batch_size=4, layout=layout)
    return SteeringState.from_selection(
        select_units(acc, k, sites, sign), layout, alpha=alpha, base_model="tiny", sign_policy=sign, **kw
    )


def manual_hooks(model, layout, coords_with_factor):
    """Independent oracle: edit each selected unit by hand, one Python hook per (site, layer)."""
    handles = []
    by_key: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for site, layer, unit, factor in coords_with_factor:
        by_key.setdefault((site, layer), []).append((unit, factor))
    for (site, layer), edits in by_key.items():
        module = layout.site(site).modules[layer]

        def edit(x, edits=edits):
            x = x.clone()
            for unit, factor in edits:
                x[..., unit] = x[..., unit] + factor * x[..., unit]
            return x

        if layout.site(site).reads_input:
            handles.append(module.register_forward_pre_hook(lambda m, a, edit=edit: (edit(a[0]), *a[1:])))
        else:
            handles.append(
                module.register_forward_hook(
                    lambda m, a, o, edit=edit: edit(o) if torch.is_tensor(o) else (edit(o[0]), *o[1:])
                )
            )
    return handles


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_steering_matches_manual_edit(arch):
    model = make_model(arch)
    layout = locate_units(model)
    tok = make_tokenizer()
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    state = fitted_state(model, k=8)
    coords = state.coordinates()

    # 1. At the first steered layer, the steered activation is the unsteered one edited by hand.
    site0, layer0, _ = min(coords, key=lambda c: (c[1], c[0] != "attention"))
    before, _ = capture_full(model, layout, site0, layer0, **batch)
    expected = before.clone()
    for (site, layer, unit), m in zip(coords, state.momentum.tolist()):
        if (site, layer) == (site0, layer0):
            expected[..., unit] = before[..., unit] + state.alpha * m * before[..., unit]
    with state.apply(model):
        after, steered_out = capture_full(model, layout, site0, layer0, **batch)
    if layout.site(site0).reads_input is False:
        pass  # a forward hook registered after ours sees the edited output as well
    assert torch.allclose(after, expected, atol=1e-6)
    assert not torch.allclose(after, before)

    # 2. Whole-model logits equal those of independent hand-written hooks.
    handles = manual_hooks(
        model, layout, [(s, l, u, state.alpha * m) for (s, l, u), m in zip(coords, state.momentum.tolist())]
    )
    with torch.no_grad():
        manual = model(**batch).logits
    for h in handles:
        h.remove()
    assert torch.allclose(steered_out.logits, manual, atol=1e-5)


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_hook_removal_is_bit_identical(arch):
    model = make_model(arch)
    batch = make_tokenizer()(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**batch).logits
    state = fitted_state(model, k=5)
    handle = state.apply(model)
    with torch.no_grad():
        steered = model(**batch).logits
    handle.remove()
    with torch.no_grad():
        after = model(**batch).logits
    assert not torch.equal(before, steered)
    assert torch.equal(before, after)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hooks_only_on_layers_with_units():
    model = make_model("llama")
    layout = locate_units(model)
    state = fitted_state(model, k=3, sites=("attention",))
    with state.apply(model):
        hooked = {i for i, m in enumerate(layout.site("attention").modules) if m._forward_pre_hooks}
        assert hooked == set(state.layers_by_site()["attention"])
        assert not any(m._forward_hooks for m in layout.site("ffn").modules)


def greedy(model, tok, prompts, n=6, **kw):
    batch = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(
        **batch,
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        output_scores=True,
        return_dict_in_generate=True,
        **kw,
    )
    return out.sequences[:, batch["input_ids"].shape[1] :], torch.stack(out.scores, 1)


@pytest.mark.parametrize("arch", CORE_ARCHS)
def test_generate_left_padded_batch_equals_single_rows(arch):
    model = make_model(arch)  # float32: transformers' float64 masks give NaN rows under left padding
    tok = make_tokenizer(padding_side="left")
    state = fitted_state(model, k=10, alpha=30.0)
    prompts = ["is it good? ", "a truly wonderful, moving story! so ", "no"]
    _, plain_scores = greedy(model, tok, prompts)
    with state.apply(model):
        tokens, scores = greedy(model, tok, prompts)
        for i, p in enumerate(prompts):
            t1, s1 = greedy(model, tok, [p])
            assert torch.equal(tokens[i], t1[0])
            assert torch.allclose(scores[i], s1[0], atol=1e-4)
    assert not torch.allclose(scores, plain_scores)


def test_token_scopes_in_generation():
    model = make_model("llama")
    tok = make_tokenizer(padding_side="left")
    state = fitted_state(model, k=10, alpha=30.0)
    prompts = ["is it good? ", "what a mess"]
    _, plain = greedy(model, tok, prompts)
    with state.apply(model):
        _, every = greedy(model, tok, prompts)
    with state.apply(model, token_scope="prompt"):
        _, prompt_only = greedy(model, tok, prompts)
    with state.apply(model, token_scope="generated"):
        _, generated_only = greedy(model, tok, prompts)
    # The first new token is predicted at the prompt's last position.
    assert torch.allclose(prompt_only[:, 0], every[:, 0]) and not torch.allclose(prompt_only[:, 0], plain[:, 0])
    assert torch.allclose(generated_only[:, 0], plain[:, 0])
    assert not torch.allclose(generated_only[:, 1:], plain[:, 1:])
    assert not torch.allclose(prompt_only[:, 1:], every[:, 1:])
    with pytest.raises(AusteerError, match="token scope"):
        state.apply(model, token_scope="answers")


def test_alpha_override_rescales():
    model = make_model("llama")
    state = fitted_state(model, k=4, alpha=2.0)
    assert torch.allclose(state.with_alpha(6.0).scale, 3 * state.scale)
    batch = make_tokenizer()(TEXTS, return_tensors="pt", padding=True)
    with state.with_alpha(6.0).apply(model), torch.no_grad():
        a = model(**batch).logits
    with state.apply(model, alpha=6.0), torch.no_grad():
        b = model(**batch).logits
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------- save and load
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
sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
from conftest import make_model
import austeer_pl
state = austeer_pl.SteeringState.from_pretrained({str(tmp_path / "s")!r})
with state.apply(make_model('llama')):
    pass
bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'wandb', 'datasets')]
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], check=True)
