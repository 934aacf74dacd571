"""Models split across devices and disk (a device map): the same momentum, units, steered logits and
fitted state as the model on one device; placements checked in one line."""

from __future__ import annotations

import json

import pytest
import torch

from austeer_pl import AusteerError, accumulate_momentum, select_units
from austeer_pl.core.models import load_model
from austeer_pl.core.placement import is_dispatched, placement_kwargs
from austeer_pl.core.stateio import WEIGHTS_NAME
from austeer_pl.errors import SettingError

from helpers import TEXTS, fitted_state, make_tokenizer, random_pairs, write_less_task

pytest.importorskip("accelerate")

#: The tiny llama of ``tiny_dir`` (3 layers): embeddings and layer 0 in memory, layers 1-2 on disk.
OFFLOAD = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture
def both(tiny_dir, tmp_path):
    whole, tokenizer = load_model(str(tiny_dir))
    split, _ = load_model(str(tiny_dir), device_map=json.dumps(OFFLOAD), offload_folder=str(tmp_path / "offload"))
    assert is_dispatched(split) and not is_dispatched(whole)
    assert split.model.layers[2].self_attn.o_proj.weight.device.type == "meta"  # really on disk
    return whole, split, tokenizer


def test_offloaded_model_gives_the_same_momentum_units_and_steered_logits(both):
    whole, split, _ = both
    tok = make_tokenizer()
    pairs = random_pairs(11)
    sites = ["attention", "ffn"]
    a = accumulate_momentum(whole, tok, pairs, sites=sites, batch_size=4)
    b = accumulate_momentum(split, tok, pairs, sites=sites, batch_size=4)
    for site in sites:
        assert all(torch.equal(x, y) for x, y in zip(a.counts(site), b.counts(site)))
        torch.testing.assert_close(a.mean_difference(site), b.mean_difference(site), rtol=0, atol=1e-6)
    units_a, units_b = select_units(a, 8, sites), select_units(b, 8, sites)
    assert units_a.coordinates() == units_b.coordinates()
    state = fitted_state(whole, k=6)
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = split(**batch).logits
        with state.apply(whole):
            want = whole(**batch).logits
        with state.apply(split):
            got = split(**batch).logits
        after = split(**batch).logits
    assert (want - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.equal(after, plain)  # removal leaves the dispatched model as it was


def test_merging_into_weights_on_disk_is_refused(both):
    whole, split, _ = both
    state = fitted_state(whole, k=40, sites=("attention", "ffn"))
    assert {layer for _site, layer, _unit in state.coordinates()} & {1, 2}
    with pytest.raises(AusteerError, match="is offloaded to disk") as err:
        state.merge_into(split)
    assert "\n" not in str(err.value)


def recording(monkeypatch, *modules) -> list[bool]:
    """Wrap each command module's ``load_model``: the list says, per load, whether the model came back dispatched."""
    loaded: list[bool] = []

    def load(*args, **kwargs):
        model, tokenizer = load_model(*args, **kwargs)
        loaded.append(is_dispatched(model))
        return model, tokenizer

    for module in modules:
        monkeypatch.setattr(module, "load_model", load)
    return loaded


def test_train_py_with_a_device_map_exports_the_same_state(tiny_dir, tmp_path, monkeypatch):
    from austeer_pl.cli import evaluate, generate
    from austeer_pl.cli.train import train_main
    from austeer_pl.lightning import frozen

    loaded = recording(monkeypatch, frozen, evaluate, generate)

    task = write_less_task(tmp_path / "less.jsonl", 48)
    common = [
        "--model.model_name", str(tiny_dir), "--data.task", str(task), "--data.batch_size", "8",
        "--data.max_val_examples", "16", "--data.max_test_examples", "8", "--model.k", "[2, 4]",
        "--model.alpha", "[2.0, 4.0]", "--wandb_mode", "disabled", "--export_anyway", "true",
    ]  # fmt: skip
    runs = {}
    for name, extra in (
        ("whole", []),
        ("split", ["--model.device_map", json.dumps(OFFLOAD), "--model.offload_folder", str(tmp_path / "off")]),
    ):
        out = tmp_path / name
        assert train_main([*common, *extra, "--export_dir", str(out / "state"), "--run_dir", str(out / "run")]) == 0
        runs[name] = (out / "state" / WEIGHTS_NAME).read_bytes()
    assert runs["whole"] == runs["split"]
    # evaluate.py and generate.py on the split model: the same predictions and text as on one device.
    from austeer_pl.cli.evaluate import evaluate_main
    from austeer_pl.cli.generate import generate_main

    reports = {}
    for name, extra in (
        ("whole", []),
        ("split", ["--device_map", json.dumps(OFFLOAD), "--offload_folder", str(tmp_path / "off")]),
    ):
        report = tmp_path / f"{name}.json"
        assert evaluate_main(["--steering", str(tmp_path / "whole" / "state"), "--report", str(report), *extra]) == 0
        reports[name] = json.loads(report.read_text())
        texts = tmp_path / f"{name}.jsonl"
        assert generate_main(["--steering", str(tmp_path / "whole" / "state"), "--prompt", "is 3 less than 5",
                              "--max_new_tokens", "6", "--out", str(texts), *extra]) == 0  # fmt: skip
        reports[name]["texts"] = texts.read_text()
    assert loaded == [False, True, False, False, True, True]  # train x2, then evaluate + generate per placement
    assert reports["whole"]["texts"] == reports["split"]["texts"]
    assert reports["whole"]["steered"]["per_example_correct"] == reports["split"]["steered"]["per_example_correct"]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"device_map": "everywhere"}, "setting 'device_map' is 'everywhere'; use auto, balanced"),
        ({"device_map": "{not json"}, "device_map: invalid JSON"),
        ({"device_map": '{"model.layers.0": [1]}'}, "setting 'device_map' has a device [1]"),
        ({"max_memory": '{"cpu": "1GiB"}'}, "setting 'max_memory' only applies with a device_map"),
        ({"device_map": "auto", "max_memory": '{"cpu": true}'}, "setting 'max_memory' has a size True"),
    ],
)
def test_bad_placements_are_one_line(kwargs, words):
    with pytest.raises((AusteerError, SettingError)) as err:
        placement_kwargs(**kwargs)
    assert str(err.value).startswith(words) and "\n" not in str(err.value), str(err.value)


def test_a_device_and_a_device_map_together_are_refused(tiny_dir):
    with pytest.raises(AusteerError, match="either a device or a device_map"):
        load_model(str(tiny_dir), device="cpu", device_map="auto")


def test_the_memory_estimate_counts_the_weights_exactly(tiny_dir):
    from austeer_pl.core.memory import estimate_fit_memory

    model, _ = load_model(str(tiny_dir))
    estimate = estimate_fit_memory(str(tiny_dir), batch_size=4, max_length=64)
    assert estimate is not None
    assert estimate.weights == sum(p.numel() * p.element_size() for p in model.parameters())
    assert estimate.activations > 0 and estimate.statistics > 0
    assert estimate.line().startswith("memory estimate per replica: weights ") and "\n" not in estimate.line()
    half = estimate_fit_memory(str(tiny_dir), dtype=torch.bfloat16, batch_size=4, max_length=64)
    assert half is not None and half.weights * 2 == estimate.weights
    assert estimate_fit_memory("nobody/not-in-any-cache") is None  # advice only: unknown models load as usual


def test_a_max_memory_too_small_is_refused_before_loading(tiny_dir, tmp_path, capsys, monkeypatch):
    from austeer_pl.cli.train import train_main
    from austeer_pl.lightning import frozen

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(frozen, "load_model", no_load)
    task = write_less_task(tmp_path / "less.jsonl", 24)
    code = train_main(
        ["--model.model_name", str(tiny_dir), "--data.task", str(task), "--model.device_map", "auto",
         "--model.max_memory", '{"cpu": "2KB"}', "--wandb_mode", "disabled", "--run_dir", str(tmp_path / "run")]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert code == 2 and last.startswith("error: max_memory allows 0.00 GiB but the fit needs about"), err
    assert "Traceback" not in err and not (tmp_path / "run" / "state").exists()


def test_sizes_are_bytes_for_accelerate():
    from austeer_pl.core.placement import parse_max_memory, parse_size

    assert parse_size("20GiB") == 20 * 2**30 and parse_size("500MB") == 500 * 10**6 and parse_size(1000) == 1000
    assert parse_size("5Gb") == 5 * 10**9  # accelerate has no bit units
    assert parse_max_memory('{"0": "1GiB", "cpu": 2048}') == {0: 2**30, "cpu": 2048}
    with pytest.raises(SettingError, match=r"has a size '1\.2\.3GB'"):
        parse_size("1.2.3GB")


def test_compare_on_a_model_offloaded_to_disk_reports_what_the_whole_model_does(tiny_dir, tmp_path, monkeypatch):
    from austeer_pl.cli.evaluate import evaluate_main
    from austeer_pl.lightning import frozen

    loaded = recording(monkeypatch, frozen)

    task = write_less_task(tmp_path / "less.jsonl", 48)
    rows = {}
    for name, extra in (
        ("whole", []),
        ("split", ["--device_map", json.dumps(OFFLOAD), "--offload_folder", str(tmp_path / "off")]),
    ):
        report = tmp_path / f"{name}.json"
        args = ["--compare", "--model", str(tiny_dir), "--task", str(task), "--methods", "austeer", "--grid", "quick",
                "--max_val_examples", "8", "--max_test_examples", "8", "--batch_size", "8", "--wandb_mode", "disabled",
                "--report", str(report), "--run_dir", str(tmp_path / f"run-{name}"), *extra]  # fmt: skip
        assert evaluate_main(args) == 0
        rows[name] = {m["name"]: m for m in json.loads(report.read_text())["methods"]}
    assert loaded == [False, True]  # the second comparison really ran on the model split across CPU and disk
    for method in ("unsteered", "austeer"):
        for key in ("hyperparameters", "val_accuracy", "test_accuracy", "n_steered_activations"):
            assert rows["whole"][method][key] == rows["split"][method][key], (method, key)
