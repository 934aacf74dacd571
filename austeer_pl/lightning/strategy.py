"""The Lightning plumbing around the fitting module: a DDP strategy for a frozen model, the pass
checkpoint and the resume check, the site and grid options, and the Trainer of a frozen fit.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy

from austeer_pl.core.output import Output
from austeer_pl.core.paths import os_error_message
from austeer_pl.errors import AusteerError
from austeer_pl.methods.austeer import parse_sites

#: Where a Lightning checkpoint keeps the fit's pass statistics and the settings they were read with.
CHECKPOINT_KEY = "austeer"


class FrozenDDPStrategy(DDPStrategy):
    """DDP that does not wrap a module with nothing to train.

    The momentum pass has no gradients to synchronise (``DistributedDataParallel`` refuses such a
    module): processes only need the process group, their own data shard and the final sum of the
    statistics. A module with trainable parameters is wrapped as usual (without buffer broadcasts).
    """

    strategy_name = "austeer_ddp"

    def configure_ddp(self) -> None:
        if any(p.requires_grad for p in self.model.parameters()):
            super().configure_ddp()


def make_strategy(name: str, *, timeout_s: float = 1800.0):
    """Map ``ddp``-family strategy names to :class:`FrozenDDPStrategy`; others pass through."""
    if not isinstance(name, str):
        return name
    start = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}.get(name)
    if start is None:
        return name
    return FrozenDDPStrategy(start_method=start, timeout=timedelta(seconds=timeout_s), broadcast_buffers=False)


def frozen_trainer(
    *,
    accelerator: str = "auto",
    devices: Any = None,
    loggers: Any = False,
    strategy: str = "auto",
    ddp_timeout: float = 1800.0,
    limit_val_batches: float | int | None = None,
    max_epochs: int = 1,
) -> pl.Trainer:
    """A Trainer for a frozen fit: one pass epoch (plus learned-strength epochs), no checkpoints, no
    sanity check, no distributed sampler (the data module shards without repeats itself)."""
    if devices is None:
        devices = 1
    n_devices = devices if isinstance(devices, int) else (len(devices) if isinstance(devices, list) else 1)
    if strategy == "auto" and n_devices > 1:
        strategy = "ddp"
    return pl.Trainer(
        max_epochs=max_epochs,
        reload_dataloaders_every_n_epochs=1 if max_epochs > 1 else 0,
        accelerator=accelerator,
        devices=devices,
        strategy=make_strategy(strategy, timeout_s=ddp_timeout),
        logger=loggers,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
        log_every_n_steps=10,
        limit_val_batches=limit_val_batches,
    )


class PassCheckpoint(Callback):
    """Writes ``last.ckpt`` every ``every_n_batches`` batches of the momentum pass (atomically).

    ``ModelCheckpoint`` counts optimiser steps, and the momentum pass has none.
    """

    def __init__(self, dirpath: str | Path, every_n_batches: int = 50) -> None:
        self.dirpath = Path(dirpath)
        self.every = int(every_n_batches)

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every > 0 and (batch_idx + 1) % self.every == 0:
            self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.save(trainer)

    def save(self, trainer) -> None:
        """Every rank builds the checkpoint (a collective); rank zero writes it to a temporary file of
        its own and swaps it in. Whether that worked is agreed on by every rank before any raises,
        so a full disk on rank zero never leaves the others waiting in a collective."""
        output = Output(self.last_path, "checkpoint", lambda path: path.suffix == ".ckpt", overwrite=True)
        tmp = output.temporary()
        failure: BaseException | None = None
        try:
            if trainer.is_global_zero:
                self.dirpath.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(tmp if trainer.is_global_zero else self.last_path)  # only rank zero writes
            if trainer.is_global_zero:
                output.place(tmp)
        except (OSError, RuntimeError, AusteerError) as err:
            failure = err
        finally:
            if trainer.is_global_zero:
                tmp.unlink(missing_ok=True)
        failed = trainer.strategy.reduce(
            torch.tensor([1.0 if failure is not None else 0.0], device=trainer.strategy.root_device), reduce_op="max"
        )
        if float(failed.reshape(-1)[0]) > 0:
            if isinstance(failure, AusteerError):
                raise failure
            if isinstance(failure, OSError):
                raise AusteerError(os_error_message(failure, self.last_path)) from None
            if failure is not None and "writ" not in str(failure).lower():
                raise failure
            detail = str(failure).splitlines()[0][:120] if failure is not None else "it failed on another process"
            raise AusteerError(
                f"cannot write the checkpoint {self.last_path} ({detail}); free disk space or choose another --run_dir"
            ) from None


PASS_SETTINGS_DATA = (
    "task",
    "seed",
    "negatives",
    "val_fraction",
    "test_fraction",
    "max_train_pairs",
    "chat_template",
    "max_length",
    "batch_size",
    "protocol",
    "task_files",
)
PASS_SETTINGS_MODEL = ("model_name", "dtype", "site", "layout_layers", "layout_attention", "layout_ffn")


def pass_settings(model_hparams: Mapping[str, Any], data_hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a momentum pass depends on; a checkpoint resumes only under the same ones."""
    data = {key: data_hparams.get(key) for key in PASS_SETTINGS_DATA}
    model = {key: model_hparams.get(key) for key in PASS_SETTINGS_MODEL}
    model["site"] = sorted({s for _, sites in parse_sites(model["site"]) for s in sites})
    return {"data": data, "model": model}


def check_resume(path: str | Path, settings: dict[str, Any]) -> None:
    """Check, before any work, that ``path`` is an austeer-pl checkpoint written under ``settings``.

    It is read with ``weights_only=True`` (explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot
    turn a crafted file into code execution).

    Raises:
        AusteerError: naming what is wrong: a missing, truncated or foreign file, or the first
            setting that differs from the one the checkpoint was written with.
    """
    path = Path(path)
    if not path.is_file():
        raise AusteerError(f"--ckpt_path {path}: no such file; pass RUN_DIR/checkpoints/last.ckpt of the fit to resume")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a checkpoint, or objects weights_only refuses
        detail = " ".join(str(err).split())[:120]
        raise AusteerError(
            f"--ckpt_path {path} cannot be read as a checkpoint ({type(err).__name__}: {detail}); it is truncated or not from train.py: start the fit again"
        ) from None
    saved = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(saved, dict):
        raise AusteerError(
            f"--ckpt_path {path} was not written by austeer-pl's train.py; pass a last.ckpt from a train.py run"
        )
    recorded = saved.get("settings")
    if not isinstance(recorded, dict):
        raise AusteerError(
            f"--ckpt_path {path} records no data and model settings (written by an older austeer-pl); start the fit again"
        )
    for group in ("data", "model"):
        for key, value in settings[group].items():
            before = (recorded.get(group) or {}).get(key)
            if before != value:
                raise AusteerError(
                    f"--ckpt_path {path} was written with --{group}.{key} {before!r}, this run has {value!r}; "
                    "resume with the same settings, or start a new fit without --ckpt_path"
                )


__all__ = [
    "CHECKPOINT_KEY",
    "PASS_SETTINGS_DATA",
    "PASS_SETTINGS_MODEL",
    "FrozenDDPStrategy",
    "PassCheckpoint",
    "check_resume",
    "frozen_trainer",
    "make_strategy",
    "pass_settings",
]
