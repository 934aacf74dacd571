"""analyze.py: each of the paper's analyses on a tiny model writes its JSON and PNG with the expected structure."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from austeer_pl.analyses.context import AnalysisOptions, prepare
from austeer_pl.analyses.main import analyze_main
from austeer_pl.analyses.units import kl_divergence, strength_convergence

from helpers import (
    write_less_task,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    return write_less_task(tmp_path_factory.mktemp("task") / "less.jsonl", 60, seed=0)


def run(name: str, tiny_dir: Path, task_file: Path, out: Path, *extra: str, mode: str = "disabled") -> dict:
    args = [
        name,
        "--model",
        str(tiny_dir),
        "--task",
        str(task_file),
        "--max_examples",
        "8",
        "--device",
        "cpu",
        "--out",
        str(out / f"{name}.json"),
        "--wandb_mode",
        mode,
        "--run_dir",
        str(out / "run"),
        *extra,
    ]
    assert analyze_main(args) == 0
    png = out / f"{name}.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    result = json.loads((out / f"{name}.json").read_text())
    assert result["analysis"] == name and result["n_examples"] == 8 and result["task"] == str(task_file)
    return result


def test_dimension_sweep_has_every_swept_unit_and_the_whole_block(tiny_dir, task_file, tmp_path):
    r = run("sweep", tiny_dir, task_file, tmp_path, "--stride", "2", "--alpha", "4")
    block = r["block"]
    assert block["site"] == "attention" and block["n_units"] == 8 and block["stride"] == 2  # head_dim 8
    head = block["head"]
    assert [u["unit"] for u in r["units"]] == list(range(head * 8, head * 8 + 8, 2))
    assert r["whole_block"]["n_units"] == 8
    for entry in [r["unsteered"], r["whole_block"], *r["units"]]:
        assert 0 <= entry["accuracy"] <= 1 and math.isfinite(entry["margin"])
    assert r["summary"]["best_unit"] in [u["unit"] for u in r["units"]]
    # The FFN variant: a whole layer, every n-th unit; an explicit block is honoured.
    r = run("sweep", tiny_dir, task_file, tmp_path, "--site", "ffn", "--layer", "2", "--max_units", "8")
    assert r["block"]["layer"] == 2 and r["block"]["n_units"] == 32 and len(r["units"]) == 8


def test_combinations_positive_then_negative(tiny_dir, task_file, tmp_path):
    r = run("combinations", tiny_dir, task_file, tmp_path, "--sizes", "1,2,4", "--negatives", "0,2,4")
    assert [p["n_positive"] for p in r["positive"]] == [1, 2, 4]
    assert [(p["n_positive"], p["n_negative"]) for p in r["with_negative"]] == [(4, 0), (4, 2), (4, 4)]
    assert r["with_negative"][0]["margin"] == r["positive"][-1]["margin"]  # j = 0 is the best positive set itself
    assert all(u["momentum"] > 0 for u in r["units"]["positive"]) and all(
        u["momentum"] < 0 for u in r["units"]["negative"]
    )


def test_strength_convergence_kl_is_zero_at_tiny_alpha_and_grows(tiny_dir, task_file, tmp_path):
    r = run(
        "strength",
        tiny_dir,
        task_file,
        tmp_path,
        "--k",
        "4",
        "--alpha_min",
        "1e-4",
        "--alpha_max",
        "1e5",
        "--n_alpha",
        "10",
    )
    points = r["points"]
    assert len(points) == 10 and points[0]["alpha"] == pytest.approx(1e-4) and points[-1]["alpha"] == pytest.approx(1e5)
    kls = [p["kl_mean"] for p in points]
    assert all(p["finite"] and math.isfinite(k) and k >= 0 for p, k in zip(points, kls))
    assert kls[0] < 1e-6 and points[0]["top1_agreement"] == 1.0
    assert kls[-1] > 100 * max(kls[0], 1e-9)
    assert all(b >= a - 0.02 * max(kls) for a, b in itertools.pairwise(kls))  # non-decreasing, up to saturation noise


def test_token_promotion_lists_decoded_tokens(tiny_dir, task_file, tmp_path):
    r = run("tokens", tiny_dir, task_file, tmp_path, "--top_n", "5", "--alpha", "50", mode="offline")
    assert r["raised"] and r["lowered"] and len(r["raised"]) <= 5 and len(r["lowered"]) <= 5
    assert all(isinstance(t["token"], str) and t["logit_change"] > 0 for t in r["raised"])
    assert all(isinstance(t["token"], str) and t["logit_change"] < 0 for t in r["lowered"])
    changes = [t["logit_change"] for t in r["raised"]]
    assert changes == sorted(changes, reverse=True)
    assert {a["choice"] for a in r["answer_tokens"]} == {"yes", "no"}
    u = r["unit"]
    assert u["site"] == "attention" and abs(u["momentum"]) > 0
    # W&B ran offline into the run folder.
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_sign_policies_same_k(tiny_dir, task_file, tmp_path):
    r = run("sign", tiny_dir, task_file, tmp_path, "--ks", "2,4", "--alpha", "1,3")
    points = r["points"]
    assert {(p["sign"], p["k"], p["alpha"]) for p in points} == {
        (s, k, a) for s in ("promote", "both") for k in (2, 4) for a in (1.0, 3.0)
    }
    assert all(p["n_negative"] == 0 for p in points if p["sign"] == "promote")
    assert set(r["best"]) == {"promote", "both"}


def test_kl_helpers_and_api(tiny_dir, task_file):
    import torch

    logits = torch.randn(3, 7)
    assert torch.allclose(
        kl_divergence(logits, torch.log_softmax(logits.double(), -1)), torch.zeros(3, dtype=torch.float64), atol=1e-12
    )
    ctx = prepare(AnalysisOptions(model=str(tiny_dir), task=str(task_file), max_examples=4, device="cpu"))
    r = strength_convergence(ctx, k=2, alphas=[0.0, 1.0])
    assert r["points"][0]["kl_mean"] == 0.0


def test_analyze_rejects_bad_input(tiny_dir, task_file, tmp_path, capsys):
    assert analyze_main([]) == 2
    assert analyze_main(["nope"]) == 2
    assert analyze_main(["sweep", "--max_examples", "0"]) == 2
    assert analyze_main(["combinations", "--sizes", "a,b"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines)
    code = analyze_main(
        [
            "sweep",
            "--model",
            str(tiny_dir),
            "--task",
            str(task_file),
            "--layer",
            "9",
            "--wandb_mode",
            "disabled",
            "--out",
            str(tmp_path / "x.json"),
        ]
    )
    assert code == 2 and "out of range" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
