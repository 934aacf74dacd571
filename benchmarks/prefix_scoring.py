"""8. Choice scoring with shared work: the prompts' common head once per batch (its KV cache), and each prompt
once for all its choices, vs every ``prompt + choice`` whole.

The methods table scores few-shot prompts whose demonstrations are about three quarters of every prompt, and
the sentiment task's choices are whole reviews (about 19 tokens after a 46-token prompt). Both variants score
the same batches of validation examples (``--task``, ``--shots`` demonstrations of the table's draw: seed 0),
unsteered and with a fitted-looking AUSteer state (k units of the upper layers); they alternate batch by
batch. ``whole``: :func:`~austeer_pl.scoring.loglik.choice_logprobs` with ``shared_prefix=False``.
``shared``: the same call with ``prefix=prompt_prefix(...)`` and ``shared_prefix=True`` (the CPU default).
Also checked: the largest log-probability difference and whether every decision is the same. Target:
time(shared) / time(whole) <= 0.5 for Rotten Tomatoes at 4 shots.

    python benchmarks/prefix_scoring.py [--quick] [--task rotten_tomatoes|sentiment] [--examples 64] [--shots 4] [--batch_size 32]
"""

from __future__ import annotations

import torch

from austeer_pl import locate_units
from austeer_pl.scoring.evaluate import answer_suffixes
from austeer_pl.scoring.loglik import choice_logprobs
from austeer_pl.tasks import load_task
from austeer_pl.tasks.prompting import prompted_task
from austeer_pl.tasks.prompts import format_prompt, prompt_prefix
from austeer_pl.tasks.splits import split_examples

import _common as C


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=None, help="validation examples (default 64, --quick 32)")
    p.add_argument("--task", default="rotten_tomatoes", help="an embedded task (default rotten_tomatoes)")
    p.add_argument("--shots", type=int, default=4, help="few-shot demonstrations (0: the zero-shot prompt)")
    p.add_argument("--batch_size", type=int, default=32)
    args = p.parse_args()
    device = C.setup(args)
    n = args.examples or (32 if args.quick else 64)
    model, tok = C.load(args)
    info = C.machine(device)
    layout = locate_units(model)
    task = load_task(args.task)
    parts = split_examples(task.examples, seed=0)
    task = prompted_task(task, parts["train"], instruction=None, shots=args.shots, seed=0)
    examples = parts["val"][:n]
    prompts = [format_prompt(tok, task, ex.prompt) for ex in examples]
    answers = [answer_suffixes(pr, ex.choices, task) for pr, ex in zip(prompts, examples)]
    prefix = prompt_prefix(tok, task, prompts)
    assert prefix is not None, "the prompts should start with a common head"
    lengths = [len(ids) for ids in tok(prompts, add_special_tokens=False)["input_ids"]]
    prefix_tokens = len(tok(prefix, add_special_tokens=False)["input_ids"])
    choice_ids = [
        tok(p + a, add_special_tokens=False)["input_ids"] for p, group in zip(prompts, answers) for a in group
    ]
    choice_tokens = round(sum(len(c) for c in choice_ids) / len(choice_ids) - sum(lengths) / n, 1)
    ranking, _ = C.fitted_ranking(model, tok)
    state = C.state_from(ranking, layout, k=30, alpha=8.0)
    batches = [slice(i, i + args.batch_size) for i in range(0, n, args.batch_size)]
    scores: dict[str, list[torch.Tensor]] = {}

    def variant(name: str, shared: bool, steered: bool):
        def fn(i: int):
            b = batches[i]
            if i == 0:
                scores[name] = []
            with state.apply(model) if steered else torch.inference_mode():
                got = choice_logprobs(
                    model,
                    tok,
                    prompts[b],
                    answers[b],
                    batch_size=args.batch_size,
                    prefix=prefix if shared else None,
                    shared_prefix=shared,
                )
            scores[name].extend(got)

        return fn

    variants = {
        "whole": variant("whole", False, False),
        "shared": variant("shared", True, False),
        "whole steered": variant("whole steered", False, True),
        "shared steered": variant("shared steered", True, True),
    }
    print(
        f"{args.task}, {n} examples, {args.shots} shots: prompts {min(lengths)}-{max(lengths)} tokens "
        f"(mean {sum(lengths) / n:.0f}), common head {prefix_tokens} tokens, choices {choice_tokens} tokens (mean); "
        f"batches of {args.batch_size}, {args.repeats} rounds"
    )
    times = C.interleave(variants, args.repeats, device, steps=len(batches), label="prefix scoring")
    ratio = C.paired_ratio(times, "shared", "whole")
    ratio_steered = C.paired_ratio(times, "shared steered", "whole steered")
    agree = {}
    for kind in ("", " steered"):
        a, b = torch.stack(scores["whole" + kind]), torch.stack(scores["shared" + kind])
        agree[kind.strip() or "unsteered"] = {
            "max_abs_logprob_difference": float((a - b).abs().max()),
            "same_decisions": int((a.argmax(1) == b.argmax(1)).sum()),
        }
    results = {
        "task": args.task,
        "n_examples": n,
        "shots": args.shots,
        "mean_choice_tokens": choice_tokens,
        "mean_prompt_tokens": sum(lengths) / n,
        "head_tokens": prefix_tokens,
        **{name: C.summary(t) for name, t in times.items()},
        "shared_over_whole": ratio,
        "shared_over_whole_steered": ratio_steered,
        "agreement": agree,
        "target": {"shared_over_whole_max": 0.5, "met": ratio["median"] <= 0.5},  # RT, 4 shots
    }
    print()
    print(
        C.table(
            ["scoring", "s / pass (median)", "examples/s", "time / whole (median)", "min-max"],
            [
                [name, C.median(times[name]), n / C.median(times[name]), r["median"], f"{r['min']:.3f}-{r['max']:.3f}"]
                for name, r in (
                    ("whole", {"median": 1.0, "min": 1.0, "max": 1.0}),
                    ("shared", ratio),
                    ("whole steered", {"median": 1.0, "min": 1.0, "max": 1.0}),
                    ("shared steered", ratio_steered),
                )
            ],
        )
    )
    for kind, a in agree.items():
        print(
            f"{kind}: max |log p difference| {a['max_abs_logprob_difference']:.2e}, same decision {a['same_decisions']}/{n}"
        )
    print(f"shared / whole = {ratio['median']:.3f} (target <= 0.5: {'met' if ratio['median'] <= 0.5 else 'NOT met'})")
    note = C.contention_note(info)
    if note:
        print(note)
    C.finish(
        "prefix_scoring"
        if args.task == "rotten_tomatoes" and args.shots == 4
        else f"prefix_scoring_{args.task}_{args.shots}shot",
        args,
        info,
        results,
    )


if __name__ == "__main__":
    main()
