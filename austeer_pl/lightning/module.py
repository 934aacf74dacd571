"""The Lightning module: the frozen LLM and one :class:`~austeer_pl.fit.session.FitSession`, each
hook one call of the session.

Fitting is one pass over the training pairs (no optimiser) in epoch 0, the validation grid at its
end, and the learned-strength epochs after it. The frozen LLM is held outside the module's
parameters and ``state_dict``, so it is never checkpointed, wrapped by DDP or trained; checkpoints
carry the statistics of the pass only. Reductions go through the strategy
(:class:`~austeer_pl.lightning.frozen.StrategyCollectives`), so N processes compute the state of one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from austeer_pl.errors import AusteerError
from austeer_pl.fit.config import (
    MODEL_GROUPS,
    FitConfig,
    JudgeConfig,
    ModelConfig,
    SelectionConfig,
    StrengthConfig,
    settings_doc,
)
from austeer_pl.fit.data import input_pins
from austeer_pl.fit.session import FitSession
from austeer_pl.lightning.frozen import FrozenLLM, StrategyCollectives
from austeer_pl.lightning.strategy import CHECKPOINT_KEY, pass_settings
from austeer_pl.methods.austeer import AusteerGrid
from austeer_pl.methods.registry import FITTED


class AUSteerModule(FrozenLLM):
    def __init__(  # one keyword per setting of MODEL_GROUPS, defaults read from them (tests/lightning checks both)
        self,
        model_name: str = ModelConfig.model_name,
        dtype: str | None = ModelConfig.dtype,
        cache_dir: str | None = ModelConfig.cache_dir,
        layout_layers: str | None = ModelConfig.layout_layers,
        layout_attention: str | None = ModelConfig.layout_attention,
        layout_ffn: str | None = ModelConfig.layout_ffn,
        device_map: str | None = ModelConfig.device_map,
        max_memory: str | None = ModelConfig.max_memory,
        offload_folder: str | None = ModelConfig.offload_folder,
        quantize: str | None = ModelConfig.quantize,
        # LightningCLI shows and parses list defaults; they are never mutated.
        site: str | list[str] = list(AusteerGrid.site),  # noqa: B006
        k: int | list[int] = list(AusteerGrid.k),  # noqa: B006
        alpha: float | list[float] = list(AusteerGrid.alpha),  # noqa: B006
        sign: str = AusteerGrid.sign,
        token_scope: str = AusteerGrid.token_scope,
        strength: str = StrengthConfig.strength,
        strength_epochs: int = StrengthConfig.strength_epochs,
        strength_lr: float = StrengthConfig.strength_lr,
        strength_loss: str = StrengthConfig.strength_loss,
        kl_weight: float = StrengthConfig.kl_weight,
        patience: int = StrengthConfig.patience,
        gate_layer: int | None = StrengthConfig.gate_layer,
        gate_width: int = StrengthConfig.gate_width,
        scoring: str | None = SelectionConfig.scoring,
        selection: str = SelectionConfig.selection,
        criterion: str = SelectionConfig.criterion,
        halving: bool = SelectionConfig.halving,
        halving_min_examples: int = SelectionConfig.halving_min_examples,
        halving_eta: int = SelectionConfig.halving_eta,
        harm_budget: float | None = SelectionConfig.harm_budget,
        verdict_level: float = SelectionConfig.verdict_level,
        verdict_correction: str = SelectionConfig.verdict_correction,
        replay: bool = SelectionConfig.replay,
        judge: str = JudgeConfig.judge,
        fluency_budget: float = JudgeConfig.fluency_budget,
        max_new_tokens: int = JudgeConfig.max_new_tokens,
        max_judge_prompts: int = JudgeConfig.max_judge_prompts,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = FitConfig.from_settings(
            {k: v for k, v in self.hparams.items() if not k.startswith("_")}
        )  # LightningCLI adds _instantiator
        self.automatic_optimization = False
        self.export_dir = None
        #: Export the best steered grid point even when the verdict says steering did not help (``--export_anyway``).
        self.export_anyway = False
        #: Replace a steering state already at :attr:`export_dir` (``--overwrite``).
        self.overwrite = False
        self.methods: Sequence[str] | None = None
        self.grids: Mapping[str, Any] | None = None
        self.primary: str | None = None
        self.session: FitSession | None = None
        self._pending: dict[str, Any] | None = None

    def use_methods(
        self, methods: Sequence[str], grids: Mapping[str, Any] | None = None, *, primary: str = FITTED
    ) -> AUSteerModule:
        """Fit, tune (and test) these registered methods in the same run (``evaluate.py --compare``)."""
        self.methods, self.grids, self.primary = tuple(methods), grids, primary
        return self

    def model_config(self) -> ModelConfig:
        return self.config.model

    @property
    def state(self):
        """The exported state (after validation chose it)."""
        return None if self.session is None else self.session.state

    @property
    def summary(self) -> dict[str, Any]:
        return {} if self.session is None else self.session.summary

    def _flush(self, *, direct: bool = False) -> None:
        """Log the session's new metrics (to the loggers directly where ``self.log`` is closed)."""
        logs = self.session.take_logs() if self.session is not None else []
        if not direct:
            for name, value in logs:
                self.log(name, value, rank_zero_only=True)
        elif logs and self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(dict(logs), step=self.global_step)

    # -- the hooks: each one call of the session
    def setup(self, stage: str) -> None:
        if self.session is None:
            self.session = FitSession(
                self.llm,
                self.tokenizer,
                self.layout,
                self.trainer.datamodule.data,
                self.config,
                methods=self.methods,
                grids=self.grids,
                primary=self.primary,
                export_anyway=self.export_anyway,
                collectives=StrategyCollectives(self),
            )

    def configure_optimizers(self):
        return None

    def on_train_start(self) -> None:
        self.session.start()
        if self._pending is not None:
            self.session.restore_pass(self._pending)
            self._pending = None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.current_epoch == 0:
            self.session.read(batch)
            return None
        losses = self.session.strength.step(batch)
        if losses is not None:
            self.log_dict({f"fit/strength_{k}": v for k, v in losses.items()}, rank_zero_only=True)
        return None

    def on_train_epoch_end(self) -> None:
        self._flush()

    def on_validation_start(self) -> None:
        # Lightning validates at the end of the training epoch, before on_train_epoch_end.
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking and self.current_epoch == 0:
            self.session.choose()

    def on_validation_epoch_start(self) -> None:
        if self.current_epoch > 0:
            self.session.strength.start_validation()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # Epoch 0's grid is scored in choose (successive halving needs its own order of examples).
        if self.current_epoch > 0:
            self.session.strength.validate(batch["index"])

    def on_validation_epoch_end(self) -> None:
        if (
            self.current_epoch > 0
            and self.session.strength.trainers
            and self.session.strength.end_epoch(self.current_epoch)
        ):
            self.trainer.should_stop = True
        self._flush()

    def on_train_end(self) -> None:
        # Before the strategy's teardown moves the model to the CPU: the learned verdict scores on the device.
        self.session.finish()

    def on_fit_end(self) -> None:
        self.session.finish()
        self._flush(direct=True)
        if self.state is not None and self.export_dir is not None and self.trainer.is_global_zero:
            pins = input_pins(
                self.trainer.datamodule.config(),
                self.config.model.model_name,
                self.llm,
                cache_dir=self.config.model.cache_dir,
            )
            self.state.metadata = {**self.state.metadata, "inputs": pins}
            self.state.save_pretrained(self.export_dir, overwrite=self.overwrite)

    def on_test_epoch_start(self) -> None:
        self.session.start_test()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.session.test_batch(batch["index"])

    def on_test_epoch_end(self) -> None:
        self.session.finish_test()

    # -- checkpoints: the statistics of the pass only
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = self.session.pass_checkpoint()
        dm = self.trainer.datamodule if self._trainer is not None else None
        checkpoint[CHECKPOINT_KEY] = {
            **saved,
            "settings": pass_settings(self.hparams, dm.hparams if dm is not None else {}),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if CHECKPOINT_KEY not in checkpoint:
            raise AusteerError(
                "this checkpoint was not written by austeer-pl's AUSteerModule; pass a last.ckpt from a train.py run"
            )
        if checkpoint[CHECKPOINT_KEY].get("phase") == "strength":
            raise AusteerError(
                "this checkpoint was written during the learned-strength phase, which does not resume; start the fit again "
                "(the momentum pass is fast to redo) or resume from an earlier checkpoint"
            )
        self._pending = checkpoint[CHECKPOINT_KEY]


AUSteerModule.__doc__ = settings_doc(
    "A frozen causal LM and its fit session: the momentum pass over contrastive pairs, the validation grid and the learned-strength phase, "
    "as Lightning hooks around :class:`~austeer_pl.fit.session.FitSession`. ``train.py`` fits AUSteer (and ``--model.strength``'s learned "
    "variant); ``evaluate.py --compare`` calls :meth:`use_methods` to fit every registered method in the same run.",
    MODEL_GROUPS,
)

__all__ = ["AUSteerModule"]
