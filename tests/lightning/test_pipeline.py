"""The Lightning pipeline: sharding, DDP exactness, resume, checkpoints, train.py -> evaluate.py."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from austeer_pl import SteeringState
from austeer_pl.cli.evaluate import evaluate_main
from austeer_pl.cli.train import train_main
from austeer_pl.core.prefix import SharedPrefixReader, use_shared_prefix
from austeer_pl.errors import AusteerError
from austeer_pl.fit.data import shard_batches
from austeer_pl.lightning.datamodule import ContrastivePairDataModule
from austeer_pl.lightning.module import AUSteerModule
from austeer_pl.lightning.strategy import PassCheckpoint

from helpers import (
    ROOT,
    make_model,
)
from helpers import write_less_task as write_task

ROOT = ROOT


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    return write_task(tmp_path_factory.mktemp("task") / "less.jsonl", 63)


# ---------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("n,world,batch", [(37, 2, 4), (5, 2, 2), (1, 3, 4), (64, 4, 8), (10, 1, 3)])
def test_shard_batches_unrepeated_and_in_step(n, world, batch):
    shards = [shard_batches(n, r, world, batch) for r in range(world)]
    flat = sorted(i for shard in shards for b in shard for i in b)
    assert flat == list(range(n))  # every pair exactly once: no padding duplicates
    assert len({len(shard) for shard in shards}) == 1  # same number of batches on every rank
    assert all(len(b) <= batch for shard in shards for b in shard)


# ---------------------------------------------------------------------------- resume and checkpoints
class Crash(pl.Callback):
    def __init__(self, after: int) -> None:
        self.after = after

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.after:
            raise RuntimeError("simulated kill")


def fit(tiny_dir, task_file, ckpt_dir, *, crash_after=None, ckpt_path=None, shared_prefix=True, negatives="sample"):
    module = AUSteerModule(model_name=str(tiny_dir), site=["attention", "ffn"], k=[3, 6], alpha=[1.0, 3.0])
    data = ContrastivePairDataModule(
        task=str(task_file), batch_size=4, max_val_examples=8, shared_prefix=shared_prefix, negatives=negatives
    )
    callbacks = [PassCheckpoint(ckpt_dir, every_n_batches=1)]
    if crash_after is not None:
        callbacks.append(Crash(crash_after))
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


def test_resume_mid_pass_equals_uninterrupted(tiny_dir, task_file, tmp_path):
    whole = fit(tiny_dir, task_file, tmp_path / "a")
    with pytest.raises(RuntimeError, match="simulated kill"):
        fit(tiny_dir, task_file, tmp_path / "b", crash_after=3)
    saved = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    assert saved["austeer"]["batches_done"] == 4 and not saved["austeer"]["reduced"]
    resumed = fit(tiny_dir, task_file, tmp_path / "b", ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert resumed.session.accumulator.n == whole.session.accumulator.n == len(resumed.trainer.datamodule.data.pairs)
    for key, value in whole.session.accumulator.tensors.items():
        assert torch.equal(value, resumed.session.accumulator.tensors[key]), key
    assert resumed.state.coordinates() == whole.state.coordinates()
    assert resumed.state.metadata["fit"]["grid"] == whole.state.metadata["fit"]["grid"]


@pytest.mark.parametrize("negatives", ["sample", "all"])
def test_shared_prefix_pass_equals_full_sequence_pass(tiny_dir, tmp_path, negatives):
    task = tmp_path / "three.jsonl"  # three choices, so negatives="all" gives two pairs per prompt
    rng = random.Random(3)
    with open(task, "w") as f:
        for _ in range(40):
            a = rng.randint(0, 20)
            f.write(
                json.dumps(
                    {"prompt": f"{a} is", "choices": ["small", "medium", "large number"], "answer": min(a // 7, 2)}
                )
                + "\n"
            )
    shared = fit(tiny_dir, task, tmp_path / "s", negatives=negatives)
    full = fit(tiny_dir, task, tmp_path / "f", shared_prefix=False, negatives=negatives)
    assert shared.session._readers and all(
        r.fallback_reason is None for r in shared.session._readers.values()
    )  # the cache was shared
    assert not full.session._readers
    assert shared.session.accumulator.n == full.session.accumulator.n == len(full.trainer.datamodule.data.pairs)
    for key, value in full.session.accumulator.tensors.items():
        if value.dtype == torch.int64:
            assert torch.equal(value, shared.session.accumulator.tensors[key]), key
        else:
            assert torch.allclose(value, shared.session.accumulator.tensors[key], rtol=1e-4, atol=1e-4), key
    assert shared.state.coordinates() == full.state.coordinates()
    assert shared.summary["fit_tokens"] == full.summary["fit_tokens"]  # tokens of the pairs' sequences, however read


def test_shared_prefix_setting_auto_and_bad_values():
    assert use_shared_prefix(True, "cuda") and not use_shared_prefix(False, "cpu")
    assert use_shared_prefix("auto", torch.device("cpu")) is True
    assert use_shared_prefix("auto", torch.device("cuda", 0)) is False  # measured 3.3x slower on an H100
    with pytest.raises(AusteerError, match="shared_prefix must be true, false or auto"):
        use_shared_prefix("yes", "cpu")
    with pytest.raises(AusteerError, match="shared_prefix must be true, false or auto"):
        ContrastivePairDataModule(shared_prefix="sometimes")


def test_auto_shared_prefix_batch_read_as_full_sequences(tiny_dir, task_file, tmp_path, monkeypatch):
    """``auto`` collates prompt/answer ids; where it resolves to off (an accelerator) the module reads
    them as the full sequences, bit for bit what ``shared_prefix=False`` collates and reads."""
    module = fit(tiny_dir, task_file, tmp_path, shared_prefix="auto")
    assert module.session._readers  # on the CPU auto shares
    data = module.trainer.datamodule.data
    items = data.pairs[:5]
    prompt_form = data.collate_pairs(items)
    assert prompt_form["shared_prefix"] == "auto" and "input_ids" not in prompt_form
    data.batching = replace(data.batching, shared_prefix=False)
    full_form = data.collate_pairs(items)
    assert full_form["n_tokens"] == prompt_form["n_tokens"]
    want = module.session.read_pairs(full_form)

    def no_cache(*_args, **_kwargs):
        raise AssertionError("the shared-prefix reader was used")

    monkeypatch.setattr(SharedPrefixReader, "read_pairs", no_cache)
    got = module.session.read_pairs({**prompt_form, "shared_prefix": False})
    for w, g in zip(want, got):
        assert w.keys() == g.keys()
        for site in w:
            assert torch.equal(w[site], g[site]), site


def test_checkpoint_holds_no_base_weights(tiny_dir, task_file, tmp_path):
    fit(tiny_dir, task_file, tmp_path)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"] == {}
    n_llm = sum(p.numel() for p in make_model("llama").parameters())
    stored = sum(t.numel() for t in ckpt["austeer"]["accumulator"].values())
    assert stored < n_llm / 4  # statistics only: 5 numbers per unit


# ---------------------------------------------------------------------------- DDP exactness
def run_train(args: list[str], cwd: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_process_ddp_equals_single_process(tiny_dir, tmp_path):
    task = write_task(tmp_path / "odd.jsonl", 61, seed=5)  # 37 training pairs: not divisible by 2 or by the batch size
    common = [
        "--model.model_name",
        str(tiny_dir),
        "--data.task",
        str(task),
        "--data.batch_size",
        "4",
        "--data.max_val_examples",
        "12",
        "--model.site",
        "[attention, ffn, both]",
        "--model.k",
        "[2, 7]",
        "--model.alpha",
        "[1, 5]",
        "--model.sign",
        "both",
        "--trainer.accelerator",
        "cpu",
        "--wandb_mode",
        "disabled",
        "--ddp_timeout",
        "300",
    ]
    run_train([*common, "--trainer.devices", "1", "--run_dir", str(tmp_path / "one")], tmp_path)
    run_train(
        [*common, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--run_dir", str(tmp_path / "two")], tmp_path
    )
    one = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=True)["austeer"]["accumulator"]
    two = torch.load(tmp_path / "two" / "checkpoints" / "last.ckpt", weights_only=True)["austeer"]["accumulator"]
    assert int(one["n"]) == int(two["n"]) == 37
    for key in one:
        if one[key].dtype == torch.int64:
            assert torch.equal(one[key], two[key]), key  # counts: exact
        else:
            # Sums of float32 activations: the shared-prefix rounds group a process's pairs differently
            # from one process's, which moves the last float32 bits (measured: 2e-8 on values ~5).
            assert torch.allclose(one[key], two[key], rtol=1e-6, atol=1e-6), key
    s1 = SteeringState.from_pretrained(tmp_path / "one" / "state")
    s2 = SteeringState.from_pretrained(tmp_path / "two" / "state")
    assert s1.coordinates() == s2.coordinates()
    assert torch.equal(s1.momentum, s2.momentum) and s1.alpha == s2.alpha
    assert s1.metadata["fit"]["grid"] == s2.metadata["fit"]["grid"]
    assert s2.metadata["fit"]["world_size"] == 2


# ---------------------------------------------------------------------------- the command lines
def test_train_then_evaluate_in_process(tiny_dir, task_file, tmp_path, capsys):
    export = tmp_path / "state"
    code = train_main(
        [
            "--model.model_name",
            str(tiny_dir),
            "--data.task",
            str(task_file),
            "--model.site",
            "attention",
            "--model.k",
            "[2, 4]",
            "--model.alpha",
            "[2]",
            "--data.batch_size",
            "8",
            "--run_dir",
            str(tmp_path / "run"),
            "--export_dir",
            str(export),
            "--wandb_mode",
            "offline",
            "--export_anyway",
            "true",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "val accuracy" in out and "verdict" in out and str(export) in out
    state = SteeringState.from_pretrained(export)
    assert state.k in (2, 4) and state.metadata["data"]["task"] == str(task_file)
    fit = state.metadata["fit"]
    grid = fit["grid"]
    # Two points: halving keeps both to the end, and the chosen one has the lower validation log-loss.
    assert len(grid) == 2 and all(g["n_val_scored"] == fit["n_val_examples"] for g in grid)
    assert fit["criterion"] == "loss" and min(g["val_loss"] for g in grid) == fit["val_loss"] > 0  # a loss, as a loss
    assert fit["val_accuracy"] == next(g["val_accuracy"] for g in grid if g["k"] == state.k)
    # W&B ran offline into the run folder; the local CSV logger recorded the run too.
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert (tmp_path / "run" / "logs" / "metrics.csv").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()

    report = tmp_path / "report.json"
    assert (
        evaluate_main(
            ["--steering", str(export), "--split", "test", "--limit", "9", "--report", str(report), "--scoring", "both"]
        )
        == 0
    )
    r = json.loads(report.read_text())
    assert r["n_examples"] == 9 and r["n_steered_activations"] == state.k
    for label in ("unsteered", "steered"):
        assert 0 <= r[label]["ci_low"] <= r[label]["accuracy"] <= r[label]["ci_high"] <= 1
        assert sum(c["n"] for c in r[label]["per_class"].values()) == 9
    assert set(r["by_scoring"]) == {"loglik", "generate"}


def test_train_rejects_bad_input_without_writing(tiny_dir, tmp_path, capsys):
    export = tmp_path / "state"
    code = train_main(
        [
            "--model.model_name",
            str(tiny_dir),
            "--data.task",
            str(tmp_path / "missing.jsonl"),
            "--run_dir",
            str(tmp_path / "run"),
            "--export_dir",
            str(export),
            "--wandb_mode",
            "disabled",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "missing.jsonl" in err[0]
    assert not export.exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "choices": ["a", "b"], "answer": 0}\n{"prompt": "y", "choices": ["a"]\n')
    assert (
        train_main(
            [
                "--model.model_name",
                str(tiny_dir),
                "--data.task",
                str(bad),
                "--run_dir",
                str(tmp_path / "run"),
                "--wandb_mode",
                "disabled",
            ]
        )
        == 2
    )
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert (
        train_main(
            [
                "--model.model_name",
                str(tiny_dir),
                "--model.k",
                "[0]",
                "--wandb_mode",
                "disabled",
                "--run_dir",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    assert "positive whole number" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["--data.shared_prefix", "maybe"],
            "error: --data.shared_prefix: invalid value 'maybe' (expected bool or Literal['auto']); see train.py --help",
        ),
        (["--data.batch_size", "x"], "error: --data.batch_size: invalid value 'x' (expected int); see train.py --help"),
        (
            ["--model.alpha", "[fast]"],
            "error: --model.alpha: invalid value 'fast' (expected float); see train.py --help",
        ),
        (["--data.bogus", "1"], "error: unrecognized arguments: --data.bogus 1"),
        (
            ["--model.strength_loss", "margin"],
            "error: --model.strength_loss 'margin' is unknown; choose one of nll, choice",
        ),
    ],
)
def test_train_option_errors_are_one_line(args, needle, tmp_path, capsys):
    assert train_main([*args, "--wandb_mode", "disabled", "--run_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith(needle), err


def test_evaluate_rejects_bad_input(tmp_path, capsys):
    assert evaluate_main(["--steering", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert evaluate_main([]) == 2


@pytest.mark.real_model
def test_fit_on_embedded_model(tmp_path, capsys):
    export = tmp_path / "state"
    code = train_main(
        [
            "--data.max_train_pairs",
            "32",
            "--data.max_val_examples",
            "16",
            "--model.site",
            "attention",
            "--model.k",
            "[20]",
            "--model.alpha",
            "[1]",
            "--run_dir",
            str(tmp_path / "run"),
            "--export_dir",
            str(export),
            "--wandb_mode",
            "disabled",
            "--export_anyway",
            "true",
        ]
    )
    assert code == 0
    state = SteeringState.from_pretrained(export)
    assert state.base_model == "smollm2-135m-instruct" and state.architecture == "llama" and state.n_layers == 30
    assert state.k == 20 and state.metadata["fit"]["n_pairs"] == 32
    assert (state.momentum > 0).all()


def test_command_line_errors_are_one_line_with_exit_code_2(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    cases = [
        (
            [
                str(ROOT / "train.py"),
                "--model.model_name",
                "no-such-org/no-such-model",
                "--run_dir",
                str(tmp_path / "r"),
                "--export_dir",
                str(tmp_path / "s"),
            ],
            "no-such-org/no-such-model",
        ),
        ([str(ROOT / "evaluate.py"), "--steering", str(tmp_path / "missing")], "does not exist"),
    ]
    for args, needle in cases:
        proc = subprocess.run(
            [sys.executable, *args], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "s").exists()
