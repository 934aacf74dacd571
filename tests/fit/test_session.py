"""The fit without Lightning: a :class:`~austeer_pl.fit.session.FitSession` driven by a plain loop on one
process exports the state ``train.py`` exports, bit for bit (the weights file byte for byte; the
config's every field but timings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from austeer_pl.cli.train import train_main
from austeer_pl.core.embedded import DEFAULT_MODEL
from austeer_pl.core.models import load_model
from austeer_pl.core.sites import locate_units
from austeer_pl.core.stateio import CONFIG_NAME, WEIGHTS_NAME
from austeer_pl.fit.config import DATA_GROUPS, FitConfig, group_settings
from austeer_pl.fit.data import FitData, input_pins
from austeer_pl.fit.session import FitSession

from helpers import (
    write_less_task,
)

TIMINGS = ("seconds", "package_version")


def _stable(value):
    """The config without what differs between any two runs (timings, the package version)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if not any(word in k for word in TIMINGS)}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def fit_plain(
    model_name: str, model_settings: dict, data_settings: dict, folder: Path, *, export_anyway: bool = False
) -> Path:
    """The fit in plain Python: load, prepare, ``session.run()``, save (what a notebook would write)."""
    config = FitConfig.from_settings({"model_name": model_name, **model_settings})
    data_config, batching = group_settings(DATA_GROUPS, data_settings)
    model, tokenizer = load_model(model_name, dtype=config.model.dtype)
    data = FitData(data_config, batching).prepare(tokenizer)
    state = FitSession(model, tokenizer, locate_units(model), data, config, export_anyway=export_anyway).run()
    state.metadata = {**state.metadata, "inputs": input_pins(data_config.absolute(), model_name, model)}
    return state.save_pretrained(folder)


def fit_with_train_py(model_name: str, model_settings: dict, data_settings: dict, tmp_path: Path, *extra: str) -> Path:
    args = ["--model.model_name", model_name]
    for prefix, settings in (("model", model_settings), ("data", data_settings)):
        for key, value in settings.items():
            args += [f"--{prefix}.{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    export = tmp_path / "train_py"
    assert (
        train_main(
            [*args, *extra, "--export_dir", str(export), "--run_dir", str(tmp_path / "run"), "--wandb_mode", "disabled"]
        )
        == 0
    )
    return export


def assert_same_export(a: Path, b: Path) -> None:
    assert (a / WEIGHTS_NAME).read_bytes() == (b / WEIGHTS_NAME).read_bytes()
    one, two = (json.loads((f / CONFIG_NAME).read_text()) for f in (a, b))
    assert _stable(one) == _stable(two)


@pytest.mark.parametrize("strength", ["momentum", "gate"])
def test_plain_session_exports_what_train_py_exports(strength, tiny_dir, tmp_path):
    task = write_less_task(tmp_path / "less.jsonl", 64)
    model = {"site": ["attention", "ffn"], "k": [2, 4], "alpha": [2.0, 4.0], "strength": strength}
    if strength == "gate":
        model["strength_epochs"] = 2
    data = {"task": str(task), "batch_size": 8, "max_val_examples": 16, "max_test_examples": 8}
    # A gate on a random tiny model rarely beats no steering: export it anyway, the same way on both sides.
    via_cli = fit_with_train_py(str(tiny_dir), model, data, tmp_path, "--export_anyway", "true")
    assert_same_export(via_cli, fit_plain(str(tiny_dir), model, data, tmp_path / "plain", export_anyway=True))


@pytest.mark.real_model
def test_plain_session_equals_train_py_on_the_readme_default(tmp_path):
    """The README's default on the embedded model, with smaller splits and grid (the full default is
    ``scripts/default_state_identity.py``, which checks ``train.py``'s export against the recorded one)."""
    model = {"k": [3, 10], "alpha": [4.0]}
    data = {"max_train_pairs": 16, "max_val_examples": 8, "max_test_examples": 4}
    via_cli = fit_with_train_py(DEFAULT_MODEL, model, data, tmp_path)
    assert_same_export(via_cli, fit_plain(DEFAULT_MODEL, model, data, tmp_path / "plain"))
