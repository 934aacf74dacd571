"""evaluate.py --compare: every method fitted, tuned and tested on one split of the Lightning pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from austeer_pl import SteeringState, locate_units
from austeer_pl.cli.evaluate import evaluate_main
from austeer_pl.tasks.schema import TaskExample

from helpers import (
    ROOT,
    make_model,
    methods_table_module,
    write_less_task,
)

METHODS = [
    "unsteered",
    "iti",
    "sadi",
    "caa",
    "austeer_block",
    "austeer",
    "random_units",
    "austeer_scalar",
    "austeer_gate",
]
BASELINES = ["zero_shot", "few_shot", "calibrated", "prompted_austeer"]
LEARNED = {"austeer_scalar": "scalar", "austeer_gate": "gate"}
FIELDS = (
    "name",
    "test_accuracy",
    "ci_low",
    "ci_high",
    "n_steered_activations",
    "state_bytes",
    "fit_seconds",
    "val_accuracy",
    "hyperparameters",
)


LEARNING = ("--strength_epochs", "2", "--strength_lr", "0.5", "--strength_loss", "choice")


def compare_args(tiny_dir, task_file, side_file, report, export_dir, *extra: str, batch_size: int = 8) -> list[str]:
    """The module's comparison on the tiny model (8 validation, 10 test, 12 side-task examples), with ``extra``."""
    return [
        "--compare", "--model", str(tiny_dir), "--task", str(task_file), "--k", "2,4", "--alpha", "1,4",
        "--max_val_examples", "8", "--max_test_examples", "10", "--side_task", str(side_file),
        "--side_examples", "12", "--batch_size", str(batch_size), "--device", "cpu", "--report", str(report),
        "--export_dir", str(export_dir), "--wandb_mode", "disabled", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread for the whole module, as the DDP children run (``OMP_NUM_THREADS=1``): scoring from
    shared caches reduces in an order that depends on the thread count, and the two-process test
    compares against ``compared``, made in this process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    return write_less_task(tmp_path_factory.mktemp("task") / "less.jsonl", 60, seed=0)


@pytest.fixture(scope="module")
def side_file(tmp_path_factory) -> Path:
    return write_less_task(tmp_path_factory.mktemp("side") / "side.jsonl", 40, seed=1)


@pytest.fixture(scope="module")
def compared(tiny_dir, task_file, side_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    args = compare_args(tiny_dir, task_file, side_file, out / "compare.json", out / "states", *LEARNING)
    assert evaluate_main(args) == 0
    return out, json.loads((out / "compare.json").read_text())


def test_report_has_one_row_per_method_on_the_same_test_examples(compared, capsys):
    _, report = compared
    assert [m["name"] for m in report["methods"]] == METHODS + BASELINES
    assert report["task"].endswith("less.jsonl") and report["split"] == "test" and report["seed"] == 0
    assert report["n_test"] == 10 and report["n_val"] == 8 and report["n_train_pairs"] == 60 - 12 - 12
    for m in report["methods"]:
        for key in FIELDS:
            assert key in m, (m["name"], key)
        assert m["n_test"] == report["n_test"] == m["test"]["n"]  # every method on the same examples
        assert 0 <= m["ci_low"] <= m["test_accuracy"] <= m["ci_high"] <= 1
        assert 0 <= m["val_accuracy"] <= 1
        if m["name"] not in ("zero_shot", "calibrated"):  # one setting each: no grid
            assert m["grid"] and max(g["val_accuracy"] for g in m["grid"]) >= m["val_accuracy"]
    rows = {m["name"]: m for m in report["methods"]}
    assert (
        rows["unsteered"]["n_steered_activations"] == 0
        and rows["unsteered"]["state_bytes"] == 0
        and rows["unsteered"]["fit_seconds"] == 0
    )
    # One shared pass, counted in full for every fitted method; ITI adds its validation probe pass.
    shared = report["shared_pass_seconds"]
    for name in METHODS[1:]:
        parts = rows[name]["fit_seconds_parts"]
        assert parts["shared_pass"] == shared > 0 and rows[name]["fit_seconds"] == pytest.approx(sum(parts.values()))
        assert (parts["probe_pass"] > 0) == (name == "iti")
    assert rows["austeer"]["n_steered_activations"] in (2, 4) and rows["austeer"]["hyperparameters"]["k"] in (2, 4)
    assert rows["caa"]["n_steered_activations"] == 32  # hidden size: the whole residual stream of one layer
    assert rows["iti"]["n_steered_activations"] % 8 == 0  # whole heads of head_dim 8


def test_chosen_states_are_saved_and_loadable(compared, tiny_dir):
    out, report = compared
    model = make_model("llama")
    for m in report["methods"][1:]:
        if m["name"] in BASELINES[:3]:  # prompts and offsets: no state
            assert m["state_bytes"] == 0 and not (out / "states" / m["name"]).exists()
            continue
        folder = out / "states" / m["name"]
        state = SteeringState.from_pretrained(folder)
        assert (
            state.method == ("austeer" if m["name"] in (*LEARNED, "prompted_austeer") else m["name"])
            and state.k == m["n_steered_activations"]
        )
        prompted = {k: state.metadata["data"].get(k) for k in ("instruction", "shots") if k in state.metadata["data"]}
        assert prompted == ({k: m["hyperparameters"][k] for k in prompted} if m["name"] == "prompted_austeer" else {})
        assert bool(prompted) == (m["name"] == "prompted_austeer")
        assert state.strength["kind"] == LEARNED.get(m["name"], "momentum")
        assert m["state_bytes"] == sum(p.stat().st_size for p in folder.iterdir()) > 0
        assert (
            state.metadata["data"]["task"] == report["task"]
            and state.metadata["fit"]["val_accuracy"] == m["val_accuracy"]
        )
        ids = torch.tensor([[3, 4, 5, 6]])
        with state.apply(model):
            steered = model(ids).logits
        assert torch.isfinite(steered).all()


def test_learned_variants_start_from_austeers_choice(compared):
    out, report = compared
    rows = {m["name"]: m for m in report["methods"]}
    base = SteeringState.from_pretrained(out / "states" / "austeer")
    for name, kind in LEARNED.items():
        row = rows[name]
        state = SteeringState.from_pretrained(out / "states" / name)
        assert state.coordinates() == base.coordinates() and torch.equal(state.momentum, base.momentum)
        history = row["grid"]
        assert (
            history[0]["epoch"] == 0 and history[0]["val_accuracy"] == rows["austeer"]["val_accuracy"]
        )  # epoch 0 is the momentum rule
        assert 1 <= len(history) - 1 <= 2 and row["val_accuracy"] >= rows["austeer"]["val_accuracy"]
        best = row["hyperparameters"]["best_epoch"]
        assert history[best]["val_accuracy"] == row["val_accuracy"]
        # The one tie rule (train.py's): higher accuracy, or the same with a lower value of the loss trained.
        key = lambda h: (h["val_accuracy"], -h["val_choice_loss"])  # noqa: E731
        assert all(key(h) < key(history[best]) for h in history[:best]) and all(
            key(h) <= key(history[best]) for h in history
        )
        assert (
            row["hyperparameters"]["strength"] == kind
            and row["hyperparameters"]["k"] == rows["austeer"]["hyperparameters"]["k"]
        )
        assert row["fit_seconds_parts"]["strength_training"] > 0
        fit = state.metadata["fit"]
        assert (
            fit["strength"] == kind
            and fit["strength_best_epoch"] == best
            and fit["val_accuracy_momentum_rule"] == rows["austeer"]["val_accuracy"]
        )
        assert fit["strength_loss"] == "choice"
        # The kept weights are the momentum rule exactly when epoch 0 won (the gate's output layer starts at zero).
        unchanged = (
            torch.equal(state.scale, base.scale)
            if kind == "scalar"
            else bool(state.strength_tensors["outer.weight"].abs().sum() == 0)
        )
        assert unchanged == (best == 0), (name, best)


@pytest.mark.parametrize("method", ["austeer", "austeer_scalar", "austeer_gate", "prompted_austeer"])
def test_saved_austeer_state_evaluates_to_the_reported_accuracy(compared, method):
    out, report = compared
    row = next(m for m in report["methods"] if m["name"] == method)
    path = out / f"eval-{method}.json"
    assert evaluate_main(["--steering", str(out / "states" / method), "--report", str(path)]) == 0
    again = json.loads(path.read_text())
    assert again["n_examples"] == row["n_test"] and again["steered"]["accuracy"] == row["test_accuracy"]


def test_compare_rejects_bad_input(tmp_path, capsys):
    assert evaluate_main(["--compare", "--methods", "iti,nope", "--wandb_mode", "disabled"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]
    assert evaluate_main(["--compare", "--scoring", "both"]) == 2
    assert "one method" in capsys.readouterr().err
    assert evaluate_main(["--compare", "--max_val_examples", "0"]) == 2
    assert evaluate_main(["--compare", "--report", str(tmp_path)]) == 2
    assert evaluate_main(["--compare", "--strength_loss", "margin"]) == 2
    assert "--strength_loss 'margin' is unknown; choose one of nll, choice" in capsys.readouterr().err


def test_the_parts_of_a_split_cell_merge_into_the_whole_comparison(compared, tiny_dir, task_file, side_file, tmp_path):
    """``benchmarks/methods_table.sh`` runs a long cell as several comparisons with its ``PARTS`` of the methods
    and merges them (``methods_table.py --merge``): the merged rows are the rows of one run of them all
    (a method's row does not depend on the other methods of its run)."""
    import re

    script = (ROOT / "benchmarks" / "methods_table.sh").read_text()
    parts = re.findall(r'"([a-z_,]+)"', re.search(r"^PARTS=\(\n(.*?)^\)", script, re.M | re.S).group(1))
    assert len(parts) >= 2 and all("unsteered" in methods.split(",") for methods in parts)
    everything = re.search(r"^METHODS=([a-z_,]+)$", script, re.M).group(1).split(",")
    assert sorted({n for methods in parts for n in methods.split(",")}) == sorted(everything)  # each method once
    assert sum(len(methods.split(",")) - 1 for methods in parts) == len(everything) - 1
    reports = []
    for i, methods in enumerate(parts):
        report, states = tmp_path / f"part{i}.json", tmp_path / f"states{i}"
        args = compare_args(tiny_dir, task_file, side_file, report, states, "--methods", methods)
        assert evaluate_main(args) == 0
        reports.append(json.loads(report.read_text()))
    _, whole = compared
    order = [m["name"] for m in whole["methods"]]
    merged = methods_table_module().merge_parts(reports, order)
    wanted = {name for methods in parts for name in methods.split(",")}
    assert [m["name"] for m in merged["methods"]] == [n for n in order if n in wanted]
    assert merged["test_uids_sha256"] == whole["test_uids_sha256"] and merged["n_val"] == whole["n_val"]
    # Timings differ, and the saved files by a byte or so (their metadata's timings): the states are compared.
    drop = ("fit_seconds", "fit_seconds_parts", "val_seconds", "test_seconds", "state_dir", "state_bytes", "seconds")
    clean = lambda row: {k: v for k, v in row.items() if k not in drop}  # noqa: E731
    by_name = {m["name"]: m for m in whole["methods"]}
    for row in merged["methods"]:
        assert clean(row) == clean(by_name[row["name"]]), row["name"]
        if row["state_dir"]:
            mine, theirs = (SteeringState.from_pretrained(Path(r["state_dir"])) for r in (row, by_name[row["name"]]))
            assert mine.coordinates() == theirs.coordinates() and torch.equal(mine.scale, theirs.scale)


@pytest.mark.slow
def test_two_processes_give_the_single_process_comparison(compared, tiny_dir, task_file, side_file, tmp_path):
    """The shared pass, ITI's probe pass, validation and test are sharded and summed exactly under DDP."""
    import os
    import subprocess
    import sys

    root = ROOT
    out, one = compared
    # Batches of 4 per process: the same global batch of 8 per step as the single process. The grid deals
    # whole scoring batches to the processes, so it takes the single process's size.
    report = tmp_path / "two.json"
    extra = ("--eval_batch_size", "8", "--devices", "2", *LEARNING)
    args = compare_args(tiny_dir, task_file, side_file, report, tmp_path / "states", *extra, batch_size=4)
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", AUSTEER_RUN_DIR=str(tmp_path / "run"))
    proc = subprocess.run(
        [sys.executable, str(root / "evaluate.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(report.read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["test_uids_sha256"] == one["test_uids_sha256"]
    for a, b in zip(one["methods"], two["methods"]):
        assert a["name"] == b["name"] and a["hyperparameters"] == b["hyperparameters"] and a["test"] == b["test"]
        if a["name"] in LEARNED:
            # The training history: the same accuracies; losses summed in another order agree to rounding.
            assert [h["val_accuracy"] for h in a["grid"]] == [h["val_accuracy"] for h in b["grid"]]
            for key in ("val_nll", "val_choice_loss"):
                assert [h[key] for h in a["grid"]] == pytest.approx([h[key] for h in b["grid"]], rel=1e-4), key
        elif a["grid"]:  # (zero-shot and calibration have one setting: their hyperparameters and test are compared)
            # The same points, the same scored examples and accuracies; the continuous criterion of
            # shift states (ITI, CAA: shifts from float sums of another order) agrees to rounding.
            key = next((k for k in a["grid"][0] if k.startswith("val_") and k != "val_accuracy"), None)
            strip = lambda grid: [{k: v for k, v in g.items() if k != key} for g in grid]  # noqa: E731
            assert strip(a["grid"]) == strip(b["grid"])
            if key is not None:
                assert [g[key] for g in a["grid"]] == pytest.approx([g[key] for g in b["grid"]], rel=1e-5)
                if a["name"] in ("austeer", "austeer_block", "prompted_austeer", "few_shot"):  # counts, exact sums
                    assert a["grid"] == b["grid"]
        if a["name"] not in ("unsteered", *BASELINES[:3]):
            s1, s2 = (
                SteeringState.from_pretrained(out / "states" / a["name"]),
                SteeringState.from_pretrained(tmp_path / "states" / a["name"]),
            )
            # Learned strengths: gradients averaged across processes equal the global mean up to rounding.
            same = (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6)) if a["name"] in LEARNED else torch.equal
            assert s1.coordinates() == s2.coordinates() and same(s1.scale, s2.scale)
            for key, value in s1.strength_tensors.items():
                # Adam (lr 0.5 here) normalises each step, which lifts the rounding of the gradient sums a little.
                assert torch.allclose(value, s2.strength_tensors[key], rtol=1e-4, atol=1e-4), (
                    key,
                    float((value - s2.strength_tensors[key]).abs().max()),
                )
            assert torch.allclose(s1.shift, s2.shift, rtol=1e-6, atol=1e-7)


def test_train_and_compare_export_bit_identical_gate_states(compared, tiny_dir, task_file, tmp_path):
    """One engine: train.py --model.strength gate and --compare's austeer_gate, with the same data,
    seed and settings, train the same gate on the same batches and keep the same epoch."""
    from austeer_pl.cli.train import train_main

    out, _ = compared
    code = train_main(
        [
            "--model.model_name",
            str(tiny_dir),
            "--data.task",
            str(task_file),
            "--model.k",
            "[2, 4]",
            "--model.alpha",
            "[1, 4]",
            "--data.max_val_examples",
            "8",
            "--data.max_test_examples",
            "10",
            "--data.batch_size",
            "8",
            "--data.eval_batch_size",
            "8",
            "--model.strength",
            "gate",
            "--model.strength_epochs",
            "2",
            "--model.strength_lr",
            "0.5",
            "--model.strength_loss",
            "choice",
            "--trainer.accelerator",
            "cpu",
            "--run_dir",
            str(tmp_path / "run"),
            "--export_dir",
            str(tmp_path / "gate"),
            "--wandb_mode",
            "disabled",
            "--export_anyway",
            "true",  # as --compare does: the learned state whatever the verdict
        ]
    )
    assert code == 0
    trained, compared_gate = (
        SteeringState.from_pretrained(tmp_path / "gate"),
        SteeringState.from_pretrained(out / "states" / "austeer_gate"),
    )
    assert trained.coordinates() == compared_gate.coordinates()
    for name in ("momentum", "scale", "shift"):
        assert torch.equal(getattr(trained, name), getattr(compared_gate, name)), name
    assert trained.strength == compared_gate.strength and set(trained.strength_tensors) == set(
        compared_gate.strength_tensors
    )
    for key, value in trained.strength_tensors.items():
        assert torch.equal(value, compared_gate.strength_tensors[key]), key
    assert trained.metadata["fit"]["strength_history"] == compared_gate.metadata["fit"]["strength_history"]
    assert len(trained.metadata["fit"]["strength_history"]) == 3  # epoch 0 and two trained epochs


def test_a_comparison_without_austeer(tiny_dir, task_file, tmp_path):
    report = tmp_path / "caa.json"
    args = [
        "--compare",
        "--model",
        str(tiny_dir),
        "--task",
        str(task_file),
        "--methods",
        "caa",
        "--grid",
        "quick",
        "--max_val_examples",
        "8",
        "--max_test_examples",
        "10",
        "--batch_size",
        "8",
        "--device",
        "cpu",
        "--report",
        str(report),
        "--wandb_mode",
        "disabled",
    ]
    assert evaluate_main(args) == 0
    assert [m["name"] for m in json.loads(report.read_text())["methods"]] == ["unsteered", "caa"]


def test_no_steering_is_scored_once_for_all_methods(tiny_dir, task_file, tmp_path, monkeypatch):
    from austeer_pl.fit.gridscore import GridScorer

    scored: list[tuple[str, int]] = []
    original = GridScorer.score

    def counting(self, states, examples, prompts):
        scored.extend(("unsteered" if s is None else "steered", len(examples)) for s in states)
        return original(self, states, examples, prompts)

    monkeypatch.setattr(GridScorer, "score", counting)
    report = tmp_path / "two.json"
    args = [
        "--compare",
        "--model",
        str(tiny_dir),
        "--task",
        str(task_file),
        "--methods",
        "caa,sadi",
        "--grid",
        "quick",
        "--max_val_examples",
        "8",
        "--max_test_examples",
        "10",
        "--batch_size",
        "8",
        "--device",
        "cpu",
        "--report",
        str(report),
        "--wandb_mode",
        "disabled",
    ]
    assert evaluate_main(args) == 0
    methods = {m["name"]: m for m in json.loads(report.read_text())["methods"]}
    assert (
        sum(n for kind, n in scored if kind == "unsteered") == 8
    )  # the 8 validation examples, once, not once per method
    assert sum(n for kind, n in scored if kind == "steered") > 0
    assert {"caa", "sadi", "unsteered"} <= set(methods)


def test_every_row_reports_its_side_effects_on_ordinary_requests(compared, tiny_dir):
    from austeer_pl.core.models import load_model
    from austeer_pl.fit.gridscore import GENERIC_PROMPTS, generic_texts, harm_kl
    from austeer_pl.scoring.fluency import distinct_n, mean_perplexity, perplexity
    from austeer_pl.scoring.generation import generate_new_text
    from austeer_pl.tasks.prompts import format_prompt
    from austeer_pl.tasks.schema import Task

    out, report = compared
    rows = {m["name"]: m for m in report["methods"]}
    effects = {"kl_ordinary_text", "perplexity", "distinct_2", "off_task", "off_task_accuracy", "off_task_change"}
    for row in rows.values():
        if row["name"] in BASELINES[:3]:  # a prompt or an offset reaches only the task's own requests
            assert row["side_effects"] is None
        else:
            assert set(row["side_effects"]) == effects
            assert row["side_effects"]["off_task"] == "side"
    assert rows["unsteered"]["side_effects"]["kl_ordinary_text"] == 0.0
    assert rows["unsteered"]["side_effects"]["off_task_change"] == 0.0
    # An independent recomputation from the saved AUSteer state, by the scoring functions themselves.
    model, tokenizer = load_model(str(tiny_dir))
    layout = locate_units(model)
    state = SteeringState.from_pretrained(out / "states" / "austeer")
    texts = generic_texts(tokenizer, model)
    kl = float(harm_kl(model, tokenizer, layout, [state], texts, replay=False)[0])
    assert rows["austeer"]["side_effects"]["kl_ordinary_text"] == pytest.approx(kl, rel=1e-6, abs=1e-9)
    prompts = [format_prompt(tokenizer, Task("generic", ()), p) for p in GENERIC_PROMPTS]
    generated = generate_new_text(model, tokenizer, prompts, state=state if state.k else None, layout=layout)
    assert rows["austeer"]["side_effects"]["distinct_2"] == pytest.approx(distinct_n(generated, 2))
    ppl = mean_perplexity(perplexity(model, tokenizer, prompts, generated))
    assert rows["austeer"]["side_effects"]["perplexity"] == pytest.approx(ppl, rel=1e-6)


def test_prompt_baselines_score_the_prompted_examples_directly(compared, tiny_dir, task_file):
    """A prompt's row is the unsteered model scored on the prompted examples by evaluate.py's own path;
    prompting + AUSteer's session scores the same prompt to the same predictions."""
    from austeer_pl.core.models import load_model
    from austeer_pl.scoring.evaluate import evaluate_examples, prompt_texts
    from austeer_pl.tasks.config import DataConfig

    _, report = compared
    rows = {m["name"]: m for m in report["methods"]}
    model, tokenizer = load_model(str(tiny_dir))
    base = DataConfig(task=str(task_file), seed=0, max_val_examples=8, max_test_examples=10)
    plain_task, plain = base.load()
    for name in ("zero_shot", "few_shot"):
        row = rows[name]
        task, splits = base.replace(**row["hyperparameters"]).load()
        assert [ex.uid for ex in splits["test"]] == [ex.uid for ex in plain["test"]]
        direct = evaluate_examples(model, tokenizer, task, splits["test"], batch_size=8)
        assert direct["per_example_correct"] == row["test"]["per_example_correct"], name
        lengths = [
            [len(ids) for ids in tokenizer(prompt_texts(tokenizer, t, splits["test"], None))["input_ids"]]
            for t in (task, plain_task)
        ]
        added = sum(a - b for a, b in zip(*lengths)) / len(lengths[0])
        assert row["added_prompt_tokens"] == pytest.approx(added) and added > 0
    assert rows["zero_shot"]["hyperparameters"] == {"instruction": "auto"}
    few = rows["few_shot"]
    assert [g["shots"] for g in few["grid"]] == [2, 4, 8] and few["hyperparameters"]["shots"] in (2, 4, 8)
    lowest = min(g["val_loss"] for g in few["grid"])  # the criterion's best, ties to fewer shots
    assert few["hyperparameters"]["shots"] == min(g["shots"] for g in few["grid"] if g["val_loss"] == lowest)
    both = rows["prompted_austeer"]
    prompt = "zero_shot" if both["hyperparameters"].get("instruction") == "auto" else "few_shot"
    assert both["prompt_test_accuracy"] == rows[prompt]["test_accuracy"]


def test_calibration_offsets_minimise_the_validation_log_loss(compared, tiny_dir, task_file):
    """The fitted offsets zero the log-loss gradient on validation (for two answers: the mean predicted
    probability of each answer equals its share of right answers), and test predictions follow them."""
    from austeer_pl.core.models import load_model
    from austeer_pl.scoring.evaluate import answer_suffixes, prompt_texts
    from austeer_pl.scoring.loglik import choice_logprobs
    from austeer_pl.tasks.config import DataConfig

    _, report = compared
    row = next(m for m in report["methods"] if m["name"] == "calibrated")
    offsets = row["hyperparameters"]["offsets"]
    assert set(offsets) == {"yes", "no"} and min(abs(v) for v in offsets.values()) == 0.0
    model, tokenizer = load_model(str(tiny_dir))
    task, splits = DataConfig(task=str(task_file), seed=0, max_val_examples=8, max_test_examples=10).load()

    def table(split):
        prompts = prompt_texts(tokenizer, task, splits[split], None)
        answers = [answer_suffixes(p, ex.choices, task) for p, ex in zip(prompts, splits[split])]
        scores = choice_logprobs(model, tokenizer, prompts, answers)
        shift = [torch.tensor([offsets[c] for c in ex.choices], dtype=torch.float64) for ex in splits[split]]
        return torch.stack([s.double() + b for s, b in zip(scores, shift)])

    val = table("val")
    probs = val.softmax(dim=1)
    right = torch.nn.functional.one_hot(torch.tensor([ex.answer for ex in splits["val"]]), 2).double()
    assert probs.mean(0).tolist() == pytest.approx(right.mean(0).tolist(), abs=1e-5)
    correct = table("test").argmax(dim=1).eq(torch.tensor([ex.answer for ex in splits["test"]])).long().tolist()
    assert correct == row["test"]["per_example_correct"]


def test_off_task_accuracy_is_the_side_tasks_accuracy_steered(compared, tiny_dir, side_file):
    from austeer_pl.core.models import load_model
    from austeer_pl.scoring.evaluate import evaluate_examples
    from austeer_pl.tasks.config import DataConfig

    out, report = compared
    rows = {m["name"]: m for m in report["methods"]}
    model, tokenizer = load_model(str(tiny_dir))
    task, splits = DataConfig(task=str(side_file), seed=0, max_test_examples=12).load()
    base = evaluate_examples(model, tokenizer, task, splits["test"])["accuracy"]
    for name in ("austeer", "prompted_austeer"):
        state = SteeringState.from_pretrained(out / "states" / name)
        steered = evaluate_examples(model, tokenizer, task, splits["test"], state=state)["accuracy"]
        effects = rows[name]["side_effects"]
        assert effects["off_task_accuracy"] == pytest.approx(steered)
        assert effects["off_task_change"] == pytest.approx(steered - base)


def test_a_comparison_says_which_baselines_it_could_not_run(capsys):
    """A baseline the comparison cannot run (calibration under generation scoring, the default of a
    generation task when --scoring is not given) is named in the report with the reason, and printed."""
    from types import SimpleNamespace

    from austeer_pl.cli.compare import print_compare_table
    from austeer_pl.cli.compare_baselines import baseline_rows

    session = SimpleNamespace(
        data=SimpleNamespace(splits={"test": []}),
        model=None,
        tokenizer=None,
        layout=None,
        coll=None,
        scoring="generate",
        criterion="loss",
        config=SimpleNamespace(selection=None),
    )
    rows, states, omitted = baseline_rows(session, ("unsteered", "calibrated"), quick=True)
    assert rows == [] and states == {}
    assert omitted == {
        "calibrated": "offsets on choice log-likelihoods; this comparison scores by generate (use --scoring loglik)"
    }
    report = {"task_name": "t", "n_test": 0, "n_val": 0, "n_train_pairs": 0, "base_model": "m", "methods": []}
    print_compare_table({**report, "omitted": omitted})
    assert "calibrated: not run (offsets on choice log-likelihoods" in capsys.readouterr().out
    # Free-text choices whose right answer is always listed first: per-position offsets are refused too.
    first = [TaskExample(f"p{i}", (f"good {i}", f"bad {i}"), 0, str(i)) for i in range(4)]
    session.scoring, session.data = "loglik", SimpleNamespace(splits={"val": first[:2], "test": first[2:]})
    rows, states, omitted = baseline_rows(session, ("calibrated",), quick=True)
    assert rows == [] and "every validation answer is choice 1" in omitted["calibrated"]


def test_a_prompting_comparison_tries_only_the_shots_the_training_split_holds(tiny_dir, tmp_path):
    task = write_less_task(tmp_path / "small.jsonl", 12, seed=3)  # 8 training examples
    report = tmp_path / "few.json"
    args = ["--compare", "--model", str(tiny_dir), "--task", str(task), "--methods", "few_shot,calibrated"]
    args += [
        "--shots",
        "4,64",
        "--side_task",
        "none",
        "--k",
        "2,4",
        "--grid",
        "quick",
        "--device",
        "cpu",
        "--report",
        str(report),
    ]
    assert evaluate_main([*args, "--wandb_mode", "disabled"]) == 0
    rows = {m["name"]: m for m in json.loads(report.read_text())["methods"]}
    assert list(rows) == ["unsteered", "few_shot", "calibrated"]
    assert [g["shots"] for g in rows["few_shot"]["grid"]] == [4] and rows["few_shot"]["hyperparameters"] == {"shots": 4}
    assert (
        rows["unsteered"]["side_effects"]["kl_ordinary_text"] == 0.0
        and "off_task" not in rows["unsteered"]["side_effects"]
    )
