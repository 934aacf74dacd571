"""Block-level baselines (ITI, SADI, CAA, block-level AUSteer) against hand-computed oracles."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from austeer_pl import (
    AusteerError,
    MomentumAccumulator,
    SteeringState,
    accumulate_momentum,
    locate_units,
)
from austeer_pl.core.stateio import CONFIG_NAME
from austeer_pl.methods.block import block_austeer_state, rank_blocks
from austeer_pl.methods.caa import caa_candidate_layers, caa_state, caa_vector
from austeer_pl.methods.iti import (
    accumulate_head_moments,
    accumulate_probe_accuracy,
    iti_directions,
    iti_state,
    select_heads,
)
from austeer_pl.methods.probes import HeadMoments, ProbeAccuracy, fit_probes
from austeer_pl.methods.registry import METHODS as REGISTRY
from austeer_pl.methods.registry import FitContext, build_state, grid_points
from austeer_pl.methods.sadi import sadi_head_scores, sadi_state

from helpers import (
    make_model,
    make_tokenizer,
)

METHODS = [
    m for m, entry in REGISTRY.items() if entry.points is not None and m not in ("austeer", "random_units")
]  # block-level
STRENGTH_KEY = {m: REGISTRY[m].strength_key for m in METHODS}


def baseline_state(method, layout, *, acc=None, moments=None, accuracy=None, base_model="", **hyper):
    return build_state(
        method,
        FitContext(layout=layout, acc=acc, moments=moments, probe_accuracy=accuracy, base_model=base_model),
        **hyper,
    )


def sadi_mask(acc, layout, *, site, k):
    """The units a SADI state edits, as a (layers, units) mask: the oracle the state is compared with."""
    key = "k_heads" if site == "attention" else "k_units"
    state = sadi_state(acc, layout, site=site, delta=1.0, **{key: k})
    mask = torch.zeros(layout.n_layers, layout.site(site).size, dtype=torch.bool)
    mask[state.layer, state.unit] = True
    return mask


TEXTS = ["is it good? yes", "bad film.", "a truly wonderful, moving story!", "what a mess, 2 stars"]


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    g = torch.Generator().manual_seed(seed)
    words = ["good", "bad", "fine", "awful", "great", "dull", "nice", "poor"]
    pairs = []
    for i in range(n):
        idx = torch.randint(len(words), (4,), generator=g).tolist()
        prompt = f"review {i}: " + " ".join(words[j] for j in idx[:2]) + "? "
        pairs.append((prompt + words[idx[2]] + " yes", prompt + words[idx[3]] + " no"))
    return pairs


class FakeLayout:
    """Just the facts the baselines read from a ModelLayout (for handmade statistics)."""

    def __init__(self, n_layers, n_heads, head_dim, hidden):
        self.architecture, self.n_layers, self.n_heads, self.head_dim = "llama", n_layers, n_heads, head_dim
        sizes = {"attention": n_heads * head_dim, "ffn": hidden, "residual": hidden}
        self.sites = {name: type("S", (), {"size": size})() for name, size in sizes.items()}

    def site(self, name):
        if name not in self.sites:
            raise AusteerError(f"site '{name}' is not available")
        return self.sites[name]


def random_acts(g, batch, n_layers=2, n_heads=3, head_dim=4, shift=0.0):
    return torch.randn(batch, n_layers, n_heads * head_dim, generator=g, dtype=torch.float64) + shift


# ============================================================================ HeadMoments
def test_head_moments_match_direct_computation():
    g = torch.Generator().manual_seed(0)
    L, H, D = 2, 3, 4
    pos = [random_acts(g, b, shift=1.0) for b in (3, 5, 1)]
    neg = [random_acts(g, b, shift=-0.5) for b in (4, 2, 3)]
    moments = HeadMoments(L, H, D)
    for p, n in zip(pos, neg):
        moments.update(p.float(), {"attention": n.float()})  # sizes differ per class; mappings accepted
    P, N = torch.cat(pos).float().double(), torch.cat(neg).float().double()
    assert moments.counts == (9, 9)
    for label, X in ((0, P), (1, N)):
        Xh = X.view(-1, L, H, D)
        assert torch.allclose(moments.mean(label), Xh.mean(0), atol=1e-12)
        for l in range(L):
            for h in range(H):
                x = Xh[:, l, h, :]
                assert torch.allclose(moments.covariance(label)[l, h], torch.cov(x.T), atol=1e-12)
                assert torch.allclose(moments.covariance(label, ddof=0)[l, h], torch.cov(x.T, correction=0), atol=1e-12)
    Ph, Nh = P.view(-1, L, H, D), N.view(-1, L, H, D)
    for l in range(L):
        for h in range(H):
            cp, cn = Ph[:, l, h] - Ph[:, l, h].mean(0), Nh[:, l, h] - Nh[:, l, h].mean(0)
            pooled = (cp.T @ cp + cn.T @ cn) / (9 + 9 - 2)
            assert torch.allclose(moments.pooled_covariance()[l, h], pooled, atol=1e-12)
    assert torch.allclose(moments.mass_mean_shift(), Ph.mean(0) - Nh.mean(0), atol=1e-12)

    # Merge == union; integer counts exact.
    a, b = HeadMoments(L, H, D), HeadMoments(L, H, D)
    a.update(pos[0].float(), neg[0].float())
    b.update(torch.cat(pos[1:]).float(), torch.cat(neg[1:]).float())
    a.merge_(b)
    assert torch.equal(a.tensors["count"], moments.tensors["count"])
    for key in ("sum", "outer"):
        assert torch.allclose(a.tensors[key], moments.tensors[key], rtol=1e-12, atol=1e-12)
    # update_class equals update.
    c = HeadMoments(L, H, D)
    c.update_class(torch.cat(pos).float(), 0)
    c.update_class(torch.cat(neg).float(), 1)
    assert torch.allclose(c.tensors["outer"], moments.tensors["outer"], atol=1e-12)
    # reduce_ with a SUM all-reduce over two identical processes == merging with itself.
    twice = HeadMoments(L, H, D)
    twice.load_state_dict(moments.state_dict())
    twice.reduce_(lambda t: t.mul_(2))
    moments2 = HeadMoments(L, H, D)
    moments2.load_state_dict(moments.state_dict())
    moments2.merge_(moments)
    for key in HeadMoments.KEYS:
        assert torch.equal(twice.tensors[key], moments2.tensors[key])
    # State dict round trip; shape mismatches are refused.
    fresh = HeadMoments(L, H, D)
    fresh.load_state_dict(moments.state_dict())
    assert all(torch.equal(fresh.tensors[k], moments.tensors[k]) for k in HeadMoments.KEYS)
    with pytest.raises(AusteerError, match="another model"):
        HeadMoments(L, H, D + 1).load_state_dict(moments.state_dict())


def test_head_moments_errors():
    moments = HeadMoments(2, 3, 4)
    with pytest.raises(ValueError, match="expected attention activations"):
        moments.update(torch.zeros(2, 2, 11), torch.zeros(2, 2, 12))
    bad = torch.zeros(2, 2, 12)
    bad[0, 1, 3] = float("inf")
    with pytest.raises(AusteerError, match="non-finite"):
        moments.update(torch.zeros(2, 2, 12), bad)
    assert moments.counts == (0, 0)  # nothing half-added
    moments.update_class(torch.zeros(2, 2, 12), 0)
    with pytest.raises(AusteerError, match="both classes"):
        fit_probes(moments)


# ============================================================================ probes
def separable_data(g, dirs, separable, n):
    """Per head: on ``separable`` heads the classes lie at +-2 along ``dirs`` (noise removed there); elsewhere pure noise."""

    def draw(sign):
        noise = torch.randn(n, *dirs.shape, generator=g, dtype=torch.float64)
        noise = noise - (noise * dirs).sum(-1, keepdim=True) * dirs * separable[..., None]
        x = noise + sign * 2.0 * dirs * separable[..., None] + 3.0
        return x.reshape(n, dirs.shape[0], -1)

    return draw(1.0), draw(-1.0)


def test_probe_separates_and_accuracy_counts():
    g = torch.Generator().manual_seed(1)
    L, H, D = 2, 3, 4
    dirs = torch.nn.functional.normalize(torch.randn(L, H, D, generator=g, dtype=torch.float64), dim=-1)
    separable = torch.tensor([[True, True, True], [True, False, False]])
    train_pos, train_neg = separable_data(g, dirs, separable, 40)
    moments = HeadMoments(L, H, D)
    moments.update(train_pos, train_neg)
    probe = fit_probes(moments, ridge=0.01)

    # The closed form: w = (Sigma_pooled + ridge * tr(Sigma)/D * I)^-1 (mu_p - mu_n), bias at the midpoint.
    Ph, Nh = train_pos.view(-1, L, H, D), train_neg.view(-1, L, H, D)
    for l in range(L):
        for h in range(H):
            mp, mn = Ph[:, l, h].mean(0).numpy(), Nh[:, l, h].mean(0).numpy()
            cp, cn = Ph[:, l, h].numpy() - mp, Nh[:, l, h].numpy() - mn
            sigma = (cp.T @ cp + cn.T @ cn) / 78
            w = np.linalg.solve(sigma + 0.01 * np.trace(sigma) / D * np.eye(D), mp - mn)
            assert np.allclose(probe.weight[l, h].numpy(), w, atol=1e-10)
            assert np.isclose(float(probe.bias[l, h]), -w @ (mp + mn) / 2, atol=1e-10)

    # Separable heads classify training and fresh data perfectly; noise heads do not.
    val_pos, val_neg = separable_data(g, dirs, separable, 25)
    for X, label in ((train_pos, True), (train_neg, False), (val_pos, True), (val_neg, False)):
        assert (probe.predict(X)[:, separable] == label).all()

    counter = ProbeAccuracy(probe)
    counter.update(val_pos[:10], val_neg[:7])
    counter.update(val_pos[10:], val_neg[7:])
    # Direct computation, one example and one head at a time.
    correct = np.zeros((L, H), dtype=np.int64)
    for label, X in ((1, val_pos), (0, val_neg)):
        for x in X.view(-1, L, H, D):
            for l in range(L):
                for h in range(H):
                    score = float(x[l, h] @ probe.weight[l, h] + probe.bias[l, h])
                    correct[l, h] += (score > 0) == bool(label)
    assert counter.tensors["correct"].tolist() == correct.tolist()
    assert counter.tensors["total"].tolist() == [[50] * H] * L
    assert torch.allclose(counter.accuracy(), torch.tensor(correct / 50.0))
    assert (counter.accuracy()[separable] == 1).all() and (counter.accuracy()[~separable] < 0.9).all()
    # ...so the top heads by validation accuracy are the separable ones.
    layers, heads = select_heads(counter, 4)
    assert sorted(zip(layers.tolist(), heads.tolist())) == [(0, 0), (0, 1), (0, 2), (1, 0)]

    # Merge, reduce and state-dict round trip of the integer counts.
    a, b = ProbeAccuracy(probe), ProbeAccuracy(probe)
    a.update(val_pos[:10], val_neg[:7])
    b.update(val_pos[10:], val_neg[7:])
    assert torch.equal(a.merge_(b).tensors["correct"], counter.tensors["correct"])
    fresh = ProbeAccuracy(probe)
    fresh.load_state_dict(counter.state_dict())
    fresh.reduce_(lambda t: t.mul_(3))
    assert torch.equal(fresh.tensors["total"], 3 * counter.tensors["total"])
    assert torch.equal(fresh.accuracy(), counter.accuracy())
    with pytest.raises(AusteerError, match="no validation"):
        ProbeAccuracy(probe).accuracy()


def test_select_heads_order_and_ties():
    acc = torch.tensor([[0.5, 0.9, 0.9], [0.9, 0.7, 0.5]], dtype=torch.float64)
    layers, heads = select_heads(acc, 4)
    # Ties at 0.9: lower layer, then lower head.
    assert list(zip(layers.tolist(), heads.tolist())) == [(0, 1), (0, 2), (1, 0), (1, 1)]
    sep = torch.tensor([[9.0, 1.0, 2.0], [3.0, 0.0, 8.0]])
    layers, heads = select_heads(acc, 6, separation=sep)
    assert list(zip(layers.tolist(), heads.tolist())) == [(1, 0), (0, 2), (0, 1), (1, 1), (0, 0), (1, 2)]
    # Separations that differ below float32 resolution count as tied.
    sep = torch.tensor([[0.0, 1.0 + 1e-12, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    layers, heads = select_heads(acc, 3, separation=sep)
    assert list(zip(layers.tolist(), heads.tolist())) == [(0, 1), (0, 2), (1, 0)]
    for k in (0, 7):
        with pytest.raises(AusteerError, match="out of range"):
            select_heads(acc, k)


# ============================================================================ ITI
def test_iti_direction_sigma_and_state():
    g = torch.Generator().manual_seed(3)
    L, H, D = 2, 3, 4
    pos, neg = random_acts(g, 11, shift=0.7).float(), random_acts(g, 8, shift=-0.2).float()
    moments = HeadMoments(L, H, D)
    moments.update(pos[:6], neg[:3])
    moments.update(pos[6:], neg[3:])
    direction, sigma = iti_directions(moments)
    P, N = pos.double().numpy().reshape(-1, L, H, D), neg.double().numpy().reshape(-1, L, H, D)
    for l in range(L):
        for h in range(H):
            shift = P[:, l, h].mean(0) - N[:, l, h].mean(0)
            u = shift / np.linalg.norm(shift)
            assert np.allclose(direction[l, h].numpy(), u, atol=1e-12)
            proj = np.concatenate([P[:, l, h], N[:, l, h]]) @ u
            assert np.isclose(float(sigma[l, h]), np.std(proj), atol=1e-10)

    # Validation accuracy handmade: head (1, 2) best, then (0, 0) and (1, 1) tied -> lower layer first.
    accuracy = torch.zeros(L, H, dtype=torch.float64)
    accuracy[1, 2], accuracy[0, 0], accuracy[1, 1] = 0.9, 0.8, 0.8
    layout = FakeLayout(L, H, D, hidden=8)
    state = iti_state(moments, accuracy, layout, k_heads=3, alpha=2.5)
    assert state.method == "iti" and state.alpha == 2.5 and state.sites == ("attention",)
    assert state.metadata["heads"] == [[1, 2], [0, 0], [1, 1]]
    expected_units = list(range(8, 12)) + list(range(0, 4)) + list(range(4, 8))
    assert state.unit.tolist() == expected_units
    assert state.layer.tolist() == [1] * 4 + [0] * 4 + [1] * 4
    for i, (l, h) in enumerate([(1, 2), (0, 0), (1, 1)]):
        want = 2.5 * sigma[l, h] * direction[l, h]
        assert torch.allclose(state.shift[4 * i : 4 * i + 4], want.float(), atol=1e-6)
    assert torch.equal(state.scale, torch.zeros(12)) and state.k == 12
    assert state.metadata["sigma"] == pytest.approx([float(sigma[1, 2]), float(sigma[0, 0]), float(sigma[1, 1])])


# ============================================================================ SADI
def handmade_accumulator(L=2, H=2, D=3, hidden=4, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = {"attention": H * D, "ffn": hidden, "residual": hidden}
    acc = MomentumAccumulator(sizes, n_layers=L)
    pos = {s: torch.randn(n, L, size, generator=g) for s, size in sizes.items()}
    neg = {s: torch.randn(n, L, size, generator=g) for s, size in sizes.items()}
    acc.update(pos, neg)
    return acc, pos, neg, FakeLayout(L, H, D, hidden)


def test_sadi_masks_and_state():
    acc, pos, neg, layout = handmade_accumulator(L=3, H=2, D=3, hidden=5, n=4)
    L, H, D = 3, 2, 3
    # Attention: heads ranked by mean_u |mean_pairs(pos - neg)|, a plain loop.
    diff = pos["attention"].double() - neg["attention"].double()
    md = [[sum(float(diff[i, l, u]) for i in range(4)) / 4 for u in range(H * D)] for l in range(L)]
    head_score = {(l, h): sum(abs(md[l][h * D + j]) for j in range(D)) / D for l in range(L) for h in range(H)}
    assert torch.allclose(
        sadi_head_scores(acc, layout),
        torch.tensor([[head_score[l, h] for h in range(H)] for l in range(L)], dtype=torch.float64),
    )
    best = sorted(head_score, key=lambda lh: (-head_score[lh], lh))[:2]
    expected = torch.zeros(L, H * D, dtype=torch.bool)
    for l, h in best:
        expected[l, h * D : (h + 1) * D] = True
    assert torch.equal(sadi_mask(acc, layout, site="attention", k=2), expected)

    state = sadi_state(acc, layout, site="attention", k_heads=2, delta=3.0)
    assert state.method == "sadi" and state.alpha == 3.0 and state.k == 2 * D
    assert state.metadata["heads"] == [list(b) for b in best]
    for l, u, s in zip(state.layer.tolist(), state.unit.tolist(), state.scale.tolist()):
        assert expected[l, u]
        assert s == (3.0 if md[l][u] >= 0 else -3.0)
    assert torch.equal(state.shift, torch.zeros(state.k))
    uniform = sadi_state(acc, layout, site="attention", k_heads=2, delta=3.0, sign="uniform")
    assert torch.equal(uniform.scale, torch.full((2 * D,), 3.0)) and uniform.coordinates() == state.coordinates()

    # FFN: single units ranked by |mean difference|.
    diff = (pos["ffn"].double() - neg["ffn"].double()).mean(0)
    ranked = sorted(((l, u) for l in range(L) for u in range(5)), key=lambda lu: (-abs(float(diff[lu])), lu))[:4]
    expected = torch.zeros(L, 5, dtype=torch.bool)
    for l, u in ranked:
        expected[l, u] = True
    assert torch.equal(sadi_mask(acc, layout, site="ffn", k=4), expected)
    state = sadi_state(acc, layout, site="ffn", k_units=4, delta=0.5)
    assert list(zip(state.layer.tolist(), state.unit.tolist())) == ranked
    assert state.scale.tolist() == [0.5 if float(diff[l, u]) >= 0 else -0.5 for l, u in ranked]
    assert state.momentum.tolist() == acc.momentum("ffn")[state.layer, state.unit].tolist()

    with pytest.raises(AusteerError, match="k_heads"):
        sadi_state(acc, layout, site="attention", delta=1.0)
    with pytest.raises(AusteerError, match="out of range"):
        sadi_state(acc, layout, site="ffn", k_units=16, delta=1.0)
    with pytest.raises(AusteerError, match="sign handling"):
        sadi_state(acc, layout, site="ffn", k_units=1, delta=1.0, sign="abs")


def test_sadi_tie_breaking_is_positional():
    acc = MomentumAccumulator({"attention": 4, "ffn": 2}, n_layers=2)
    d = torch.tensor([[[1.0, -1.0, 1.0, 1.0], [-1.0, 1.0, 2.0, 0.0]]])  # head scores: [[1, 1], [1, 1]]
    acc.update(
        {"attention": d, "ffn": torch.ones(1, 2, 2)}, {"attention": torch.zeros_like(d), "ffn": torch.zeros(1, 2, 2)}
    )
    layout = FakeLayout(2, 2, 2, hidden=2)
    state = sadi_state(acc, layout, site="attention", k_heads=3, delta=1.0)
    assert state.metadata["heads"] == [[0, 0], [0, 1], [1, 0]]
    assert state.scale.tolist() == [1.0, -1.0, 1.0, 1.0, -1.0, 1.0]


# ============================================================================ CAA
def residual_last_token(model, layout, tok, text):
    """Independent oracle: each decoder layer's output at the last token, one text alone: ``(layers, hidden)``."""
    box = {}

    def keep(i):
        def hook(_module, _args, output):
            box[i] = (output if torch.is_tensor(output) else output[0])[0, -1].double().clone()

        return hook

    handles = [module.register_forward_hook(keep(i)) for i, module in enumerate(layout.site("residual").modules)]
    try:
        with torch.no_grad():
            model(**tok([text], return_tensors="pt"))
    finally:
        for h in handles:
            h.remove()
    return torch.stack([box[i] for i in range(layout.n_layers)])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_caa_vector_matches_plain_loop(arch):
    model = make_model(arch).double()
    tok = make_tokenizer()
    layout = locate_units(model)
    pairs = make_pairs(7)
    acc = accumulate_momentum(model, tok, pairs, sites=["residual"], batch_size=3, layout=layout)
    total = torch.zeros(layout.n_layers, layout.site("residual").size, dtype=torch.float64)
    for p, n in pairs:  # a plain loop, one text at a time
        total += residual_last_token(model, layout, tok, p) - residual_last_token(model, layout, tok, n)
    for layer in range(layout.n_layers):
        vector = total[layer] / len(pairs)
        assert torch.allclose(caa_vector(acc, layer), vector, atol=1e-9)
        state = caa_state(acc, layout, layer, 1.5)
        assert state.method == "caa" and state.alpha == 1.5 and state.sites == ("residual",)
        assert state.unit.tolist() == list(range(32)) and set(state.layer.tolist()) == {layer}
        assert torch.allclose(state.shift.double(), 1.5 * vector, atol=1e-6)
        assert torch.equal(state.scale, torch.zeros(32)) and state.k == 32
    with pytest.raises(AusteerError, match="out of range"):
        caa_state(acc, layout, layout.n_layers, 1.0)


def test_caa_candidate_layers():
    assert caa_candidate_layers(30) == [6, 9, 12, 15, 17, 20]
    assert caa_candidate_layers(3) == [0, 1]  # fractions x 2 = .4, .6, .8, 1, 1.2, 1.4 -> 0, 1
    assert caa_candidate_layers(11, [0.0, 0.5, 1.0]) == [0, 5, 10]
    with pytest.raises(AusteerError, match=r"\[0, 1\]"):
        caa_candidate_layers(4, [1.5])
    acc, *_ = handmade_accumulator()
    with pytest.raises(AusteerError, match="residual"):
        caa_vector(MomentumAccumulator({"ffn": 2}, 1), 0)
    assert caa_vector(acc, 1).shape == (4,)


# ============================================================================ block-level AUSteer
def test_block_austeer_picks_whole_blocks():
    L, H, D, hidden = 2, 3, 2, 4
    acc = MomentumAccumulator({"attention": H * D, "ffn": hidden}, n_layers=L)

    # 4 pairs; a unit with m = s * c / 4 has d = s on c pairs and d = 0 on the others.
    def d_for(m_table):
        return torch.tensor(
            [
                [[math.copysign(1.0, m) if i < round(abs(m) * 4) else 0.0 for m in layer] for layer in m_table]
                for i in range(4)
            ]
        )

    m_attn = [[0.5, 0.75, 1.0, 1.0, 0.5, -0.5], [-1.0, -1.0, 0.75, 0.5, -0.75, 0.75]]
    m_ffn = [[0.75, 0.75, 0.75, 1.0], [0.5, 0.5, -0.5, 0.5]]
    da, df = d_for(m_attn), d_for(m_ffn)
    acc.update({"attention": da, "ffn": df}, {"attention": torch.zeros_like(da), "ffn": torch.zeros_like(df)})
    assert acc.momentum("attention").tolist() == m_attn and acc.momentum("ffn").tolist() == m_ffn
    layout = FakeLayout(L, H, D, hidden)
    # Head scores (mean |m|): L0 = [.625, 1, .5], L1 = [1, .625, .75]; ffn layers: [.8125, .5].
    ranking = rank_blocks(acc, layout, ["attention", "ffn"])
    assert ranking.blocks() == [
        ("attention", 0, 1),
        ("attention", 1, 0),
        ("ffn", 0, -1),
        ("attention", 1, 2),
        ("attention", 0, 0),
        ("attention", 1, 1),
        ("attention", 0, 2),
        ("ffn", 1, -1),
    ]
    assert ranking.score.tolist() == [1.0, 1.0, 0.8125, 0.75, 0.625, 0.625, 0.5, 0.5]

    state = block_austeer_state(acc, layout, k_blocks=3, alpha=2.0, sites=["attention", "ffn"])
    assert state.method == "austeer_block" and state.sites == ("attention", "ffn")
    assert state.coordinates() == [
        ("attention", 0, 2),
        ("attention", 0, 3),
        ("attention", 1, 0),
        ("attention", 1, 1),
        ("ffn", 0, 0),
        ("ffn", 0, 1),
        ("ffn", 0, 2),
        ("ffn", 0, 3),
    ]
    expected_m = [1.0, 1.0, -1.0, -1.0, 0.75, 0.75, 0.75, 1.0]
    assert state.momentum.tolist() == expected_m
    assert state.scale.tolist() == [2.0 * m for m in expected_m]
    assert torch.equal(state.shift, torch.zeros(8)) and state.k == 8

    ffn_only = block_austeer_state(acc, layout, k_blocks=1, alpha=1.0, sites=["ffn"])
    assert ffn_only.coordinates() == [("ffn", 0, u) for u in range(hidden)]
    with pytest.raises(AusteerError, match="out of range"):
        block_austeer_state(acc, layout, k_blocks=3, alpha=1.0, sites=["ffn"])


# ============================================================================ every method on a tiny model
@pytest.fixture(scope="module", params=["llama", "gemma2", "gpt2"])
def fitted(request):
    arch = request.param
    model = make_model(arch)
    tok = make_tokenizer()
    layout = locate_units(model)
    train, val = make_pairs(10, seed=1), make_pairs(6, seed=2)
    acc = accumulate_momentum(model, tok, train, sites=["attention", "ffn", "residual"], batch_size=5, layout=layout)
    moments = accumulate_head_moments(model, tok, train, batch_size=5, layout=layout)
    accuracy = accumulate_probe_accuracy(model, tok, val, fit_probes(moments), batch_size=4, layout=layout)
    return arch, model, tok, layout, acc, moments, accuracy


def build(method, fitted, strength):
    arch, _model, _tok, layout, acc, moments, accuracy = fitted
    hyper = {
        "iti": {"k_heads": 3},
        "sadi": {"site": "attention", "k_heads": 2},
        "caa": {"layer": 1},
        "austeer_block": {"k_blocks": 2, "sites": ("attention",)},
    }[method]
    hyper[STRENGTH_KEY[method]] = strength
    return baseline_state(
        method, layout, acc=acc, moments=moments, accuracy=accuracy, base_model=f"tiny-{arch}", **hyper
    )


def test_head_moments_from_model_match_reader(fitted):
    _arch, _model, _tok, layout, acc, moments, accuracy = fitted
    # Sums of the attention site agree with the momentum accumulator's (same last-token reads).
    sums = moments.tensors["sum"].view(2, layout.n_layers, -1)
    assert torch.allclose(sums[0], acc.tensors["attention.sum_pos"], atol=1e-4)
    assert torch.allclose(sums[1], acc.tensors["attention.sum_neg"], atol=1e-4)
    assert moments.counts == (10, 10) and int(accuracy.tensors["total"][0, 0]) == 12


@pytest.mark.parametrize("method", METHODS)
def test_states_apply_save_load_and_rescale(method, fitted, tmp_path):
    arch, model, tok, layout, *_ = fitted
    big = {"iti": 40.0, "sadi": 8.0, "caa": 6.0, "austeer_block": 8.0}[method]
    state = build(method, fitted, big)
    assert state.method == method and state.alpha == big and state.base_model == f"tiny-{arch}"
    json.dumps(state.metadata)
    expected_k = {
        "iti": 3 * layout.head_dim,
        "sadi": 2 * layout.head_dim,
        "caa": layout.site("residual").size,
        "austeer_block": 2 * layout.head_dim,
    }[method]
    assert state.k == expected_k

    batch = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = model(**batch).logits
    with state.apply(model), torch.no_grad():
        steered = model(**batch).logits
    assert not torch.allclose(plain, steered, atol=1e-4)

    folder = state.save_pretrained(tmp_path / method)
    assert json.loads((folder / CONFIG_NAME).read_text())["method"] == method
    loaded = SteeringState.from_pretrained(folder)
    assert loaded.method == method and loaded.metadata == json.loads(json.dumps(state.metadata))
    fresh = make_model(arch)
    with loaded.apply(fresh), torch.no_grad():
        assert torch.equal(fresh(**batch).logits, steered)

    # Linear in the strength: fitting with 2x equals with_alpha(2x), which doubles scale and shift.
    double = build(method, fitted, 2 * big)
    rescaled = state.with_alpha(2 * big)
    assert rescaled.coordinates() == double.coordinates()
    assert torch.allclose(rescaled.scale, 2 * state.scale) and torch.allclose(rescaled.shift, 2 * state.shift)
    assert torch.allclose(rescaled.scale, double.scale, atol=1e-6) and torch.allclose(
        rescaled.shift, double.shift, atol=1e-6
    )
    with rescaled.apply(model), torch.no_grad():
        a = model(**batch).logits
    with state.apply(model, alpha=2 * big), torch.no_grad():
        b = model(**batch).logits
    assert torch.equal(a, b) and not torch.allclose(a, steered, atol=1e-4)


def test_grid_points_build_states(fitted):
    _arch, _model, _tok, layout, acc, moments, accuracy = fitted
    n_heads = layout.n_layers * layout.n_heads
    assert set(METHODS) == {"iti", "sadi", "caa", "austeer_block"} and all(STRENGTH_KEY.values())
    for method in METHODS:
        points = grid_points(method, layout)
        assert points and len(points) == len({json.dumps(p, sort_keys=True) for p in points})
        for point in points:
            assert STRENGTH_KEY[method] in point
            state = baseline_state(method, layout, acc=acc, moments=moments, accuracy=accuracy, **point)
            assert state.method == method and state.alpha == point[STRENGTH_KEY[method]]
    iti = grid_points("iti", layout)
    assert max(p["k_heads"] for p in iti) == min(48, n_heads)  # clipped to the model's heads
    caa_layers = sorted({p["layer"] for p in grid_points("caa", layout)})
    assert caa_layers == caa_candidate_layers(layout.n_layers)
    ffn = grid_points("sadi", layout, {"site": ["ffn"], "k_units": [3, 1000], "delta": [1.0]})
    assert ffn == [
        {"site": "ffn", "k_units": 3, "delta": 1.0},
        {"site": "ffn", "k_units": layout.n_layers * 32, "delta": 1.0},
    ]
    with pytest.raises(AusteerError, match="unknown method"):
        grid_points("repe", layout)


def test_missing_statistics_are_named():
    acc, _, _, layout = handmade_accumulator()
    with pytest.raises(AusteerError, match="ITI needs"):
        baseline_state("iti", layout, acc=acc, k_heads=1, alpha=1.0)
    with pytest.raises(AusteerError, match="needs momentum"):
        baseline_state("caa", layout, layer=0, multiplier=1.0)
    only_ffn = MomentumAccumulator({"ffn": 4}, n_layers=2)
    only_ffn.update({"ffn": torch.ones(1, 2, 4)}, {"ffn": torch.zeros(1, 2, 4)})
    with pytest.raises(AusteerError, match="no 'attention' site"):
        sadi_state(only_ffn, layout, site="attention", k_heads=1, delta=1.0)
    with pytest.raises(AusteerError, match="finite"):
        caa_state(acc, layout, 0, float("nan"))
    with pytest.raises(AusteerError, match="whole number"):
        sadi_state(acc, layout, site="ffn", k_units=1.5, delta=1.0)
    assert caa_state(acc, layout, np.int64(1), 1.0).layer.tolist() == [1] * 4  # numpy integers are fine
