"""Compare AUSteer with the block-level baselines on one split: ``evaluate.py --compare``.

This module only orchestrates: it parses the comparison's options, runs the one
:class:`~austeer_pl.lightning.module.AUSteerModule` with every requested method of the registry
(:mod:`austeer_pl.methods.registry`) on one :class:`~austeer_pl.lightning.datamodule.ContrastivePairDataModule`,
tests each method's chosen state on the same examples, and writes the report. The methods:

* ``unsteered``: the base model;
* ``iti``, ``sadi``, ``caa``, ``austeer_block``: :mod:`austeer_pl.methods`, each over its
  registered grid (or its quick grid with ``--grid quick``);
* ``austeer``: the module's own ``site x k x alpha`` grid, with the paper's strength rule ``alpha * m``;
* ``austeer_scalar``, ``austeer_gate``: AUSteer's chosen units with a learned strength, trained by
  the same :class:`~austeer_pl.fit.strength.StrengthTrainer` as ``train.py --model.strength`` (the same
  batches, the same tie rule, the same history), so both export the same state.

One momentum pass reads the ``attention``, ``ffn`` and ``residual`` sites once per batch and feeds
every method's statistics; they are summed across processes at the end of the pass, so N
processes give the statistics of one. Validation and test run in Lightning's loops, sharded
across processes; correct counts and predictions are summed exactly.

Fit time. ``fit_seconds`` of a method is the shared pass (counted in full for every method that
uses it), plus ITI's probe pass (ITI only), plus the validation time of the method's own grid; the
unsteered model's is 0. The parts are in ``fit_seconds_parts``. Under DDP each part is the slowest
process's time.

Example:
    >>> report = compare(task="rotten_tomatoes", max_train_pairs=300, max_val_examples=100, grid="quick")
    >>> [(m["name"], round(m["test_accuracy"], 3)) for m in report["methods"]]
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from austeer_pl.cli.compare_baselines import baseline_rows, method_row
from austeer_pl.cli.compare_options import (
    READ_SITES,
    CompareOptions,
    austeer_grid,
    data_kwargs,
    folder_bytes,
    options_from_args,
    side_task_examples,
)
from austeer_pl.cli.rundir import claim_run_dir
from austeer_pl.cli.runtime import (
    accelerator_for,
    quiet,
    quiet_fit,
)
from austeer_pl.cli.tracking import wandb_logger
from austeer_pl.core.embedded import DEFAULT_MODEL
from austeer_pl.core.fileio import json_output, jsonable, write_json_output
from austeer_pl.errors import AusteerError
from austeer_pl.fit.data import input_pins
from austeer_pl.fit.side_effects import off_task, side_effects
from austeer_pl.lightning.datamodule import ContrastivePairDataModule
from austeer_pl.lightning.module import AUSteerModule
from austeer_pl.lightning.strategy import frozen_trainer
from austeer_pl.methods import FITTED, METHODS, get_method

FIT_SECONDS_NOTE = (
    "fit_seconds = shared momentum pass over the training pairs (one forward pass feeding every method's "
    "statistics; counted in full for each method that uses it) + ITI's validation probe pass (ITI only) + "
    "the validation time of the method's own grid (for the learned AUSteer variants: AUSteer's grid plus "
    "their strength training and its validation epochs); 0 for the unsteered model. Under DDP each part is "
    "the slowest process's wall time."
)


def compare(opts: CompareOptions | None = None, **overrides: Any) -> dict[str, Any]:
    """Fit, tune and test every method on one split; write the report and states; return the report.

    Example:
        >>> report = compare(task="rotten_tomatoes", max_train_pairs=300, grid="quick", report="compare.json")
    """
    opts = opts or CompareOptions()
    for key, value in overrides.items():
        if not hasattr(opts, key):
            raise AusteerError(f"unknown comparison option '{key}'")
        setattr(opts, key, value)
    opts.model = opts.model or DEFAULT_MODEL
    quiet()
    side = side_task_examples(opts)  # a side task that cannot be read is one line before any work

    accelerator, devices = accelerator_for(opts.device)
    if opts.devices > 1:
        devices = opts.devices if devices is None else devices
    grids = {
        m: dict(get_method(m).quick_grid if opts.grid == "quick" else get_method(m).grid)
        for m in METHODS
        if get_method(m).points is not None and m != FITTED
    }
    au = austeer_grid(opts)
    for m in grids:  # a control tuned over AUSteer's own grid follows the grid given for AUSteer
        if get_method(m).shares_grid:
            grids[m].update(au)
    data = ContrastivePairDataModule(**data_kwargs(opts))
    learned = {
        key: getattr(opts, key)
        for key in ("strength_epochs", "strength_lr", "strength_loss")
        if getattr(opts, key) is not None
    }
    # The comparison tunes every method with the engine's one pick (also on a behaviour task's pairs),
    # reports each method's best steered point with the verdict beside it, and bounds none of them by
    # the harm budget (block-level methods' grids would mostly fall outside it; their rows would be unsteered).
    module = AUSteerModule(
        model_name=opts.model,
        dtype=opts.dtype,
        cache_dir=opts.cache_dir,
        device_map=opts.device_map,
        max_memory=opts.max_memory,
        offload_folder=opts.offload_folder,
        quantize=opts.quantize,
        sign=opts.sign,
        scoring=opts.scoring,
        selection="accuracy",
        harm_budget=None,
        **au,
        **learned,
    )
    module.use_methods(tuple(m for m in opts.methods if m in METHODS), grids)
    module.export_anyway = True
    run = claim_run_dir("compare", opts.task, opts.run_dir, inputs=[opts.task, opts.model])
    try:
        return _compare(opts, module, data, grids, run.path, accelerator, devices, side)
    finally:
        run.release()


def _compare(opts: CompareOptions, module, data, grids, run_dir: Path, accelerator, devices, side) -> dict[str, Any]:

    logger = wandb_logger(opts.wandb_mode, opts.wandb_project, run_dir, config=jsonable(vars(opts)))
    loggers: Any = [logger] if logger is not None else False
    epochs = 1 + (module.config.strength.strength_epochs if any(get_method(m).learned for m in module.methods) else 0)
    trainer = frozen_trainer(accelerator=accelerator, devices=devices, loggers=loggers, max_epochs=epochs)
    started = time.perf_counter()
    with quiet_fit():
        trainer.fit(module, datamodule=data)
        session = module.session
        if not session.results:
            raise AusteerError("the comparison stopped before the validation grid ran; check the validation split")
        trainer.test(module, datamodule=data, verbose=False)
    test_examples = data.data.splits["test"]
    shared = float(session.summary.get("fit_seconds") or 0.0)
    probe = float(session.timing.get("probe_pass", 0.0))
    entries = []
    export_root = Path(opts.export_dir) if opts.export_dir else None
    scratch = None
    if trainer.is_global_zero:
        scratch = Path(tempfile.mkdtemp(prefix=".compare-states-"))
    try:
        for method in session.methods:
            res = session.results[method]
            state = res.chosen.state
            parts = {"shared_pass": 0.0, "probe_pass": 0.0, "tuning": 0.0}
            state_bytes, state_dir = 0, None
            if state is not None:
                parts = {
                    "shared_pass": shared,
                    "probe_pass": probe if method == "iti" else 0.0,
                    "tuning": res.tuning_seconds - res.training_seconds,
                }
                if get_method(method).learned:
                    parts["strength_training"] = res.training_seconds
                if trainer.is_global_zero:
                    folder = (export_root / method) if export_root else scratch / method
                    if export_root:
                        state.metadata = {
                            **state.metadata,
                            "inputs": input_pins(data.config(), opts.model, session.model, cache_dir=opts.cache_dir),
                        }
                    state.save_pretrained(folder, overwrite=opts.overwrite)
                    state_bytes = folder_bytes(folder)
                    state_dir = str(folder) if export_root else None
            row = method_row(
                method,
                res.chosen.hyper,
                res.val_accuracy,
                res.test_predictions,
                test_examples,
                parts=parts,
                val_seconds=res.tuning_seconds,
                test_seconds=res.test_seconds,
                n_steered=res.chosen.n_steered,
                grid=res.grid,
            )
            row["state_bytes"], row["state_dir"] = state_bytes, state_dir
            entries.append(row)
        # Prompting, calibration and prompting + AUSteer on the same model, processes and examples.
        rows, extra_states, omitted = baseline_rows(session, opts.methods, quick=opts.grid == "quick", shots=opts.shots)
        for row in rows:
            state = extra_states.get(row["name"])
            if state is not None and trainer.is_global_zero and state.k:
                if export_root:
                    pins = input_pins(data.config(), opts.model, session.model, cache_dir=opts.cache_dir)
                    state.metadata = {**state.metadata, "inputs": pins}
                folder = (export_root / row["name"]) if export_root else scratch / row["name"]
                state.save_pretrained(folder, overwrite=opts.overwrite)
                row["state_bytes"], row["state_dir"] = folder_bytes(folder), str(folder) if export_root else None
        entries.extend(rows)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if trainer.is_global_zero:  # each method's cost outside its task, beside its gain
        states = {**{m: session.results[m].chosen.state for m in session.methods}, **extra_states}
        effects = side_effects(
            session.model, session.tokenizer, session.layout, states, chat_template=opts.chat_template
        )
        if side is not None:
            moved = off_task(
                session.model,
                session.tokenizer,
                session.layout,
                states,
                *side,
                chat_template=opts.chat_template,
                batch_size=data.data.batching.eval_batch_size,
                max_length=data.data.config.max_length,
            )
            for name in effects:
                effects[name] = {**effects[name], "off_task": side[0].name, **moved[name]}
        for entry in entries:
            entry["side_effects"] = effects.get(entry["name"])
    total_seconds = time.perf_counter() - started  # the whole comparison: methods, baselines, side effects
    task = data.data.task
    layout = session.layout
    uids = "\n".join(ex.uid for ex in test_examples)
    report = {
        "kind": "compare",
        "task": opts.task,
        "task_name": task.name,
        "split": "test",
        "seed": opts.seed,
        "base_model": opts.model,
        "scoring": session.scoring,
        "grid_preset": opts.grid,
        "grids": jsonable(
            {**{m: grids[m] for m in grids if m in session.methods}, FITTED: module.config.grid.as_grid()}
        ),
        "data": data.config().to_dict(),
        "n_train_pairs": session.accumulator.n,
        "n_val": len(data.data.splits["val"]),  # (the summary has it only when AUSteer ran)
        "n_test": len(test_examples),
        "test_uids_sha256": hashlib.sha256(uids.encode()).hexdigest(),
        "n_units_total": {s: layout.site(s).size * layout.n_layers for s in READ_SITES},
        "shared_pass_seconds": shared,
        "probe_pass_seconds": probe,
        "total_seconds": total_seconds,
        "world_size": trainer.world_size,
        "fit_seconds_note": FIT_SECONDS_NOTE,
        "methods": entries,
        "omitted": omitted,  # asked for, not run: {name: why}
    }
    if trainer.is_global_zero:
        if opts.report:
            write_json_output(json_output(opts.report, "comparison report", overwrite=opts.overwrite), report)
        _log_wandb(loggers, report)
        print_compare_table(report)
    return report


def _log_wandb(loggers, report: dict[str, Any]) -> None:
    for logger in loggers or []:
        if type(logger).__name__ != "WandbLogger":
            continue
        import wandb  # noqa: PLC0415 - W&B only: a slow import

        cols = [
            "method",
            "val_accuracy",
            "test_accuracy",
            "ci_low",
            "ci_high",
            "n_steered_activations",
            "state_bytes",
            "fit_seconds",
        ]
        table = wandb.Table(
            columns=cols, data=[[m["name"] if c == "method" else m[c] for c in cols] for m in report["methods"]]
        )
        exp = logger.experiment
        exp.log(
            {"compare/table": table, **{f"test/{m['name']}_accuracy": m["test_accuracy"] for m in report["methods"]}}
        )
        exp.finish()


def print_compare_table(report: dict[str, Any]) -> None:
    """The comparison as a rich table on stdout."""

    title = f"{report['task_name']}: test n={report['n_test']}, val n={report['n_val']}, {report['n_train_pairs']} training pairs ({report['base_model']})"
    table = Table(title=title, title_justify="left")
    for col, justify in (
        ("method", "left"),
        ("val acc", "right"),
        ("test acc", "right"),
        ("95% CI", "right"),
        ("steered", "right"),
        ("state", "right"),
        ("fit s", "right"),
        ("KL text", "right"),
        ("ppl", "right"),
        ("chosen", "left"),
    ):
        table.add_column(col, justify=justify)
    for m in report["methods"]:
        hyper = ", ".join(
            f"{k}={v if not isinstance(v, list) else '+'.join(map(str, v))}" for k, v in m["hyperparameters"].items()
        )
        table.add_row(
            m["name"],
            f"{m['val_accuracy']:.3f}",
            f"{m['test_accuracy']:.3f}",
            f"[{m['ci_low']:.3f}, {m['ci_high']:.3f}]",
            str(m["n_steered_activations"]),
            _human_bytes(m["state_bytes"]),
            f"{m['fit_seconds']:.1f}",
            *_effects(m.get("side_effects")),
            hyper or "-",
        )
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    for name, why in report.get("omitted", {}).items():
        console.print(f"{name}: not run ({why})", markup=False)


def _effects(effects: dict[str, Any] | None) -> tuple[str, str]:
    """The side-effect cells: KL on ordinary text, perplexity of free generation ("-" where not measured)."""
    if not effects:
        return "-", "-"
    kl, ppl = effects.get("kl_ordinary_text"), effects.get("perplexity")
    return "-" if kl is None else f"{kl:.3f}", "-" if ppl is None else f"{ppl:.1f}"


def _human_bytes(n: int) -> str:
    if n <= 0:
        return "-"
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / 1024 / 1024:.1f} MB"


def compare_main_args(args) -> dict[str, Any]:
    """``evaluate.py --compare``: run :func:`compare` with the parsed arguments."""
    return compare(options_from_args(args))


__all__ = [
    "FIT_SECONDS_NOTE",
    "compare",
    "compare_main_args",
    "print_compare_table",
]
