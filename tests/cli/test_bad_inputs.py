"""Bad inputs and faults, one row each: every one ends in one ``error:`` line, exit status 2, and
nothing written or lost.

The table covers what a hostile new user tries (wrong folders, corrupt files, mismatched resumes,
no network, full disks); rows that were already right stay here so that they stay right.
"""

from __future__ import annotations

import errno
import hashlib
import io
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

import austeer_pl.core.stateio
from austeer_pl import SteeringState
from austeer_pl.analyses.main import analyze_main
from austeer_pl.cli.evaluate import evaluate_main
from austeer_pl.cli.export import export_main
from austeer_pl.cli.generate import generate_main
from austeer_pl.cli.train import train, train_main
from austeer_pl.errors import AusteerError

from helpers import (
    ROOT,
    FakeEmbedded,
    make_model,
    make_tokenizer,
    write_custom_code_folder,
    write_less_task,
)

ROOT = ROOT


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
    code = train_main(
        [
            "--model.model_name",
            str(tiny),
            "--data.task",
            str(task),
            "--model.site",
            "attention",
            "--model.k",
            "[3]",
            "--model.alpha",
            "[2]",
            "--data.batch_size",
            "4",
            "--checkpoint_every",
            "1",
            "--run_dir",
            str(run),
            "--export_dir",
            str(root / "state"),
            "--wandb_mode",
            "disabled",
            "--export_anyway",
            "true",
        ]
    )
    assert code == 0
    return {
        "root": root,
        "tiny": tiny,
        "task": task,
        "state": root / "state",
        "ckpt": run / "checkpoints" / "last.ckpt",
    }


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


def rewrite_state(
    folder: Path, *, config: Callable[[dict], None] | None = None, tensors: Callable[[dict], None] | None = None
) -> None:
    """Alter a saved state the way a hand edit would (keeping the checksum consistent, so only the field is wrong)."""
    from safetensors.torch import load_file, save_file

    from austeer_pl.core.fileio import sha256_file

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
    """One bad input: ``setup(world, tmp_path, monkeypatch)`` returns ``(main, argv)``.

    ``code`` is the exit status (2, or 128 + the signal for an interrupted command); ``made`` names
    the paths the setup makes appear *while the command runs* (a user's file that must survive);
    ``stdin`` is what the user types (a "y" to a custom-code prompt)."""

    id: str
    setup: Callable
    needle: str
    already_right: bool = False
    env: dict[str, str] = field(default_factory=dict)
    code: int = 2
    made: dict[str, str | None] = field(default_factory=dict)
    stdin: str | None = None


def compare_args(world, *extra: str) -> list[str]:
    """``evaluate.py --compare`` on the tiny model and task, W&B off, plus ``extra``."""
    return [
        "--compare",
        "--task",
        str(world["task"]),
        "--model",
        str(world["tiny"]),
        "--wandb_mode",
        "disabled",
        *extra,
    ]


def train_args(world, tmp_path, *extra: str) -> list[str]:
    return [
        "--model.model_name",
        str(world["tiny"]),
        "--data.task",
        str(world["task"]),
        "--model.site",
        "attention",
        "--model.k",
        "[3]",
        "--model.alpha",
        "[2]",
        "--data.batch_size",
        "4",
        "--run_dir",
        str(tmp_path / "run"),
        "--wandb_mode",
        "disabled",
        "--export_anyway",
        "true",
        *extra,
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
    mp.setattr(
        "austeer_pl.core.output.os.access", lambda path, mode: False if Path(path) == tmp_path else real(path, mode)
    )
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
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    mp.setattr(austeer_pl.core.stateio, "save_file", full)
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
    import austeer_pl.core.fileio as fileio

    def full(path, obj):
        Path(path).write_text("{")
        raise OSError(errno.ENOSPC, "No space left on device")

    mp.setattr(fileio, "write_json", full)
    return evaluate_main, eval_args(world["state"], "--report", str(tmp_path / "r.json"))


def _compare_export_user_folder(world, tmp_path, mp):
    (tmp_path / "out" / "austeer").mkdir(parents=True)
    (tmp_path / "out" / "austeer" / "notes.txt").write_text("mine")
    return evaluate_main, compare_args(world, "--methods", "austeer", "--export_dir", str(tmp_path / "out"))


# -- analyze.py
def _analyze_out_is_folder(world, tmp_path, mp):
    (tmp_path / "o").mkdir()
    return analyze_main, [
        "sweep",
        "--task",
        str(world["task"]),
        "--model",
        str(world["tiny"]),
        "--out",
        str(tmp_path / "o"),
    ]


def _analyze_out_is_plot(world, tmp_path, mp):
    return analyze_main, [
        "sweep",
        "--task",
        str(world["task"]),
        "--model",
        str(world["tiny"]),
        "--out",
        str(tmp_path / "a.json"),
        "--plot",
        str(tmp_path / "a.json"),
    ]


# ---------------------------------------------------------------------------- round 3: the faults the table did not reach
# 1. Remote code: custom code in a model, judge or tokenizer folder never runs, whatever stdin says.
def _custom_code_model_train(world, tmp_path, mp):
    evil = write_custom_code_folder(tmp_path / "evil", tmp_path / "pwned")
    return train_main, [*train_args(world, tmp_path), "--model.model_name", str(evil)]


def _custom_code_model_evaluate(world, tmp_path, mp):
    evil = write_custom_code_folder(tmp_path / "evil", tmp_path / "pwned")
    return evaluate_main, eval_args(world["state"], "--model", str(evil))


def _custom_code_judge(world, tmp_path, mp):
    evil = write_custom_code_folder(tmp_path / "evil", tmp_path / "pwned", kind="classifier")
    return generate_main, [
        "--steering",
        str(world["state"]),
        "--prompt",
        "is 1 less than 2",
        "--judge",
        str(evil),
        "--max_new_tokens",
        "2",
    ]


def _custom_code_judge_evaluate(world, tmp_path, mp):
    evil = write_custom_code_folder(tmp_path / "evil", tmp_path / "pwned", kind="classifier")
    return evaluate_main, eval_args(world["state"], "--scoring", "judge", "--judge", str(evil), "--max_new_tokens", "2")


# 2. File outputs: never an input, never someone else's file without --overwrite.
def _user_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_text("mine")
    return path


def _report_is_task_file(world, tmp_path, mp):
    task = tmp_path / "less.jsonl"
    shutil.copy(world["task"], task)
    return evaluate_main, eval_args(world["state"], "--task", str(task), "--report", str(task), "--overwrite")


def _report_over_user_file(world, tmp_path, mp):
    return evaluate_main, eval_args(world["state"], "--report", str(_user_file(tmp_path, "notes.json")))


def _report_inside_state(world, tmp_path, mp):
    folder = copy_state(world, tmp_path)
    return evaluate_main, eval_args(folder, "--report", str(folder / "report.json"))


def _dump_over_task_file(world, tmp_path, mp):
    task = tmp_path / "less.jsonl"
    shutil.copy(world["task"], task)
    return evaluate_main, [
        "--task",
        str(task),
        "--model",
        str(world["tiny"]),
        "--dump_examples",
        str(task),
        "--overwrite",
    ]


def _dump_over_user_file(world, tmp_path, mp):
    return evaluate_main, [
        "--task",
        str(world["task"]),
        "--model",
        str(world["tiny"]),
        "--dump_examples",
        str(_user_file(tmp_path, "d.jsonl")),
    ]


def _generate_out_is_prompts(world, tmp_path, mp):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("is 1 less than 2\n")
    return generate_main, [
        "--steering",
        str(world["state"]),
        "--prompts",
        str(prompts),
        "--out",
        str(prompts),
        "--overwrite",
    ]


def _generate_out_over_user_file(world, tmp_path, mp):
    return generate_main, [
        "--steering",
        str(world["state"]),
        "--prompt",
        "is 1 less than 2",
        "--out",
        str(_user_file(tmp_path, "g.jsonl")),
    ]


def _analyze_out_over_user_file(world, tmp_path, mp):
    return analyze_main, [
        "sweep",
        "--task",
        str(world["task"]),
        "--model",
        str(world["tiny"]),
        "--out",
        str(_user_file(tmp_path, "a.json")),
        "--wandb_mode",
        "disabled",
    ]


def _analyze_plot_over_user_file(world, tmp_path, mp):
    return analyze_main, [
        "sweep",
        "--task",
        str(world["task"]),
        "--model",
        str(world["tiny"]),
        "--out",
        str(tmp_path / "a.json"),
        "--plot",
        str(_user_file(tmp_path, "a.png")),
        "--wandb_mode",
        "disabled",
    ]


def _compare_report_is_task(world, tmp_path, mp):
    task = tmp_path / "less.jsonl"
    shutil.copy(world["task"], task)
    return evaluate_main, [
        "--compare",
        "--task",
        str(task),
        "--model",
        str(world["tiny"]),
        "--methods",
        "austeer",
        "--report",
        str(task),
        "--overwrite",
        "--wandb_mode",
        "disabled",
    ]


def _export_dir_is_model(world, tmp_path, mp):
    model = tmp_path / "model"
    shutil.copytree(world["tiny"], model)
    return train_main, train_args(
        world, tmp_path, "--model.model_name", str(model), "--export_dir", str(model), "--overwrite", "true"
    )


# 3. The export folder is judged again when the result is swapped in: what appeared meanwhile stays.
def _appears_during(mp, target: str, where: Path, text: str = "mine") -> None:
    """Patch ``target`` (a function called inside the write, after the output was checked) to put a user's file at ``where`` first."""
    import importlib

    module_name, name = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_text(text)
        return original(*args, **kwargs)

    mp.setattr(module, name, wrapped)


def _file_appears_in_export_during_fit(world, tmp_path, mp):
    _appears_during(mp, "austeer_pl.core.stateio.save_file", tmp_path / "export" / "notes.txt")
    return train_main, train_args(world, tmp_path, "--export_dir", str(tmp_path / "export"))


_OTHER_STATE = '{"package": "austeer-pl"}'


def _state_appears_in_export_during_fit(world, tmp_path, mp):
    _appears_during(
        mp, "austeer_pl.core.stateio.save_file", tmp_path / "export" / "steering_config.json", _OTHER_STATE
    )  # another fit's
    return train_main, train_args(world, tmp_path, "--export_dir", str(tmp_path / "export"))


def _file_appears_in_merge_out(world, tmp_path, mp):
    _appears_during(mp, "austeer_pl.export.merged._model_card", tmp_path / "merged" / "notes.txt")
    return export_main, ["--steering", str(world["state"]), "--out", str(tmp_path / "merged")]


def _file_appears_in_compare_export(world, tmp_path, mp):
    _appears_during(mp, "austeer_pl.core.stateio.save_file", tmp_path / "out" / "austeer" / "notes.txt")
    return evaluate_main, compare_args(
        world,
        "--methods",
        "austeer",
        "--k",
        "3",
        "--alpha",
        "2",
        "--export_dir",
        str(tmp_path / "out"),
        "--run_dir",
        str(tmp_path / "run"),
    )


# 4. Killed writers: SIGTERM and Ctrl-C clean up like an error, in one line.
def _signal_during(mp, owner, name: str, signum: int | None) -> None:
    """Make ``owner.name`` stop the command: a signal to this process (SIGTERM), or Ctrl-C (None)."""

    def stop(*args, **kwargs):
        if signum is None:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises before this returns

    mp.setattr(owner, name, stop)


def _sigterm_during_export(world, tmp_path, mp):
    import signal

    from transformers import PreTrainedModel

    def half_written(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 4096)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    mp.setattr(PreTrainedModel, "save_pretrained", half_written)
    return export_main, ["--steering", str(world["state"]), "--out", str(tmp_path / "merged")]


def _sigterm_during_state_export(world, tmp_path, mp):
    import signal

    def half_written(tensors, path, **kwargs):
        Path(path).write_bytes(b"\0" * 4096)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    mp.setattr(austeer_pl.core.stateio, "save_file", half_written)
    return train_main, train_args(world, tmp_path, "--export_dir", str(tmp_path / "export"))


def _ctrl_c_during_evaluate(world, tmp_path, mp):
    import austeer_pl.scoring.evaluate

    _signal_during(mp, austeer_pl.scoring.evaluate, "predict", None)
    return evaluate_main, eval_args(world["state"], "--report", str(tmp_path / "r.json"))


def _ctrl_c_during_generate(world, tmp_path, mp):
    import austeer_pl.scoring.generation

    _signal_during(mp, austeer_pl.scoring.generation, "generate_new_text", None)
    return generate_main, [
        "--steering",
        str(world["state"]),
        "--prompt",
        "is 1 less than 2",
        "--out",
        str(tmp_path / "g.jsonl"),
    ]


def _sigterm_during_fit(world, tmp_path, mp):
    import signal

    from austeer_pl.fit.gridscore import GridScorer

    _signal_during(mp, GridScorer, "score", signal.SIGTERM)
    return train_main, train_args(world, tmp_path, "--export_dir", str(tmp_path / "export"))


# 5. A state pins its inputs: other content under the same path is refused.
def _task_changed_since_fit(world, tmp_path, mp):
    task = tmp_path / "less.jsonl"
    shutil.copy(world["task"], task)
    state = tmp_path / "state"
    assert (
        train_main(
            train_args(
                world,
                tmp_path,
                "--data.task",
                str(task),
                "--export_dir",
                str(state),
                "--run_dir",
                str(tmp_path / "run"),
            )
        )
        == 0
    )
    lines = task.read_text().splitlines()
    task.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # same rows, another order: other splits
    return evaluate_main, eval_args(state)


def _model_changed_since_fit(world, tmp_path, mp):
    model = tmp_path / "model"
    shutil.copytree(world["tiny"], model)
    state = tmp_path / "state"
    assert (
        train_main(
            train_args(
                world,
                tmp_path,
                "--model.model_name",
                str(model),
                "--export_dir",
                str(state),
                "--run_dir",
                str(tmp_path / "run"),
            )
        )
        == 0
    )
    make_model("llama", seed=1).save_pretrained(model)  # retrained in place: same architecture, other weights
    return evaluate_main, eval_args(state)


def _model_changed_generate(world, tmp_path, mp):
    _, argv = _model_changed_since_fit(world, tmp_path, mp)
    return generate_main, ["--steering", argv[1], "--prompt", "is 1 less than 2"]


def _model_changed_export(world, tmp_path, mp):
    _, argv = _model_changed_since_fit(world, tmp_path, mp)
    return export_main, ["--steering", argv[1], "--out", str(tmp_path / "merged")]


def _task_gone_since_fit(world, tmp_path, mp):
    task = tmp_path / "less.jsonl"
    shutil.copy(world["task"], task)
    state = tmp_path / "state"
    assert (
        train_main(
            train_args(
                world,
                tmp_path,
                "--data.task",
                str(task),
                "--export_dir",
                str(state),
                "--run_dir",
                str(tmp_path / "run"),
            )
        )
        == 0
    )
    task.unlink()
    return evaluate_main, eval_args(state)


# 6. Run folders: one command at a time.
def _run_folder_in_use(world, tmp_path, mp):
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    holder = open(run / ".lock", "a+")  # noqa: SIM115 - another fit holds it until the test ends
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    _HELD.append(holder)
    return train_main, train_args(world, tmp_path, "--export_dir", str(tmp_path / "export"))


_HELD: list = []  # the other command's open lock files, held until the module's tests end


@pytest.fixture(scope="module", autouse=True)
def _release_held_locks():
    yield
    while _HELD:
        _HELD.pop().close()


def _compare_run_folder_in_use(world, tmp_path, mp):
    _run_folder_in_use(world, tmp_path, mp)
    return evaluate_main, compare_args(world, "--methods", "austeer", "--run_dir", str(tmp_path / "run"))


def _run_dir_is_a_user_folder(world, tmp_path, mp):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("three years of work")
    return train_main, [*train_args(world, tmp_path), "--run_dir", str(mine)]


def _run_dir_is_the_model(world, tmp_path, mp):
    model = tmp_path / "model"
    shutil.copytree(world["tiny"], model)
    return train_main, [*train_args(world, tmp_path), "--model.model_name", str(model), "--run_dir", str(model / "run")]


# 7. One line instead of a traceback.
def _huge_int(digits: int = 5000) -> str:
    return "1" * digits


def _state_json_huge_int(world, tmp_path, mp):
    folder = copy_state(world, tmp_path)
    text = (folder / "steering_config.json").read_text()
    (folder / "steering_config.json").write_text(text.replace('"n_layers": 3', f'"n_layers": {_huge_int()}'))
    return evaluate_main, eval_args(folder)


def _state_json_deep(world, tmp_path, mp):
    folder = copy_state(world, tmp_path)
    cfg = json.loads((folder / "steering_config.json").read_text())
    text = json.dumps(cfg).replace('"metadata": {', '"metadata": {"deep": ' + "[" * 200000 + "]" * 200000 + ", ", 1)
    (folder / "steering_config.json").write_text(text)
    return evaluate_main, eval_args(folder)


def _task_json_huge_int(world, tmp_path, mp):
    bad = tmp_path / "big.jsonl"
    bad.write_text(f'{{"prompt": "x", "choices": ["a", "b"], "answer": {_huge_int()}}}\n')
    return train_main, [*train_args(world, tmp_path), "--data.task", str(bad)]


def _task_json_deep(world, tmp_path, mp):
    bad = tmp_path / "deep.json"
    bad.write_text("[" * 200000 + "]" * 200000)
    return train_main, [*train_args(world, tmp_path), "--data.task", str(bad)]


def _prompts_json_deep(world, tmp_path, mp):
    bad = tmp_path / "p.json"
    bad.write_text("[" * 200000 + "]" * 200000)
    return generate_main, ["--steering", str(world["state"]), "--prompts", str(bad)]


def _state_float8_scale(world, tmp_path, mp):
    folder = copy_state(world, tmp_path)
    rewrite_state(folder, tensors=lambda t: t.__setitem__("scale", t["scale"].to(torch.float8_e4m3fn)))
    return evaluate_main, eval_args(folder)


def _gate(world, tmp_path, **changes) -> Path:
    folder = copy_state(world, tmp_path)
    k = SteeringState.from_pretrained(folder).k
    gate = {"kind": "gate", "layer": 0, "width": 2, "hidden_size": 32, **changes}

    def tensors(t):
        t.update(
            {
                "strength.inner.weight": torch.zeros(2, 32),
                "strength.inner.bias": torch.zeros(2),
                "strength.outer.weight": torch.zeros(k, 2),
                "strength.outer.bias": torch.zeros(k),
            }
        )

    rewrite_state(folder, tensors=tensors, config=lambda c: c.__setitem__("strength", gate))
    return folder


def _gate_layer_null(world, tmp_path, mp):
    return evaluate_main, eval_args(_gate(world, tmp_path, layer=None))


def _gate_layer_out_of_range(world, tmp_path, mp):
    return evaluate_main, eval_args(_gate(world, tmp_path, layer=-1))


def _gate_layer_above_first(world, tmp_path, mp):
    first = int(SteeringState.from_pretrained(world["state"]).layer.min())
    return evaluate_main, eval_args(_gate(world, tmp_path, layer=first + 1))


def _gate_hidden_size_other(world, tmp_path, mp):
    folder = _gate(world, tmp_path)
    cfg = json.loads((folder / "steering_config.json").read_text())

    def tensors(t):
        t["strength.inner.weight"] = torch.zeros(2, 48)

    rewrite_state(folder, tensors=tensors, config=lambda c: c["strength"].__setitem__("hidden_size", 48))
    assert cfg["strength"]["hidden_size"] == 32
    return evaluate_main, eval_args(folder)


def _metadata_data_list(world, tmp_path, mp):
    folder = copy_state(world, tmp_path)
    rewrite_state(folder, config=lambda c: c["metadata"].__setitem__("data", ["rotten_tomatoes"]))
    return evaluate_main, eval_args(folder)


def _metadata_data_seed_string(world, tmp_path, mp):
    folder = copy_state(world, tmp_path)
    rewrite_state(folder, config=lambda c: c["metadata"]["data"].__setitem__("seed", "zero"))
    return evaluate_main, eval_args(folder)


def _metadata_data_string_behaviour(world, tmp_path, mp):
    folder = copy_state(world, tmp_path)
    rewrite_state(folder, config=lambda c: c["metadata"].__setitem__("data", "oops"))
    return analyze_main, [
        "behaviour",
        "--steering",
        str(folder),
        "--model",
        str(world["tiny"]),
        "--wandb_mode",
        "disabled",
    ]


def _export_name_too_long(world, tmp_path, mp):
    return export_main, [
        "--steering",
        str(world["state"]),
        "--out",
        str(tmp_path / ("a" * 300)),
        "--format",
        "control-vector",
    ]


def _report_name_too_long(world, tmp_path, mp):
    return evaluate_main, eval_args(world["state"], "--report", str(tmp_path / ("r" * 300 + ".json")))


def _generate_max_new_tokens_huge(world, tmp_path, mp):
    return generate_main, [
        "--steering",
        str(world["state"]),
        "--prompt",
        "is 1 less than 2",
        "--max_new_tokens",
        "1000000000",
    ]


def _evaluate_judge_max_new_tokens_huge(world, tmp_path, mp):
    return evaluate_main, eval_args(world["state"], "--scoring", "judge", "--max_new_tokens", "1000000000")


def _task_answer_5000_digits(world, tmp_path, mp):
    bad = tmp_path / "t.csv"
    bad.write_text(f"prompt,choices,answer\nx,a|b,{_huge_int()}\n")
    return evaluate_main, [
        "--task",
        str(bad),
        "--model",
        str(world["tiny"]),
        "--dump_examples",
        str(tmp_path / "d.jsonl"),
    ]


def _config_yaml_5000_digits(world, tmp_path, mp):
    config = tmp_path / "big.yaml"
    config.write_text(f"data:\n  seed: {_huge_int()}\n")
    return train_main, ["--config", str(config), *train_args(world, tmp_path)]


def _evaluate_parser_error(world, tmp_path, mp):
    return evaluate_main, ["--steering", str(world["state"]), "--limit", "many"]


def _export_parser_error(world, tmp_path, mp):
    return export_main, ["--steering", str(world["state"]), "--out", str(tmp_path / "m"), "--format", "onnx"]


def _compare_side_task_missing(world, tmp_path, mp):
    return evaluate_main, compare_args(
        world, "--side_task", str(tmp_path / "gone.jsonl"), "--report", str(tmp_path / "r.json")
    )


def _compare_shots_zero(world, tmp_path, mp):
    return evaluate_main, [
        "--compare",
        "--shots",
        "2,0",
        "--report",
        str(tmp_path / "r.json"),
        "--wandb_mode",
        "disabled",
    ]


def _compare_calibrated_by_generation(world, tmp_path, mp):
    return evaluate_main, compare_args(world, "--methods", "unsteered,calibrated", "--scoring", "generate")


def _data_shots_negative(world, tmp_path, mp):
    return train_main, train_args(world, tmp_path, "--data.shots", "-1")


def _data_shots_over_the_training_split(world, tmp_path, mp):
    return train_main, train_args(world, tmp_path, "--data.shots", "5000")


def _data_shots_with_the_paper_protocol(world, tmp_path, mp):
    return train_main, train_args(world, tmp_path, "--data.protocol", "paper", "--data.shots", "2")


NEW_CASES = [
    Case(
        "custom-code-model-train",
        _custom_code_model_train,
        "needs its own Python code to load (custom code), which austeer-pl never runs",
        stdin="y\n",
    ),
    Case(
        "custom-code-model-evaluate",
        _custom_code_model_evaluate,
        "needs its own Python code to load (custom code)",
        stdin="y\n",
    ),
    Case(
        "custom-code-judge-generate", _custom_code_judge, "needs its own Python code to load (custom code)", stdin="y\n"
    ),
    Case(
        "custom-code-judge-evaluate",
        _custom_code_judge_evaluate,
        "needs its own Python code to load (custom code)",
        stdin="y\n",
    ),
    Case("report-is-the-task-file", _report_is_task_file, "is (or holds, or lies in) the input"),
    Case(
        "report-over-a-user-file",
        _report_over_user_file,
        "it is not a evaluation report that austeer-pl wrote; pass --overwrite",
    ),
    Case("report-inside-the-state", _report_inside_state, "is (or holds, or lies in) the input"),
    Case("dump-over-the-task-file", _dump_over_task_file, "is (or holds, or lies in) the input"),
    Case("dump-over-a-user-file", _dump_over_user_file, "not a example dump that austeer-pl wrote"),
    Case("generations-over-the-prompts", _generate_out_is_prompts, "is (or holds, or lies in) the input"),
    Case("generations-over-a-user-file", _generate_out_over_user_file, "not a generations that austeer-pl wrote"),
    Case("analysis-over-a-user-file", _analyze_out_over_user_file, "not a analysis JSON that austeer-pl wrote"),
    Case("plot-over-a-user-file", _analyze_plot_over_user_file, "not a analysis plot that austeer-pl wrote"),
    Case("compare-report-is-the-task", _compare_report_is_task, "is (or holds, or lies in) the input"),
    Case("export-dir-is-the-model", _export_dir_is_model, "is (or holds, or lies in) the input"),
    Case(
        "file-appears-in-export-during-fit",
        _file_appears_in_export_during_fit,
        "holds other files (it appeared while this command ran)",
        made={"export": None, "export/notes.txt": "mine"},
    ),
    Case(
        "state-appears-in-export-during-fit",
        _state_appears_in_export_during_fit,
        "already holds a steering state (it appeared while this command ran)",
        made={"export": None, "export/steering_config.json": _OTHER_STATE},
    ),
    Case(
        "file-appears-in-merge-out",
        _file_appears_in_merge_out,
        "holds other files (it appeared while this command ran)",
        made={"merged": None, "merged/notes.txt": "mine"},
    ),
    Case(
        "file-appears-in-compare-export",
        _file_appears_in_compare_export,
        "holds other files (it appeared while this command ran)",
        made={"out": None, "out/austeer": None, "out/austeer/notes.txt": "mine"},
    ),
    Case("sigterm-during-merge-export", _sigterm_during_export, "interrupted by SIGTERM", code=143),
    Case("sigterm-during-state-export", _sigterm_during_state_export, "interrupted by SIGTERM", code=143),
    Case("sigterm-during-fit", _sigterm_during_fit, "interrupted by SIGTERM", code=143),
    Case("ctrl-c-during-evaluate", _ctrl_c_during_evaluate, "interrupted by SIGINT", code=130),
    Case("ctrl-c-during-generate", _ctrl_c_during_generate, "interrupted by SIGINT", code=130),
    Case("task-file-changed-since-fit", _task_changed_since_fit, "changed since the fit"),
    Case("task-file-gone-since-fit", _task_gone_since_fit, "the state was fitted on is gone"),
    Case("model-weights-changed-evaluate", _model_changed_since_fit, "has other weights than the fit's"),
    Case("model-weights-changed-generate", _model_changed_generate, "has other weights than the fit's"),
    Case("model-weights-changed-export", _model_changed_export, "has other weights than the fit's"),
    Case("run-folder-in-use-train", _run_folder_in_use, "is in use by another running command"),
    Case("run-folder-in-use-compare", _compare_run_folder_in_use, "is in use by another running command"),
    Case("state-json-5000-digit-int", _state_json_huge_int, "unreadable JSON"),
    Case("state-json-deep-nesting", _state_json_deep, "nested too deeply"),
    Case("task-json-5000-digit-int", _task_json_huge_int, "unreadable JSON"),
    Case("task-json-deep-nesting", _task_json_deep, "nested too deeply"),
    Case("prompts-json-deep-nesting", _prompts_json_deep, "nested too deeply"),
    Case("state-float8-tensor", _state_float8_scale, "'scale' must hold float16/32/64 or bfloat16"),
    Case("state-gate-layer-null", _gate_layer_null, "gate field 'layer' must be a non-negative integer"),
    Case("state-gate-layer-negative", _gate_layer_out_of_range, "gate field 'layer' must be a non-negative integer"),
    Case("state-gate-layer-above-first", _gate_layer_above_first, "above the first steered layer"),
    Case("state-gate-other-residual", _gate_hidden_size_other, "gate reads a residual stream of 48"),
    Case("state-metadata-data-list", _metadata_data_list, "metadata.data must be an object, got list"),
    Case("state-metadata-data-seed-string", _metadata_data_seed_string, "data setting 'seed' must be int, got str"),
    Case(
        "state-metadata-data-string-behaviour",
        _metadata_data_string_behaviour,
        "metadata.data must be an object, got str",
    ),
    Case("export-name-300-chars", _export_name_too_long, "its name is 300 bytes"),
    Case("report-name-300-chars", _report_name_too_long, "its name is 305 bytes"),
    Case("generate-max-new-tokens-1e9", _generate_max_new_tokens_huge, "does not fit the model's context"),
    Case("evaluate-judge-max-new-tokens-1e9", _evaluate_judge_max_new_tokens_huge, "does not fit the model's context"),
    Case("run-dir-is-a-user-folder", _run_dir_is_a_user_folder, "holds other files than a run's (thesis.tex)"),
    Case("run-dir-inside-the-model", _run_dir_is_the_model, "is (or holds, or lies in) the input"),
    Case("task-answer-5000-digits", _task_answer_5000_digits, "is out of range for 2 choices"),
    Case("config-yaml-5000-digits", _config_yaml_5000_digits, "cannot read the arguments or --config file"),
    Case("evaluate-parser-error", _evaluate_parser_error, "invalid int value: 'many'; see evaluate.py --help"),
    Case("export-parser-error", _export_parser_error, "invalid choice: 'onnx'"),
    Case("compare-side-task-missing", _compare_side_task_missing, "--side_task: unknown task"),
    Case("compare-shots-zero", _compare_shots_zero, "--shots must list positive numbers of demonstrations"),
    Case(
        "compare-calibrated-by-generation",
        _compare_calibrated_by_generation,
        "--methods calibrated fits offsets on choice log-likelihoods",
    ),
    Case("data-shots-negative", _data_shots_negative, "--data.shots must be 0 or more demonstrations"),
    Case(
        "data-shots-over-the-training-split",
        _data_shots_over_the_training_split,
        "shots=5000 needs 5000 training examples",
    ),
    Case(
        "data-shots-paper-protocol",
        _data_shots_with_the_paper_protocol,
        "the paper protocol feeds the paper code's prompts raw",
    ),
]


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
    Case(
        "wandb-mode-unknown", _wandb_mode_bogus, "--wandb_mode must be offline, online or disabled", already_right=True
    ),
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
    Case("state-config-not-json", _state_bad_json, "steering_config.json: invalid JSON", already_right=True),
    Case("state-other-architecture", _state_other_architecture, "is for a 'llama' model", already_right=True),
    Case("limit-zero", _eval_limit_zero, "--limit must be positive", already_right=True),
    Case("layout-without-layers", _eval_layout_without_layers, "need --layout_layers"),
    Case("full-disk-at-report", _eval_full_disk_report, "the disk is full"),
    Case("compare-export-into-user-folder", _compare_export_user_folder, "holds other files"),
    Case("analyze-out-is-folder", _analyze_out_is_folder, "it is a folder"),
    Case("analyze-out-is-plot", _analyze_out_is_plot, "are the same file"),
    *NEW_CASES,
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main, argv = case.setup(world, tmp_path, monkeypatch)
    if case.stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(case.stdin))
    before = snapshot(tmp_path)
    world_before = snapshot(world["state"])
    started = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - started
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("error: ")]
    assert code == case.code, err
    assert len(errors) == 1 and case.needle in errors[0], err
    assert not any("Traceback" in line for line in err), err
    after = snapshot(tmp_path)
    # Nothing the user had is changed or gone; nothing new except a run folder's logs; no temporary files.
    assert {k: v for k, v in before.items() if k in after} == {k: after[k] for k in before if k in after}
    assert set(before) <= set(after), sorted(set(before) - set(after))
    new = set(after) - set(before) - set(case.made)
    assert all(p == "run" or p.startswith("run/") for p in new), sorted(new)
    for made, text in case.made.items():  # what a user put there while the command ran is still there, unchanged
        assert (tmp_path / made).is_dir() if text is None else (tmp_path / made).read_text() == text, made
    assert not any(p.endswith((".tmp", ".old")) or ".kept-" in p for p in after), sorted(after)
    assert snapshot(world["state"]) == world_before
    assert seconds < 60
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------- what must still work
def test_overwrite_replaces_a_state_and_keeps_normal_permissions(world, tmp_path, capsys):
    old = copy_state(world, tmp_path, "old")
    before = (old / "steering_config.json").read_bytes()
    assert (
        train_main(train_args(world, tmp_path, "--export_dir", str(old), "--overwrite", "true", "--model.k", "[2]"))
        == 0
    )
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
    from austeer_pl.cli.tracking import resolve_wandb_mode

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    started = time.perf_counter()
    with pytest.warns(UserWarning, match="logging offline instead"):
        assert resolve_wandb_mode("online") == "offline"
    assert time.perf_counter() - started < 5
    with pytest.raises(AusteerError, match="unreachable"):
        resolve_wandb_mode("online", "error")


def test_resume_with_the_same_settings_is_accepted(world, tmp_path):
    from austeer_pl.lightning.strategy import check_resume, pass_settings

    model = {
        "model_name": str(world["tiny"]),
        "dtype": None,
        "site": "attention",
        "layout_layers": None,
        "layout_attention": None,
        "layout_ffn": None,
    }
    data = {
        "task": str(world["task"]),
        "seed": 0,
        "negatives": "sample",
        "val_fraction": 0.2,
        "test_fraction": 0.2,
        "max_train_pairs": 256,
        "chat_template": None,
        "max_length": 512,
        "batch_size": 4,
        "protocol": "default",
        "task_files": None,
    }
    check_resume(world["ckpt"], pass_settings(model, data))
    with pytest.raises(AusteerError, match=r"--data\.batch_size 4, this run has 8"):
        check_resume(world["ckpt"], pass_settings(model, {**data, "batch_size": 8}))


def test_custom_layout_is_recorded_and_evaluated(world, tmp_path, capsys):
    export = tmp_path / "state"
    code = train_main(
        train_args(
            world,
            tmp_path,
            "--export_dir",
            str(export),
            "--model.layout_layers",
            "model.layers",
            "--model.layout_attention",
            "self_attn.o_proj",
            "--model.layout_ffn",
            "mlp",
        )
    )
    assert code == 0
    state = SteeringState.from_pretrained(export)
    assert state.layout == {"layers": "model.layers", "attention": "self_attn.o_proj", "ffn": "mlp"}
    assert evaluate_main(eval_args(export, "--report", str(tmp_path / "r.json"))) == 0
    assert (
        evaluate_main(eval_args(export, "--layout_layers", "model.layers", "--layout_attention", "self_attn.o_proj"))
        == 0
    )


def test_scoring_refuses_nan_log_probabilities():
    from austeer_pl.scoring.loglik import choice_logprobs

    model = make_model("llama")
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(AusteerError, match="NaN log-probabilities"):
        choice_logprobs(model, make_tokenizer(), ["is 1 less than 2"], [[" yes", " no"]])


def test_cache_overwritten_in_place_is_caught(tmp_path, monkeypatch):
    from austeer_pl.core import embedded
    from austeer_pl.core.embedded import ensure_embedded_model
    from austeer_pl.core.models import load_model

    fake = FakeEmbedded(tmp_path, monkeypatch)
    folder = ensure_embedded_model(fake.cache)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\xff" * 8  # a float32 NaN pattern inside the last tensor, size kept
    weights.write_bytes(bytes(data))
    embedded._VERIFIED.clear()
    with pytest.raises(AusteerError, match="does not match its recorded sha256"):
        load_model(cache_dir=fake.cache)


def test_truncated_gguf_message_does_not_blame_a_missing_package(tmp_path):
    from austeer_pl.core.models import load_model

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
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(world["state"]), str(target), str(base)], stderr=subprocess.PIPE, text=True
        )
        for base in (100, 200)
    ]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    state = SteeringState.from_pretrained(target)  # whole: the checksum in its config matches its weights
    assert state.alpha in {114.0, 214.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]


# ---------------------------------------------------------------------------- round 3: what must still work
ROOTS = ("austeer_pl", "benchmarks", "scripts")


def _calls(name: str):
    """Every call of ``.name(...)`` or ``name(...)`` in the project's own Python files, with where it is."""
    import ast

    files = [p for root in ROOTS for p in (ROOT / root).rglob("*.py")] + list(ROOT.glob("*.py"))
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                called = (
                    func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
                )
                if called == name:
                    owner = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
                    yield path.relative_to(ROOT), node.lineno, owner, node


def test_every_hub_loader_refuses_custom_code():
    """Every transformers ``from_pretrained`` and every ``datasets.load_dataset`` passes
    ``trust_remote_code=False`` literally (transformers asks on stdin when it is left unset)."""
    import ast

    checked, missing = 0, []
    for name in ("from_pretrained", "load_dataset"):
        for path, line, owner, node in _calls(name):
            if owner == "SteeringState":
                continue  # our own state loader: JSON and safetensors, no code
            checked += 1
            flag = next((k for k in node.keywords if k.arg == "trust_remote_code"), None)
            if flag is None or not (isinstance(flag.value, ast.Constant) and flag.value.value is False):
                missing.append(f"{path}:{line}")
    assert checked >= 10 and not missing, missing


def test_custom_code_never_runs_when_a_user_types_y(tmp_path):
    """The issue's own repro, as a user runs it: ``echo y | generate.py ... --judge FOLDER``."""
    from austeer_pl.core.state import SteeringState  # noqa: F401 - the state below is the world's

    marker = tmp_path / "pwned"
    judge = write_custom_code_folder(tmp_path / "judge", marker, kind="classifier")
    state = tmp_path / "state"
    model = tmp_path / "tiny"
    make_model("llama").save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    task = write_less_task(tmp_path / "less.jsonl", 30)
    assert (
        train_main(
            [
                "--model.model_name",
                str(model),
                "--data.task",
                str(task),
                "--model.site",
                "attention",
                "--model.k",
                "[2]",
                "--model.alpha",
                "[2]",
                "--run_dir",
                str(tmp_path / "run"),
                "--export_dir",
                str(state),
                "--wandb_mode",
                "disabled",
                "--export_anyway",
                "true",
            ]
        )
        == 0
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "generate.py"),
            "--steering",
            str(state),
            "--prompt",
            "is 1 less than 2",
            "--judge",
            str(judge),
            "--max_new_tokens",
            "2",
        ],
        input="y\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.count("error: ") == 1 and "never runs" in proc.stderr, proc.stderr[
        -2000:
    ]
    assert not marker.exists()


def test_a_custom_code_tokenizer_folder_is_read_without_its_code(world, tmp_path, monkeypatch):
    """``--dump_examples --model FOLDER`` only needs the tokenizer: its ``tokenizer.json`` is read, its Python never runs."""
    marker = tmp_path / "pwned"
    evil = write_custom_code_folder(tmp_path / "evil", marker)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    out = tmp_path / "d.jsonl"
    assert (
        evaluate_main(["--task", str(world["task"]), "--model", str(evil), "--dump_examples", str(out), "--limit", "3"])
        == 0
    )
    assert len(out.read_text().splitlines()) == 3 and not marker.exists()


def test_a_writer_killed_outright_leaves_a_temporary_the_next_writer_removes(world, tmp_path):
    """SIGTERM cleans up (the table); SIGKILL cannot be caught, so the next writer to the same place
    removes what a dead writer left, and nothing of a live writer's."""
    script = (
        "import sys, time\n"
        "from austeer_pl.core.fileio import json_output\n"
        "with json_output(sys.argv[1]).writing() as tmp:\n"
        "    tmp.write_bytes(b'0' * 100000)\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    target = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    live = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True)
    assert live.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    temporaries = lambda: sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))  # noqa: E731
    assert len(temporaries()) == 2
    assert evaluate_main(eval_args(world["state"], "--report", str(target))) == 0
    left = temporaries()
    assert len(left) == 1 and f"-{live.pid}-" in left[0]  # the dead writer's is gone, the live one's kept
    live.kill()
    live.wait()


def test_sigterm_from_another_process_during_export_leaves_nothing(world, tmp_path):
    """The issue's repro: ``kill -TERM`` while export.py writes a merged model (slowed down here)."""
    script = (
        "import sys, time\n"
        "from transformers import PreTrainedModel\n"
        "real = PreTrainedModel.save_pretrained\n"
        "def slow(self, folder, **kw):\n"
        "    real(self, folder, **kw)\n"
        "    print('written', flush=True)\n"
        "    time.sleep(60)\n"
        "PreTrainedModel.save_pretrained = slow\n"
        "from austeer_pl.cli.export import export_main\n"
        "sys.exit(export_main(sys.argv[1:]))\n"
    )
    out = tmp_path / "merged"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "--steering", str(world["state"]), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "written"
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 143 and lines == [
        "error: interrupted by SIGTERM; outputs are written whole or not at all, so none is half-written"
    ], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_run_folders_are_new_for_each_command_started_in_the_same_second(tmp_path, monkeypatch):
    from austeer_pl.cli.rundir import claim_run_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("austeer_pl.cli.rundir.time.strftime", lambda fmt: "20261206-120000")
    a, b = claim_run_dir("", "less.jsonl"), claim_run_dir("", "less.jsonl")
    assert a.path != b.path and a.path.is_dir() and b.path.is_dir()
    assert (a.path.name, b.path.name) == ("less-20261206-120000", "less-20261206-120000-2")
    a.release()
    b.release()


def test_two_fits_in_one_process_do_not_share_a_run_folder(world, tmp_path, monkeypatch):
    """The DDP hand-over (AUSTEER_RUN_DIR) once made a second fit in the same process reuse the first one's folder."""
    monkeypatch.chdir(tmp_path)
    args = [a for a in train_args(world, tmp_path) if a not in ("--run_dir", str(tmp_path / "run"))]
    first, second = train(args), train(args)
    assert first["run_dir"] != second["run_dir"]
    assert (
        Path(first["export_dir"]).parent == Path(first["run_dir"])
        and SteeringState.from_pretrained(second["export_dir"]).k == 3
    )


def test_outputs_of_our_own_are_replaced_and_others_only_with_overwrite(world, tmp_path, capsys):
    report = tmp_path / "r.json"
    assert evaluate_main(eval_args(world["state"], "--report", str(report))) == 0
    assert evaluate_main(eval_args(world["state"], "--report", str(report))) == 0  # ours: replaced freely
    assert json.loads(report.read_text())["austeer_pl_output"]["output"] == "evaluation report"
    mine = tmp_path / "mine.json"
    mine.write_text("mine")
    assert evaluate_main(eval_args(world["state"], "--report", str(mine))) == 2 and mine.read_text() == "mine"
    assert evaluate_main(eval_args(world["state"], "--report", str(mine), "--overwrite")) == 0
    assert "accuracy" in json.loads(mine.read_text())["steered"]


def test_an_evaluation_from_another_folder_reads_the_fitted_file(world, tmp_path, monkeypatch):
    """The state records absolute paths: a file of the same name elsewhere is not the task."""
    fit_dir, other = tmp_path / "fit", tmp_path / "other"
    fit_dir.mkdir()
    other.mkdir()
    shutil.copy(world["task"], fit_dir / "less.jsonl")
    write_less_task(other / "less.jsonl", 40, seed=5)  # same name, other rows
    monkeypatch.chdir(fit_dir)
    assert (
        train_main(train_args(world, tmp_path, "--data.task", "less.jsonl", "--export_dir", str(tmp_path / "state")))
        == 0
    )
    state = SteeringState.from_pretrained(tmp_path / "state")
    assert state.metadata["data"]["task"] == str(fit_dir / "less.jsonl")
    assert set(state.metadata["inputs"]["task"]) == {str(fit_dir / "less.jsonl")}
    assert state.metadata["inputs"]["model"]["kind"] == "folder" and state.base_model == str(world["tiny"])
    monkeypatch.chdir(other)
    report = tmp_path / "r.json"
    assert evaluate_main(eval_args(tmp_path / "state", "--report", str(report))) == 0
    assert json.loads(report.read_text())["task"] == str(fit_dir / "less.jsonl")


def test_changed_inputs_go_on_with_a_warning_when_allowed(world, tmp_path, monkeypatch, capsys):
    _, argv = _model_changed_since_fit(world, tmp_path, monkeypatch)
    with pytest.warns(UserWarning, match="has other weights than the fit's .*; going on"):
        assert evaluate_main([*argv, "--allow_changed_inputs"]) == 0


def test_only_the_test_rows_are_needed_to_show_the_test_split(tmp_path, tiny_dir):
    """``--protocol paper --split test --dump_examples`` with only a task's test rows: no training rows are asked for."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("paper_rows", ROOT / "tests" / "fixtures" / "paper_rows.py")
    rows = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rows)
    files = rows.write_rows(tmp_path / "rows", n=12)["boolq"]
    test_only = [str(p) for p in files if "_train" not in Path(p).name]
    assert test_only and len(test_only) < len(files)
    out = tmp_path / "d.jsonl"
    code = evaluate_main(
        [
            "--task",
            "boolq",
            "--protocol",
            "paper",
            "--task_files",
            ",".join(test_only),
            "--split",
            "test",
            "--model",
            str(tiny_dir),
            "--dump_examples",
            str(out),
        ]
    )
    assert code == 0
    from austeer_pl.tasks.config import DataConfig

    _, full = DataConfig(task="boolq", protocol="paper", task_files=",".join(str(p) for p in files)).load()
    dumped = [json.loads(line)["uid"] for line in out.read_text().splitlines()]
    assert sorted(dumped) == sorted(
        ex.uid for ex in full["test"]
    )  # the same test rows as with the training rows beside them


def test_a_users_file_moved_aside_by_a_killed_writer_comes_back(tmp_path):
    """A writer killed (SIGKILL) while it judged what was at its target leaves that file under a
    hidden name; the next writer puts it back and never deletes it."""
    from austeer_pl.core.fileio import json_output, write_json_output
    from austeer_pl.core.output import _HOST

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    target = tmp_path / "r.json"
    aside = tmp_path / f".r.json.{_HOST}-{dead}-0123abcd.old"
    aside.write_text("mine")
    with pytest.raises(AusteerError, match="not a report that austeer-pl wrote"):
        write_json_output(
            json_output(target).check(), {"a": 1}
        )  # the check passes (nothing there yet); the write finds it back
    assert target.read_text() == "mine" and not aside.exists()


def test_a_fitted_state_on_rows_all_labelled_test_evaluates_its_own_test_split(world, tmp_path):
    """A file whose rows all say ``test`` is split by the fractions at fit time; its state's evaluation
    reads that test split, never the training rows."""
    rows = [json.loads(line) for line in world["task"].read_text().splitlines()]
    task = tmp_path / "all_test.jsonl"
    task.write_text("".join(json.dumps({**row, "split": "test"}) + "\n" for row in rows))
    with pytest.warns(UserWarning, match="every example is labelled split 'test'"):
        assert (
            train_main(train_args(world, tmp_path, "--data.task", str(task), "--export_dir", str(tmp_path / "state")))
            == 0
        )
    report = tmp_path / "r.json"
    with pytest.warns(UserWarning, match="every example is labelled split 'test'"):
        assert evaluate_main(["--steering", str(tmp_path / "state"), "--report", str(report)]) == 0
    from austeer_pl.tasks.config import DataConfig

    with pytest.warns(UserWarning):
        _, splits = DataConfig.of_state(SteeringState.from_pretrained(tmp_path / "state").metadata).load()
    assert json.loads(report.read_text())["n_examples"] == len(splits["test"]) < len(rows)


def test_a_task_name_stays_a_name_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    from austeer_pl.tasks.config import DataConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "boolq").mkdir()
    (tmp_path / "less.jsonl").write_text("{}\n")
    assert DataConfig(task="boolq").absolute().task == "boolq"
    assert DataConfig(task="less.jsonl").absolute().task == str(tmp_path / "less.jsonl")


def test_a_moved_task_file_keeps_the_fits_splits(world, tmp_path):
    """The state's file moved (another machine, another folder): the same content under --task is the fit's task, caps and all."""
    from austeer_pl.tasks.config import DataConfig

    state = SteeringState.from_pretrained(world["state"])
    moved = tmp_path / "elsewhere.jsonl"
    shutil.copy(world["task"], moved)
    config = DataConfig.of_state(state.metadata, task=str(moved))
    recorded = DataConfig.of_state(state.metadata)
    assert config.task == str(moved) and (config.max_val_examples, config.max_test_examples) == (
        recorded.max_val_examples,
        recorded.max_test_examples,
    )
    write_less_task(moved, 40, seed=3)  # other content: another task, uncapped
    assert DataConfig.of_state(state.metadata, task=str(moved)).max_test_examples is None


def test_a_merged_folder_with_a_users_file_is_not_replaced(world, tmp_path, capsys):
    out = tmp_path / "merged"
    assert export_main(["--steering", str(world["state"]), "--out", str(out)]) == 0
    assert export_main(["--steering", str(world["state"]), "--out", str(out), "--overwrite"]) == 0  # ours: replaced
    (out / "notes.txt").write_text("mine")
    assert export_main(["--steering", str(world["state"]), "--out", str(out), "--overwrite"]) == 2
    assert (out / "notes.txt").read_text() == "mine" and "holds other files" in capsys.readouterr().err
