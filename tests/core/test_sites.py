"""Locating activation units on every architecture, and layouts given by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from austeer_pl import (
    AusteerError,
    LayoutSpec,
    locate_units,
)

from helpers import (
    ALL_ARCHS,
    capture_full,
    make_model,
    tiny_config,
)


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
