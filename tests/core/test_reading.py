"""Reading units at the last token: positions, padding on either side."""

from __future__ import annotations

import pytest
import torch

from austeer_pl import (
    ActivationReader,
    locate_units,
)
from austeer_pl.core.reading import last_token_index, position_ids_from_mask

from helpers import (
    CORE_ARCHS,
    TEXTS,
    capture_full,
    make_model,
    make_tokenizer,
)


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
