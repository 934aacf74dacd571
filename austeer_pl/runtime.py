"""The command lines' shared runtime: quiet logging, one-line errors, run folders, W&B and devices.

``train.py``, ``evaluate.py`` (also ``--compare``), ``analyze.py``, ``export.py`` and
``generate.py`` use these, so they fail the same way (``error: ...`` on one line, exit status 2),
name their run folders the same way and talk to W&B the same way.
"""

from __future__ import annotations

import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AusteerError

RUN_DIR_ENV = "AUSTEER_RUN_DIR"
WANDB_MODES = ("offline", "online", "disabled")

# Messages that say nothing actionable about a frozen single-pass fit.
_NOISE = (
    r".*configure_optimizers.* returned `None`.*",
    r".*The number of training batches .* is smaller than the logging interval.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*`weights_only` was not set.*",
    r".*The anonymous setting has no effect.*",
    r".*does not have many workers which may be a bottleneck.*",
    r".*smaller than the logging interval.*",
    r".*limit_val_batches.*",
    r".*`training_step` returned `None`.*",
    r".*GPU available but not used.*",
    r".*args parameter is intended to run from within Python.*",
)


def quiet() -> None:
    """Silence library chatter that a user cannot act on (progress bars of weight loading, tips)."""
    import logging

    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)

    class _DropTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            message = record.getMessage()
            return "litlogger" not in message and "TPU available" not in message

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.seed"):
        logging.getLogger(name).addFilter(_DropTips())
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def run_main(fn: Callable[[], Any]) -> int:
    """Run an entry point: 0 on success; an :class:`AusteerError`, an ``OSError`` (disk, permission)
    or a parser error becomes one ``error:`` line and exit status 2."""
    from .fileio import os_error_message

    try:
        fn()
    except AusteerError as err:
        return fail(str(err))
    except OSError as err:
        return fail(os_error_message(err))
    except SystemExit as stop:  # a parser has printed its one-line error
        if stop.code in (None, 0):
            return 0
        if isinstance(stop.code, int):
            return stop.code
        return fail(str(stop.code))
    return 0


def one_line_parse_error(message: str, prog: str = "train.py") -> str:
    """jsonargparse's multi-line type error, as one line that names the option, the value and what it takes.

    Example:
        >>> one_line_parse_error('Parser key "data.batch_size":\\n  Expected a int\\n  Given value: abc')
        "--data.batch_size: invalid value 'abc' (expected int); see train.py --help"
    """
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return f"invalid arguments; see {prog} --help"
    key = re.match(r'Parser key "([^"]+)"', lines[0])
    text = "\n".join(lines)
    given = re.search(r"(?:Given|Got) value: (.*)", text)
    if key and given is not None:
        expected = []
        for kind in re.findall(r"Expected a (.+?)(?:\. Got value:.*)?$", text, flags=re.MULTILINE):
            expected.append(re.sub(r"<class '([^']+)'>", r"\1", kind).replace("typing.", "").strip())
        want = f" (expected {' or '.join(dict.fromkeys(expected))})" if expected else ""
        return f"--{key.group(1)}: invalid value {given.group(1).strip()!r}{want}; see {prog} --help"
    return "; ".join(lines) + f"; see {prog} --help"


def task_stem(task: str) -> str:
    """A short folder-safe name for a task spec."""
    path = Path(task)
    stem = path.parent.name if path.name == "task.json" else path.stem if path.suffix else task
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in stem)[:40] or "task"


def run_dir_for(kind: str, task: str, given: str | None = None) -> Path:
    """The run folder: ``given``, else the one a DDP parent chose (``AUSTEER_RUN_DIR``), else
    ``runs/KIND-TASK-TIMESTAMP``; exported to the environment so DDP children share it."""
    prefix = f"{kind}-" if kind else ""
    run_dir = given or os.environ.get(RUN_DIR_ENV) or str(Path("runs") / f"{prefix}{task_stem(task)}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.environ[RUN_DIR_ENV] = run_dir
    return Path(run_dir)


# ---------------------------------------------------------------------------- W&B
def _wandb_key(base_url: str) -> str | None:
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    import netrc
    from urllib.parse import urlparse

    try:
        auth = netrc.netrc(os.environ.get("NETRC")).authenticators(urlparse(base_url).hostname or "")
    except (OSError, netrc.NetrcParseError):
        return None
    return auth[2] if auth else None


def resolve_wandb_mode(mode: str, fallback: str = "offline") -> str:
    """The W&B mode to run with: ``online`` only when a key exists and the server answers quickly.

    Without a key wandb raises, and with a key but no network it blocks about 100 s before failing;
    one short connection attempt decides instead. ``fallback`` is ``offline`` (warn and log offline)
    or ``error`` (one line, exit 2).
    """
    if mode not in WANDB_MODES:
        raise AusteerError(f"--wandb_mode must be offline, online or disabled, not '{mode}'")
    if fallback not in ("offline", "error"):
        raise AusteerError(f"--wandb_fallback must be offline or error, not '{fallback}'")
    if mode != "online":
        return mode
    from .network import unreachable

    base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if _wandb_key(base_url) is None:
        problem = "--wandb_mode online needs a W&B API key (WANDB_API_KEY or `wandb login`) and none is set"
    elif (reason := unreachable(base_url)) is not None:
        problem = f"--wandb_mode online but W&B is unreachable ({reason})"
    else:
        return mode
    if fallback == "error":
        raise AusteerError(f"{problem}; set the key or the network, or use --wandb_mode offline")
    warnings.warn(f"{problem}; logging offline instead (sync later with `wandb sync`; --wandb_fallback error makes this an error)", stacklevel=2)
    return "offline"


def wandb_logger(mode: str, project: str, run_dir: Path, config: dict[str, Any] | None = None):
    """A Lightning ``WandbLogger`` writing into ``run_dir`` (None when ``mode`` is ``disabled``).

    ``mode`` is passed explicitly: wandb reads ``WANDB_MODE`` only once per process.
    """
    if mode == "disabled":
        return None
    from lightning.pytorch.loggers import WandbLogger

    run_dir.mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=project, save_dir=str(run_dir), offline=mode == "offline", name=run_dir.name, mode=mode, config=config)


def log_result_wandb(result: dict[str, Any], png: Path, json_path: Path, *, mode: str, project: str, run_dir: Path,
                     scalars: dict[str, float] | None = None) -> str | None:
    """Log a result's plot, headline numbers and JSON (as an artifact) to a W&B run; returns its folder."""
    if mode == "disabled":
        return None
    import wandb

    run_dir.mkdir(parents=True, exist_ok=True)
    name = result.get("analysis", "result")
    config = {k: v for k, v in result.items() if isinstance(v, (str, int, float, bool)) or k in ("block", "unit")}
    run = wandb.init(project=project, dir=str(run_dir), mode=mode, name=f"{name}-{run_dir.name}", job_type="analysis", config=config, reinit="finish_previous")
    try:
        run.log({f"{name}/plot": wandb.Image(str(png)), **(scalars or {})})
        artifact = wandb.Artifact(name=f"analysis-{name}-{run.id}", type="analysis")
        artifact.add_file(str(json_path))
        run.log_artifact(artifact)
        folder = str(getattr(run, "dir", run_dir))
    finally:
        run.finish()
    return folder


# ---------------------------------------------------------------------------- devices
def accelerator_for(device: str | None) -> tuple[str, Any]:
    """Map ``--device`` (``cpu``, ``cuda``, ``cuda:N``, ``mps``, None) to Lightning's ``(accelerator, devices)``."""
    if device is None:
        return "auto", None
    dev = str(device).strip().lower()
    if dev == "cpu":
        return "cpu", None
    if dev in ("cuda", "gpu"):
        return "gpu", None
    if dev.startswith("cuda:") and dev[5:].isdigit():
        return "gpu", [int(dev[5:])]
    if dev == "mps":
        return "mps", None
    raise AusteerError(f"--device {device!r} is not understood; use cpu, cuda, cuda:N or mps")


class quiet_fit:
    """Silence Lightning's chatter about the frozen single-pass fit (no optimiser, no val batches)."""

    def __enter__(self):
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        for pattern in _NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


@dataclass
class ModelDataOptions:
    """The model and data settings every driver takes (``None``: the pipeline's default)."""

    model: str | None = None
    task: str = "rotten_tomatoes"
    seed: int = 0
    max_train_pairs: int | None = None
    batch_size: int = 16
    max_length: int | None = None
    chat_template: bool | None = None
    dtype: str | None = None
    device: str | None = None
    cache_dir: str | None = None


def add_output_options(p, *, name: str) -> None:
    """The options every analysis shares (batching, model loading, outputs, W&B), with the
    ``--data.*``/``--model.*`` spellings of ``train.py`` as aliases."""
    p.add_argument("--batch_size", "--data.batch_size", dest="batch_size", type=int, default=16)
    p.add_argument("--max_length", "--data.max_length", dest="max_length", type=int, default=None)
    p.add_argument("--chat_template", "--data.chat_template", dest="chat_template", default=None, choices=["auto", "on", "off"])
    p.add_argument("--dtype", "--model.dtype", dest="dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--cache_dir", "--model.cache_dir", dest="cache_dir", default=None)
    p.add_argument("--out", default=None, help=f"JSON result (default: runs/analyses/{name}-TASK.json)")
    p.add_argument("--plot", default=None, help="PNG plot (default: the JSON path with .png)")
    p.add_argument("--run_dir", default=None, help=f"folder of the W&B run (default: runs/analyze-{name}-TASK-TIMESTAMP)")
    p.add_argument("--wandb_mode", default=os.environ.get("WANDB_MODE", "offline"), choices=list(WANDB_MODES))
    p.add_argument("--wandb_project", default=os.environ.get("WANDB_PROJECT", "austeer-pl"))


def jsonable(value: Any) -> Any:
    """Tuples as lists, recursively (JSON reports and W&B configs)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def parse_list(value: Any, name: str, kind: type) -> list:
    """``"10,50"``, ``"[10, 50]"``, ``10`` or ``[10, 50]`` as a list of ``kind``."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [p for p in str(value).strip().strip("[]").replace(" ", ",").split(",") if p]
    out = []
    for item in items:
        try:
            out.append(kind(item) if kind is not str else str(item).strip().strip("'\""))
        except (TypeError, ValueError):
            raise AusteerError(f"{name}: {item!r} is not a {'whole number' if kind is int else 'number' if kind is float else 'name'}") from None
    if not out:
        raise AusteerError(f"{name} is empty; give at least one value")
    return out


__all__ = [
    "ModelDataOptions",
    "RUN_DIR_ENV",
    "WANDB_MODES",
    "accelerator_for",
    "add_output_options",
    "jsonable",
    "fail",
    "log_result_wandb",
    "one_line_parse_error",
    "parse_list",
    "quiet",
    "quiet_fit",
    "resolve_wandb_mode",
    "run_dir_for",
    "run_main",
    "task_stem",
    "wandb_logger",
]
