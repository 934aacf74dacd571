"""austeer-pl: fine-grained activation steering (AUSteer) for causal language models.

The core (this namespace) imports torch, safetensors and transformers only; the Lightning
pipeline lives in :mod:`austeer_pl.lightning.module` and is imported on demand.

Example:
    >>> from austeer_pl import load_model, SteeringState
    >>> model, tokenizer = load_model("smollm2-135m-instruct")
    >>> state = SteeringState.from_pretrained("runs/rotten_tomatoes/state")
    >>> with state.apply(model):
    ...     out = model.generate(**tokenizer("Great film!", return_tensors="pt"), max_new_tokens=5)
"""

from austeer_pl._version import __version__
from austeer_pl.core.embedded import DEFAULT_MODEL
from austeer_pl.core.hooks import EditHandle
from austeer_pl.core.models import load_model
from austeer_pl.core.momentum import MomentumAccumulator
from austeer_pl.core.pairs import accumulate_momentum, fit_state
from austeer_pl.core.reading import ActivationReader
from austeer_pl.core.selection import Selection, select_units
from austeer_pl.core.sites import SITES, LayoutSpec, ModelLayout, locate_units
from austeer_pl.core.state import SteeringState
from austeer_pl.errors import AusteerError

__all__ = [
    "DEFAULT_MODEL",
    "SITES",
    "ActivationReader",
    "AusteerError",
    "EditHandle",
    "LayoutSpec",
    "ModelLayout",
    "MomentumAccumulator",
    "Selection",
    "SteeringState",
    "__version__",
    "accumulate_momentum",
    "fit_state",
    "load_model",
    "locate_units",
    "select_units",
]
