"""``evaluate.py``'s options: what a state is scored on, how, and where the report goes (with
``--compare``'s and ``--behaviour``'s options), parsed by one :class:`~austeer_pl.cli.runtime.OneLineParser`."""

from __future__ import annotations

import argparse
import os

from austeer_pl.cli.runtime import OneLineParser, add_placement_options


def evaluate_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="evaluate.py", description="Accuracy of a base model with and without a steering state.")
    p.add_argument("--steering", help="steering state folder (written by train.py)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a file at --report/--dump_examples that austeer-pl did not write (its own are replaced freely), and steering states under --compare's --export_dir",
    )
    p.add_argument(
        "--allow_changed_inputs",
        action="store_true",
        help="evaluate even if the state's task file or base model weights changed since the fit (a warning instead of an error)",
    )
    p.add_argument("--task", "--data.task", help="task spec (default: the task the state was fitted on)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N examples")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument(
        "--scoring",
        "--model.scoring",
        default=None,
        choices=["loglik", "generate", "both", "paper", "judge"],
        help="default: the task's (loglik for choices, judge for behaviour tasks: a judge of generated text and its fluency)",
    )
    p.add_argument(
        "--judge", default="vader", help="with --scoring judge: vader, vader:negative or a local classifier folder"
    )
    p.add_argument("--max_new_tokens", type=int, default=32, help="with --scoring judge: tokens generated per prompt")
    p.add_argument("--model", "--model.model_name", default=None, help="base model (default: the one the state names)")
    p.add_argument("--dtype", "--model.dtype", default=None)
    p.add_argument("--device", default=None)
    add_placement_options(p)
    p.add_argument("--batch_size", "--data.batch_size", type=int, default=32)
    p.add_argument(
        "--eval_batch_size",
        "--data.eval_batch_size",
        type=int,
        default=None,
        help="examples per scoring batch in --compare's validation and test (default: --batch_size); the grid's choice is the same for any number of processes at the same value",
    )
    p.add_argument("--seed", "--data.seed", type=int, default=None, help="split seed (default: the fit's)")
    p.add_argument("--chat_template", "--data.chat_template", default=None, choices=["auto", "on", "off"])
    p.add_argument("--cache_dir", "--model.cache_dir", default=None)
    for part, example in (("layers", "model.layers"), ("attention", "self_attn.o_proj"), ("ffn", "mlp")):
        p.add_argument(
            f"--layout_{part}",
            f"--model.layout_{part}",
            dest=f"layout_{part}",
            default=None,
            help=f"module path of the {part} for models austeer-pl does not locate, e.g. {example} (default: the state's)",
        )
    p.add_argument(
        "--protocol",
        "--data.protocol",
        dest="protocol",
        default=None,
        choices=["default", "paper"],
        help="prompt and scoring protocol (default: the state's; paper: the AUSteer paper code's, see docs/paper_protocol.md)",
    )
    p.add_argument(
        "--task_files",
        "--data.task_files",
        dest="task_files",
        default=None,
        help="local files (comma-separated) with rows in the hub task's own schema, read instead of fetching",
    )
    p.add_argument(
        "--dump_examples",
        default=None,
        help="write the split's examples as JSONL (uid, prompt, choices, answer, scoring, the token read) and stop; needs no --steering",
    )
    p.add_argument("--compare", action="store_true", help="fit and compare every method on the same split (see README)")
    c = p.add_argument_group(
        "comparison (--compare)",
        "fit unsteered, ITI, SADI, CAA, block-level AUSteer, AUSteer, its learned-strength variants and random units, "
        "and measure zero-shot and few-shot prompting, calibration and prompting + AUSteer, on one split; tune each on validation, report test",
    )
    c.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of unsteered,iti,sadi,caa,austeer_block,austeer,austeer_scalar,austeer_gate,"
        "random_units,zero_shot,few_shot,calibrated,prompted_austeer (default: all)",
    )
    c.add_argument(
        "--shots",
        default=None,
        help="few-shot demonstrations to choose from on validation, e.g. 2,4,8 (default: 2,4,8; --grid quick: 2,4)",
    )
    c.add_argument(
        "--side_task",
        default=None,
        help="a task no method is fitted for, whose accuracy change each row reports (default: rotten_tomatoes, "
        "or none when the compared task is rotten_tomatoes or sentiment); 'none' skips it",
    )
    c.add_argument(
        "--side_examples",
        type=int,
        default=200,
        help="examples of --side_task (drawn by --seed; default 200)",
    )
    c.add_argument(
        "--strength_epochs",
        "--model.strength_epochs",
        type=int,
        default=None,
        help="training epochs of the learned-strength variants (default: the module's, 3)",
    )
    c.add_argument(
        "--strength_lr",
        "--model.strength_lr",
        type=float,
        default=None,
        help="their Adam learning rate (default: the module's)",
    )
    c.add_argument(
        "--strength_loss",
        "--model.strength_loss",
        default=None,
        help="their loss: nll (right answer) or choice (right vs. wrong answer); default: the module's, nll",
    )
    c.add_argument(
        "--grid",
        default="default",
        choices=["default", "quick"],
        help="hyperparameter grids: the documented defaults, or 4 points per method",
    )
    c.add_argument(
        "--site",
        "--model.site",
        default=None,
        help="AUSteer sites to choose from, e.g. attention or attention,ffn,both",
    )
    c.add_argument("--k", "--model.k", default=None, help="AUSteer k values, e.g. 10,50,100")
    c.add_argument("--alpha", "--model.alpha", default=None, help="AUSteer alpha values, e.g. 0.5,1,2")
    c.add_argument("--sign", "--model.sign", default="promote", choices=["promote", "both"], help="AUSteer sign policy")
    c.add_argument(
        "--negatives",
        "--data.negatives",
        default="sample",
        choices=["sample", "all"],
        help="wrong answers per training example",
    )
    c.add_argument(
        "--max_train_pairs",
        "--data.max_train_pairs",
        type=int,
        default=None,
        help="cap on training pairs (default: the data module's)",
    )
    c.add_argument(
        "--max_val_examples",
        "--data.max_val_examples",
        type=int,
        default=None,
        help="cap on validation examples (default: the data module's)",
    )
    c.add_argument(
        "--max_test_examples",
        "--data.max_test_examples",
        type=int,
        default=None,
        help="cap on test examples (default: the data module's; --limit also caps them)",
    )
    c.add_argument(
        "--max_length",
        "--data.max_length",
        type=int,
        default=None,
        help="truncate longer sequences from the left (default: the data module's)",
    )
    c.add_argument("--devices", type=int, default=1, help="processes (DDP when more than 1)")
    c.add_argument("--export_dir", default=None, help="save each method's chosen state under DIR/METHOD")
    c.add_argument(
        "--wandb_fallback",
        default="offline",
        choices=["offline", "error"],
        help="--wandb_mode online without a key or network: log offline with a warning, or fail",
    )
    c.add_argument("--run_dir", default=None, help="folder for W&B files (default: runs/compare-TASK-TIMESTAMP)")
    c.add_argument("--wandb_mode", default=os.environ.get("WANDB_MODE", "offline"), help="offline, online or disabled")
    c.add_argument("--wandb_project", default=os.environ.get("WANDB_PROJECT", "austeer-pl"))
    return p


__all__ = [
    "evaluate_parser",
]
