"""Steering states on the Hugging Face Hub: ``from_pretrained("owner/name")`` and ``push_to_hub``.

A state on the hub is a model repository holding the two files of a saved state (and a model card).
Loading reads them through huggingface_hub's cache (``HF_HOME``, ``HF_HUB_CACHE``), so a state
downloaded once loads offline (``HF_HUB_OFFLINE=1``) like any model. A local folder of that name
always wins over the hub. An unreachable hub with nothing cached is one line, as for models.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from austeer_pl.core.network import hub_endpoint, hub_offline, unreachable
from austeer_pl.core.stateio import CONFIG_NAME, WEIGHTS_NAME
from austeer_pl.errors import AusteerError

__all__ = ["base_model_yaml", "is_hub_id", "push_state_to_hub", "resolve_state_dir"]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")


def is_hub_id(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` reads as a hub repository id (``owner/name``) rather than a local path."""
    text = str(spec)
    return bool(_HUB_ID.fullmatch(text)) and ".." not in text and not text.endswith((".", "-"))


def resolve_state_dir(
    spec: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The local folder of a state: ``spec`` itself, or its hub snapshot when ``spec`` is ``owner/name``
    and no such local folder exists."""
    path = Path(spec).expanduser()
    if path.exists() or not is_hub_id(spec):
        return path
    from huggingface_hub import snapshot_download  # noqa: PLC0415 - only when a state is named by hub id
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError  # noqa: PLC0415 - as above

    reason = None if hub_offline() else unreachable(hub_endpoint())
    try:
        folder = snapshot_download(
            str(spec),
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "README.md"],
            local_files_only=hub_offline() or reason is not None,
        )
    except LocalEntryNotFoundError:
        if reason:
            why = f"the hub is unreachable ({reason})"
        elif hub_offline():
            why = "the hub is off (HF_HUB_OFFLINE)"
        else:
            why = "the hub did not answer"
        raise AusteerError(
            f"no steering state '{spec}': no such local folder, {why} and it is not in the hub cache; "
            "check the path, or download it once online"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        fixes = {401: "log in (hf auth login) or pass a token", 403: "ask for access to the repository"}
        fix = fixes.get(status if isinstance(status, int) else 0, "check the path or the repository name")
        raise AusteerError(
            f"no steering state '{spec}': no such local folder, and the hub refused it ({type(err).__name__}"
            f"{f' {status}' if status else ''}); {fix}"
        ) from None
    found = Path(folder)
    if not (found / CONFIG_NAME).is_file():
        raise AusteerError(
            f"the hub repository '{spec}' holds no steering state ({CONFIG_NAME} is missing); check the name"
        )
    return found


def push_state_to_hub(
    state: Any,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload a steering state (austeer-pl)",
) -> str:
    """Upload ``state`` (its two files and a model card) to the hub model repository ``repo_id``,
    creating it if needed; returns the commit URL.

    Example:
        >>> state.push_to_hub("me/smollm2-rt-austeer")  # later: SteeringState.from_pretrained("me/smollm2-rt-austeer")
    """
    from huggingface_hub import HfApi  # noqa: PLC0415 - only when a state is pushed

    if not is_hub_id(repo_id):
        raise AusteerError(f"'{repo_id}' is not a hub repository id; pass owner/name")
    if hub_offline():
        raise AusteerError("cannot push to the hub: it is off (HF_HUB_OFFLINE); unset it to push")
    reason = unreachable(hub_endpoint())
    if reason:
        raise AusteerError(f"cannot push to the hub: it is unreachable ({reason}); try again when online")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = state.save_pretrained(Path(tmp) / "state")
        (folder / "README.md").write_text(_card(state, repo_id))
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    return str(getattr(info, "commit_url", info))


def base_model_yaml(name: str) -> str:
    """The model card's ``base_model`` line: only for a hub id (a local path would leak and the hub rejects it)."""
    return f"base_model: {json.dumps(name)}\n" if is_hub_id(name) else ""


def _card(state: Any, repo_id: str) -> str:
    fit = state.metadata.get("fit", {}) if isinstance(state.metadata.get("fit"), dict) else {}
    verdict = fit.get("verdict", {}) if isinstance(fit.get("verdict"), dict) else {}
    rows = {
        "base model": state.base_model,
        "method": state.method,
        "steered units (k)": state.k,
        "alpha": state.alpha,
        "sites": ", ".join(state.layers_by_site()),
        "validation accuracy (steered / unsteered)": f"{fit.get('val_accuracy')} / {fit.get('val_accuracy_unsteered')}",
        "verdict": verdict.get("reason"),
    }
    table = "\n".join(f"| {key} | {value} |" for key, value in rows.items() if value not in (None, "", "None / None"))
    return (
        f"---\nlibrary_name: austeer-pl\n{base_model_yaml(state.base_model)}tags:\n- austeer-pl\n- activation-steering\n---\n\n"
        f"# {repo_id}\n\nA steering state of {state.base_model}: {state.k} activation units edited at inference "
        "(AUSteer, arXiv 2602.04428).\n\n"
        f"| | |\n|---|---|\n{table}\n\n"
        "```python\nfrom austeer_pl import SteeringState\n"
        f'state = SteeringState.from_pretrained("{repo_id}")\nwith state.apply(model):\n    ...\n```\n'
    )
