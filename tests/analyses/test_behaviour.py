"""Behaviour steering: the judge, fluency metrics, steered generation (generate.py), the choice under a
fluency budget, the strength curve and the embedded ``sentiment`` task, against hand-computed oracles."""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import austeer_pl.tasks as T
from austeer_pl import AusteerError, accumulate_momentum, fit_state, locate_units
from austeer_pl.analyses.behaviour import add_behaviour_arguments, behaviour_cli
from austeer_pl.analyses.curve import strength_curve
from austeer_pl.cli.generate import generate_main
from austeer_pl.core.models import load_model
from austeer_pl.fit.judged import (
    choose_by_judge,
    choose_under_budget,
    evaluate_candidates,
)
from austeer_pl.methods.caa import caa_state
from austeer_pl.scoring.behaviour import behaviour_report, text_metrics
from austeer_pl.scoring.fluency import (
    distinct_n,
    distinct_n_scores,
    mean_perplexity,
    perplexity,
)
from austeer_pl.scoring.generation import generate_new_text, generate_pairs
from austeer_pl.scoring.judges import (
    CallableJudge,
    ClassifierJudge,
    VaderJudge,
    load_judge,
)
from austeer_pl.tasks.embedded import (
    SENTIMENT_MAX_WORDS,
    SENTIMENT_MIN_WORDS,
    detokenize_review,
    sentiment_prompts,
    sentiment_task,
)

from helpers import (
    make_model,
    make_tokenizer,
)

FIT_PAIRS = [(f"review {i}: the film was good", f"review {i}: the film was bad") for i in range(8)]
PROMPTS = ["the film was", "i think that the movie", "ok"]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on a shared 2-core machine the tiny models run ~100x faster (no thread hand-offs), the real one ~3x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


# ============================================================================ judge
def vader_compound(valence: float) -> float:
    """VADER's normalisation of a summed valence, alpha = 15, rounded as VADER rounds."""
    return round(valence / math.sqrt(valence * valence + 15), 4)


def test_vader_judge_on_fixed_strings():
    judge = VaderJudge()
    texts = ["good", "great", "bad", "not good", "the table"]
    # Lexicon valences: good 1.9, great 3.1, bad -2.5; a negation multiplies by -0.74.
    expected = [vader_compound(1.9), vader_compound(3.1), vader_compound(-2.5), vader_compound(1.9 * -0.74), 0.0]
    assert judge.score(texts) == pytest.approx(expected, abs=1e-4)
    result = judge.judge(texts)
    assert result.positive == [True, True, False, False, False] and result.n_positive == 2
    negative = load_judge("vader:negative")
    assert negative.name == "vader:negative" and negative.score(texts) == pytest.approx(
        [-e for e in expected], abs=1e-4
    )
    assert negative.judge(texts).positive == [False, False, True, True, False]
    # The threshold is VADER's 0.05: a text scoring exactly 0.0 is not positive, one at 0.05 is.
    assert CallableJudge(lambda ts: [0.05, 0.0499], threshold=0.05).judge(["a", "b"]).positive == [True, False]
    assert load_judge().name == "vader" and load_judge(judge) is judge


def test_callable_judge_and_errors(tmp_path):
    refuses = CallableJudge(lambda t: "cannot" in t, batched=False, name="refusal")
    assert refuses.score(["i cannot do that", "sure"]) == [1.0, 0.0]
    assert refuses.judge(["i cannot do that", "sure"]).positive == [True, False]
    assert load_judge(lambda ts: torch.tensor([0.9, 0.1])).judge(["a", "b"]).positive == [True, False]
    for bad, words in (
        (CallableJudge(lambda ts: [1.0]), "returned 1 scores for 2 texts"),
        (CallableJudge(lambda ts: ["x", "y"]), "must return numbers"),
        (CallableJudge(lambda ts: [math.nan, 1.0]), "non-finite score"),
    ):
        with pytest.raises(AusteerError, match=words):
            bad.judge(["a", "b"])
    with pytest.raises(AusteerError, match="unknown judge 'nope'"):
        load_judge("nope")
    with pytest.raises(AusteerError, match="no classifier at"):
        ClassifierJudge(tmp_path / "missing")


def test_classifier_judge_matches_unbatched_softmax(tmp_path):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        num_labels=2,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
        pad_token_id=0,
    )
    clf = transformers.LlamaForSequenceClassification(config).eval()
    clf.save_pretrained(tmp_path)
    tok = make_tokenizer()
    tok.save_pretrained(tmp_path)
    texts = ["a good film", "bad", "the plot was dull and long"]
    judge = ClassifierJudge(tmp_path, batch_size=2)  # batches of 2: padded rows
    with torch.no_grad():
        oracle = [
            torch.softmax(clf(input_ids=torch.tensor([tok(t)["input_ids"]])).logits[0], -1)[1].item() for t in texts
        ]
    assert judge.score_name == "p(POSITIVE)" and judge.score(texts) == pytest.approx(oracle, abs=1e-5)
    assert judge.judge(texts).positive == [p >= 0.5 for p in oracle]
    neg = ClassifierJudge(tmp_path, positive_label="negative")
    assert neg.score(texts) == pytest.approx([1 - p for p in oracle], abs=1e-5)
    with pytest.raises(AusteerError, match="no label 'happy'"):
        ClassifierJudge(tmp_path, positive_label="happy")
    assert isinstance(load_judge(str(tmp_path)), ClassifierJudge)


# ============================================================================ fluency
class CountingLM(nn.Module):
    """Logits log(j + 1) for every token j at every position: p(j) = (j + 1) / (V (V + 1) / 2)."""

    def __init__(self, vocab: int = 64) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, use_cache=False):
        keep = logits_to_keep or input_ids.shape[1]
        row = torch.log(torch.arange(1, self.vocab + 1, dtype=torch.float32))
        return SimpleNamespace(logits=row.expand(input_ids.shape[0], keep, self.vocab).clone())


def test_perplexity_hand_computed():
    tok = make_tokenizer()
    ids = tok("ab", add_special_tokens=False)["input_ids"]
    total = 64 * 65 / 2
    # Only the continuation's tokens count: "ab" after any prompt has p = (id + 1) / total each.
    expected = math.exp(-(math.log((ids[0] + 1) / total) + math.log((ids[1] + 1) / total)) / 2)
    got = perplexity(CountingLM(), tok, ["xyz", "q"], ["ab", ""])
    assert got[0].item() == pytest.approx(expected, rel=1e-6)
    assert math.isnan(got[1].item())  # an empty continuation has no tokens
    assert mean_perplexity([4.0, 16.0, math.nan]) == pytest.approx(8.0)
    assert math.isnan(mean_perplexity([math.nan]))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_perplexity_matches_plain_loop(arch):
    model, tok = make_model(arch), make_tokenizer()
    prompts = ["the film", "a", "what did you think of it?", "ok then"]
    conts = [" was good.", " bad", " fine, i guess", "!"]
    oracle = []
    with torch.no_grad():
        for p, c in zip(prompts, conts):
            # The continuation's tokens: the joined text's after the prompt's (no merges across the boundary here).
            p_ids, whole = tok(p)["input_ids"], tok(p + c)["input_ids"]
            assert whole[: len(p_ids)] == p_ids
            c_ids = whole[len(p_ids) :]
            ids = torch.tensor([whole])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            nll = [-logp[len(p_ids) + j - 1, c_ids[j]].item() for j in range(len(c_ids))]
            oracle.append(math.exp(sum(nll) / len(nll)))
    got = perplexity(model, tok, prompts, conts, batch_size=3)  # sorted batches of 3 and 1, left-padded
    assert got.tolist() == pytest.approx(oracle, rel=1e-4)
    assert mean_perplexity(got) == pytest.approx(math.exp(sum(math.log(o) for o in oracle) / len(oracle)), rel=1e-4)


def test_distinct_n_hand_computed():
    scores = distinct_n_scores(["the cat the cat", "a a a a", "one", "Big big BIG"], 2)
    assert scores[:2] == pytest.approx([2 / 3, 1 / 3]) and math.isnan(scores[2])
    assert scores[3] == pytest.approx(1 / 2)  # lower-cased: (big, big) twice
    assert distinct_n(["the cat the cat", "a a a a", "one"], 2) == pytest.approx(0.5)
    assert distinct_n(["x y z"], 1) == 1.0 and math.isnan(distinct_n(["one"], 2))


# ============================================================================ steered generation
@pytest.fixture(scope="module")
def tiny():
    model, tok = make_model("llama"), make_tokenizer()
    layout = locate_units(model)
    state = fit_state(model, tok, FIT_PAIRS, k=8, alpha=10.0)
    acc = accumulate_momentum(model, tok, FIT_PAIRS, sites=["residual"], layout=layout)
    caa = caa_state(acc, layout, layer=1, multiplier=10.0)
    return SimpleNamespace(model=model, tok=tok, layout=layout, state=state, caa=caa)


def plain_generate(model, tok, prompts, n, state=None):
    """One unpadded ``model.generate`` per prompt (the oracle of the batched generation)."""
    out = []
    ctx = state.apply(model) if state is not None else torch.no_grad()
    with ctx, torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok(p)["input_ids"]])
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            out.append(tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
    return out


@pytest.mark.parametrize("which", ["state", "caa"])
def test_generate_pairs_batched_equals_plain_generate(tiny, which):
    state = getattr(tiny, which)
    ids = torch.tensor([tiny.tok("the film was")["input_ids"]])
    before = tiny.model(input_ids=ids).logits
    pairs = generate_pairs(tiny.model, tiny.tok, state, PROMPTS, max_new_tokens=6, batch_size=2)
    assert pairs.prompts == PROMPTS
    assert pairs.unsteered == plain_generate(tiny.model, tiny.tok, PROMPTS, 6)
    assert pairs.steered == plain_generate(tiny.model, tiny.tok, PROMPTS, 6, state)
    assert pairs.steered != pairs.unsteered
    assert torch.equal(tiny.model(input_ids=ids).logits, before)  # no hook left behind
    reused = generate_pairs(tiny.model, tiny.tok, state, PROMPTS, unsteered=["x"] * 3, max_new_tokens=6, batch_size=2)
    assert reused.unsteered == ["x"] * 3 and reused.steered == pairs.steered
    # Sampling: both sides share their draws, so a zero-strength state samples the unsteered text.
    sampled = generate_pairs(tiny.model, tiny.tok, state, PROMPTS, alpha=0.0, max_new_tokens=6, do_sample=True, seed=3)
    assert sampled.steered == sampled.unsteered
    with pytest.raises(AusteerError, match="max_new_tokens"):
        generate_new_text(tiny.model, tiny.tok, PROMPTS, max_new_tokens=0)


def test_text_metrics_and_report(tiny):
    judge = CallableJudge(lambda ts: [t.count("b") / max(len(t), 1) for t in ts], threshold=0.1, name="b-share")
    report = behaviour_report(
        tiny.model, tiny.tok, tiny.state, PROMPTS, judge, max_new_tokens=6, batch_size=2, n_examples=2
    )
    pairs = generate_pairs(tiny.model, tiny.tok, tiny.state, PROMPTS, max_new_tokens=6, batch_size=2)
    for side in ("unsteered", "steered"):
        texts = getattr(pairs, side)
        m = report[side]
        scores = judge.score(texts)
        positive = sum(s >= 0.1 for s in scores)
        assert m["n"] == 3 and m["n_positive"] == positive and m["share_positive"] == pytest.approx(positive / 3)
        assert m["ci_low"] <= m["share_positive"] <= m["ci_high"] and m["mean_score"] == pytest.approx(sum(scores) / 3)
        assert m["perplexity"] == pytest.approx(
            mean_perplexity(perplexity(tiny.model, tiny.tok, PROMPTS, texts)), rel=1e-6
        )
        assert m["distinct_2"] == pytest.approx(distinct_n(texts, 2), nan_ok=True)
    assert report["perplexity_ratio"] == pytest.approx(
        report["steered"]["perplexity"] / report["unsteered"]["perplexity"]
    )
    assert report["examples"] == pairs.rows()[:2] and report["judge"]["name"] == "b-share"


# ============================================================================ choice under a fluency budget
def grid(*rows):
    return [dict(zip(("label", "share_positive", "mean_score", "perplexity"), r)) for r in rows]


GRID = grid(
    ("unsteered", 0.40, 0.00, 10.0),
    ("k=10,a=1", 0.60, 0.10, 12.0),  # ratio 1.2
    ("k=10,a=4", 0.90, 0.50, 16.0),  # ratio 1.6
    ("k=50,a=1", 0.60, 0.30, 14.0),  # ratio 1.4: same share as k=10,a=1, higher mean score
    ("k=50,a=4", 1.00, 0.90, math.nan),  # no perplexity (all empty): never eligible
)


@pytest.mark.parametrize(
    "budget, metric, label, eligible",
    [
        (1.5, "share_positive", "k=50,a=1", ["unsteered", "k=10,a=1", "k=50,a=1"]),
        (2.0, "share_positive", "k=10,a=4", ["unsteered", "k=10,a=1", "k=10,a=4", "k=50,a=1"]),
        (1.3, "share_positive", "k=10,a=1", ["unsteered", "k=10,a=1"]),
        (1.4, "share_positive", "k=50,a=1", ["unsteered", "k=10,a=1", "k=50,a=1"]),  # the budget is inclusive
        (1.1, "share_positive", "unsteered", ["unsteered"]),
        (1.45, "mean_score", "k=50,a=1", ["unsteered", "k=10,a=1", "k=50,a=1"]),
    ],
)
def test_choose_under_budget_synthetic_grid(budget, metric, label, eligible):
    choice = choose_under_budget(GRID, budget, metric=metric)
    assert (choice.label, choice.eligible) == (label, eligible)
    assert choice.ratios["k=10,a=4"] == pytest.approx(1.6) and math.isnan(choice.ratios["k=50,a=4"])
    assert choice.to_dict()["label"] == label and GRID[choice.index]["label"] == label


def test_choose_under_budget_ties_and_errors():
    # A steered point no better than no steering loses the tie; a worse-fluency tie loses to a better one.
    tie = grid(("a=1", 0.5, 0.2, 11.0), ("unsteered", 0.5, 0.2, 10.0), ("a=2", 0.5, 0.2, 10.0))
    assert choose_under_budget(tie, 1.5).label == "unsteered"
    assert choose_under_budget(grid(("unsteered", 0.5, 0.2, 10.0), ("a=1", 0.5, 0.2, 9.0)), 1.5).label == "a=1"
    # The baseline may carry any label when marked steered=False.
    marked = [dict(r, steered=r["label"] != "base") for r in grid(("base", 0.1, 0.0, 5.0), ("x", 0.9, 0.5, 7.0))]
    assert choose_under_budget(marked, 1.5).label == "x" and choose_under_budget(marked, 1.2).label == "base"
    rng = random.Random(0)
    for _ in range(50):  # against a brute-force oracle
        rows = [("unsteered", rng.random(), rng.random(), 10.0)] + [
            (f"p{i}", rng.random(), rng.random(), rng.uniform(5, 30)) for i in range(6)
        ]
        ok = [r for r in rows if r[0] == "unsteered" or r[3] / 10.0 <= 1.5]
        assert choose_under_budget(grid(*rows), 1.5).label == max(ok, key=lambda r: r[1])[0]
    for kwargs, words in (
        (dict(grid_results=grid(("a", 0.5, 0.0, 1.0))), "no unsteered entry"),
        (dict(grid_results=GRID, budget=0), "fluency budget must be a positive number"),
        (dict(grid_results=GRID, metric="accuracy"), "unknown choice metric"),
    ):
        with pytest.raises(AusteerError, match=words):
            choose_under_budget(**kwargs)


def test_evaluate_candidates_and_choose_by_judge(tiny):
    judge = CallableJudge(lambda ts: [t.count("b") / max(len(t), 1) for t in ts], threshold=0.1)
    candidates = [("austeer", tiny.state), ("caa", tiny.caa)]
    results = evaluate_candidates(tiny.model, tiny.tok, candidates, PROMPTS, judge, max_new_tokens=6, batch_size=2)
    assert [r["label"] for r in results] == ["unsteered", "austeer", "caa"]
    assert results[0]["steered"] is False and results[0]["perplexity_ratio"] == 1.0
    texts = generate_new_text(tiny.model, tiny.tok, PROMPTS, state=tiny.caa, max_new_tokens=6, batch_size=2)
    expected = text_metrics(tiny.model, tiny.tok, PROMPTS, texts, judge)
    assert results[2]["share_positive"] == expected["share_positive"] and results[2]["perplexity"] == pytest.approx(
        expected["perplexity"]
    )
    assert results[2]["perplexity_ratio"] == pytest.approx(expected["perplexity"] / results[0]["perplexity"])
    pick = choose_by_judge(
        tiny.model, tiny.tok, candidates, PROMPTS, judge, budget=100.0, max_new_tokens=6, batch_size=2
    )
    assert pick.label == choose_under_budget(results, 100.0).label
    assert pick.state is dict(candidates).get(pick.label)
    with pytest.raises(AusteerError, match="labels must be distinct"):
        evaluate_candidates(tiny.model, tiny.tok, [("a", tiny.state), ("a", tiny.caa)], PROMPTS, judge)


# ============================================================================ strength curve and analyze.py behaviour
def test_strength_curve_writes_json_and_png(tiny, tmp_path):
    judge = CallableJudge(lambda ts: [t.count("b") / max(len(t), 1) for t in ts], threshold=0.1, name="b-share")
    out, png = tmp_path / "curve.json", tmp_path / "curve.png"
    result = strength_curve(
        tiny.model,
        tiny.tok,
        {"austeer": tiny.state, "caa": tiny.caa},
        PROMPTS,
        judge,
        multiples=(0.0, 1.0),
        alphas={"caa": [0.0, 5.0, 10.0]},
        max_new_tokens=6,
        batch_size=2,
        out=out,
        plot=png,
    )
    saved = json.loads(out.read_text())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.json", "curve.png"]  # no temporary files left
    assert [p["alpha"] for p in saved["methods"]["austeer"]["points"]] == [0.0, 10.0]
    assert [p["alpha"] for p in saved["methods"]["caa"]["points"]] == [0.0, 5.0, 10.0]
    zero = saved["methods"]["caa"]["points"][0]
    assert zero["share_positive"] == saved["unsteered"]["share_positive"] and zero["perplexity_ratio"] == 1.0
    steered = generate_new_text(
        tiny.model, tiny.tok, PROMPTS, state=tiny.caa.with_alpha(5.0), max_new_tokens=6, batch_size=2
    )
    assert saved["methods"]["caa"]["points"][1]["texts"] == steered
    assert saved["methods"]["caa"]["points"][1]["share_positive"] == pytest.approx(
        text_metrics(tiny.model, tiny.tok, PROMPTS, steered, judge)["share_positive"]
    )
    assert (
        result["examples"][0]["unsteered"] == generate_new_text(tiny.model, tiny.tok, PROMPTS[:1], max_new_tokens=6)[0]
    )


@pytest.fixture(scope="module")
def tiny_states(tiny_dir, tmp_path_factory):
    """An AUSteer and a CAA state fitted on the saved tiny model, with the data record train.py writes."""
    folder = tmp_path_factory.mktemp("behaviour-states")
    model, tok = load_model(str(tiny_dir))
    layout = locate_units(model)
    task_file = folder / "pairs.jsonl"
    rows = [
        {"prompt": f"review {i}:", "positive": "the film was good", "negative": "the film was bad"} for i in range(20)
    ]
    task_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    state = fit_state(model, tok, FIT_PAIRS, k=8, alpha=10.0, base_model=str(tiny_dir))
    state.metadata["data"] = {
        "task": str(task_file),
        "seed": 0,
        "val_fraction": 0.2,
        "test_fraction": 0.2,
        "chat_template": None,
        "max_length": None,
    }
    acc = accumulate_momentum(model, tok, FIT_PAIRS, sites=["residual"], layout=layout)
    caa = caa_state(acc, layout, layer=1, multiplier=10.0, base_model=str(tiny_dir))
    paths = {"austeer": state.save_pretrained(folder / "austeer"), "caa": caa.save_pretrained(folder / "caa")}
    return SimpleNamespace(model=model, tok=tok, paths=paths, task=task_file, folder=folder)


def test_behaviour_analysis_command(tiny_states, tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = [
        "--steering",
        str(tiny_states.paths["austeer"]),
        "--alphas",
        "0,10",
        "--caa_multipliers",
        "0,4",
        "--max_prompts",
        "3",
        "--max_new_tokens",
        "4",
        "--batch_size",
        "2",
        "--out",
        str(out),
        "--wandb_mode",
        "disabled",
    ]
    assert behaviour_cli(argv) == 0
    saved = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file() and "behaviour: wrote" in capsys.readouterr().out
    assert (
        set(saved["methods"]) == {"austeer", "caa"}
        and saved["caa"]["source"] == "fitted"
        and saved["caa"]["n_pairs"] == 12
    )
    assert [p["alpha"] for p in saved["methods"]["caa"]["points"]] == [0.0, 4.0]
    assert saved["n_prompts"] == 3 and saved["task"] == str(tiny_states.task)
    # The prompting baselines: the unsteered model on the same requests, prompted (recomputed here directly).
    from austeer_pl.scoring.generation import generate_new_text
    from austeer_pl.tasks.config import DataConfig
    from austeer_pl.tasks.prompts import behaviour_prompts

    assert set(saved["prompts"]) == {"zero_shot", "few_shot"} and saved["few_shot_settings"] == {"shots": 4}
    config = DataConfig.from_mapping(
        json.loads((tiny_states.paths["austeer"] / "steering_config.json").read_text())["metadata"]["data"]
    )
    for name, settings in (("zero_shot", {"instruction": "auto"}), ("few_shot", {"shots": 4})):
        task, parts = config.replace(**settings).load()
        prompts = behaviour_prompts(tiny_states.tok, task, parts["val"][:3])
        texts = generate_new_text(tiny_states.model, tiny_states.tok, prompts, max_new_tokens=4, batch_size=2)
        assert saved["prompts"][name]["texts"] == texts[:3] and saved["prompts"][name]["n"] == len(prompts)
    assert behaviour_cli([*argv[:-4], "--out", str(tmp_path / "c.json"), "--prompting", "nope"]) == 2
    assert "--prompting: unknown baseline(s) nope" in one_line(capsys.readouterr().err)
    # Output paths are checked before any work; bad input is one line and status 2.
    (tmp_path / "dir.json").mkdir()
    assert behaviour_cli([*argv[:-4], "--out", str(tmp_path / "dir.json")]) == 2
    assert "is a folder" in one_line(capsys.readouterr().err)
    assert behaviour_cli(["--steering", str(tmp_path / "none")]) == 2
    assert "no steering state" in one_line(capsys.readouterr().err)
    parser = add_behaviour_arguments(__import__("argparse").ArgumentParser())
    assert parser.parse_args(["--steering", "x"]).budget == 1.5


# ============================================================================ generate.py
@pytest.mark.parametrize("method", ["austeer", "caa"])
def test_generate_cli_in_process(tiny_states, tmp_path, capsys, method):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("the film was\n\ni think that the movie\nok\n")
    out = tmp_path / "gen.jsonl"
    rc = generate_main(
        [
            "--steering",
            str(tiny_states.paths[method]),
            "--prompts",
            str(prompts_file),
            "--max_new_tokens",
            "6",
            "--batch_size",
            "2",
            "--out",
            str(out),
            "--chat_template",
            "off",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [list(r) for r in rows] == [["prompt", "unsteered", "steered"]] * 3
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["unsteered"] for r in rows] == plain_generate(tiny_states.model, tiny_states.tok, PROMPTS, 6)
    assert [r["steered"] for r in rows] != [r["unsteered"] for r in rows]
    assert (
        "unsteered" in captured.out
        and "i think that the movie" in captured.out
        and f"wrote 3 generations to {out}" in captured.out
    )
    # --prompt, --alpha 0 (steering off: equal sides), a JSONL prompts file (the behaviour schema works as is).
    assert (
        generate_main(
            ["--steering", str(tiny_states.paths[method]), "--prompt", "ok", "--prompts", str(tiny_states.task)]
        )
        == 2
    )
    capsys.readouterr()
    out2 = tmp_path / "zero.jsonl"
    assert (
        generate_main(
            [
                "--steering",
                str(tiny_states.paths[method]),
                "--prompts",
                str(tiny_states.task),
                "--alpha",
                "0",
                "--max_new_tokens",
                "4",
                "--out",
                str(out2),
                "--judge",
                "vader",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out2.read_text().splitlines()]
    assert len(rows) == 20 and rows[0]["prompt"] == "review 0:" and all(r["steered"] == r["unsteered"] for r in rows)


def test_generate_cli_errors(tiny_states, tmp_path, capsys):
    state = str(tiny_states.paths["austeer"])
    empty, bad, folder = tmp_path / "empty.txt", tmp_path / "bad.jsonl", tmp_path / "folder.jsonl"
    empty.write_text("\n\n")
    bad.write_text('{"prompt": "a"}\n{oops\n')
    folder.mkdir()
    gpt2 = tmp_path / "gpt2"
    make_model("gpt2").save_pretrained(gpt2)
    make_tokenizer().save_pretrained(gpt2)
    cases = [
        (["--prompt", "ok"], "the following arguments are required: --steering"),
        (["--steering", state, "--prompt", "ok", "--prompts", str(empty)], "not allowed with argument"),
        (["--steering", str(tmp_path / "nothing"), "--prompt", "ok"], "no steering state at"),
        (["--steering", state, "--prompt", "ok", "--out", str(folder)], "it is a folder"),
        (["--steering", state, "--prompts", str(tmp_path / "missing.txt")], "no such prompts file"),
        (["--steering", state, "--prompts", str(empty)], "no prompts"),
        (["--steering", state, "--prompts", str(bad)], "bad.jsonl:2: invalid JSON"),
        (["--steering", state, "--prompt", "ok", "--max_new_tokens", "0"], "--max_new_tokens must be positive"),
        (["--steering", state, "--prompt", "ok", "--model", str(gpt2)], "steering state is for a 'llama' model"),
        (["--steering", state, "--prompt", "ok", "--judge", "nope"], "unknown judge"),
    ]
    for argv, words in cases:
        out = tmp_path / "never.jsonl"
        assert generate_main([*argv, "--out", str(out)] if "--out" not in argv else argv) == 2, argv
        err = one_line(capsys.readouterr().err)
        assert err.startswith("error: ") and words in err, (argv, err)
        assert not out.exists()


# ============================================================================ the embedded sentiment task
@pytest.fixture(scope="module")
def sentiment():
    return sentiment_task()


def test_sentiment_task_rows(sentiment):
    rotten = {ex.uid: ex for ex in T.load_rotten_tomatoes().examples}
    head, tail = T.RT_PROMPT.split("{text}")
    assert sentiment.name == "sentiment" and sentiment.scoring == "choice" and sentiment.answer_prefix == "Review:"
    assert len(sentiment.examples) == 2817
    assert len({ex.uid for ex in sentiment.examples}) == 2817 and len({ex.prompt for ex in sentiment.examples}) == 2817
    assert Counter(ex.answer for ex in sentiment.examples) == {0: 2817}
    used: set[str] = set()
    for ex in sentiment.examples:
        match = re.fullmatch(r"sentiment:(\d+)-(\d+)", ex.uid)
        assert match, ex.uid
        pos, neg = (rotten[f"rotten_tomatoes:{row}"] for row in match.groups())
        assert (pos.target, neg.target) == ("positive", "negative")
        raw = [e.prompt[len(head) : -len(tail)] for e in (pos, neg)]
        assert ex.choices == tuple(detokenize_review(r) for r in raw)
        words = [len(r.split()) for r in raw]  # the source's tokens
        assert all(SENTIMENT_MIN_WORDS <= w <= SENTIMENT_MAX_WORDS for w in words)
        assert abs(words[0] - words[1]) <= 1  # length-matched pairs
        used.update(match.groups())
    assert len(used) == 2 * 2817  # every review sentence is used once
    # The prompts do not lean either way (VADER finds no sentiment word in any of them).
    vader = VaderJudge()
    assert set(vader.score(sentiment_prompts())) == {0.0}
    # The judge agrees with the construction in aggregate (VADER is a noisy reader of these reviews: 0.67 vs. 0.39).
    share = [vader.judge([ex.choices[i] for ex in sentiment.examples]).n_positive / 2817 for i in (0, 1)]
    assert share[0] > share[1] + 0.2
    assert sentiment.examples[:3] == sentiment_task.__wrapped__().examples[:3]  # deterministic, not only cached
    first = sentiment.examples[0]
    assert first.prompt == "How was the animated feature you watched on a plane? Answer in one line."
    assert first.choices == ("Illuminating if overly talky documentary.", "Simplistic, silly and tedious.")
    parts = T.split_examples(sentiment.examples, seed=0, max_train=64)
    pairs = T.make_pairs(parts["train"], seed=0)
    assert len(pairs) == 64 and all(p.negative == ex.choices[1] for p, ex in zip(pairs, parts["train"]))
    assert T.format_prompt(None, sentiment, first.prompt, chat_template=False).endswith("Answer in one line.\nReview:")
    assert detokenize_review('i liked it , " truly " ( mostly ) .') == 'I liked it, "truly" (mostly).'


def test_sentiment_registered_in_load_task(sentiment):
    if "sentiment" not in T.EMBEDDED_TASKS:
        pytest.skip("sentiment is not registered in tasks.EMBEDDED_TASKS yet")
    assert T.load_task("sentiment").examples == sentiment.examples


# ============================================================================ the embedded model
@pytest.mark.real_model
def test_real_model_fluency_and_steered_generation(sentiment):
    model, tok = load_model("smollm2-135m-instruct")
    fluent = "The film is a warm, funny and moving story about a family."
    scrambled = "family funny a The story, about warm and film is moving a."
    ppl = perplexity(
        model, tok, ["Write a one-line review of the new film.\nReview:"] * 2, [" " + fluent, " " + scrambled]
    )
    assert ppl[0] < ppl[1] / 3
    texts = [
        T.join_answer(T.format_prompt(tok, sentiment, ex.prompt), c)
        for ex in sentiment.examples[:8]
        for c in ex.choices
    ]
    state = fit_state(model, tok, list(zip(texts[::2], texts[1::2])), k=20, alpha=4.0)
    prompts = [T.format_prompt(tok, sentiment, ex.prompt) for ex in sentiment.examples[-2:]]
    pairs = generate_pairs(model, tok, state, prompts, max_new_tokens=12)
    assert pairs.unsteered == plain_generate(model, tok, prompts, 12)
    assert pairs.steered != pairs.unsteered and all(t.strip() for t in pairs.unsteered)


def test_train_chooses_by_judge_and_evaluate_reports_it(tiny_dir, tmp_path, capsys):
    """train.py on a behaviour task picks its grid point by the judge under the fluency budget (every
    candidate's share and perplexity ratio are recorded), and evaluate.py reports judge and fluency."""
    import json

    from austeer_pl import SteeringState
    from austeer_pl.cli.evaluate import evaluate_main
    from austeer_pl.cli.train import train_main

    rows = tmp_path / "pairs.jsonl"
    with open(rows, "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"say {i % 7} ", "positive": "good good", "negative": "bad bad"}) + "\n")
    export = tmp_path / "state"
    code = train_main(
        [
            "--model.model_name",
            str(tiny_dir),
            "--data.task",
            str(rows),
            "--model.site",
            "attention",
            "--model.k",
            "[2, 4]",
            "--model.alpha",
            "[1, 8]",
            "--model.selection",
            "judge",
            "--model.max_new_tokens",
            "4",
            "--model.max_judge_prompts",
            "5",
            "--data.batch_size",
            "8",
            "--run_dir",
            str(tmp_path / "run"),
            "--export_dir",
            str(export),
            "--wandb_mode",
            "disabled",
        ]
    )
    assert code == 0, capsys.readouterr().err
    fit = SteeringState.from_pretrained(export).metadata["fit"]
    assert (
        fit["selection"] == "judge"
        and fit["judge"] == "vader"
        and fit["fluency_budget"] == 1.5
        and fit["n_val_prompts"] == 5
    )
    assert len(fit["grid"]) == 4 and all({"share_positive", "perplexity_ratio"} <= set(g) for g in fit["grid"])
    chosen = next(
        g
        for g in fit["grid"]
        if g["k"] == SteeringState.from_pretrained(export).k
        and g["alpha"] == SteeringState.from_pretrained(export).alpha
    )
    within = [g for g in fit["grid"] if g["perplexity_ratio"] <= 1.5]
    if within:  # the pick respects the budget whenever some point does
        assert chosen["perplexity_ratio"] <= 1.5 and chosen["share_positive"] == max(
            g["share_positive"] for g in within
        )
    assert "val share judged positive" in capsys.readouterr().out
    report = tmp_path / "r.json"
    assert (
        evaluate_main(
            [
                "--steering",
                str(export),
                "--scoring",
                "judge",
                "--max_new_tokens",
                "4",
                "--limit",
                "6",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    r = json.loads(report.read_text())
    assert r["scoring"] == "judge" and 1 <= r["n_prompts"] <= 6  # the distinct prompts of 6 test examples
    for side in ("unsteered", "steered"):
        assert (
            0 <= r[side]["ci_low"] <= r[side]["share_positive"] <= r[side]["ci_high"] <= 1 and r[side]["perplexity"] > 0
        )
    assert r["perplexity_ratio"] == pytest.approx(r["steered"]["perplexity"] / r["unsteered"]["perplexity"])
