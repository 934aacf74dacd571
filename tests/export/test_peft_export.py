"""``export.py --format peft``: a LoRA adapter folder from one state or a weighted combination of several."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from austeer_pl import SteeringState, locate_units
from austeer_pl.cli.export import export_main
from austeer_pl.core.fileio import sha256_file
from austeer_pl.core.lora import ADAPTER_CONFIG_NAME, PROVENANCE_NAME
from austeer_pl.core.stateio import WEIGHTS_NAME

from helpers import random_state

peft = pytest.importorskip("peft")
IDS = [[5, 9, 12, 7, 30, 4], [8, 3, 22, 41, 6, 2]]


def run(argv, capsys) -> tuple[int, str]:
    code = export_main([str(a) for a in argv])
    return code, capsys.readouterr().err


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


def peft_logits(tiny_dir, folder) -> torch.Tensor:
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    return logits(peft.PeftModel.from_pretrained(base, str(folder)).eval())


def test_peft_export_equals_hooks_and_records_provenance(tiny_dir, tmp_path, capsys):
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    state = random_state(locate_units(base), ["attention", "ffn"], base_model=str(tiny_dir))
    folder = state.save_pretrained(tmp_path / "state")
    out = tmp_path / "adapter"
    code, err = run(["--steering", folder, "--out", out, "--format", "peft"], capsys)
    assert code == 0, err
    record = json.loads((out / PROVENANCE_NAME).read_text())
    assert record["state_sha256"] == sha256_file(folder / WEIGHTS_NAME) and record["method"] == "austeer"
    assert record["state_sha256"] in (out / "README.md").read_text()
    assert json.loads((out / ADAPTER_CONFIG_NAME).read_text())["base_model_name_or_path"] == str(tiny_dir)
    with state.apply(base):
        hooked = logits(base)
    torch.testing.assert_close(peft_logits(tiny_dir, out), hooked, rtol=0, atol=1e-5)
    # An adapter export.py wrote is replaced only with --overwrite; a folder of other files never.
    assert run(["--steering", folder, "--out", out, "--format", "peft"], capsys)[0] == 2
    assert run(["--steering", folder, "--out", out, "--format", "peft", "--overwrite"], capsys)[0] == 0
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, err = run(["--steering", folder, "--out", other, "--format", "peft", "--overwrite"], capsys)
    assert code == 2 and (other / "notes.txt").read_text() == "mine" and len(err.strip().splitlines()) == 1


def test_several_states_export_as_one_weighted_adapter_and_one_merged_model(tiny_dir, tmp_path, capsys):
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    layout = locate_units(base)
    a = random_state(layout, ["attention"], seed=1, base_model=str(tiny_dir))
    b = random_state(layout, ["ffn", "attention"], seed=2, base_model=str(tiny_dir))
    folders = [a.save_pretrained(tmp_path / "a"), b.save_pretrained(tmp_path / "b")]
    with SteeringState.combine([a, b], [1.0, -0.5]).apply(base):
        hooked = logits(base)
    steering = ["--steering", *folders, "--weights", "1", "-0.5"]
    assert run([*steering, "--out", tmp_path / "ab", "--format", "peft"], capsys)[0] == 0
    torch.testing.assert_close(peft_logits(tiny_dir, tmp_path / "ab"), hooked, rtol=0, atol=1e-5)
    record = json.loads((tmp_path / "ab" / PROVENANCE_NAME).read_text())
    assert [part["weight"] for part in record["combination"]] == [1.0, -0.5]
    assert run([*steering, "--out", tmp_path / "merged"], capsys)[0] == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged), hooked, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--weights", "1", "2"], "1 --steering folders but 2 --weights"),
        (["--format", "peft", "--alpha", "nan"], "alpha must be a finite number"),
        (["--weights", "0.5", "--alpha", "2"], "--alpha rescales one state"),
    ],
)
def test_bad_peft_exports_are_one_line(extra, words, tiny_dir, tmp_path, capsys):
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    folder = random_state(locate_units(base), ["ffn"], base_model=str(tiny_dir)).save_pretrained(tmp_path / "s")
    code, err = run(["--steering", folder, "--out", tmp_path / "out", *extra], capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not Path(tmp_path / "out").exists()
