"""Choosing well: replayed grid scoring, the harm measure, successive halving and the verdict."""

from __future__ import annotations

import math

import pytest
import torch

from austeer_pl.core.reading import unreplayed
from austeer_pl.core.selection import Selection
from austeer_pl.core.sites import locate_units
from austeer_pl.core.state import SteeringState
from austeer_pl.fit.choose import Candidate, choose, halving_schedule
from austeer_pl.fit.gridscore import (
    GridScorer,
    LayerReplay,
    decision_statistics,
    harm_kl,
)
from austeer_pl.scoring.evaluate import answer_suffixes
from austeer_pl.scoring.loglik import choice_logprobs
from austeer_pl.scoring.statistics import criterion_values
from austeer_pl.tasks import Task, TaskExample
from austeer_pl.tasks.prompts import format_prompt

from helpers import (
    make_model,
    make_tokenizer,
    tiny_model,
    tiny_tokenizer,
    word_examples,
    write_less_task,
)


def _state(layout, site: str, units: list[tuple[int, int]], alpha: float) -> SteeringState:
    sel = Selection(
        (site,),
        torch.zeros(len(units), dtype=torch.long),
        torch.tensor([l for l, _ in units]),
        torch.tensor([u for _, u in units]),
        torch.linspace(0.9, 0.6, len(units)),
    )
    return SteeringState.from_selection(sel, layout, alpha=alpha)


def _examples(n: int, long_answers: bool = False):
    words = ["yes", "no"] if not long_answers else ["yes it is so", "no, not at all"]
    exs = [
        TaskExample(f"is {i % 7} less than {(i * 3) % 5}", tuple(words), int((i % 7) >= (i * 3) % 5), f"t:{i}")
        for i in range(n)
    ]
    return Task("less", tuple(exs)), exs, [f"q: {e.prompt}?\nA:" for e in exs]


def _oracle_stats(model, tok, task, state, examples, prompts, layout):
    """Independent oracle: the plain scorer with the state's hooks, then the statistics by hand."""
    answers = [answer_suffixes(p, ex.choices, task) for p, ex in zip(prompts, examples)]
    ctx = state.apply(model, layout=layout) if state is not None else None
    try:
        scores = choice_logprobs(model, tok, prompts, answers, batch_size=4)
    finally:
        if ctx is not None:
            ctx.remove()
    rows = []
    for sc, ex in zip(scores, examples):
        sc = sc.double()
        right, wrong = sc[ex.answer], sc[1 - ex.answer]
        rows.append(
            [
                float(sc.argmax() == ex.answer),
                float(right - wrong),
                float(math.log(math.exp(sc[0]) + math.exp(sc[1])) - right),
            ]
        )
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("long_answers", [False, True])
def test_replayed_grid_scores_equal_plain_scoring(arch, long_answers, monkeypatch):
    """Multi-token answers (character-level): each batch's prompts are computed once for both answers (a prefill and a round per
    answer, each forward recorded and replayed; the layers a replayed prefill skips hold a placeholder cache)."""
    import austeer_pl.core.kvcache as kvcache
    import austeer_pl.scoring.loglik as loglik

    shared = []
    spy = kvcache.shared_prompt_logprobs

    def spied(*args, **kwargs):
        got = spy(*args, **kwargs)
        shared.append(got is not None)
        return got

    monkeypatch.setattr(loglik, "shared_prompt_logprobs", spied)
    model, tok = make_model(arch), make_tokenizer()
    layout = locate_units(model)
    task, examples, prompts = _examples(10, long_answers)
    top = layout.n_layers - 1
    sites = [s for s in ("attention", "ffn", "residual") if s in layout.sites]
    states = (
        [None]
        + [_state(layout, s, [(top, 1), (top, 5)], 3.0) for s in sites]
        + [_state(layout, "attention", [(0, 2), (top, 3)], 2.0)]
    )
    replayed = GridScorer(model, tok, layout, task, batch_size=4, replay=True).score(states, examples, prompts)
    plain = GridScorer(model, tok, layout, task, batch_size=4, replay=False).score(states, examples, prompts)
    # Replay skips the layers below each state's first steered layer: the same inputs, so the same bits.
    assert torch.equal(replayed, plain)
    assert shared == [True] * 3 * len(states) * 2  # 10 examples in batches of 4, replayed and plain
    for j, state in enumerate(states):
        torch.testing.assert_close(
            replayed[j], _oracle_stats(model, tok, task, state, examples, prompts, layout), rtol=0, atol=1e-5
        )
    # The states really differ from unsteered (the test would pass on a no-op otherwise), and nothing is left patched.
    assert not torch.allclose(replayed[1, :, 2], replayed[0, :, 2])
    assert all("forward" not in vars(layer) for layer in layout.layers)


def test_replay_refuses_more_forwards_than_recorded():
    model = make_model("llama")
    layout = locate_units(model)
    replay = LayerReplay(model, layout, max_layer=2)
    ids = torch.tensor([[3, 4, 5]])
    with replay.recording():
        model(input_ids=ids)
    with replay.replaying(2):
        model(input_ids=ids)
        with pytest.raises(Exception, match="more forwards than its recording"):
            model(input_ids=ids)
    assert all("forward" not in vars(layer) for layer in layout.layers)


def test_harm_kl_is_zero_unsteered_and_matches_the_full_forward():
    model, tok = make_model("llama"), make_tokenizer()
    layout = locate_units(model)
    texts = [("q: is 3 less than 4?\na:", " yes it is"), ("tell me a word:", " apple pie")]
    weak, strong = _state(layout, "attention", [(2, 1)], 1.0), _state(layout, "ffn", [(1, 1), (2, 4), (2, 7)], 30.0)
    kl = harm_kl(model, tok, layout, [None, weak, strong], texts)
    assert kl[0] == 0 and 0 < kl[1] < kl[2]
    assert torch.equal(kl, harm_kl(model, tok, layout, [None, weak, strong], texts, replay=False))
    # Oracle: KL(p || q) over the continuation tokens, one text at a time, without padding.
    for state, value in ((weak, kl[1]), (strong, kl[2])):
        total, count = 0.0, 0
        for p, c in texts:
            p_ids = tok(p, add_special_tokens=False)["input_ids"]
            full = tok(p + c, add_special_tokens=False)["input_ids"]
            n_cont = len(full) - len(p_ids)
            ids = torch.tensor([full])
            base = torch.log_softmax(model(input_ids=ids).logits[0, -n_cont - 1 : -1].double(), -1)
            with state.apply(model, layout=layout):
                steered = torch.log_softmax(model(input_ids=ids).logits[0, -n_cont - 1 : -1].double(), -1)
            total += float((base.exp() * (base - steered)).sum())
            count += n_cont
        assert float(value) == pytest.approx(total / count, rel=1e-4, abs=1e-7)


def test_decision_statistics_follow_the_definitions():
    stats = decision_statistics([torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-3.0, -1.0])], [0, 1])
    assert stats[0, 0] == 0 and stats[0, 1] == pytest.approx(-1.0 + 0.5)
    assert stats[0, 2] == pytest.approx(math.log(math.exp(-1) + math.exp(-2) + math.exp(-0.5)) + 1.0)
    assert stats[1, 0] == 1 and stats[1, 1] == pytest.approx(2.0)
    assert torch.equal(criterion_values(stats, "loss"), -stats[:, 2])


def test_strength_validation_sums_match_the_per_example_oracle():
    from austeer_pl.fit.strength import StrengthTrainer

    model, tok = make_model("llama"), make_tokenizer()
    layout = locate_units(model)
    task, examples, prompts = _examples(9)
    three = Task(
        "three", tuple(TaskExample(ex.prompt, ("yes", "no", "maybe"), ex.answer, ex.uid) for ex in examples[:5])
    )
    for t, exs in ((task, examples), (three, list(three.examples))):
        state = _state(layout, "ffn", [(1, 2), (2, 5)], 4.0)
        trainer = StrengthTrainer(model, layout, state, "scalar")
        sums = trainer.validation_sums(
            tok, t, exs, prompts[: len(exs)], scoring="loglik", batch_size=4, max_length=None
        )
        with state.apply(model, layout=layout):
            scores = choice_logprobs(
                model,
                tok,
                prompts[: len(exs)],
                [answer_suffixes(p, ex.choices, t) for p, ex in zip(prompts, exs)],
                batch_size=4,
            )
        correct = sum(float(int(sc.argmax()) == ex.answer) for sc, ex in zip(scores, exs))
        nll = sum(-float(sc[ex.answer]) for sc, ex in zip(scores, exs))
        loss = sum(math.log(sum(math.exp(float(v)) for v in sc)) - float(sc[ex.answer]) for sc, ex in zip(scores, exs))
        assert sums.tolist() == pytest.approx([correct, len(exs), nll, loss], rel=1e-9, abs=1e-9)


def test_strength_epochs_are_chosen_by_the_grids_criterion():
    from austeer_pl.fit.strength import StrengthTrainer

    model = make_model("llama")
    layout = locate_units(model)
    state = _state(layout, "ffn", [(1, 2)], 2.0)
    # sums: right answers, examples, NLL sum, choice log-loss sum. Epoch 1: more right, higher loss;
    # epoch 2: fewer right, the lowest loss; epoch 3: no better on either.
    history = [(6, 10, 9.0, 6.0), (8, 10, 9.5, 6.5), (5, 10, 8.0, 5.0), (5, 10, 8.0, 5.0)]
    picked = {}
    for criterion in ("accuracy", "loss"):
        trainer = StrengthTrainer(model, layout, state, "scalar", loss="choice", criterion=criterion, patience=5)
        trainer.begin(torch.tensor(history[0], dtype=torch.float64))
        for epoch, sums in enumerate(history[1:], 1):
            trainer.end_epoch(epoch, torch.tensor(sums, dtype=torch.float64))
        picked[criterion] = trainer.best["epoch"]
    assert picked == {"accuracy": 1, "loss": 2}  # a tie (epoch 3) never replaces the best
    with pytest.raises(Exception, match="accuracy or loss"):
        StrengthTrainer(model, layout, state, "scalar", criterion="margin")


# ---------------------------------------------------------------------------- the chooser on synthetic statistics
class _Units:
    def __init__(self, k, alpha):
        self.k, self.alpha = k, alpha


def _grid(means, n=200, noise=0.3, seed=0, acc=None):
    """Candidate 0 unsteered; candidate i's per-example loss is its mean plus shared-example noise."""
    g = torch.Generator().manual_seed(seed)
    example = torch.randn(n, generator=g, dtype=torch.float64) * noise  # the same hard examples for everyone
    stats = torch.zeros(len(means), n, 3, dtype=torch.float64)
    for i, m in enumerate(means):
        stats[i, :, 2] = m + example + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)
        stats[i, :, 0] = (stats[i, :, 2] < 0.69).double() if acc is None else acc[i]
    cands = [Candidate("unsteered", {}, None)] + [
        Candidate("austeer", {"k": i}, _Units(i, 1.0)) for i in range(1, len(means))
    ]
    calls = []

    def score(idx, lo, hi):
        calls.append((list(idx), lo, hi))
        return stats[list(idx), lo:hi]

    return cands, stats, score, calls


def test_halving_keeps_the_best_and_scores_far_less():
    means = [0.70] + [0.70 - 0.002 * i for i in range(1, 28)]  # candidate 27 is the best
    cands, _stats, score, calls = _grid(means)
    full = choose(cands, 200, score, halving=False, level=1.0)
    cands, _stats, score, calls = _grid(means)
    halved = choose(cands, 200, score, halving=True, min_examples=16, eta=3, level=1.0)
    assert full.best == halved.best == 27
    assert halved.scored_evaluations < 0.4 * full.scored_evaluations
    assert halving_schedule(200, 27, min_examples=16, eta=3, final=2) == [16, 48, 144, 200]
    # The unsteered model is scored on every example; no example range is scored twice for a candidate.
    assert halved.n_scored[0] == 200
    seen = {}
    for idx, lo, hi in calls:
        for i in idx:
            assert seen.get(i, 0) == lo
            seen[i] = hi


def test_verdict_says_when_nothing_beats_no_steering():
    # Every steered point is unsteered plus independent noise: the best of 20 looks better by chance.
    cands, _stats, score, _ = _grid([0.70] * 21, n=150, seed=3)
    choice = choose(cands, 150, score, halving=False)
    assert choice.index == 0 and not choice.helps and choice.best is not None
    assert "within the noise" in choice.reason
    # The same grid with one point really better: it is chosen and the verdict says it helps.
    cands, _stats, score, _ = _grid([0.70] * 20 + [0.60], n=150, seed=3)
    choice = choose(cands, 150, score, halving=False)
    assert choice.index == choice.best == 20 and choice.helps and choice.gain > choice.threshold > 0


def test_verdict_refuses_a_point_that_lowers_accuracy():
    acc = [1.0, 0.0]
    cands, _stats, score, _ = _grid([0.70, 0.50], n=100, acc=acc)
    choice = choose(cands, 100, score, halving=False)
    assert choice.index == 0 and choice.best == 1 and "lowers validation accuracy" in choice.reason


def test_harm_budget_excludes_points_before_scoring():
    cands, _stats, score, calls = _grid([0.70, 0.50, 0.65], n=100)
    harm = torch.tensor([0.0, 2.0, 0.1], dtype=torch.float64)
    choice = choose(cands, 100, score, halving=False, harm=lambda idx: harm[list(idx)], harm_budget=0.5)
    assert choice.best == 2 and choice.harm == {1: 2.0, 2: pytest.approx(0.1)}
    assert all(1 not in idx for idx, _, _ in calls)  # the harmful point is never scored
    none = choose(cands, 100, score, halving=False, harm=lambda idx: torch.full((len(idx),), 9.0), harm_budget=0.5)
    assert none.index == 0 and none.best is None and "harm budget" in none.reason


def test_ties_go_to_fewer_units_then_weaker_push():
    stats = torch.zeros(4, 10, 3, dtype=torch.float64)
    stats[:, :, 2] = 0.5
    stats[0, :, 2] = 0.7
    cands = [
        Candidate("unsteered", {}, None),
        Candidate("a", {}, _Units(10, 4.0)),
        Candidate("a", {}, _Units(3, 8.0)),
        Candidate("a", {}, _Units(3, 4.0)),
    ]
    choice = choose(cands, 10, lambda idx, lo, hi: stats[list(idx), lo:hi], halving=False, level=1.0)
    assert choice.best == 3


def test_choose_rejects_a_grid_without_no_steering():
    with pytest.raises(Exception, match="unsteered"):
        choose([Candidate("a", {}, _Units(1, 1.0))], 10, lambda *a: None)


def test_mcnemar_exact_against_enumeration():
    from itertools import product

    from austeer_pl.scoring.statistics import mcnemar

    assert mcnemar([0, 0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1, 0]) == {
        "gained": 6,
        "lost": 1,
        "p_value": 0.125,
        "significant_at_0.05": False,
    }
    assert mcnemar([1, 0], [1, 0])["p_value"] == 1.0
    # Oracle: the two-sided p-value is the probability, over all 2^m fair splits of the m discordant
    # examples, of a split at least as lopsided as the observed one.
    for gained, lost in [(9, 1), (12, 3), (4, 4), (0, 7)]:
        m = gained + lost
        extreme = sum(1 for bits in product((0, 1), repeat=m) if abs(2 * sum(bits) - m) >= abs(gained - lost))
        result = mcnemar([0] * gained + [1] * lost, [1] * gained + [0] * lost)
        assert result["p_value"] == pytest.approx(min(1.0, extreme / 2**m))
    assert mcnemar([0] * 10, [1] * 10)["significant_at_0.05"]


@pytest.mark.real_model
def test_harm_budget_keeps_generation_coherent_on_embedded_model():
    """On SmolLM2, the default grid's worst point within the default harm budget still writes fluent
    text (the README's prompt and an ordinary one), and the worst point over it does not: the budget
    is what keeps an exported default state coherent (train.py never exports a point above it)."""
    from austeer_pl.core.pairs import accumulate_momentum
    from austeer_pl.fit.config import SelectionConfig
    from austeer_pl.fit.gridscore import generic_texts
    from austeer_pl.fit.statistics import rank_site_options
    from austeer_pl.methods import AusteerGrid
    from austeer_pl.scoring.fluency import distinct_n, perplexity
    from austeer_pl.tasks.config import DataConfig

    DEFAULT_GRID, DEFAULT_SELECTION = AusteerGrid().as_grid(), SelectionConfig().choose_kwargs()
    from austeer_pl.core.models import load_model
    from austeer_pl.methods.registry import FitContext, build_state
    from austeer_pl.scoring.generation import generate_new_text as generate_texts
    from austeer_pl.tasks import format_prompt, join_answer, make_pairs

    model, tok = load_model("smollm2-135m-instruct")
    layout = locate_units(model)
    config = DataConfig(max_train_pairs=64)
    task, splits = config.load()
    pairs = make_pairs(splits["train"], negatives="sample", seed=0, max_pairs=64)
    texts = {p.prompt: format_prompt(tok, task, p.prompt) for p in pairs}
    acc = accumulate_momentum(
        model,
        tok,
        [(join_answer(texts[p.prompt], p.positive), join_answer(texts[p.prompt], p.negative)) for p in pairs],
        sites=("attention", "ffn"),
        layout=layout,
    )
    rankings = rank_site_options(acc, [(s, (s,)) for s in DEFAULT_GRID["site"]], "promote", max(DEFAULT_GRID["k"]))
    ctx = FitContext(layout=layout, acc=acc, rankings=rankings)
    states = [
        build_state("austeer", ctx, site=s, k=k, alpha=a)
        for s in DEFAULT_GRID["site"]
        for k in DEFAULT_GRID["k"]
        for a in DEFAULT_GRID["alpha"]
    ]
    kl = harm_kl(model, tok, layout, states, generic_texts(tok, model))
    budget = DEFAULT_SELECTION["harm_budget"]
    within = [i for i in range(len(states)) if kl[i] <= budget]
    assert within and len(within) < len(states)
    asks = [
        format_prompt(tok, Task("generic", ()), a, chat_template=True)
        for a in (
            "Review: a gorgeous, moving film.\nIs the sentiment of this review positive or negative?",
            "Write one sentence about the sea.",
        )
    ]
    base = generate_texts(model, tok, asks, max_new_tokens=24)
    base_ppl = perplexity(model, tok, asks, base)

    def fluency(state):
        with state.apply(model, layout=layout):
            out = generate_texts(model, tok, asks, max_new_tokens=24)
        return (
            float((perplexity(model, tok, asks, out).log().mean() - base_ppl.log().mean()).exp()),
            distinct_n(out),
            out,
        )

    worst_in = max(within, key=lambda i: float(kl[i]))
    ratio, distinct, out = fluency(states[worst_in])
    # Coherent: perplexity under the unsteered model at most 2.5x the unsteered answers' and no loops.
    # (On the 256-pair default grid the points within the budget measured 0.93x to 1.34x, those above
    # it 2.9x to 915x: benchmarks/README.md, "Choosing well".)
    assert ratio <= 2.5 and distinct >= 0.6, (float(kl[worst_in]), ratio, distinct, out)
    worst = int(kl.argmax())
    ratio_bad, distinct_bad, out_bad = fluency(states[worst])
    assert ratio_bad > 2.5 or distinct_bad < 0.6, (float(kl[worst]), ratio_bad, distinct_bad, out_bad)


def test_a_fit_that_does_not_help_says_so_and_exports_an_empty_state(tiny_dir, tmp_path, capsys):
    """On a random tiny model nothing beats no steering beyond the noise: train.py says so, exports a
    state with no units (evaluate.py reports steered == unsteered, McNemar p = 1), and
    --export_anyway exports the best steered point instead, with the same verdict recorded."""
    import json

    from austeer_pl.cli.evaluate import evaluate_main
    from austeer_pl.cli.train import train_main

    task = write_less_task(tmp_path / "less.jsonl", 60, seed=4)
    common = [
        "--model.model_name",
        str(tiny_dir),
        "--data.task",
        str(task),
        "--model.k",
        "[2, 4]",
        "--model.alpha",
        "[1, 2]",
        "--data.batch_size",
        "8",
        "--wandb_mode",
        "disabled",
    ]
    assert train_main([*common, "--run_dir", str(tmp_path / "r1"), "--export_dir", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    state = SteeringState.from_pretrained(tmp_path / "none")
    fit = state.metadata["fit"]
    assert (
        state.k == 0
        and not fit["verdict"]["helps"]
        and "steering did not help" in out
        and "no steering exported" in out
    )
    assert fit["verdict"]["best"] is not None and len(fit["grid"]) == 8  # both sites x 2 k x 2 alpha
    report = tmp_path / "r.json"
    assert evaluate_main(["--steering", str(tmp_path / "none"), "--limit", "8", "--report", str(report)]) == 0
    r = json.loads(report.read_text())
    assert (
        r["n_steered_activations"] == 0 and r["steered"]["per_example_correct"] == r["unsteered"]["per_example_correct"]
    )
    assert r["mcnemar"]["p_value"] == 1.0 and not r["fit_verdict"]["helps"]
    assert "exported no steering" in capsys.readouterr().out

    assert (
        train_main(
            [
                *common,
                "--run_dir",
                str(tmp_path / "r2"),
                "--export_dir",
                str(tmp_path / "anyway"),
                "--export_anyway",
                "true",
            ]
        )
        == 0
    )
    best = SteeringState.from_pretrained(tmp_path / "anyway")
    assert best.k in (2, 4) and best.metadata["fit"]["verdict"] == fit["verdict"]
    assert {"site": best.metadata["fit"]["site"], "k": best.k, "alpha": best.alpha} == {
        key: fit["verdict"]["best"][key] for key in ("site", "k", "alpha")
    }


def test_verdict_correction_counts_the_final_round_or_the_whole_grid():
    # Point 27's per-example gain over unsteered is exactly 0.010 +- 0.06 (t = 2.36 on 200 examples),
    # the others are clearly worse: enough against the final round's two points (z = 1.96), not
    # against Bonferroni over all 27 (z = 2.90).
    from statistics import NormalDist

    n = 200
    z = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = (z - z.mean()) / z.std()
    stats = torch.zeros(28, n, 3, dtype=torch.float64)
    stats[:, :, 2] = 0.7 + 0.05 * torch.arange(28, dtype=torch.float64).unsqueeze(1) / 27  # worse and worse
    stats[27, :, 2] = 0.7 - (0.010 + 0.06 * z)
    stats[:, :, 0] = 1.0
    cands = [Candidate("unsteered", {}, None)] + [Candidate("austeer", {}, _Units(i, 1.0)) for i in range(1, 28)]
    score = lambda idx, lo, hi: stats[list(idx), lo:hi]  # noqa: E731
    final = choose(cands, n, score, halving=True, min_examples=16, eta=3, correction="final")
    grid = choose(cands, n, score, halving=True, min_examples=16, eta=3, correction="grid")
    assert final.best == grid.best == 27 and final.rounds[-1]["candidates"] == 2
    assert final.gain / final.gain_se == pytest.approx(0.010 / (0.06 / math.sqrt(n)))
    assert final.threshold / final.gain_se == pytest.approx(NormalDist().inv_cdf(1 - 0.05 / 2), abs=1e-9)
    assert grid.threshold / grid.gain_se == pytest.approx(NormalDist().inv_cdf(1 - 0.05 / 27), abs=1e-9)
    assert final.helps and final.index == 27 and not grid.helps and grid.index == 0
    with pytest.raises(Exception, match="verdict_correction"):
        choose(cands, 200, score, correction="holm")


def test_a_learned_strength_is_exported_only_when_it_beats_no_steering(tiny_dir, tmp_path, capsys):
    """The grid's verdict also judges the learned strength: on a task where nothing helps, the
    export stays the empty state (with the learned verdict recorded) unless --export_anyway; on a
    task the learned strength can solve (the right answer is always "yes"), it is exported."""
    import json

    from austeer_pl.cli.train import train_main

    task = write_less_task(tmp_path / "less.jsonl", 60, seed=4)
    common = [
        "--model.model_name",
        str(tiny_dir),
        "--model.k",
        "[4]",
        "--model.alpha",
        "[1]",
        "--model.strength",
        "scalar",
        "--model.strength_epochs",
        "1",
        "--data.batch_size",
        "8",
        "--wandb_mode",
        "disabled",
    ]
    assert (
        train_main(
            [
                *common,
                "--data.task",
                str(task),
                "--run_dir",
                str(tmp_path / "r1"),
                "--export_dir",
                str(tmp_path / "none"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    state = SteeringState.from_pretrained(tmp_path / "none")
    learned = state.metadata["fit"]["learned_verdict"]
    assert (
        state.k == 0
        and not learned["helps"]
        and "learned strength" in learned["reason"]
        and "learned strength verdict" in out
    )
    assert (
        "val/learned_helps" in (tmp_path / "r1" / "logs" / "metrics.csv").read_text().splitlines()[0]
    )  # logged after the fit
    assert (
        learned["tests"] == 1 + state.metadata["fit"]["verdict"]["rounds"][-1]["candidates"]
    )  # the final round's points + one trained epoch
    assert (
        train_main(
            [
                *common,
                "--data.task",
                str(task),
                "--run_dir",
                str(tmp_path / "r2"),
                "--export_dir",
                str(tmp_path / "anyway"),
                "--export_anyway",
                "true",
            ]
        )
        == 0
    )
    anyway = SteeringState.from_pretrained(tmp_path / "anyway")
    assert (
        anyway.strength["kind"] == "scalar" and anyway.k == 4 and anyway.metadata["fit"]["learned_verdict"] == learned
    )

    yes = tmp_path / "always_yes.jsonl"
    yes.write_text(
        "".join(
            json.dumps({"prompt": f"say yes {i % 10}", "choices": ["yes", "no"], "answer": 0}) + "\n" for i in range(80)
        )
    )
    assert (
        train_main(
            [
                *common,
                "--data.task",
                str(yes),
                "--model.strength_lr",
                "0.5",
                "--model.strength_loss",
                "choice",
                "--model.kl_weight",
                "0",
                "--model.harm_budget",
                "null",
                "--model.strength_epochs",
                "2",
                "--run_dir",
                str(tmp_path / "r3"),
                "--export_dir",
                str(tmp_path / "yes"),
            ]
        )
        == 0
    )
    solved = SteeringState.from_pretrained(tmp_path / "yes")
    verdict = solved.metadata["fit"]["learned_verdict"]
    assert verdict["helps"] and verdict["gain"] > verdict["threshold"] and solved.strength["kind"] == "scalar", verdict


def test_few_shot_prompts_replay_exactly_from_their_shared_prefix(monkeypatch):
    """Few-shot prompts are scored from their demonstrations' cache (one prefill per batch and state,
    outside the replay), and replay still gives the bits of the full grid pass."""
    import austeer_pl.scoring.loglik as loglik

    model, tok = tiny_model().to(torch.float64), tiny_tokenizer()
    tok.pad_token = "<unk>"
    layout = locate_units(model)
    examples = word_examples([3, 7, 1, 9, 4, 2, 6], seed=3)
    task = Task("words", tuple(examples), demonstrations=(("w11 w12", "w5"), ("w14", "w6")), answer_prefix="w3")
    prompts = [format_prompt(tok, task, ex.prompt, chat_template=False) for ex in examples]
    states = [
        None,
        _state(layout, "attention", [(1, 1), (1, 5)], 3.0),
        _state(layout, "ffn", [(0, 2), (1, 3)], 2.0),
    ]
    continued = []
    spy = loglik.prefix_last_logits
    monkeypatch.setattr(loglik, "prefix_last_logits", lambda *a, **k: continued.append(1) or spy(*a, **k))
    replayed = GridScorer(model, tok, layout, task, batch_size=3, replay=True).score(states, examples, prompts)
    assert len(continued) == 3 * len(states)  # three batches, each state
    plain = GridScorer(model, tok, layout, task, batch_size=3, replay=False).score(states, examples, prompts)
    assert torch.equal(replayed, plain)
    for j, state in enumerate(states):  # the oracle scores whole prompts (no prefix)
        torch.testing.assert_close(
            replayed[j], _oracle_stats(model, tok, task, state, examples, prompts, layout), rtol=0, atol=1e-6
        )
    assert not torch.allclose(replayed[1, :, 2], replayed[0, :, 2])
    assert all("forward" not in vars(layer) for layer in layout.layers)


def test_replay_keeps_a_layers_own_forward():
    """A layer's instance forward (accelerate's dispatch wrapper) is restored after a replay, and a
    prefill outside the replay runs it."""
    model = make_model("llama")
    layout = locate_units(model)
    calls = []
    layer = layout.layers[0]
    original = layer.forward

    def own(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    layer.forward = own
    replay = LayerReplay(model, layout, max_layer=2)
    ids = torch.tensor([[3, 4, 5]])
    with replay.recording():
        model(input_ids=ids)
    with replay.replaying(2):
        model(input_ids=ids)
        with unreplayed():
            model(input_ids=ids)
    assert len(calls) == 2 and vars(layer)["forward"] is own


@pytest.mark.parametrize("few_shot", [False, True])
def test_test_scoring_replays_to_the_predictions_of_whole_passes(few_shot, monkeypatch):
    """TestScoring records each batch's unsteered pass once and replays it for every fixed-strength state:
    the predictions of scoring each state alone, with and without a shared few-shot prefix."""
    from types import SimpleNamespace

    import austeer_pl.fit.gridscore as gridscore
    from austeer_pl.fit.choose import predictions
    from austeer_pl.fit.collectives import OneProcess
    from austeer_pl.fit.grid import TestScoring

    model, tok = tiny_model().to(torch.float64), tiny_tokenizer()
    tok.pad_token = "<unk>"
    layout = locate_units(model)
    examples = word_examples([3, 7, 1, 9, 4, 2, 6, 5], seed=5)
    demos = (("w11 w12", "w5"), ("w14", "w6")) if few_shot else ()
    task = Task("words", tuple(examples), demonstrations=demos, answer_prefix="w3")
    prompts = [format_prompt(tok, task, ex.prompt, chat_template=False) for ex in examples]
    states = [
        _state(layout, "attention", [(1, 1), (1, 5)], 40.0),
        None,
        _state(layout, "ffn", [(0, 2), (1, 3)], 30.0),
        _state(layout, "ffn", [(1, 0), (1, 7)], -30.0),
    ]
    data = SimpleNamespace(
        splits={"test": examples},
        test_prompts=prompts,
        task=task,
        batching=SimpleNamespace(eval_batch_size=3),
        config=SimpleNamespace(max_length=None),
    )
    replays = []
    real = gridscore.LayerReplay.replaying
    monkeypatch.setattr(
        gridscore.LayerReplay, "replaying", lambda self, start: replays.append(start) or real(self, start)
    )
    testing = TestScoring(model, tok, layout, data, OneProcess(), scoring="loglik")
    testing.start(states)
    for lo in range(0, len(examples), 3):
        testing.batch(list(range(lo, min(lo + 3, len(examples)))))
    codes, seconds = testing.finish()
    assert replays == [1, 0, 1] * 3  # the two states whose units sit in layer 1 skip layer 0
    for j, state in enumerate(states):
        want = predictions(
            model, tok, task, state, examples, prompts, scoring="loglik", batch_size=3, max_length=None, layout=layout
        )
        assert torch.equal(codes[j], want)
    assert len({tuple(c.tolist()) for c in codes}) > 1 and bool((seconds > 0).all())
