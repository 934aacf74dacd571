"""The learned-strength phase: gradient isolation, export equality, direction of learning, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from austeer_pl import SteeringState, load_model
from austeer_pl.core.strength import GateStrength
from austeer_pl.errors import AusteerError
from austeer_pl.lightning.datamodule import ContrastivePairDataModule
from austeer_pl.lightning.module import AUSteerModule

from helpers import (
    ROOT,
    make_tokenizer,
    write_less_task,
)

ROOT = ROOT


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    return write_less_task(tmp_path_factory.mktemp("strength-task") / "less.jsonl", 60, seed=1)


def fit(tiny_dir, task_file, strength, *, epochs=2, kl_weight=1.0, lr=0.05, export=None):
    module = AUSteerModule(
        model_name=str(tiny_dir),
        k=[4],
        alpha=[1.0],
        strength=strength,
        strength_epochs=epochs,
        strength_lr=lr,
        kl_weight=kl_weight,
        patience=epochs,
    )
    module.export_dir = export
    module.export_anyway = (
        True  # these tests are about the learned state itself, whatever the verdict on a random tiny model
    )
    data = ContrastivePairDataModule(task=str(task_file), batch_size=6, max_val_examples=12)
    trainer = pl.Trainer(
        max_epochs=1 + epochs,
        reload_dataloaders_every_n_epochs=1,
        logger=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=data)
    return module


def primary(module):
    """The trainer of the fit's learned strength (``--model.strength``)."""
    session = module.session
    return session.strength.trainers[session.primary]


def test_gradients_reach_strength_parameters_only(tiny_dir, task_file):
    module = fit(tiny_dir, task_file, "gate", epochs=1)
    dm = module.trainer.datamodule.data
    trainer = primary(module)
    batch = dm.collate_examples_train(dm.train_examples[:5])
    for p in trainer.fn.parameters():
        p.grad = None
    loss, _nll, kl = trainer.batch_loss(batch)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in module.llm.parameters())
    grads = [p.grad for p in trainer.fn.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert torch.isfinite(loss) and kl >= -1e-6


@pytest.mark.parametrize("strength", ["scalar", "gate"])
def test_exported_state_reproduces_trained_module(tiny_dir, task_file, tmp_path, strength):
    module = fit(tiny_dir, task_file, strength)
    trainer = primary(module)
    # Give the strength function clearly non-trivial weights, as if training had moved them far.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trainer.fn.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    trainer.best["weights"] = {k: v.clone() for k, v in trainer.fn.state_dict().items()}
    trainer.fold().save_pretrained(tmp_path / "state")
    state = SteeringState.from_pretrained(tmp_path / "state")
    assert state.strength["kind"] == strength
    ids = make_tokenizer()(
        ["is 3 less than 7\nAnswer: yes", "is 9 less than 1\nAnswer:"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        with trainer.handle():
            trained = module.llm(**ids).logits
        fresh, _ = load_model(str(tiny_dir))  # a new model object, loaded the way users load it
        with state.apply(fresh):
            loaded = fresh(**ids).logits
        plain = fresh(**ids).logits
    assert torch.equal(trained, loaded)
    assert not torch.equal(loaded, plain)
    if strength == "gate":
        from safetensors import safe_open

        with safe_open(tmp_path / "state" / "steering_state.safetensors", "pt") as f:
            assert {k for k in f.keys() if k.startswith("strength.")} == {  # noqa: SIM118 - safe_open is not iterable
                "strength.inner.weight",
                "strength.inner.bias",
                "strength.outer.weight",
                "strength.outer.bias",
            }
        config = json.loads((tmp_path / "state" / "steering_config.json").read_text())
        assert config["strength"]["kind"] == "gate" and "class" not in json.dumps(config["strength"])


@pytest.mark.parametrize("loss", ["nll", "choice"])
def test_learned_scalar_moves_toward_the_useful_direction(tiny_dir, tmp_path, loss):
    # Synthetic task: the right answer is always "yes". The loss (the negative log-likelihood of
    # "yes", or the logistic loss of "yes" vs. "no") as a function of each unit's strength is
    # measured independently (finite differences on the frozen model); training must move every
    # strength downhill on it.
    path = tmp_path / "always_yes.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"say yes {i % 10}", "choices": ["yes", "no"], "answer": 0}) + "\n")
    module = AUSteerModule(
        model_name=str(tiny_dir),
        k=[3],
        alpha=[1.0],
        sign="both",
        strength="scalar",
        strength_epochs=3,
        strength_lr=0.2,
        strength_loss=loss,
        kl_weight=0.0,
        patience=3,
        criterion="accuracy",
    )  # keeps the trained epoch (ties to the trained loss): this test is about the gradient's direction
    data = ContrastivePairDataModule(task=str(path), batch_size=8, max_val_examples=8)
    trainer = pl.Trainer(
        max_epochs=4,
        reload_dataloaders_every_n_epochs=1,
        logger=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=data)
    trainer = primary(module)
    base = trainer.state  # the grid point the scalar started from (the export may be another: the verdict decides)
    init = base.momentum * base.alpha  # the momentum rule the scalar started from
    learned = trainer.fn.scale.detach().clone()
    batch = data.data.collate_examples_train(data.data.train_examples)

    def nll_at(scale: torch.Tensor) -> float:
        with torch.no_grad():
            trainer.fn.scale.copy_(scale)
            return float(trainer.batch_loss(batch)[0])  # kl_weight = 0: the loss alone

    eps = 1e-2
    slopes = []
    for u in range(init.numel()):
        up, down = init.clone(), init.clone()
        up[u] += eps
        down[u] -= eps
        slopes.append((nll_at(up) - nll_at(down)) / (2 * eps))
    moved = learned - init
    for u, slope in enumerate(slopes):
        if abs(slope) > 1e-4:
            assert moved[u] * slope < 0, (u, slope, float(moved[u]))
    assert nll_at(learned) < nll_at(init)


def test_saved_gate_for_k100_on_a_7b_residual_stream_is_small(tmp_path):
    from austeer_pl.core.strength import fold_strength

    k = 100
    state = SteeringState(
        sites=("attention",),
        site_index=torch.zeros(k, dtype=torch.long),
        layer=torch.full((k,), 3),
        unit=torch.arange(k),
        momentum=torch.full((k,), 0.5),
        scale=torch.full((k,), 2.0),
        shift=torch.zeros(k),
        alpha=4.0,
        architecture="llama",
        n_layers=32,
        site_sizes={"attention": 4096},
    )
    gate = GateStrength(hidden_size=4096, init=state.scale, layer=3)  # a 7B-sized residual stream
    folder = fold_strength(state, gate).save_pretrained(tmp_path / "gate")
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 1_000_000, size  # the whole exported state, on disk
    assert SteeringState.from_pretrained(folder).strength_tensors["inner.weight"].shape == (16, 4096)


@pytest.mark.slow
def test_ddp_strength_training_equals_single_process(tiny_dir, task_file, tmp_path):
    def run(extra, name):
        env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled", OMP_NUM_THREADS="1")
        args = [
            sys.executable,
            str(ROOT / "train.py"),
            "--model.model_name",
            str(tiny_dir),
            "--data.task",
            str(task_file),
            "--model.k",
            "[4]",
            "--model.alpha",
            "[1]",
            "--model.strength",
            "scalar",
            "--model.strength_epochs",
            "2",
            "--model.patience",
            "2",
            "--data.max_val_examples",
            "12",
            "--trainer.accelerator",
            "cpu",
            "--wandb_mode",
            "disabled",
            "--export_anyway",
            "true",
            "--run_dir",
            str(tmp_path / name),
            *extra,
        ]
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return SteeringState.from_pretrained(tmp_path / name / "state")

    # 36 training examples: 6 global batches of 6, i.e. 3 per process with 2 processes.
    one = run(["--data.batch_size", "6"], "one")
    two = run(["--data.batch_size", "3", "--trainer.devices", "2", "--trainer.strategy", "ddp"], "two")
    assert one.coordinates() == two.coordinates()
    h1, h2 = one.metadata["fit"]["strength_history"], two.metadata["fit"]["strength_history"]
    assert [h["val_accuracy"] for h in h1] == [h["val_accuracy"] for h in h2]
    assert [h["val_nll"] for h in h1] == pytest.approx([h["val_nll"] for h in h2], rel=1e-5)
    assert torch.allclose(one.scale, two.scale, atol=1e-5), (one.scale, two.scale)
    assert not torch.allclose(one.scale, one.momentum * one.alpha)  # it did learn


def test_strength_phase_uses_the_capped_training_examples(task_file):
    from austeer_pl.fit.config import BatchConfig
    from austeer_pl.fit.data import FitData
    from austeer_pl.tasks import DataConfig

    data = FitData(DataConfig(task=str(task_file), max_train_pairs=10), BatchConfig()).prepare(make_tokenizer())
    assert len(data.pairs) == 10 and len(data.train_examples) == 10


def test_evaluate_reports_a_learned_state_beside_its_momentum_rule(tiny_dir, task_file, tmp_path):
    from austeer_pl.cli.evaluate import evaluate_main
    from austeer_pl.scoring.evaluate import evaluate_examples
    from austeer_pl.tasks import load_task, split_examples

    module = fit(tiny_dir, task_file, "scalar", epochs=1, export=tmp_path / "state")
    state = SteeringState.from_pretrained(tmp_path / "state")
    fixed = state.momentum_rule()
    assert fixed.strength == {"kind": "momentum"} and fixed.coordinates() == state.coordinates()
    assert torch.allclose(fixed.scale, state.alpha * state.momentum)  # the rule the scalar started from
    assert (
        evaluate_main(["--steering", str(tmp_path / "state"), "--split", "val", "--report", str(tmp_path / "r.json")])
        == 0
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["strength"] == "scalar" and set(report["by_scoring"]["loglik"]) == {
        "unsteered",
        "momentum_rule",
        "steered",
    }
    # Independent oracle: the momentum-rule state scored directly on the same validation examples.
    data = state.metadata["data"]
    task = load_task(data["task"], seed=data["seed"])
    val = split_examples(
        task.examples,
        seed=data["seed"],
        val_fraction=data["val_fraction"],
        test_fraction=data["test_fraction"],
        max_val=data["max_val_examples"],
        max_test=data["max_test_examples"],
    )["val"]
    want = evaluate_examples(
        module.llm,
        module.tokenizer,
        task,
        val,
        state=fixed,
        scoring="loglik",
        chat_template=data["chat_template"],
        max_length=data["max_length"],
    )
    assert report["momentum_rule"]["correct"] == want["correct"] and report["momentum_rule"]["n"] == len(val)
    assert report["steered"]["accuracy"] == state.metadata["fit"]["val_accuracy"]  # the fit's own validation score


def _answer_logp_alone(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """log p(answer | prompt) from one unpadded sequence (no batching, no padding)."""
    ids = torch.tensor([prompt + answer])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    return logp[torch.arange(len(targets)), targets][-len(answer) :].sum()


def test_choice_and_nll_losses_against_unbatched_oracles(tiny_dir, task_file):
    module = fit(tiny_dir, task_file, "scalar", epochs=1)
    trainer = primary(module)
    with torch.no_grad():
        trainer.fn.scale.mul_(3.0)  # a strength far from the rule, so steering matters
    data = module.trainer.datamodule.data
    examples = data.train_examples[:5]
    batch = data.collate_examples_train(examples)
    assert batch["input_ids"].shape[0] == 10 and batch["n_examples"] == 5
    trainer.kl_weight = 0.0
    with torch.no_grad():
        with trainer.handle():
            right = torch.stack([_answer_logp_alone(module.llm, list(e.prompt), list(e.positive)) for e in examples])
            wrong = torch.stack([_answer_logp_alone(module.llm, list(e.prompt), list(e.negative)) for e in examples])
        trainer.loss = "nll"
        nll_loss, nll, _ = trainer.batch_loss(batch)
        trainer.loss = "choice"
        choice_loss, nll_again, _ = trainer.batch_loss(batch)
    assert torch.allclose(nll, -right.mean(), atol=1e-4) and torch.allclose(nll_loss, nll)
    assert torch.allclose(nll_again, nll, atol=1e-4)
    oracle = -torch.nn.functional.logsigmoid(right - wrong).mean()
    assert torch.allclose(choice_loss, oracle, atol=1e-4), (float(choice_loss), float(oracle))
    assert not torch.allclose(choice_loss, nll, atol=1e-2)  # a different objective


def test_nll_loss_ignores_the_wrong_answer_rows(tiny_dir, task_file):
    """With ``nll`` the wrong answers are dropped before the forward: the loss is exactly that of a
    batch of right answers alone."""
    module = fit(tiny_dir, task_file, "gate", epochs=1)
    trainer = primary(module)
    data = module.trainer.datamodule.data
    examples = data.train_examples[:6]
    both = data.collate_examples_train(examples)
    pad = data.tokenizer.pad_token_id
    from austeer_pl.core.tokens import pad_ids

    ids, mask = pad_ids([list(e.prompt) + list(e.positive) for e in examples], pad, side="left")
    alone = {
        "n_examples": 6,
        "input_ids": ids,
        "attention_mask": mask,
        "answer_lengths": torch.tensor([len(e.positive) for e in examples]),
    }
    with torch.no_grad():
        got, want = trainer.batch_loss(both), trainer.batch_loss(alone)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    with pytest.raises(AusteerError, match="the choice loss needs a wrong answer"):
        trainer.loss = "choice"
        trainer.batch_loss(alone)


def test_unknown_strength_loss_is_refused():
    with pytest.raises(AusteerError, match="setting 'strength_loss' 'margin' is unknown; choose one of nll, choice"):
        AUSteerModule(strength="scalar", strength_loss="margin")
