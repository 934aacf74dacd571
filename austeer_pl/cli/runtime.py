"""The command lines' shared runtime: quiet logging, one-line errors, signals, parsers and devices
(run folders: :mod:`~austeer_pl.cli.rundir`; W&B: :mod:`~austeer_pl.cli.tracking`).

``train.py``, ``evaluate.py`` (also ``--compare``), ``analyze.py``, ``export.py`` and
``generate.py`` use these, so they fail the same way (``error: ...`` on one line, exit status 2),
name their run folders the same way and talk to W&B the same way.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers.utils import logging as hf_logging

from austeer_pl.cli.tracking import WANDB_MODES
from austeer_pl.core.paths import os_error_message
from austeer_pl.errors import AusteerError, SettingError
from austeer_pl.fit.config import BatchConfig
from austeer_pl.tasks.config import DataConfig

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

    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)

    class _DropTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            message = record.getMessage()
            return "litlogger" not in message and "TPU available" not in message

    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.pytorch.accelerators.cuda",
        "lightning.fabric.utilities.seed",
    ):
        logging.getLogger(name).addFilter(_DropTips())
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


class Interrupted(BaseException):
    """A termination signal (SIGTERM, SIGHUP) raised where the program is, like ``KeyboardInterrupt``
    for SIGINT, so that every ``finally`` runs: temporary outputs are removed, nothing half-written stays."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def run_main(fn: Callable[[], Any], flags: Callable[[str], str | None] = lambda setting: f"--{setting}") -> int:
    """Run an entry point: 0 on success; an :class:`AusteerError`, an ``OSError`` (disk, permission)
    or a parser error becomes one ``error:`` line and exit status 2; Ctrl-C (SIGINT) and SIGTERM
    clean up like an error, print one line and exit with 128 + the signal number. A
    :class:`~austeer_pl.errors.SettingError` names the command's flag (``flags(setting)``)."""

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in _SIGNALS:
            previous[signum] = signal.signal(signum, _raise_interrupted)
    try:
        fn()
    except SettingError as err:
        flag = flags(err.setting)
        return fail(err.with_flag(flag) if flag else str(err))
    except AusteerError as err:
        return fail(str(err))
    except OSError as err:
        return fail(os_error_message(err))
    except (KeyboardInterrupt, Interrupted) as stop:
        signum = stop.signum if isinstance(stop, Interrupted) else signal.SIGINT
        print(
            f"error: interrupted by {signal.Signals(signum).name}; outputs are written whole or not at all, so none is half-written",
            file=sys.stderr,
        )
        return 128 + int(signum)
    except SystemExit as stop:  # a parser has printed its one-line error
        if stop.code in (None, 0):
            return 0
        if isinstance(stop.code, int):
            return stop.code
        return fail(str(stop.code))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    return 0


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one ``error: ...; see PROG --help`` line and exit status 2 (every command's parser)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        raise SystemExit(2)


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
    task: str = DataConfig.task
    seed: int = DataConfig.seed
    max_train_pairs: int | None = None
    batch_size: int = BatchConfig.batch_size
    max_length: int | None = None
    chat_template: bool | None = None
    dtype: str | None = None
    device: str | None = None
    cache_dir: str | None = None


def add_placement_options(p) -> None:
    """A base larger than one device or quantised, as ``train.py``'s ``--model.*`` settings of the same names."""
    p.add_argument(
        "--device_map",
        "--model.device_map",
        dest="device_map",
        default=None,
        help="auto, balanced, sequential or a JSON map of module names to devices (GPU index, cpu, disk)",
    )
    p.add_argument(
        "--max_memory",
        "--model.max_memory",
        dest="max_memory",
        default=None,
        help='with --device_map: a JSON map of devices to sizes, e.g. {"0": "20GiB", "cpu": "60GiB"}',
    )
    p.add_argument(
        "--offload_folder",
        "--model.offload_folder",
        dest="offload_folder",
        default=None,
        help="with --device_map: where weights offloaded to disk go",
    )
    p.add_argument(
        "--quantize",
        "--model.quantize",
        dest="quantize",
        default=None,
        help="a quantised base: int8 (torchao, any device), bnb-int8 or bnb-nf4 (bitsandbytes, CUDA)",
    )


def placement_of(args) -> dict[str, Any]:
    """``load_model``'s placement and quantisation keywords from options added by :func:`add_placement_options`."""
    return {key: getattr(args, key, None) for key in ("device_map", "max_memory", "offload_folder", "quantize")}


def add_output_options(p, *, name: str) -> None:
    """The options every analysis shares (batching, model loading, outputs, W&B), with the
    ``--data.*``/``--model.*`` spellings of ``train.py`` as aliases."""
    p.add_argument("--batch_size", "--data.batch_size", dest="batch_size", type=int, default=16)
    p.add_argument("--max_length", "--data.max_length", dest="max_length", type=int, default=None)
    p.add_argument(
        "--chat_template", "--data.chat_template", dest="chat_template", default=None, choices=["auto", "on", "off"]
    )
    p.add_argument("--dtype", "--model.dtype", dest="dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--cache_dir", "--model.cache_dir", dest="cache_dir", default=None)
    p.add_argument("--out", default=None, help=f"JSON result (default: runs/analyses/{name}-TASK.json)")
    p.add_argument("--plot", default=None, help="PNG plot (default: the JSON path with .png)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files at --out/--plot that austeer-pl did not write (its own are replaced freely)",
    )
    p.add_argument(
        "--run_dir", default=None, help=f"folder of the W&B run (default: runs/analyze-{name}-TASK-TIMESTAMP)"
    )
    p.add_argument("--wandb_mode", default=os.environ.get("WANDB_MODE", "offline"), choices=list(WANDB_MODES))
    p.add_argument("--wandb_project", default=os.environ.get("WANDB_PROJECT", "austeer-pl"))


def parse_list(value: Any, name: str, kind: type) -> list:
    """``"10,50"``, ``"[10, 50]"``, ``10`` or ``[10, 50]`` as a list of ``kind``: the one list parser of
    every command (numbers must be finite; one line names the flag and the bad item).

    Example:
        >>> parse_list("0, 1,2.5", "--alphas", float)
        [0.0, 1.0, 2.5]
    """
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [p for p in str(value).strip().strip("[]").replace(" ", ",").split(",") if p]
    what = "whole number" if kind is int else "finite number" if kind is float else "name"
    out = []
    for item in items:
        try:
            parsed = kind(item) if kind is not str else str(item).strip().strip("'\"")
        except (TypeError, ValueError):
            parsed = None
        if parsed is None or (kind is float and not math.isfinite(parsed)):
            raise AusteerError(
                f"{name}: {item!r} is not a {what}; give a comma-separated list such as {'4,8' if kind is not str else 'a,b'}"
            )
        out.append(parsed)
    if not out:
        raise AusteerError(f"{name} is empty; give at least one value")
    return out


def list_type(kind: type, name: str) -> Callable[[str], list]:
    """An argparse ``type=`` that reads a list with :func:`parse_list` (argparse then names the flag)."""

    def convert(text: str) -> list:
        try:
            return parse_list(text, name, kind)
        except AusteerError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix(f"{name}: ")) from None

    convert.__name__ = "list"
    return convert


__all__ = [
    "Interrupted",
    "ModelDataOptions",
    "OneLineParser",
    "accelerator_for",
    "add_output_options",
    "fail",
    "list_type",
    "one_line_parse_error",
    "parse_list",
    "quiet",
    "quiet_fit",
    "run_main",
]
