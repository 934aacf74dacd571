"""W&B for every command: offline unless asked, ``online`` only when a key and the server answer (else
one warning and offline: no 100 s stall), and the result files logged as an artifact."""

from __future__ import annotations

import netrc
import os
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger

from austeer_pl.core.network import unreachable
from austeer_pl.errors import AusteerError

WANDB_MODES = ("offline", "online", "disabled")


def _wandb_key(base_url: str) -> str | None:
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]

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

    base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if _wandb_key(base_url) is None:
        problem = "--wandb_mode online needs a W&B API key (WANDB_API_KEY or `wandb login`) and none is set"
    elif (reason := unreachable(base_url)) is not None:
        problem = f"--wandb_mode online but W&B is unreachable ({reason})"
    else:
        return mode
    if fallback == "error":
        raise AusteerError(f"{problem}; set the key or the network, or use --wandb_mode offline")
    warnings.warn(
        f"{problem}; logging offline instead (sync later with `wandb sync`; --wandb_fallback error makes this an error)",
        stacklevel=2,
    )
    return "offline"


def wandb_logger(mode: str, project: str, run_dir: Path, config: dict[str, Any] | None = None):
    """A Lightning ``WandbLogger`` writing into ``run_dir`` (None when ``mode`` is ``disabled``).

    ``mode`` is passed explicitly: wandb reads ``WANDB_MODE`` only once per process.
    """
    if mode == "disabled":
        return None

    run_dir.mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        project=project, save_dir=str(run_dir), offline=mode == "offline", name=run_dir.name, mode=mode, config=config
    )


def log_result_wandb(
    result: dict[str, Any],
    png: Path,
    json_path: Path,
    *,
    mode: str,
    project: str,
    run_dir: Path,
    scalars: dict[str, float] | None = None,
) -> str | None:
    """Log a result's plot, headline numbers and JSON (as an artifact) to a W&B run; returns its folder."""
    if mode == "disabled":
        return None
    import wandb  # noqa: PLC0415 - W&B only: a slow import

    run_dir.mkdir(parents=True, exist_ok=True)
    name = result.get("analysis", "result")
    config = {k: v for k, v in result.items() if isinstance(v, (str, int, float, bool)) or k in ("block", "unit")}
    run = wandb.init(
        project=project,
        dir=str(run_dir),
        mode=mode,
        name=f"{name}-{run_dir.name}",
        job_type="analysis",
        config=config,
        reinit="finish_previous",
    )
    try:
        run.log({f"{name}/plot": wandb.Image(str(png)), **(scalars or {})})
        artifact = wandb.Artifact(name=f"analysis-{name}-{run.id}", type="analysis")
        artifact.add_file(str(json_path))
        run.log_artifact(artifact)
        folder = str(getattr(run, "dir", run_dir))
    finally:
        run.finish()
    return folder


__all__ = [
    "WANDB_MODES",
    "log_result_wandb",
    "resolve_wandb_mode",
    "wandb_logger",
]
