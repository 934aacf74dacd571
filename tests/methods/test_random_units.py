"""The random-unit control: seeded, uniform over the sites' units, nested in k, and scored as AUSteer's rule."""

from __future__ import annotations

import pytest
import torch

from austeer_pl import accumulate_momentum, locate_units
from austeer_pl.methods.random_units import random_selection
from austeer_pl.methods.registry import METHODS, FitContext, build_state

from helpers import TEXTS, make_model, make_tokenizer, random_pairs


@pytest.fixture(scope="module")
def fitted():
    model = make_model("llama")
    layout = locate_units(model)
    acc = accumulate_momentum(model, make_tokenizer(), random_pairs(12), sites=["attention", "ffn"], batch_size=4)
    return model, layout, acc


def test_a_draw_is_reproducible_nested_in_k_and_distinct_from_other_draws(fitted):
    _model, layout, acc = fitted
    one = random_selection(layout, ("attention", "ffn"), 20, draw=1, momentum=acc.momentum)
    again = random_selection(layout, ("attention", "ffn"), 20, draw=1, momentum=acc.momentum)
    assert one.coordinates() == again.coordinates()
    assert random_selection(layout, ("attention", "ffn"), 5, draw=1).coordinates() == one.coordinates()[:5]
    assert random_selection(layout, ("attention", "ffn"), 20, draw=2).coordinates() != one.coordinates()
    assert len(set(one.coordinates())) == 20  # without replacement
    for (site, layer, unit), m in zip(one.coordinates(), one.momentum.tolist()):
        assert m == acc.momentum(site)[layer, unit].item()  # each unit keeps its own momentum


def test_draws_cover_every_site_and_layer_uniformly(fitted):
    _model, layout, _acc = fitted
    sizes = {s: layout.site(s).size * layout.n_layers for s in ("attention", "ffn")}
    total = sum(sizes.values())
    drawn = [c for d in range(200) for c in random_selection(layout, ("attention", "ffn"), 10, draw=d).coordinates()]
    share = sum(site == "attention" for site, _l, _u in drawn) / len(drawn)
    assert abs(share - sizes["attention"] / total) < 0.05
    assert {layer for _s, layer, _u in drawn} == set(range(layout.n_layers))


def test_the_registry_builds_the_rule_on_random_units(fitted):
    model, layout, acc = fitted
    entry = METHODS["random_units"]
    points = entry.grid_points(layout)
    assert {p["draw"] for p in points} == {0, 1, 2} and len(points) == 2 * 4 * 3 * 3
    ctx = FitContext(layout=layout, acc=acc, base_model="tiny")
    state = build_state("random_units", ctx, site="both", k=10, alpha=4.0, draw=0)
    selection = random_selection(layout, ("attention", "ffn"), 10, draw=0, momentum=acc.momentum)
    assert state.coordinates() == selection.coordinates() and state.method == "random_units"
    torch.testing.assert_close(state.scale, 4.0 * selection.momentum)
    batch = make_tokenizer()(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**batch).logits
        with state.apply(model):
            steered = model(**batch).logits
    assert not torch.equal(base, steered)
