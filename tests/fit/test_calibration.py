"""The calibration control's offsets: the minimum of the validation log-loss, keyed by answer text or position."""

from __future__ import annotations

import math

import pytest
import torch

from austeer_pl.fit.calibration import choice_keys, fit_offsets, position_leak
from austeer_pl.tasks.schema import TaskExample


def test_offsets_zero_the_log_loss_gradient_with_three_answers():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(200, 3, generator=g, dtype=torch.float64) + torch.tensor([2.0, 0.0, -1.0], dtype=torch.float64)
    answers = torch.randint(0, 3, (200,), generator=g)
    index = torch.arange(3).expand(200, 3)
    offsets = fit_offsets(table, index, answers, 3)
    assert offsets[0] == 0
    probs = (table + offsets).softmax(dim=1)
    share = torch.nn.functional.one_hot(answers, 3).double()
    # The stationarity condition of the convex log-loss: each answer's mean probability is its share.
    assert probs.mean(0).tolist() == pytest.approx(share.mean(0).tolist(), abs=1e-6)
    # The prior shift undoes most of the bias: the calibrated accuracy is no worse here.
    before = table.argmax(1).eq(answers).double().mean()
    after = (table + offsets).argmax(1).eq(answers).double().mean()
    assert after >= before


def test_keys_are_texts_for_one_answer_set_and_positions_otherwise():
    same = [TaskExample("a", ("yes", "no"), 0, "1"), TaskExample("b", ("no", "yes"), 1, "2")]
    keys, (index,) = choice_keys(same)
    assert keys == ["no", "yes"] and index.tolist() == [[1, 0], [0, 1]]
    mixed = [TaskExample("a", ("x", "y", "z"), 0, "1"), TaskExample("b", ("u", "v"), 1, "2")]
    keys, (index,) = choice_keys(mixed)
    assert keys == ["0", "1", "2"] and index.tolist() == [[0, 1, 2], [0, 1, -1]]
    # An example with fewer choices: its missing column is -inf and never predicted.
    table = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -math.inf]], dtype=torch.float64)
    offsets = fit_offsets(table, index, torch.tensor([2, 1]), 3)
    # Row 0 (answer 2) pulls the third offset up; row 1 (answer 1) the second above the first.
    assert torch.isfinite(offsets).all() and (table + offsets[index.clamp(min=0)]).argmax(1).tolist() == [2, 1]


def test_positions_are_refused_when_every_validation_answer_sits_at_one():
    """Free-text choices with the right one always listed first (the ``sentiment`` task, the local-file
    schema): a per-position offset would learn that order and score 1.0 without reading a word."""
    first = [TaskExample(f"p{i}", (f"right {i}", f"wrong {i}"), 0, str(i)) for i in range(6)]
    leak = position_leak(first[:4], first[4:])
    assert leak is not None and "every validation answer is choice 1" in leak
    # What the refusal prevents: the offset of position 0 grows until every example picks it.
    _, (index,) = choice_keys(first)
    table = torch.tensor([[0.0, 1.0]] * 6, dtype=torch.float64)  # the model prefers the wrong answer
    offsets = fit_offsets(table, index, torch.zeros(6, dtype=torch.long), 2)
    assert (table + offsets[index]).argmax(1).tolist() == [0] * 6
    # Positions that vary, and one answer set (keyed by text), are fitted.
    mixed = [TaskExample("a", ("x", "y"), 0, "1"), TaskExample("b", ("u", "v"), 1, "2")]
    assert position_leak(mixed, []) is None
    labels = [TaskExample(f"p{i}", ("yes", "no"), 0, str(i)) for i in range(4)]
    assert position_leak(labels, []) is None
