"""One quiet, bounded look at whether a remote service answers, before a library retries for minutes.

The hub clients (transformers, datasets) and wandb retry unreachable hosts many times with noisy
output (measured here: 11 attempts over 35 s for the hub, about 100 s for W&B). One TCP connection
attempt with a short timeout tells the same thing in a fraction of a second.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """``None`` when a TCP connection to ``url``'s host and port opens, else a short reason.

    Example:
        >>> unreachable("http://127.0.0.1:9")  # doctest: +SKIP
        '127.0.0.1:9: connection refused'
    """
    parsed = urlparse(url if "://" in url else f"https://{url}")
    host = parsed.hostname or ""
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except TimeoutError:
        return f"{host}:{port}: no answer within {timeout:g} s"
    except socket.gaierror:
        return f"{host}: the name does not resolve (offline?)"
    except ConnectionRefusedError:
        return f"{host}:{port}: connection refused"
    except OSError as err:
        return f"{host}:{port}: {(err.strerror or str(err)).lower()}"


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_offline() -> bool:
    """True when the user told the hub clients to stay offline (they then read only their caches)."""
    truthy = {"1", "true", "yes", "on"}
    return any(
        os.environ.get(name, "").lower() in truthy
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    )
