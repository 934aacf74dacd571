"""Global top-k selection of units by momentum: order, policies, bounds."""

from __future__ import annotations

import pytest
import torch

from austeer_pl import (
    AusteerError,
    MomentumAccumulator,
    select_units,
)
from austeer_pl.core.selection import rank_units


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
