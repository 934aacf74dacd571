"""Steering hooks against a hand-written edit: apply, remove, token scopes, generation."""

from __future__ import annotations

import pytest
import torch

from austeer_pl import (
    AusteerError,
    locate_units,
)

from helpers import (
    CORE_ARCHS,
    MOE_ARCHS,
    TEXTS,
    capture_full,
    fitted_state,
    make_model,
    make_tokenizer,
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


@pytest.mark.parametrize("arch", CORE_ARCHS + MOE_ARCHS)
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
