"""Activation momentum against a plain per-pair loop, and its streaming merge."""

from __future__ import annotations

import pytest
import torch

from austeer_pl import (
    AusteerError,
    MomentumAccumulator,
    accumulate_momentum,
    locate_units,
)

from helpers import (
    CORE_ARCHS,
    MOE_ARCHS,
    capture_full,
    make_model,
    make_tokenizer,
    random_pairs,
)


@pytest.mark.parametrize("arch", CORE_ARCHS + MOE_ARCHS)
def test_momentum_matches_plain_loop(arch):
    model = make_model(arch).double()  # float64 so that batched and single-row values agree to ~1e-15
    tok = make_tokenizer()
    layout = locate_units(model)
    pairs = random_pairs(13)
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
    pairs = random_pairs(11, seed=3)
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
