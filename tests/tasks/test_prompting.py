"""Prompting as data settings: the zero-shot instruction, few-shot demonstrations and their formatting."""

from __future__ import annotations

import collections
import json

import pytest

from austeer_pl.errors import AusteerError, SettingError
from austeer_pl.tasks.config import DataConfig
from austeer_pl.tasks.prompting import draw_demonstrations, prompted_task, zero_shot_instruction
from austeer_pl.tasks.prompts import format_prompt
from austeer_pl.tasks.schema import Task, TaskExample

from helpers import ROOT

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BIGBENCH = ROOT.parent / "shared" / "data" / "bigbench"


def chat_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.chat_template = CHATML
    return fast


def examples(n: int, answers=("no", "yes")) -> list[TaskExample]:
    return [TaskExample(f"q{i}", answers, int(i % 3 == 0), f"t:{i}") for i in range(n)]


def test_demonstrations_are_balanced_seeded_and_from_the_given_examples():
    train = examples(30)
    demos = draw_demonstrations(train, 6, seed=0)
    assert len(demos) == 6 and len(set(demos)) == 6
    assert collections.Counter(a for _, a in demos) == {"yes": 3, "no": 3}  # 10 "yes" of 30: still balanced
    by_prompt = {ex.prompt: ex.target for ex in train}
    assert all(by_prompt[p] == a for p, a in demos)  # each with its right answer
    assert draw_demonstrations(train, 6, seed=0) == demos
    assert draw_demonstrations(train, 6, seed=1) != demos
    assert collections.Counter(a for _, a in draw_demonstrations(train, 5, seed=0)) in (
        {"yes": 3, "no": 2},
        {"yes": 2, "no": 3},
    )
    assert draw_demonstrations(train, 0, seed=0) == ()
    with pytest.raises(AusteerError, match=r"shots=31 needs 31 training examples.*lower --data.shots"):
        draw_demonstrations(train, 31, seed=0)


def test_few_shot_formatting_raw_and_chat():
    task = Task(
        "demo", (), instruction="Say yes or no.\n\n", answer_prefix="A:", demonstrations=(("q1", "yes"), ("q2", "no"))
    )
    assert format_prompt(None, task, "q3", chat_template=False) == "Say yes or no.\n\nq1\nA: yes\n\nq2\nA: no\n\nq3\nA:"
    chat = format_prompt(chat_tokenizer(), task, "q3")
    assert chat == (
        "<|im_start|>user\nSay yes or no.\n\nq1<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\nno<|im_end|>\n"
        "<|im_start|>user\nq3<|im_end|>\n<|im_start|>assistant\n"
    )
    # Without demonstrations the text is what it always was.
    bare = Task("demo", (), instruction="Say yes or no.\n\n", answer_prefix="A:")
    assert format_prompt(None, bare, "q3", chat_template=False) == "Say yes or no.\n\nq3\nA:"


def test_zero_shot_instruction_of_the_shipped_tasks():
    task = DataConfig(task="rotten_tomatoes").load_task()
    assert zero_shot_instruction(task) == (
        "Classify the sentiment of a movie review as positive or negative. "
        "Answer with one word: negative or positive.\n\n"
    )
    described = Task("t", tuple(examples(3)), description="Decide.")
    assert zero_shot_instruction(described) == "Decide. Answer with one word: no or yes.\n\n"
    mixed = Task("t", (TaskExample("q", ("a b", "c"), 0, "1"), TaskExample("q", ("d", "e"), 1, "2")))
    assert zero_shot_instruction(mixed) == "Choose the best answer.\n\n"
    if (BIGBENCH / "strategyqa" / "task.json").exists():
        data = json.loads((BIGBENCH / "strategyqa" / "task.json").read_text())
        strategy = DataConfig(task=str(BIGBENCH / "strategyqa" / "task.json")).load_task()
        assert zero_shot_instruction(strategy).startswith(data["description"])


def test_prompt_settings_in_the_data_config():
    plain = DataConfig(max_val_examples=20, max_test_examples=30)
    assert "instruction" not in plain.to_dict() and "shots" not in plain.to_dict()
    prompted = plain.replace(instruction="auto", shots=4)
    assert prompted.to_dict()["shots"] == 4 and DataConfig.from_mapping(prompted.to_dict()) == prompted
    (t0, s0), (t1, s1) = plain.load(), prompted.load()
    assert {k: [e.uid for e in v] for k, v in s0.items()} == {k: [e.uid for e in v] for k, v in s1.items()}
    assert t1.instruction.startswith("Classify the sentiment") and len(t1.demonstrations) == 4
    train = {ex.prompt for ex in s1["train"]}
    assert all(p in train for p, _ in t1.demonstrations)  # never a validation or test example
    custom = plain.replace(instruction="Be brief").load()[0]
    assert custom.instruction == "Be brief\n" + t0.instruction
    with pytest.raises(SettingError, match="shots"):
        DataConfig(shots=-1)
    with pytest.raises(SettingError, match="paper protocol"):
        DataConfig(task="boolq", protocol="paper", shots=2)
    paper = Task("p", (), protocol="paper")
    with pytest.raises(AusteerError, match="paper protocol"):
        prompted_task(paper, [], instruction="auto", shots=0, seed=0)
