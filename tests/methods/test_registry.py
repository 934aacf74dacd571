"""One conformance suite over every registered method (as peft runs one suite over all its tuners):
build a state from the registry, save, load, apply, remove, rescale, and refuse another model."""

from __future__ import annotations

import pytest
import torch

from austeer_pl import AusteerError, SteeringState, accumulate_momentum, locate_units
from austeer_pl.fit.statistics import rank_site_options
from austeer_pl.fit.strength import StrengthTrainer
from austeer_pl.methods.iti import accumulate_head_moments, accumulate_probe_accuracy
from austeer_pl.methods.probes import fit_probes
from austeer_pl.methods.registry import METHODS, FitContext, build_state, needs

from helpers import (
    make_model,
    make_tokenizer,
)

TEXTS = [
    "is 3 less than 7 yes",
    "is 9 less than 1 no",
    "is 2 less than 5 yes",
    "is 8 less than 4 no",
    "is 1 less than 6 yes",
]
PAIRS = [(t, t.rsplit(" ", 1)[0] + (" no" if t.endswith("yes") else " yes")) for t in TEXTS * 2]


@pytest.fixture(scope="module")
def context():
    model, tok = make_model("llama"), make_tokenizer()
    layout = locate_units(model)
    acc = accumulate_momentum(model, tok, PAIRS, sites=["attention", "ffn", "residual"], layout=layout, batch_size=4)
    moments = accumulate_head_moments(model, tok, PAIRS, layout=layout)
    probes = accumulate_probe_accuracy(model, tok, PAIRS[:4], fit_probes(moments), layout=layout)
    rankings = rank_site_options(acc, [("attention", ("attention",)), ("ffn", ("ffn",))], "both", 50)
    ctx = FitContext(
        layout=layout,
        acc=acc,
        moments=moments,
        probe_accuracy=probes,
        rankings=rankings,
        base_model="tiny-llama",
        sign="both",
    )
    return model, tok, layout, ctx


def state_of(method: str, model, tok, layout, ctx) -> SteeringState:
    entry = METHODS[method]
    if entry.learned:
        base = build_state("austeer", ctx, site="attention", k=4, alpha=2.0)
        trainer = StrengthTrainer(model, layout, base, entry.learned)
        ids = tok(["is 3 less than 7 yes"], return_tensors="pt")
        batch = {
            "n_examples": 1,
            "input_ids": ids["input_ids"],
            "attention_mask": ids["attention_mask"],
            "answer_lengths": torch.tensor([3]),
        }
        trainer.begin(torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
        trainer.step(batch)
        trainer.end_epoch(
            1, torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
        )  # epoch 1 wins: its weights are kept
        return trainer.fold()
    point = entry.grid_points(layout)[0]
    return build_state(method, ctx, **point)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "unsteered"])
def test_every_registered_method_saves_loads_applies_removes_and_refuses(method, context, tmp_path):
    model, tok, layout, ctx = context
    entry = METHODS[method]
    assert needs([method]) == set(entry.statistics)
    state = state_of(method, model, tok, layout, ctx)
    assert state.k > 0
    batch = tok(TEXTS[:3], return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = model(**batch).logits
        with state.apply(model):
            steered = model(**batch).logits
        after = model(**batch).logits
    assert torch.equal(plain, after)  # removed: bit-identical to before
    assert not torch.equal(plain, steered)

    folder = state.save_pretrained(tmp_path / method)
    loaded = SteeringState.from_pretrained(folder)
    fresh = make_model("llama")  # a new model object with the same weights
    with torch.no_grad(), loaded.apply(fresh):
        again = fresh(**batch).logits
    assert torch.equal(again, steered)

    if state.strength.get("kind") == "gate":
        with pytest.raises(AusteerError, match="no single strength"):
            state.with_alpha(2 * state.alpha)
    else:
        doubled = state.with_alpha(2 * state.alpha)
        assert torch.allclose(doubled.scale, 2 * state.scale) and torch.allclose(doubled.shift, 2 * state.shift)
        if entry.strength_key is not None and not entry.learned:
            rebuilt = build_state(method, ctx, **{**entry.grid_points(layout)[0], entry.strength_key: 2 * state.alpha})
            assert torch.allclose(rebuilt.scale, doubled.scale) and torch.allclose(rebuilt.shift, doubled.shift)

    with pytest.raises(AusteerError, match="is for a 'llama' model"):
        loaded.apply(make_model("gpt2"))


def test_registry_order_and_learned_variants():
    assert list(METHODS)[:1] == ["unsteered"] and "austeer" in METHODS
    learned = {m: e.learned for m, e in METHODS.items() if e.learned}
    assert learned == {"austeer_scalar": "scalar", "austeer_gate": "gate"}
    for name, entry in METHODS.items():
        if entry.points is not None:
            assert entry.grid and entry.quick_grid and entry.strength_key and entry.build is not None, name
