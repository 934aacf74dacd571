"""austeer-pl: fine-grained activation steering (AUSteer) for causal language models.

The core (this namespace) imports torch, safetensors and transformers only; the Lightning
pipeline lives in :mod:`austeer_pl.lightning` and is imported on demand.

Example:
    >>> from austeer_pl import load_model, SteeringState
    >>> model, tokenizer = load_model("smollm2-135m-instruct")
    >>> state = SteeringState.from_pretrained("runs/rotten_tomatoes/state")
    >>> with state.apply(model):
    ...     out = model.generate(**tokenizer("Great film!", return_tensors="pt"), max_new_tokens=5)
"""

from ._version import __version__
from .errors import AusteerError
from .fit import accumulate_momentum, fit_state
from .models import DEFAULT_MODEL, load_model
from .momentum import MomentumAccumulator
from .reading import ActivationReader
from .selection import Selection, select_units
from .sites import SITES, LayoutSpec, ModelLayout, locate_units
from .hooks import EditHandle
from .steering import SteeringState

__all__ = [
    "__version__",
    "AusteerError",
    "ActivationReader",
    "DEFAULT_MODEL",
    "LayoutSpec",
    "ModelLayout",
    "MomentumAccumulator",
    "SITES",
    "Selection",
    "EditHandle",
    "SteeringState",
    "accumulate_momentum",
    "fit_state",
    "load_model",
    "locate_units",
    "select_units",
]
