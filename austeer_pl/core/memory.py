"""Know before loading: about how much memory a fit needs, read from the model's config alone.

The weights are counted exactly (the architecture built on the meta device, no weights read) at the
dtype they will be loaded in; the activations are those of one inference batch (the largest of the
layer's intermediate tensors and eager attention's scores, a few alive at once); the statistics are
the momentum pass's per-unit sums. A ``max_memory`` that cannot hold the weights and one batch
(without disk offload to spill to) is refused in one line before anything is loaded, instead of an
out-of-memory crash minutes in.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Any

import torch

from austeer_pl.core.embedded import DEFAULT_MODEL, ensure_embedded_model
from austeer_pl.core.placement import parse_max_memory
from austeer_pl.errors import AusteerError

__all__ = ["MemoryEstimate", "check_max_memory", "estimate_fit_memory"]

GIB = 1024**3
#: Bytes of momentum statistics per unit: two int64 counts and three float64 sums.
STATISTICS_BYTES_PER_UNIT = 40
#: Activation tensors of the largest size alive at once in one layer's forward (input, output, a temporary).
LIVE_TENSORS = 3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a fit needs per model replica."""

    weights: int
    activations: int
    statistics: int
    batch: str

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.statistics

    def line(self) -> str:
        return (
            f"memory estimate per replica: weights {self.weights / GIB:.2f} GiB + activations {self.activations / GIB:.2f} GiB "
            f"({self.batch}) + statistics {self.statistics / GIB:.3f} GiB = {self.total / GIB:.2f} GiB"
        )


def _config(name: str, cache_dir: Any = None):
    from transformers import AutoConfig  # noqa: PLC0415 - only when estimating

    text = str(name).strip()
    path = pathlib.Path(text).expanduser()
    if text.lower() == DEFAULT_MODEL:
        return AutoConfig.from_pretrained(ensure_embedded_model(cache_dir), trust_remote_code=False)
    if path.is_dir():
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    return AutoConfig.from_pretrained(text, trust_remote_code=False, local_files_only=True)  # the hub cache only


def estimate_fit_memory(
    name: str,
    *,
    dtype: torch.dtype | None = None,
    batch_size: int = 16,
    max_length: int | None = 512,
    n_sites: int = 2,
    cache_dir: Any = None,
    quantize: str | None = None,
) -> MemoryEstimate | None:
    """About how much memory fitting ``name`` needs per replica; None when its config cannot be read
    without loading it (a hub model not in the cache)."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 - only when estimating

    try:
        config = _config(name, cache_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception:  # the estimate is advice: a model it cannot read is loaded (and checked) as usual
        return None
    loaded = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(loaded, str):  # a config records its dtype by name
        loaded = getattr(torch, loaded.replace("torch.", ""), torch.float32)
    itemsize = torch.empty(0, dtype=loaded if isinstance(loaded, torch.dtype) else torch.float32).element_size()
    total = sum(p.numel() for p in model.parameters())
    # A quantised base stores its linear layers' weights in 1 byte (int8) or half a byte (NF4) each.
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) if quantize else 0
    per_linear = {"int8": 1.0, "bnb-int8": 1.0, "bnb-nf4": 0.5}.get(quantize or "", itemsize)
    weights = (total - linear) * itemsize + linear * per_linear
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    inner = int(getattr(text, "intermediate_size", 0) or 4 * hidden)
    heads = int(getattr(text, "num_attention_heads", 0) or 1)
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    seq = int(max_length or 512)  # no max_length: rows as long as the data's; 512 tokens assumed
    rows = 2 * batch_size  # a pair is two sequences
    widest = max(4 * hidden, inner, heads * seq)
    activations = LIVE_TENSORS * rows * seq * widest * 4
    statistics = n_sites * layers * hidden * STATISTICS_BYTES_PER_UNIT * 2  # attention width ~ hidden
    return MemoryEstimate(int(weights), int(activations), int(statistics), f"batch {batch_size} pairs x {seq} tokens")


def check_max_memory(estimate: MemoryEstimate | None, max_memory: Any, *, offload_folder: str | None = None) -> None:
    """Refuse, in one line, a ``max_memory`` that cannot hold the weights and one batch (no disk to spill to)."""
    limits = parse_max_memory(max_memory)
    if estimate is None or limits is None:
        return
    allowed = sum(size for device, size in limits.items() if device != "disk")
    if allowed < estimate.total and not offload_folder:
        raise AusteerError(
            f"max_memory allows {allowed / GIB:.2f} GiB but the fit needs about {estimate.total / GIB:.2f} GiB "
            f"({estimate.line().split(': ', 1)[1]}); raise max_memory, lower --data.batch_size, or let weights go to disk "
            "with --model.offload_folder"
        )
