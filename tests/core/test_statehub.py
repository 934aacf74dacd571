"""Steering states named by hub id: loaded from a real hub cache layout offline; an unreachable hub is one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from austeer_pl import AusteerError, SteeringState, locate_units
from austeer_pl.core.statehub import is_hub_id, push_state_to_hub, resolve_state_dir

from helpers import fitted_state, make_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, repo_id: str, state: SteeringState) -> Path:
    """The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<commit>/files}."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    state.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_hub_ids_and_local_paths():
    assert is_hub_id("me/smollm2-rt") and is_hub_id("Org.Name/state_v1.2")
    for spec in ("runs/rt/state/x", "./state", "/abs/path", "state", "a/../b", "me/"):
        assert not is_hub_id(spec), spec


def test_a_local_folder_wins_over_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = fitted_state(make_model("llama"), k=4)
    state.save_pretrained(tmp_path / "me" / "state")
    assert resolve_state_dir("me/state") == Path("me/state")
    assert SteeringState.from_pretrained("me/state").coordinates() == state.coordinates()


def test_offline_load_from_the_hub_cache_in_process(tmp_path, monkeypatch):
    state = fitted_state(make_model("llama"), k=5)
    hub_cache(tmp_path / "hub", "me/rt-state", state)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    loaded = SteeringState.from_pretrained("me/rt-state", cache_dir=tmp_path / "hub")
    assert loaded.coordinates() == state.coordinates() and torch.equal(loaded.scale, state.scale)


def test_offline_load_with_hf_home_in_a_fresh_process(tmp_path):
    model = make_model("llama")
    state = fitted_state(model, k=5)
    hub_cache(tmp_path / "hf" / "hub", "me/rt-state", state)
    code = (
        "import json, austeer_pl\n"
        "s = austeer_pl.SteeringState.from_pretrained('me/rt-state')\n"
        "print(json.dumps(s.coordinates()))\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [tuple(c) for c in json.loads(out.stdout)] == state.coordinates()
    assert locate_units(model).n_layers == 3


def test_missing_offline_and_unreachable_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AusteerError) as err:
        SteeringState.from_pretrained("me/not-cached", cache_dir=tmp_path / "hub")
    assert "\n" not in str(err.value) and "not in the hub cache" in str(err.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(AusteerError) as err:
        SteeringState.from_pretrained("me/not-cached", cache_dir=tmp_path / "hub")
    assert "\n" not in str(err.value) and "the hub is unreachable" in str(err.value)
    with pytest.raises(AusteerError, match="cannot push to the hub: it is unreachable"):
        push_state_to_hub(fitted_state(make_model("llama"), k=3), "me/new")


def test_a_hub_repo_without_a_state_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    snapshot = hub_cache(tmp_path / "hub", "me/model", fitted_state(make_model("llama"), k=3))
    for name in os.listdir(snapshot):
        os.remove(snapshot / name)
    (snapshot / "README.md").write_text("a model, not a state")
    with pytest.raises(AusteerError) as err:
        SteeringState.from_pretrained("me/model", cache_dir=tmp_path / "hub")
    assert "\n" not in str(err.value)
    shutil.rmtree(tmp_path / "hub")


def test_push_uploads_the_two_files_and_a_card_that_loads_back(tmp_path, monkeypatch):
    import huggingface_hub

    from austeer_pl.core import statehub

    uploaded: dict[str, object] = {}

    class FakeApi:  # records what huggingface_hub would send; the hub itself is not reachable here
        def __init__(self, token=None):
            uploaded["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploaded["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message):
            uploaded["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
            return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr(statehub, "unreachable", lambda url: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    state = fitted_state(make_model("llama"), k=4)
    assert state.push_to_hub("me/rt", token="t", private=True) == "https://hub/me/rt/commit/1"
    assert uploaded["repo"] == ("me/rt", True, True) and uploaded["token"] == "t"
    files = uploaded["files"]
    assert isinstance(files, dict) and set(files) == {"steering_config.json", "steering_state.safetensors", "README.md"}
    assert b'SteeringState.from_pretrained("me/rt")' in files["README.md"]
    hub_cache(tmp_path / "hub", "me/rt", state)  # what a download of that upload holds
    folder = next((tmp_path / "hub").glob("models--me--rt/snapshots/*"))
    for name in ("steering_config.json", "steering_state.safetensors"):
        assert (folder / name).read_bytes() == files[name]
