"""What the Lightning module holds besides its session: the frozen LLM, kept out of its parameters,
and the session's collectives over the module's strategy."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn

from austeer_pl.core.models import load_model
from austeer_pl.core.placement import is_dispatched
from austeer_pl.core.sites import LayoutSpec, ModelLayout, locate_units
from austeer_pl.fit.config import ModelConfig

__all__ = ["FrozenLLM", "StrategyCollectives"]


class StrategyCollectives:
    """A session's :class:`~austeer_pl.fit.collectives.Collectives` over a module's Lightning strategy."""

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module

    @property
    def _trainer(self):
        return self.module._trainer

    @property
    def rank(self) -> int:
        return 0 if self._trainer is None else self._trainer.global_rank

    @property
    def world(self) -> int:
        return 1 if self._trainer is None else self._trainer.world_size

    def _reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        return tensor if self._trainer is None else self._trainer.strategy.reduce(tensor, reduce_op=op)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, "sum")

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, "max")


class FrozenLLM(pl.LightningModule):
    """A Lightning module base that holds a frozen causal LM outside its parameters and ``state_dict``
    (so it is never checkpointed, wrapped by DDP or trained), loaded on first use from
    :meth:`model_config` and moved with the module."""

    def model_config(self) -> ModelConfig:
        raise NotImplementedError

    def _load(self) -> None:
        if self.__dict__.get("_llm") is None:
            cfg = self.model_config()
            model, tokenizer = load_model(cfg.model_name, dtype=cfg.dtype, cache_dir=cfg.cache_dir, **cfg.placement())
            spec = cfg.layout_spec()
            self.__dict__.update(
                _llm=model if is_dispatched(model) else model.to(self.device),  # a device map placed every layer itself
                _tokenizer=tokenizer,
                _layout=locate_units(model, LayoutSpec(**spec) if spec else None),
            )

    @property
    def llm(self) -> nn.Module:
        """The frozen base model. Not a submodule, so it is never checkpointed, wrapped or trained."""
        self._load()
        return self.__dict__["_llm"]

    @property
    def tokenizer(self):
        self._load()
        return self.__dict__["_tokenizer"]

    @property
    def layout(self) -> ModelLayout:
        self._load()
        return self.__dict__["_layout"]

    def _apply(self, fn, *args, **kwargs):
        # Device and dtype moves of the module apply to the frozen model too.
        super()._apply(fn, *args, **kwargs)
        if self.__dict__.get("_llm") is not None and not is_dispatched(self.__dict__["_llm"]):
            self.__dict__["_llm"]._apply(fn, *args, **kwargs)
        return self

    def attach(self, model: nn.Module, tokenizer, layout: ModelLayout | None = None):
        """Use an already loaded model (tests, notebooks) instead of loading the configured one."""
        self.__dict__.update(
            _llm=model.requires_grad_(False).eval(), _tokenizer=tokenizer, _layout=layout or locate_units(model)
        )
        return self
