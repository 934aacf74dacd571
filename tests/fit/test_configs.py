"""Every shipped YAML config parses against the CLI's typed schema (no model is loaded)."""

from __future__ import annotations

import pytest
import yaml

from austeer_pl.cli.train import build_cli

from helpers import (
    ROOT,
)

ROOT = ROOT
CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs" / "paper").glob("*.yaml"))


def test_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"default", "multi-gpu"} <= names and len(names) >= 4
    paper = [p for p in CONFIGS if p.parent.name == "paper"]
    assert len(paper) == 15  # the 15 model x task settings of the paper code's reproduce.sh
    for path in paper:
        data = yaml.safe_load(path.read_text())["data"]
        assert data["protocol"] == "paper" and 0 < data["paper_accuracy"] < 1, path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_parses(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load(path.read_text())
    for section in ("model", "data"):
        for key, value in (written.get(section) or {}).items():
            assert resolved[section][key] == value, (section, key)


def test_default_config_matches_the_defaults(capsys):
    with pytest.raises(SystemExit):
        build_cli(["--print_config"])
    defaults = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    for section in ("model", "data"):
        for key, value in written[section].items():
            assert defaults[section][key] == value, (section, key)


def test_one_source_for_every_default():
    """The fit's setting groups hold every default; the module, the data module, the registry and
    --compare read them, so no two places can disagree (configs/default.yaml: the test above)."""
    import argparse
    import inspect

    from austeer_pl.cli.compare_options import CompareOptions, options_from_args
    from austeer_pl.fit.config import DATA_GROUPS, MODEL_GROUPS, BatchConfig, defaults
    from austeer_pl.lightning.datamodule import ContrastivePairDataModule
    from austeer_pl.lightning.module import AUSteerModule
    from austeer_pl.methods import FITTED, METHODS, AusteerGrid
    from austeer_pl.tasks.config import DataConfig

    for cls, groups in ((AUSteerModule, MODEL_GROUPS), (ContrastivePairDataModule, DATA_GROUPS)):
        want = defaults(groups)
        params = inspect.signature(cls.__init__).parameters
        missing = sorted(set(want) - set(params))
        assert not missing, f"{cls.__name__} lacks settings {missing}"
        got = {
            name: list(params[name].default) if isinstance(params[name].default, tuple) else params[name].default
            for name in want
        }
        assert got == want, {n: (got[n], want[n]) for n in want if got[n] != want[n]}
    assert {k: list(v) for k, v in METHODS[FITTED].grid.items()} == {
        k: list(v) for k, v in AusteerGrid().as_grid().items()
    }
    # --compare with no flags: the fit's defaults (its None fields mean "the module's default").
    opts = options_from_args(argparse.Namespace(wandb_mode="disabled"))
    assert (opts.task, opts.seed, opts.negatives, opts.batch_size, opts.sign) == (
        DataConfig.task,
        DataConfig.seed,
        DataConfig.negatives,
        BatchConfig.batch_size,
        AusteerGrid.sign,
    )
    assert CompareOptions().sign == AusteerGrid.sign and CompareOptions().negatives == DataConfig.negatives
