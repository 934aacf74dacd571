"""``python train.py``: the LightningCLI over :class:`~austeer_pl.lightning.module.AUSteerModule` and
:class:`~austeer_pl.lightning.datamodule.ContrastivePairDataModule`, with its run folder, W&B,
resumable passes and the one-screen summary of the fit.

Bad input prints one ``error: ...`` line naming the flag and exits with status 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerStatus
from rich.console import Console
from rich.table import Table

from austeer_pl.cli.rundir import claim_run_dir
from austeer_pl.cli.runtime import one_line_parse_error, quiet, run_main
from austeer_pl.cli.tracking import resolve_wandb_mode
from austeer_pl.core.memory import check_max_memory, estimate_fit_memory
from austeer_pl.core.models import resolve_dtype
from austeer_pl.core.paths import check_writable_parent, paths_overlap
from austeer_pl.core.state import SteeringState
from austeer_pl.errors import AusteerError
from austeer_pl.fit.config import DATA_GROUPS, MODEL_GROUPS, ModelConfig
from austeer_pl.lightning.datamodule import ContrastivePairDataModule
from austeer_pl.lightning.module import AUSteerModule
from austeer_pl.lightning.strategy import (
    PassCheckpoint,
    check_resume,
    make_strategy,
    pass_settings,
)
from austeer_pl.tasks.schema import split_files


def build_cli(args: Sequence[str] | None = None):
    """Parse ``train.py`` arguments into a LightningCLI with module, data module and trainer."""
    quiet()

    class AusteerCLI(LightningCLI):
        def init_parser(self, **kwargs):
            parser = super().init_parser(**kwargs)

            def error(message: str, ex: Exception | None = None):  # one line, exit status 2
                print(f"error: {one_line_parse_error(message)}", file=sys.stderr)
                parser.exit(2)

            parser.error = error
            return parser

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument(
                "--export_dir",
                type=str | None,
                default=None,
                help="where the steering state is exported (default: RUN_DIR/state)",
            )
            parser.add_argument(
                "--overwrite",
                type=bool,
                default=False,
                help="replace a steering state already at --export_dir (a folder of other files is never replaced)",
            )
            parser.add_argument(
                "--export_anyway",
                type=bool,
                default=False,
                help="export the best steered grid point even when the verdict says steering did not help (default: an empty state that steers nothing)",
            )
            parser.add_argument(
                "--run_dir",
                type=str | None,
                default=None,
                help="folder for logs and checkpoints (default: runs/TASK-TIMESTAMP)",
            )
            parser.add_argument(
                "--ckpt_path",
                type=str | None,
                default=None,
                help="resume from this checkpoint (e.g. RUN_DIR/checkpoints/last.ckpt)",
            )
            parser.add_argument(
                "--checkpoint_every",
                type=int,
                default=50,
                help="write last.ckpt every N batches of the pass (0: only at its end)",
            )
            parser.add_argument(
                "--wandb_mode",
                type=str,
                default=os.environ.get("WANDB_MODE", "offline"),
                help="offline, online or disabled",
            )
            parser.add_argument("--wandb_project", type=str, default=os.environ.get("WANDB_PROJECT", "austeer-pl"))
            parser.add_argument(
                "--wandb_fallback",
                type=str,
                default="offline",
                help="when --wandb_mode online has no API key or W&B is unreachable: offline (log offline, with a warning) or error",
            )
            parser.add_argument(
                "--ddp_timeout", type=float, default=1800.0, help="seconds before a stuck collective fails"
            )

        def instantiate_trainer(self, **kwargs):
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            trainer_cfg = cfg["trainer"]
            if trainer_cfg.get("max_epochs") not in (None, 1):
                raise AusteerError(
                    "fitting is a single pass over the pairs (plus --model.strength_epochs for a learned strength); drop --trainer.max_epochs"
                )
            given = cfg.get("run_dir")
            if given and Path(given).exists() and not Path(given).is_dir():
                raise AusteerError(f"--run_dir {given} is a file; choose a folder path")
            if cfg.get("ckpt_path"):
                check_resume(cfg["ckpt_path"], pass_settings(cfg["model"], cfg["data"]))
            mode = resolve_wandb_mode(cfg["wandb_mode"], cfg["wandb_fallback"])
            if given:
                check_train_outputs(
                    Path(given),
                    Path(cfg.get("export_dir") or Path(given) / "state"),
                    overwrite=bool(cfg.get("overwrite")),
                    inputs=train_inputs(cfg),
                )
            # A new folder for each fit (or the one given, locked while the fit runs); DDP children share it.
            self.run = claim_run_dir("", cfg["data"]["task"], given, inputs=train_inputs(cfg))
            self.run_dir = self.run.path
            self.export_dir = Path(cfg.get("export_dir") or self.run_dir / "state")
            try:
                check_train_outputs(
                    self.run_dir, self.export_dir, overwrite=bool(cfg.get("overwrite")), inputs=train_inputs(cfg)
                )
            except AusteerError:
                self.run.release()
                if not given:
                    (self.run_dir / ".lock").unlink(missing_ok=True)
                    self.run_dir.rmdir()
                raise

            loggers = [CSVLogger(str(self.run_dir), name="logs", version="")]
            if mode != "disabled":
                # `mode` is passed explicitly: wandb reads WANDB_MODE only once per process.
                loggers.insert(
                    0,
                    WandbLogger(
                        project=cfg["wandb_project"],
                        save_dir=str(self.run_dir),
                        offline=mode == "offline",
                        name=self.run_dir.name,
                        mode=mode,
                    ),
                )
            self.loggers = loggers
            self.pass_checkpoint = PassCheckpoint(self.run_dir / "checkpoints", cfg["checkpoint_every"])
            init = self._get(self.config_init, "trainer", default={})
            user_callbacks = init.get("callbacks") or []
            kwargs = dict(kwargs)
            kwargs["logger"] = loggers
            kwargs["callbacks"] = [
                *(user_callbacks if isinstance(user_callbacks, list) else [user_callbacks]),
                self.pass_checkpoint,
            ]
            kwargs["strategy"] = make_strategy(init.get("strategy", "auto"), timeout_s=cfg["ddp_timeout"])
            model_cfg = cfg["model"]
            learned = model_cfg.get("strength", "momentum") != "momentum"
            # Epoch 0 is the momentum pass; a learned strength trains for strength_epochs more.
            kwargs["max_epochs"] = 1 + (int(model_cfg.get("strength_epochs", 0)) if learned else 0)
            kwargs["reload_dataloaders_every_n_epochs"] = 1 if learned else 0
            kwargs["use_distributed_sampler"] = False
            kwargs["num_sanity_val_steps"] = 0
            kwargs["enable_checkpointing"] = False
            return super().instantiate_trainer(**kwargs)

    return AusteerCLI(
        AUSteerModule,
        ContrastivePairDataModule,
        run=False,
        args=list(args) if args is not None else None,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        trainer_defaults={"enable_model_summary": False, "log_every_n_steps": 10},
        parser_kwargs={
            "description": "Fit an AUSteer steering state on contrastive pairs and export it.",
            "default_config_files": [],
        },
    )


_RUN_SUBFOLDERS = ("checkpoints", "logs", "wandb")


def train_inputs(cfg) -> list[str]:
    """The paths ``train.py`` reads: no output may be, hold or lie in one of them."""
    data, model = cfg["data"], cfg["model"]
    files = split_files(data.get("task_files"))
    configs = [str(c) for c in (cfg.get("config") or []) if c is not None]
    return [
        str(data.get("task") or ""),
        *files,
        str(model.get("model_name") or ""),
        str(cfg.get("ckpt_path") or ""),
        *configs,
    ]


def check_train_outputs(run_dir: Path, export_dir: Path, *, overwrite: bool, inputs: Sequence[str] = ()) -> None:
    """Before any work: the export folder may be written, and it does not overlap the run folder
    or an input.

    ``RUN_DIR/state`` (the default) is fine; the run folder itself, a folder that holds it, or one of
    its checkpoint/log folders is not, since exporting replaces the export folder whole.
    """

    run, export = run_dir.absolute().resolve(), export_dir.absolute().resolve()
    if export == run or export in run.parents or any(paths_overlap(export, run / sub) for sub in _RUN_SUBFOLDERS):
        raise AusteerError(
            f"--export_dir {export_dir} overlaps the run folder {run_dir} (its logs and checkpoints would be replaced); "
            "choose an export folder outside it, or RUN_DIR/state"
        )
    SteeringState.output(export_dir, overwrite=overwrite).check(inputs=inputs)
    if run_dir.exists() and not run_dir.is_dir():
        raise AusteerError(f"--run_dir {run_dir} is a file; choose a folder path")
    check_writable_parent(run_dir / "logs", "run folder")


def train(args: Sequence[str] | None = None) -> dict[str, Any]:
    """Run ``train.py``: fit, export on global rank zero, print a summary. Returns the summary."""
    try:
        cli = build_cli(args)
    except (ValueError, RecursionError) as err:  # e.g. a --config YAML with a 5,000-digit number or deep nesting
        detail = " ".join(str(err).split())[:120] or type(err).__name__
        raise AusteerError(
            f"cannot read the arguments or --config file ({type(err).__name__}: {detail}); fix the value"
        ) from None
    try:
        return _fit(cli)
    finally:
        run = getattr(cli, "run", None)
        if run is not None:
            run.release()


def _memory_check(model: ModelConfig, data: Any, announce: bool) -> None:
    """The one-line memory estimate, and an early refusal of a max_memory that cannot hold the fit."""
    estimate = estimate_fit_memory(
        model.model_name,
        dtype=resolve_dtype(model.dtype),
        batch_size=int(data.get("batch_size") or 16),
        max_length=data.get("max_length"),
        cache_dir=model.cache_dir,
        quantize=model.quantize,
    )
    check_max_memory(estimate, model.max_memory, offload_folder=model.offload_folder)
    if estimate is not None and announce:
        print(estimate.line())


def _fit(cli) -> dict[str, Any]:

    trainer, module = cli.trainer, cli.model
    module.export_dir = cli.export_dir
    cfg = cli.config
    module.export_anyway = bool(cfg.get("export_anyway"))
    module.overwrite = bool(cfg.get("overwrite"))
    _memory_check(module.config.model, cli.datamodule.hparams, trainer.is_global_zero)
    try:
        # weights_only explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD overrides only an unset argument.
        trainer.fit(module, datamodule=cli.datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    except SystemExit:
        if trainer.state.status == TrainerStatus.INTERRUPTED:  # Lightning turns Ctrl-C into exit(1)
            raise KeyboardInterrupt from None
        raise
    if module.state is None:
        raise AusteerError(
            "the fit ended before validation chose a state (interrupted, or --trainer.limit_val_batches 0); resume with --ckpt_path RUN_DIR/checkpoints/last.ckpt"
        )
    summary = dict(module.summary)
    summary.update(
        export_dir=str(cli.export_dir),
        run_dir=str(cli.run_dir),
        units=module.state.layers_by_site(),
        k=module.state.k,
        alpha=module.state.alpha,
    )
    if trainer.is_global_zero:
        _log_artifact(cli.loggers, cli.export_dir)
        _print_fit_summary(module, summary)
    return summary


def _criterion_text(criterion: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{-value:.4f}" if criterion == "loss" else f"{value:.4f}"


def _log_artifact(loggers, export_dir: Path) -> None:
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb  # noqa: PLC0415 - W&B only: a slow import

            artifact = wandb.Artifact(name=f"steering-state-{logger.experiment.id}", type="steering-state")
            artifact.add_dir(str(export_dir))
            logger.experiment.log_artifact(artifact)
            logger.experiment.finish()


def _print_fit_summary(module, summary: dict[str, Any]) -> None:

    state = module.state
    table = Table(title="AUSteer fit", show_header=False, title_justify="left")
    table.add_row("base model", state.base_model)
    fit = state.metadata.get("fit", {})
    table.add_row("pairs / fit time", f"{summary.get('n_pairs')} pairs in {summary.get('fit_seconds', 0):.1f} s")
    table.add_row("chosen", f"site={fit.get('site')}  k={state.k}  alpha={state.alpha:g}  sign={state.sign_policy}")
    if state.strength.get("kind", "momentum") != "momentum":
        table.add_row(
            "learned strength",
            f"{state.strength['kind']}: val {fit.get('val_accuracy_momentum_rule', 0):.3f} with alpha*m -> {fit.get('val_accuracy', 0):.3f} learned ({fit.get('strength_loss', 'nll')} loss, best epoch {fit.get('strength_best_epoch')})",
        )
    for site, layers in state.layers_by_site().items():
        counts = {l: int(((state.layer == l) & (state.site_index == state.sites.index(site))).sum()) for l in layers}
        table.add_row(f"{site} units", ", ".join(f"L{l}:{c}" for l, c in counts.items()))
    if summary.get("selection") == "judge":
        verdict = "" if summary.get("beats_unsteered") else "  (no grid point beat unsteered within the fluency budget)"
        table.add_row(
            f"val share judged positive ({fit.get('judge')})",
            f"{summary['val_accuracy_unsteered']:.3f} unsteered -> {summary['val_accuracy']:.3f} steered, perplexity x{summary['perplexity_ratio']:.2f} "
            f"(budget x{fit.get('fluency_budget')}, n={summary['n_val']} prompts){verdict}",
        )
    else:
        verdict = summary.get("verdict") or {}
        best = verdict.get("best") or {}
        table.add_row(
            "val accuracy",
            f"{summary['val_accuracy_unsteered']:.3f} unsteered -> {summary['val_accuracy']:.3f} steered (n={summary['n_val']})",
        )
        if "criterion" in summary:
            table.add_row(
                f"val {summary['criterion']}",
                f"{_criterion_text(summary['criterion'], summary['val_criterion_unsteered'])} unsteered -> "
                f"{_criterion_text(summary['criterion'], summary['val_criterion'])} chosen",
            )
            table.add_row(
                "harm (KL on ordinary text)",
                f"{summary.get('harm_kl', 0):.3f} nats/token (budget {fit.get('harm_budget')})",
            )
            table.add_row(
                "verdict",
                ("steering helps: " if verdict.get("helps") else "steering did not help: ")
                + str(verdict.get("reason", "")),
            )
            if not state.k and best:
                table.add_row(
                    "best steered point",
                    f"site={best.get('site')} k={best.get('k')} alpha={best.get('alpha'):g} (export it with --export_anyway true)",
                )
            learned = summary.get("learned_verdict")
            if learned:
                exported = state.strength.get("kind", "momentum") != "momentum"
                table.add_row(
                    "learned strength verdict",
                    ("helps: " if learned.get("helps") else "did not help: ")
                    + str(learned.get("reason", ""))
                    + (
                        ""
                        if exported or learned.get("helps")
                        else " (the grid's choice is exported; --export_anyway true exports the learned strength)"
                    ),
                )
    Console(stderr=False).print(table)
    # A plain line that scripts can grep, whatever the terminal width.
    if state.k or summary.get("selection") == "judge":
        print(f"steering state exported to {summary['export_dir']}")
    else:
        print(
            f"no steering exported to {summary['export_dir']}: an empty state (0 units); steering did not help on validation"
        )


def train_flag(setting: str) -> str | None:
    """``train.py``'s flag of a setting: ``--model.k``, ``--data.max_length``."""

    for prefix, groups in (("model", MODEL_GROUPS), ("data", DATA_GROUPS)):
        if any(setting == f.name for group in groups for f in fields(group)):
            return f"--{prefix}.{setting}"
    return None


def train_main(argv: Sequence[str] | None = None) -> int:
    """``train.py``: 0 on success, 2 with one ``error: ...`` line on bad input or a disk fault."""
    return run_main(lambda: train(argv), flags=train_flag)
