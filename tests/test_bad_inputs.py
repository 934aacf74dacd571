"""Bad inputs and faults, one row each: every one ends in one ``error:`` line, exit status 2, and
nothing written or lost.

The table covers what a hostile new user tries (wrong folders, corrupt files, mismatched resumes,
no network, full disks); rows that were already right stay here so that they stay right.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from austeer_pl import SteeringState
from austeer_pl.analyses import analyze_main
from austeer_pl.cli import evaluate_main, train_main
from austeer_pl.errors import AusteerError

from conftest import make_model, make_tokenizer, write_less_task

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- shared fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model folder, a task file, one finished fit (its state and mid-pass checkpoint)."""
    root = tmp_path_factory.mktemp("world")
    tiny = root / "tiny"
    make_model("llama").save_pretrained(tiny)
    make_tokenizer().save_pretrained(tiny)
    task = write_less_task(root / "less.jsonl", 40)
    run = root / "run"
    code = train_main([
        "--model.model_name", str(tiny), "--data.task", str(task), "--model.site", "attention", "--model.k", "[3]", "--model.alpha", "[2]",
        "--data.batch_size", "4", "--checkpoint_every", "1", "--run_dir", str(run), "--export_dir", str(root / "state"),
        "--wandb_mode", "disabled", "--export_anyway", "true",
    ])
    assert code == 0
    return {"root": root, "tiny": tiny, "task": task, "state": root / "state", "ckpt": run / "checkpoints" / "last.ckpt"}


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes (and every folder, as '<dir>')."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def copy_state(world, tmp_path: Path, name: str = "state") -> Path:
    target = tmp_path / name
    shutil.copytree(world["state"], target)
    return target


def rewrite_state(folder: Path, *, config: Callable[[dict], None] | None = None, tensors: Callable[[dict], None] | None = None) -> None:
    """Alter a saved state the way a hand edit would (keeping the checksum consistent, so only the field is wrong)."""
    from safetensors.torch import load_file, save_file

    from austeer_pl.fileio import sha256_file

    cfg = json.loads((folder / "steering_config.json").read_text())
    if tensors is not None:
        data = load_file(str(folder / "steering_state.safetensors"))
        tensors(data)
        save_file(data, str(folder / "steering_state.safetensors"))
        cfg["files"]["steering_state.safetensors"] = sha256_file(folder / "steering_state.safetensors")
    if config is not None:
        config(cfg)
    (folder / "steering_config.json").write_text(json.dumps(cfg))


# ---------------------------------------------------------------------------- the table
@dataclass
class Case:
    """One bad input: ``setup(world, tmp_path, monkeypatch)`` returns ``(main, argv)``."""

    id: str
    setup: Callable
    needle: str
    already_right: bool = False
    env: dict[str, str] = field(default_factory=dict)


def train_args(world, tmp_path, *extra: str) -> list[str]:
    return [
        "--model.model_name", str(world["tiny"]), "--data.task", str(world["task"]), "--model.site", "attention", "--model.k", "[3]", "--model.alpha", "[2]",
        "--data.batch_size", "4", "--run_dir", str(tmp_path / "run"), "--wandb_mode", "disabled", "--export_anyway", "true", *extra,
    ]


def _user_folder(world, tmp_path, mp):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("three years of work")
    return train_main, train_args(world, tmp_path, "--export_dir", str(mine))


def _export_is_run_dir(world, tmp_path, mp):
    return train_main, train_args(world, tmp_path, "--export_dir", str(tmp_path / "run"))


def _export_holds_run_dir(world, tmp_path, mp):
    return train_main, [*train_args(world, tmp_path, "--export_dir", str(tmp_path))]


def _export_in_checkpoints(world, tmp_path, mp):
    return train_main, train_args(world, tmp_path, "--export_dir", str(tmp_path / "run" / "checkpoints"))


def _existing_state_no_overwrite(world, tmp_path, mp):
    copy_state(world, tmp_path, "old")
    return train_main, train_args(world, tmp_path, "--export_dir", str(tmp_path / "old"))


def _export_is_a_file(world, tmp_path, mp):
    (tmp_path / "f").write_text("x")
    return train_main, train_args(world, tmp_path, "--export_dir", str(tmp_path / "f"))


def _readonly_output(world, tmp_path, mp):
    real = os.access
    mp.setattr("austeer_pl.fileio.os.access", lambda path, mode: False if Path(path) == tmp_path else real(path, mode))
    return train_main, train_args(world, tmp_path, "--export_dir", str(tmp_path / "new"))


def _max_length_zero(world, tmp_path, mp):
    return train_main, train_args(world, tmp_path, "--data.max_length", "0")


def _max_pairs_zero(world, tmp_path, mp):
    return train_main, train_args(world, tmp_path, "--data.max_train_pairs", "0")


def _negatives_bogus(world, tmp_path, mp):
    return train_main, train_args(world, tmp_path, "--data.negatives", "most")


def _missing_task(world, tmp_path, mp):
    return train_main, [*train_args(world, tmp_path), "--data.task", str(tmp_path / "missing.jsonl")]


def _bad_jsonl(world, tmp_path, mp):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "choices": ["a", "b"], "answer": 0}\n{"prompt": "y", "choices": ["a"]\n')
    return train_main, [*train_args(world, tmp_path), "--data.task", str(bad)]


def _csv_unterminated_quote(world, tmp_path, mp):
    bad = tmp_path / "bad.csv"
    bad.write_text('prompt,positive,negative\nfine,yes,no\n"never closed,yes,no\nnext,yes,no\n')
    return train_main, [*train_args(world, tmp_path), "--data.task", str(bad)]


def _csv_extra_cells(world, tmp_path, mp):
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,positive,negative\nfine,yes,no\nsplit, by, a comma,no\n")
    return train_main, [*train_args(world, tmp_path), "--data.task", str(bad)]


def _ckpt_missing(world, tmp_path, mp):
    return train_main, train_args(world, tmp_path, "--ckpt_path", str(tmp_path / "none.ckpt"))


def _ckpt_truncated(world, tmp_path, mp):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(world["ckpt"].read_bytes()[:300])
    return train_main, train_args(world, tmp_path, "--ckpt_path", str(cut))


def _ckpt_foreign(world, tmp_path, mp):
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    return train_main, train_args(world, tmp_path, "--ckpt_path", str(other))


def _ckpt_other_seed(world, tmp_path, mp):
    return train_main, train_args(world, tmp_path, "--ckpt_path", str(world["ckpt"]), "--data.seed", "7")


def _ckpt_other_pairs(world, tmp_path, mp):
    return train_main, train_args(world, tmp_path, "--ckpt_path", str(world["ckpt"]), "--data.max_train_pairs", "10")


def _ckpt_other_sites(world, tmp_path, mp):
    return train_main, train_args(world, tmp_path, "--ckpt_path", str(world["ckpt"]), "--model.site", "ffn")


def _ckpt_other_negatives(world, tmp_path, mp):
    return train_main, train_args(world, tmp_path, "--ckpt_path", str(world["ckpt"]), "--data.negatives", "all")


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['AUSTEER_PWNED']}",))


def _ckpt_crafted_pickle(world, tmp_path, mp):
    crafted = tmp_path / "crafted.ckpt"
    mp.setenv("AUSTEER_PWNED", str(tmp_path / "pwned"))
    torch.save({"austeer": _Payload()}, crafted)
    mp.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    return train_main, train_args(world, tmp_path, "--ckpt_path", str(crafted))


def _wandb_online_no_key(world, tmp_path, mp):
    mp.delenv("WANDB_API_KEY", raising=False)
    mp.setenv("NETRC", str(tmp_path / "no-netrc"))
    return train_main, [*train_args(world, tmp_path), "--wandb_mode", "online", "--wandb_fallback", "error"]


def _wandb_online_unreachable(world, tmp_path, mp):
    mp.setenv("WANDB_API_KEY", "x" * 40)
    mp.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    return train_main, [*train_args(world, tmp_path), "--wandb_mode", "online", "--wandb_fallback", "error"]


def _wandb_mode_bogus(world, tmp_path, mp):
    return train_main, [*train_args(world, tmp_path), "--wandb_mode", "sometimes"]


def _max_epochs(world, tmp_path, mp):
    return train_main, train_args(world, tmp_path, "--trainer.max_epochs", "3")


def _k_zero(world, tmp_path, mp):
    return train_main, [*train_args(world, tmp_path), "--model.k", "[0]"]


def _model_missing(world, tmp_path, mp):
    return train_main, [*train_args(world, tmp_path), "--model.model_name", str(tmp_path / "no-model")]


def _model_nan_weights(world, tmp_path, mp):
    broken = tmp_path / "broken"
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(broken)
    make_tokenizer().save_pretrained(broken)
    return train_main, [*train_args(world, tmp_path), "--model.model_name", str(broken)]


def _hub_unreachable(world, tmp_path, mp):
    mp.delenv("HF_HUB_OFFLINE", raising=False)
    mp.delenv("TRANSFORMERS_OFFLINE", raising=False)
    mp.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    return train_main, [*train_args(world, tmp_path), "--model.model_name", "some-org/some-model"]


def _full_disk_at_export(world, tmp_path, mp):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    mp.setattr(safetensors.torch, "save_file", full)
    return train_main, train_args(world, tmp_path, "--export_dir", str(tmp_path / "new"))


# -- evaluate.py
def eval_args(folder: Path, *extra: str) -> list[str]:
    return ["--steering", str(folder), "--limit", "4", *extra]


def _eval_missing_state(world, tmp_path, mp):
    return evaluate_main, eval_args(tmp_path / "none")


def _eval_report_is_folder(world, tmp_path, mp):
    (tmp_path / "reports").mkdir()
    return evaluate_main, eval_args(world["state"], "--report", str(tmp_path / "reports"))


def _state_nan_scale(world, tmp_path, mp):
    folder = copy_state(world, tmp_path)
    rewrite_state(folder, tensors=lambda t: t["scale"].__setitem__(0, float("nan")))
    return evaluate_main, eval_args(folder)


def _state_inf_momentum(world, tmp_path, mp):
    folder = copy_state(world, tmp_path)
    rewrite_state(folder, tensors=lambda t: t["momentum"].__setitem__(0, float("inf")))
    return evaluate_main, eval_args(folder)


def _state_float_units(world, tmp_path, mp):
    folder = copy_state(world, tmp_path)
    rewrite_state(folder, tensors=lambda t: t.__setitem__("unit", t["unit"].float()))
    return evaluate_main, eval_args(folder)


def _state_2d_unit(world, tmp_path, mp):
    folder = copy_state(world, tmp_path)
    rewrite_state(folder, tensors=lambda t: t.__setitem__("unit", t["unit"].reshape(1, -1)))
    return evaluate_main, eval_args(folder)


def _state_alpha_nan(world, tmp_path, mp):
    folder = copy_state(world, tmp_path)
    rewrite_state(folder, config=lambda c: c.__setitem__("alpha", float("nan")))
    return evaluate_main, eval_args(folder)


def _state_alpha_string(world, tmp_path, mp):
    folder = copy_state(world, tmp_path)
    rewrite_state(folder, config=lambda c: c.__setitem__("alpha", "2"))
    return evaluate_main, eval_args(folder)


def _state_site_sizes_types(world, tmp_path, mp):
    folder = copy_state(world, tmp_path)
    rewrite_state(folder, config=lambda c: c.__setitem__("site_sizes", {"attention": "32"}))
    return evaluate_main, eval_args(folder)


def _state_metadata_list(world, tmp_path, mp):
    folder = copy_state(world, tmp_path)
    rewrite_state(folder, config=lambda c: c.__setitem__("metadata", []))
    return evaluate_main, eval_args(folder)


def _state_version_string(world, tmp_path, mp):
    folder = copy_state(world, tmp_path)
    rewrite_state(folder, config=lambda c: c.__setitem__("format_version", "1"))
    return evaluate_main, eval_args(folder)


def _state_weights_altered(world, tmp_path, mp):
    folder = copy_state(world, tmp_path)
    weights = folder / "steering_state.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    return evaluate_main, eval_args(folder)


def _state_missing_weights(world, tmp_path, mp):
    folder = copy_state(world, tmp_path)
    (folder / "steering_state.safetensors").unlink()
    return evaluate_main, eval_args(folder)


def _state_bad_json(world, tmp_path, mp):
    folder = copy_state(world, tmp_path)
    (folder / "steering_config.json").write_text("{not json")
    return evaluate_main, eval_args(folder)


def _state_other_architecture(world, tmp_path, mp):
    other = tmp_path / "gpt2"
    make_model("gpt2").save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    return evaluate_main, eval_args(world["state"], "--model", str(other))


def _eval_limit_zero(world, tmp_path, mp):
    return evaluate_main, eval_args(world["state"], "--limit", "0")


def _eval_layout_without_layers(world, tmp_path, mp):
    return evaluate_main, eval_args(world["state"], "--layout_ffn", "mlp")


def _eval_full_disk_report(world, tmp_path, mp):
    import austeer_pl.fileio as fileio

    def full(path, obj):
        Path(path).write_text("{")
        raise OSError(errno.ENOSPC, "No space left on device")

    mp.setattr(fileio, "write_json", full)
    return evaluate_main, eval_args(world["state"], "--report", str(tmp_path / "r.json"))


def _compare_export_user_folder(world, tmp_path, mp):
    (tmp_path / "out" / "austeer").mkdir(parents=True)
    (tmp_path / "out" / "austeer" / "notes.txt").write_text("mine")
    return evaluate_main, ["--compare", "--task", str(world["task"]), "--model", str(world["tiny"]), "--methods", "austeer",
                           "--export_dir", str(tmp_path / "out"), "--wandb_mode", "disabled"]


# -- analyze.py
def _analyze_out_is_folder(world, tmp_path, mp):
    (tmp_path / "o").mkdir()
    return analyze_main, ["sweep", "--task", str(world["task"]), "--model", str(world["tiny"]), "--out", str(tmp_path / "o")]


def _analyze_out_is_plot(world, tmp_path, mp):
    return analyze_main, ["sweep", "--task", str(world["task"]), "--model", str(world["tiny"]),
                          "--out", str(tmp_path / "a.json"), "--plot", str(tmp_path / "a.json")]


CASES = [
    Case("export-into-user-folder", _user_folder, "holds other files"),
    Case("export-is-run-folder", _export_is_run_dir, "overlaps the run folder"),
    Case("export-holds-run-folder", _export_holds_run_dir, "overlaps the run folder"),
    Case("export-into-checkpoints", _export_in_checkpoints, "overlaps the run folder"),
    Case("export-existing-state-without-overwrite", _existing_state_no_overwrite, "pass --overwrite"),
    Case("export-is-a-file", _export_is_a_file, "a file is in the way", already_right=True),
    Case("output-not-writable", _readonly_output, "is not writable"),
    Case("max-length-zero", _max_length_zero, "--data.max_length must be an integer of at least 2"),
    Case("max-train-pairs-zero", _max_pairs_zero, "--data.max_train_pairs must be an integer of at least 1"),
    Case("negatives-unknown", _negatives_bogus, "--data.negatives must be one of sample, all"),
    Case("task-file-missing", _missing_task, "missing.jsonl", already_right=True),
    Case("jsonl-bad-row", _bad_jsonl, "bad.jsonl:2", already_right=True),
    Case("csv-unterminated-quote", _csv_unterminated_quote, "bad.csv:3: bad CSV (a quote is opened and never closed)"),
    Case("csv-extra-cells", _csv_extra_cells, "bad.csv:3: 4 cells but the header has 3"),
    Case("ckpt-missing", _ckpt_missing, "none.ckpt: no such file"),
    Case("ckpt-truncated", _ckpt_truncated, "cannot be read as a checkpoint"),
    Case("ckpt-not-austeer", _ckpt_foreign, "was not written by austeer-pl"),
    Case("ckpt-other-seed", _ckpt_other_seed, "--data.seed 0, this run has 7"),
    Case("ckpt-other-pair-cap", _ckpt_other_pairs, "--data.max_train_pairs 256, this run has 10"),
    Case("ckpt-other-sites", _ckpt_other_sites, "--model.site ['attention'], this run has ['ffn']"),
    Case("ckpt-other-negatives", _ckpt_other_negatives, "--data.negatives 'sample', this run has 'all'"),
    Case("ckpt-crafted-pickle", _ckpt_crafted_pickle, "cannot be read as a checkpoint"),
    Case("wandb-online-no-key", _wandb_online_no_key, "needs a W&B API key"),
    Case("wandb-online-unreachable", _wandb_online_unreachable, "W&B is unreachable (127.0.0.1:9: connection refused)"),
    Case("wandb-mode-unknown", _wandb_mode_bogus, "--wandb_mode must be offline, online or disabled", already_right=True),
    Case("max-epochs", _max_epochs, "drop --trainer.max_epochs", already_right=True),
    Case("k-zero", _k_zero, "positive whole number", already_right=True),
    Case("model-missing", _model_missing, "no such file or folder", already_right=True),
    Case("model-nan-weights", _model_nan_weights, "NaN or infinite weights in model.layers.1.mlp.down_proj.weight"),
    Case("hub-unreachable", _hub_unreachable, "the Hugging Face hub is unreachable (127.0.0.1:9: connection refused)"),
    Case("full-disk-at-export", _full_disk_at_export, "the disk is full"),
    Case("state-missing", _eval_missing_state, "does not exist", already_right=True),
    Case("report-is-folder", _eval_report_is_folder, "it is a folder"),
    Case("state-nan-scale", _state_nan_scale, "'scale' holds NaN or infinite values"),
    Case("state-inf-momentum", _state_inf_momentum, "'momentum' holds NaN or infinite values"),
    Case("state-float-units", _state_float_units, "'unit' must hold integers"),
    Case("state-2d-unit", _state_2d_unit, "'unit' must be 1-D"),
    Case("state-alpha-nan", _state_alpha_nan, "'alpha' must be a finite number"),
    Case("state-alpha-string", _state_alpha_string, "field 'alpha' must be int or float, got str"),
    Case("state-site-sizes-types", _state_site_sizes_types, "'site_sizes' must map site names to positive integers"),
    Case("state-metadata-list", _state_metadata_list, "field 'metadata' must be dict, got list"),
    Case("state-format-version-string", _state_version_string, "'format_version' must be the integer 1, got str \"1\""),
    Case("state-weights-altered", _state_weights_altered, "does not match the checksum", already_right=True),
    Case("state-weights-missing", _state_missing_weights, "is missing steering_state.safetensors", already_right=True),
    Case("state-config-not-json", _state_bad_json, "is not valid JSON", already_right=True),
    Case("state-other-architecture", _state_other_architecture, "is for a 'llama' model", already_right=True),
    Case("limit-zero", _eval_limit_zero, "--limit must be positive", already_right=True),
    Case("layout-without-layers", _eval_layout_without_layers, "need --layout_layers"),
    Case("full-disk-at-report", _eval_full_disk_report, "the disk is full"),
    Case("compare-export-into-user-folder", _compare_export_user_folder, "holds other files"),
    Case("analyze-out-is-folder", _analyze_out_is_folder, "it is a folder"),
    Case("analyze-out-is-plot", _analyze_out_is_plot, "are the same file"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main, argv = case.setup(world, tmp_path, monkeypatch)
    before = snapshot(tmp_path)
    world_before = snapshot(world["state"])
    started = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - started
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("error: ")]
    assert code == 2, err
    assert len(errors) == 1 and case.needle in errors[0], err
    assert not any("Traceback" in line for line in err), err
    after = snapshot(tmp_path)
    # Nothing the user had is changed or gone; nothing new except a run folder's logs; no temporary files.
    assert {k: v for k, v in before.items() if k in after} == {k: after[k] for k in before if k in after}
    assert set(before) <= set(after), sorted(set(before) - set(after))
    new = set(after) - set(before)
    assert all(p == "run" or p.startswith("run/") for p in new), sorted(new)
    assert not any(p.endswith(".tmp") or ".old-" in p for p in after), sorted(after)
    assert snapshot(world["state"]) == world_before
    assert seconds < 60
    assert not (tmp_path / "pwned").exists()


def test_table_counts():
    """The closing note reports these numbers; keep them honest."""
    assert len({c.id for c in CASES}) == len(CASES)
    assert sum(not c.already_right for c in CASES) >= 30


# ---------------------------------------------------------------------------- what must still work
def test_overwrite_replaces_a_state_and_keeps_normal_permissions(world, tmp_path, capsys):
    old = copy_state(world, tmp_path, "old")
    before = (old / "steering_config.json").read_bytes()
    assert train_main(train_args(world, tmp_path, "--export_dir", str(old), "--overwrite", "true", "--model.k", "[2]")) == 0
    assert (old / "steering_config.json").read_bytes() != before and SteeringState.from_pretrained(old).k == 2
    umask = os.umask(0)
    os.umask(umask)
    assert (old.stat().st_mode & 0o777) == 0o777 & ~umask
    for path in old.iterdir():
        assert (path.stat().st_mode & 0o777) == 0o666 & ~umask, path
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_report_has_normal_permissions(world, tmp_path):
    report = tmp_path / "r.json"
    assert evaluate_main(eval_args(world["state"], "--report", str(report))) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (report.stat().st_mode & 0o777) == 0o666 & ~umask


def test_wandb_online_falls_back_to_offline_with_a_warning(monkeypatch, tmp_path):
    from austeer_pl.cli import resolve_wandb_mode

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    started = time.perf_counter()
    with pytest.warns(UserWarning, match="logging offline instead"):
        assert resolve_wandb_mode("online") == "offline"
    assert time.perf_counter() - started < 5
    with pytest.raises(AusteerError, match="unreachable"):
        resolve_wandb_mode("online", "error")


def test_resume_with_the_same_settings_is_accepted(world, tmp_path):
    from austeer_pl.lightning import check_resume, pass_settings

    model = {"model_name": str(world["tiny"]), "dtype": None, "site": "attention", "layout_layers": None, "layout_attention": None, "layout_ffn": None}
    data = {"task": str(world["task"]), "seed": 0, "negatives": "sample", "val_fraction": 0.2, "test_fraction": 0.2,
            "max_train_pairs": 256, "chat_template": None, "max_length": 512, "batch_size": 4, "protocol": "default", "task_files": None}
    check_resume(world["ckpt"], pass_settings(model, data))
    with pytest.raises(AusteerError, match="--data.batch_size 4, this run has 8"):
        check_resume(world["ckpt"], pass_settings(model, {**data, "batch_size": 8}))


def test_custom_layout_is_recorded_and_evaluated(world, tmp_path, capsys):
    export = tmp_path / "state"
    code = train_main(train_args(world, tmp_path, "--export_dir", str(export), "--model.layout_layers", "model.layers",
                                 "--model.layout_attention", "self_attn.o_proj", "--model.layout_ffn", "mlp"))
    assert code == 0
    state = SteeringState.from_pretrained(export)
    assert state.layout == {"layers": "model.layers", "attention": "self_attn.o_proj", "ffn": "mlp"}
    assert evaluate_main(eval_args(export, "--report", str(tmp_path / "r.json"))) == 0
    assert evaluate_main(eval_args(export, "--layout_layers", "model.layers", "--layout_attention", "self_attn.o_proj")) == 0


def test_scoring_refuses_nan_log_probabilities():
    from austeer_pl.scoring import choice_logprobs

    model = make_model("llama")
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(AusteerError, match="NaN log-probabilities"):
        choice_logprobs(model, make_tokenizer(), ["is 1 less than 2"], [[" yes", " no"]])


def test_cache_overwritten_in_place_is_caught(tmp_path, monkeypatch):
    from austeer_pl import models
    from austeer_pl.models import ensure_embedded_model, load_model

    from test_models import FakeEmbedded

    fake = FakeEmbedded(tmp_path, monkeypatch)
    folder = ensure_embedded_model(fake.cache)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\xff" * 8  # a float32 NaN pattern inside the last tensor, size kept
    weights.write_bytes(bytes(data))
    models._VERIFIED.clear()
    with pytest.raises(AusteerError, match="does not match its recorded sha256"):
        load_model(cache_dir=fake.cache)


def test_truncated_gguf_message_does_not_blame_a_missing_package(tmp_path):
    from austeer_pl.models import load_model

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(20))
    with pytest.raises(AusteerError) as err:
        load_model(str(gguf))
    assert "pip install" not in str(err.value) and "truncated" in str(err.value)


def test_concurrent_exports_to_one_folder_leave_one_whole_state(world, tmp_path):
    code = (
        "import sys, torch\n"
        "from austeer_pl import SteeringState\n"
        "state = SteeringState.from_pretrained(sys.argv[1])\n"
        "for i in range(15):\n"
        "    state.with_alpha(float(sys.argv[3]) + i).save_pretrained(sys.argv[2])\n"
    )
    target = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(world["state"]), str(target), str(base)], stderr=subprocess.PIPE, text=True)
             for base in (100, 200)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    state = SteeringState.from_pretrained(target)  # whole: the checksum in its config matches its weights
    assert state.alpha in {114.0, 214.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]
