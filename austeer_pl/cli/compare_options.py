"""``evaluate.py --compare``'s options: :class:`CompareOptions` from the parsed flags, checked through the
fit's own setting groups before any work, and the module and data-module arguments they become."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from austeer_pl.cli.runtime import ModelDataOptions, parse_list, placement_of
from austeer_pl.cli.tracking import resolve_wandb_mode
from austeer_pl.core.embedded import DEFAULT_MODEL
from austeer_pl.core.fileio import json_output
from austeer_pl.core.state import SteeringState
from austeer_pl.errors import AusteerError
from austeer_pl.fit.baselines import PROMPT_BASELINES
from austeer_pl.fit.config import BatchConfig, FitConfig, ModelConfig
from austeer_pl.methods.austeer import AusteerGrid
from austeer_pl.methods.registry import FITTED, GRID_PRESETS, METHODS, UNSTEERED, get_method
from austeer_pl.tasks.config import DataConfig

#: Methods in report order (the registry's order), then the prompting and calibration baselines.
COMPARE_METHODS: tuple[str, ...] = (*METHODS, *PROMPT_BASELINES)
#: Tasks that are the embedded reviews themselves: their side task is none by default.
REVIEW_TASKS = ("rotten_tomatoes", "sentiment")


#: Sites the shared pass reads (ITI's head moments come from ``attention``).
READ_SITES: tuple[str, ...] = ("attention", "ffn", "residual")


def folder_bytes(path: str | os.PathLike) -> int:
    """Total size of the files in a folder (recursively)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


@dataclass
class CompareOptions(ModelDataOptions):
    """Everything ``evaluate.py --compare`` needs (see :func:`options_from_args`).

    ``None`` for a data or grid option means the pipeline's default
    (:class:`~austeer_pl.lightning.module.ContrastivePairDataModule`, :class:`~austeer_pl.lightning.module.AUSteerModule`).
    """

    methods: tuple[str, ...] = COMPARE_METHODS
    grid: str = "default"
    site: list[str] | None = None
    k: list[int] | None = None
    alpha: list[float] | None = None
    sign: str = AusteerGrid.sign
    strength_epochs: int | None = None
    strength_lr: float | None = None
    strength_loss: str | None = None
    negatives: str = DataConfig.negatives
    max_val_examples: int | None = None
    max_test_examples: int | None = None
    eval_batch_size: int | None = None
    scoring: str | None = None
    devices: int = 1
    report: str | None = None
    export_dir: str | None = None
    overwrite: bool = False
    run_dir: str | None = None
    wandb_mode: str = "offline"
    wandb_project: str = "austeer-pl"
    device_map: str | None = None
    max_memory: str | None = None
    offload_folder: str | None = None
    quantize: str | None = None
    shots: tuple[int, ...] | None = None
    side_task: str | None = "auto"
    side_examples: int = 200


def side_task_examples(opts: CompareOptions):
    """``(task, examples)`` of the comparison's side task (None: none): ``--side_task``, else rotten_tomatoes
    unless the compared task is made of the same reviews; its test split under its own seed, capped."""
    spec = opts.side_task
    if spec == "auto":
        spec = None if str(opts.task).strip().lower() in REVIEW_TASKS else "rotten_tomatoes"
    if spec is None or str(spec).strip().lower() == "none":
        return None
    try:
        task, splits = DataConfig(task=spec, seed=opts.seed, max_test_examples=opts.side_examples).load(need=("test",))
    except AusteerError as err:
        raise AusteerError(f"--side_task: {err}") from None
    if not splits["test"]:
        raise AusteerError(f"--side_task: {spec!r} left no test examples; choose a task with more rows")
    return task, splits["test"]


def options_from_args(args) -> CompareOptions:
    """Map the parsed ``evaluate.py`` arguments to :class:`CompareOptions` (checking them)."""
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    if g("steering"):
        raise AusteerError("--compare fits its own states; drop --steering")
    if g("split", "test") != "test":
        raise AusteerError("--compare tunes on validation and reports the test split; drop --split")
    if g("scoring") == "both":
        raise AusteerError("--compare scores with one method; choose --scoring loglik or generate")
    # The fit's own settings validate themselves (one source); a bad value is one line naming its flag.
    grid = {"k": parse_list(g("k"), "--k", int), "alpha": parse_list(g("alpha"), "--alpha", float)}
    FitConfig.from_settings(
        {
            **{k: g(k) for k in ("strength_epochs", "strength_lr", "strength_loss", "sign") if g(k) is not None},
            **{k: v for k, v in grid.items() if v},
        }
    )
    DataConfig(
        **{
            k: g(k)
            for k in ("seed", "negatives", "max_train_pairs", "max_val_examples", "max_test_examples", "max_length")
            if g(k) is not None
        }
    )
    BatchConfig(**{k: g(k) for k in ("batch_size", "eval_batch_size") if g(k) is not None})
    placement = placement_of(args)
    ModelConfig(**placement)  # a bad placement or quantisation is one line before any work
    shots = tuple(parse_list(g("shots"), "--shots", int)) if g("shots") else None
    if shots is not None and any(n < 1 for n in shots):
        raise AusteerError(f"--shots must list positive numbers of demonstrations, got {g('shots')}")
    for name in ("limit", "devices", "side_examples"):
        value = g(name)
        if value is not None and value <= 0:
            raise AusteerError(f"--{name} must be positive, got {value}")

    report = g("report")
    reads = [g("task"), g("model")]
    if report:
        json_output(report, "comparison report", overwrite=bool(g("overwrite"))).check(inputs=reads)
    mode = resolve_wandb_mode(
        g("wandb_mode") or os.environ.get("WANDB_MODE", "offline"), g("wandb_fallback") or "offline"
    )
    preset = g("grid") or "default"
    if preset not in GRID_PRESETS:
        raise AusteerError(f"--grid must be one of {', '.join(GRID_PRESETS)}, not '{preset}'")
    methods = tuple(parse_list(g("methods"), "--methods", str)) if g("methods") else COMPARE_METHODS
    bad = [m for m in methods if m not in COMPARE_METHODS]
    if bad:
        raise AusteerError(f"--methods: unknown method(s) {', '.join(bad)}; choose from {', '.join(COMPARE_METHODS)}")
    if g("methods") and "calibrated" in methods and g("scoring") in ("generate", "paper"):
        raise AusteerError(
            f"--methods calibrated fits offsets on choice log-likelihoods, which --scoring {g('scoring')} does not "
            "use; drop calibrated or score with --scoring loglik"
        )
    max_test = g("max_test_examples")
    if g("limit") is not None:
        max_test = g("limit") if max_test is None else min(max_test, g("limit"))
    if g("export_dir"):
        for method in methods:
            if method != UNSTEERED:
                SteeringState.output(Path(g("export_dir")) / method, overwrite=bool(g("overwrite"))).check(inputs=reads)
    chat = {"on": True, "off": False, "auto": None, None: None}[g("chat_template")]
    return CompareOptions(
        task=g("task") or DataConfig.task,
        model=g("model") or DEFAULT_MODEL,
        seed=DataConfig.seed if g("seed") is None else int(g("seed")),
        methods=methods,
        grid=preset,
        site=parse_list(g("site"), "--site", str) if g("site") else None,
        k=grid["k"] or None,
        alpha=grid["alpha"] or None,
        sign=g("sign") or AusteerGrid.sign,
        strength_epochs=g("strength_epochs"),
        strength_lr=g("strength_lr"),
        strength_loss=g("strength_loss"),
        negatives=g("negatives") or DataConfig.negatives,
        max_train_pairs=g("max_train_pairs"),
        max_val_examples=g("max_val_examples"),
        max_test_examples=max_test,
        batch_size=g("batch_size") or BatchConfig.batch_size,
        eval_batch_size=g("eval_batch_size"),
        max_length=g("max_length"),
        chat_template=chat,
        scoring=g("scoring"),
        dtype=g("dtype"),
        device=g("device"),
        devices=g("devices") or 1,
        cache_dir=g("cache_dir"),
        report=report,
        export_dir=g("export_dir"),
        overwrite=bool(g("overwrite")),
        run_dir=g("run_dir"),
        wandb_mode=mode,
        wandb_project=g("wandb_project") or os.environ.get("WANDB_PROJECT", "austeer-pl"),
        shots=shots,
        side_task=g("side_task") or "auto",
        side_examples=g("side_examples") or 200,
        **placement,
    )


def austeer_grid(opts: CompareOptions) -> dict[str, Any]:
    """AUSteer's grid: the options given, else the quick preset (``--grid quick``) or the module's defaults."""
    preset = dict(get_method(FITTED).quick_grid) if opts.grid == "quick" else {}
    out = {
        "site": opts.site or preset.get("site"),
        "k": opts.k or preset.get("k"),
        "alpha": opts.alpha or preset.get("alpha"),
    }
    return {key: value for key, value in out.items() if value is not None}


def data_kwargs(opts: CompareOptions) -> dict[str, Any]:
    out = dict(
        task=opts.task,
        seed=opts.seed,
        negatives=opts.negatives,
        batch_size=opts.batch_size,
        eval_batch_size=opts.eval_batch_size or opts.batch_size,
        chat_template=opts.chat_template,
    )
    for key in ("max_train_pairs", "max_val_examples", "max_test_examples", "max_length"):
        if getattr(opts, key) is not None:
            out[key] = getattr(opts, key)
    return out


__all__ = [
    "COMPARE_METHODS",
    "READ_SITES",
    "CompareOptions",
    "austeer_grid",
    "data_kwargs",
    "folder_bytes",
    "options_from_args",
    "side_task_examples",
]
