"""Where the activation units (AUs) of a causal language model live.

An *activation unit* is one dimension of a block's output vector. Three sites are located in
every decoder layer:

* ``attention``: the input of the attention output projection (``o_proj`` and friends), i.e. the
  concatenated per-head outputs: ``n_heads x head_dim`` units. ``head_dim`` need not equal
  ``hidden / n_heads`` (Gemma) and grouped-query attention changes nothing here.
* ``ffn``: the output of the feed-forward (MLP) block, before it joins the residual stream:
  ``hidden_size`` units.
* ``residual``: the decoder layer's output (the residual stream), ``hidden_size`` units; the
  block-level baselines (CAA) steer here.

:func:`locate_units` is the only place that knows module paths. Models it does not know can be
described with a :class:`LayoutSpec`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from austeer_pl.errors import AusteerError

SITES: tuple[str, ...] = ("attention", "ffn", "residual")

# model_type -> (path to the decoder-layer list, attention output projection, FFN module), with
# the two inner paths relative to one decoder layer. These are the architectures that are tested;
# anything else goes through the generic search below, then through a user LayoutSpec.
KNOWN_LAYOUTS: dict[str, tuple[str, str, str]] = {
    "llama": ("model.layers", "self_attn.o_proj", "mlp"),
    "mistral": ("model.layers", "self_attn.o_proj", "mlp"),
    "qwen2": ("model.layers", "self_attn.o_proj", "mlp"),
    "qwen3": ("model.layers", "self_attn.o_proj", "mlp"),
    "gemma": ("model.layers", "self_attn.o_proj", "mlp"),
    "gemma2": ("model.layers", "self_attn.o_proj", "mlp"),
    "gemma3_text": ("model.layers", "self_attn.o_proj", "mlp"),
    "gemma3": ("model.language_model.layers", "self_attn.o_proj", "mlp"),
    "phi3": ("model.layers", "self_attn.o_proj", "mlp"),
    "gpt2": ("transformer.h", "attn.c_proj", "mlp"),
    "gpt_neox": ("gpt_neox.layers", "attention.dense", "mlp"),
    "opt": ("model.decoder.layers", "self_attn.out_proj", "fc2"),
}

_LAYER_CANDIDATES = (
    "model.layers",
    "model.language_model.layers",
    "model.decoder.layers",
    "transformer.h",
    "transformer.layers",
    "gpt_neox.layers",
    "model.transformer.h",
)
_ATTENTION_CANDIDATES = (
    "self_attn.o_proj",
    "self_attn.out_proj",
    "self_attn.dense",
    "attn.c_proj",
    "attn.out_proj",
    "attention.dense",
    "self_attention.dense",
    "attn.o_proj",
)
_FFN_CANDIDATES = ("mlp", "feed_forward", "ffn", "fc2")


@dataclass(frozen=True)
class LayoutSpec:
    """Where to find the units of a model that :func:`locate_units` does not know.

    Args:
        layers: dotted path from the model to its list of decoder layers, e.g. ``"model.layers"``.
        attention: dotted path inside one decoder layer to the attention *output projection*
            (a linear layer whose input is the concatenated head outputs), e.g. ``"self_attn.o_proj"``.
        ffn: dotted path inside one decoder layer to the feed-forward block whose *output* is read,
            e.g. ``"mlp"``.

    Example:
        >>> spec = LayoutSpec(layers="backbone.blocks", attention="mixer.out", ffn="mlp")
    """

    layers: str
    attention: str | None = None
    ffn: str | None = None

    @classmethod
    def from_dict(cls, paths: Mapping[str, str | None]) -> LayoutSpec:
        """The spec a state records (``{"layers", "attention", "ffn"}``)."""
        return cls(layers=str(paths["layers"]), attention=paths.get("attention"), ffn=paths.get("ffn"))


@dataclass(frozen=True)
class Site:
    """One site in every decoder layer.

    Attributes:
        name: one of :data:`SITES`.
        size: number of units per layer.
        modules: the module hooked in each layer.
        reads_input: True when the units are the module's input (attention), False when they are
            its output (ffn, residual).
    """

    name: str
    size: int
    modules: tuple[nn.Module, ...]
    reads_input: bool


@dataclass(frozen=True)
class ModelLayout:
    """The activation units of one model: architecture facts and the modules to hook.

    Attributes:
        architecture: ``config.model_type`` of the model.
        n_layers: number of decoder layers.
        n_heads: attention heads per layer.
        head_dim: units per head at the ``attention`` site.
        sites: the located sites by name.
        layers: the decoder layers themselves.
    """

    architecture: str
    n_layers: int
    n_heads: int
    head_dim: int
    sites: dict[str, Site]
    layers: tuple[nn.Module, ...]

    def site(self, name: str) -> Site:
        if name not in self.sites:
            raise AusteerError(
                f"site '{name}' is not available on this {self.architecture} model; choose from {', '.join(self.sites)}"
            )
        return self.sites[name]

    def n_units(self, sites: tuple[str, ...] | list[str]) -> int:
        return sum(self.site(s).size * self.n_layers for s in sites)


def _get(root: nn.Module, path: str) -> nn.Module | None:
    module: object = root
    for part in path.split("."):
        if not part:
            return None
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if isinstance(module, nn.Module) else None


def _in_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    # transformers' Conv1D (GPT-2) stores its input width as `nx`, weight as (nx, nf).
    nx = getattr(module, "nx", None)
    if isinstance(nx, int):
        return nx
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[1])
    return None


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _unsupported(model: nn.Module, what: str) -> AusteerError:
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    return AusteerError(
        f"cannot locate {what} in a '{kind}' model; pass a LayoutSpec (layers=..., attention=..., ffn=...) "
        f"naming the module paths (on the command line: --model.layout_layers/--model.layout_attention/--model.layout_ffn)"
    )


def locate_units(model: nn.Module, spec: LayoutSpec | None = None) -> ModelLayout:
    """Find the activation units of a transformers causal LM.

    Args:
        model: a causal language model (``*ForCausalLM``) from transformers, or any module whose
            structure ``spec`` describes.
        spec: module paths for a model this function does not know; overrides the built-in table.

    Returns:
        The model's :class:`ModelLayout`.

    Raises:
        AusteerError: when the layers or a site cannot be found; the message says what to set.

    Example:
        >>> layout = locate_units(model)
        >>> layout.site("attention").size  # n_heads * head_dim
        576
    """
    config = _text_config(model)
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or type(model).__name__)
    known = KNOWN_LAYOUTS.get(model_type)

    layer_paths: tuple[str, ...]
    attn_paths: tuple[str | None, ...]
    ffn_paths: tuple[str | None, ...]
    if spec is not None:
        layer_paths, attn_paths, ffn_paths = (spec.layers,), (spec.attention,), (spec.ffn,)
    elif known is not None:
        layer_paths, attn_paths, ffn_paths = (known[0],), (known[1],), (known[2],)
    else:
        layer_paths, attn_paths, ffn_paths = _LAYER_CANDIDATES, _ATTENTION_CANDIDATES, _FFN_CANDIDATES

    layers = next(
        (m for p in layer_paths if (m := _get(model, p)) is not None and isinstance(m, nn.ModuleList) and len(m) > 0),
        None,
    )
    if layers is None:
        raise _unsupported(model, "the decoder layers")
    first = layers[0]

    def find(paths: tuple[str | None, ...]) -> str | None:
        return next((p for p in paths if p and _get(first, p) is not None), None)

    attn_path, ffn_path = find(attn_paths), find(ffn_paths)
    if attn_path is None and ffn_path is None:
        raise _unsupported(model, "the attention output projection or the FFN block")

    n_layers = len(layers)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    sites: dict[str, Site] = {}
    if attn_path is not None:
        found = [_get(layer, attn_path) for layer in layers]
        modules = tuple(m for m in found if m is not None)
        if len(modules) < n_layers:
            raise _unsupported(model, f"'{attn_path}' in every layer")
        size = _in_features(modules[0])
        if size is None:
            raise _unsupported(model, f"the input width of '{attn_path}'")
        sites["attention"] = Site("attention", size, modules, reads_input=True)
    if ffn_path is not None:
        found = [_get(layer, ffn_path) for layer in layers]
        modules = tuple(m for m in found if m is not None)
        if len(modules) < n_layers:
            raise _unsupported(model, f"'{ffn_path}' in every layer")
        ffn_size = hidden
        if ffn_size is None:
            raise _unsupported(model, "the hidden size (config.hidden_size)")
        sites["ffn"] = Site("ffn", int(ffn_size), modules, reads_input=False)
    if hidden is not None:
        sites["residual"] = Site("residual", int(hidden), tuple(layers), reads_input=False)

    n_heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1)
    attn_size = sites["attention"].size if "attention" in sites else int(hidden or 0)
    head_dim = attn_size // n_heads if n_heads and attn_size % n_heads == 0 else attn_size
    return ModelLayout(model_type, n_layers, n_heads, head_dim, sites, tuple(layers))


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"expected a tensor or a tuple starting with one, got {type(value).__name__}")


def register_site_hook(
    site: Site, layer: int, fn: Callable[[torch.Tensor], torch.Tensor | None]
) -> torch.utils.hooks.RemovableHandle:
    """Call ``fn`` on a site's ``(batch, seq, units)`` tensor in one layer.

    ``fn`` may return a replacement tensor (same shape) or ``None`` to leave it (it may also edit
    it in place). The hook hides whether the units are a module's input or output and whether the
    module returns a tuple.
    """
    module = site.modules[layer]
    if site.reads_input:

        def pre_hook(_module, args, kwargs):
            if args:
                new = fn(args[0])
                if new is not None:
                    return (new, *args[1:]), kwargs
                return None
            key = next(iter(kwargs))
            new = fn(kwargs[key])
            if new is not None:
                kwargs = dict(kwargs)
                kwargs[key] = new
                return args, kwargs
            return None

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(_module, _args, output):
        tensor = _first_tensor(output)
        new = fn(tensor)
        if new is None:
            return None
        if isinstance(output, torch.Tensor):
            return new
        return type(output)((new, *output[1:])) if isinstance(output, tuple) else [new, *output[1:]]

    return module.register_forward_hook(hook)
