"""``generate.py``: steered generation beside the unsteered text.

    python generate.py --steering DIR (--prompt TEXT [--prompt TEXT ...] | --prompts FILE)
                       [--alpha A] [--max_new_tokens N] [--out FILE.jsonl] [--judge vader]

Prompts are the user's text. With a chat template (``--chat_template auto``: when the tokenizer
has one; the fit's choice when the state records it) each becomes one user turn followed by the
assistant's turn; without one (``off``) the text is continued as is. Generation is batched
(left-padded, one ``generate`` per batch) and greedy unless ``--sample``. The result is printed as
a table (prompt, unsteered, steered) and, with ``--out``, written as JSON lines, one per prompt:
``{"prompt", "unsteered", "steered"}`` with the new text only. Any method's state works.

Bad input prints one ``error: ...`` line and exits with status 2; output paths are checked before
the model is loaded.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from austeer_pl.cli.runtime import OneLineParser, add_placement_options, placement_of, quiet, run_main
from austeer_pl.core.fileio import jsonl_output, parse_json, write_jsonl_output
from austeer_pl.core.models import load_model
from austeer_pl.core.pins import check_model
from austeer_pl.core.sites import locate_units
from austeer_pl.core.state import SteeringState
from austeer_pl.errors import AusteerError
from austeer_pl.scoring.generation import generate_pairs
from austeer_pl.scoring.judges import load_judge

PROMPT_SUFFIXES = (".txt", ".jsonl", ".json")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="generate.py", description="Generate with and without a steering state, side by side.")
    p.add_argument("--steering", required=True, help="steering state folder (written by train.py or save_pretrained)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    src.add_argument(
        "--prompts", default=None, help="a .txt file (one prompt a line), or .jsonl/.json rows with a 'prompt' field"
    )
    p.add_argument("--alpha", type=float, default=None, help="steering strength (default: the state's)")
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--out", default=None, help="write one JSON line per prompt here: {prompt, unsteered, steered}")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a file at --out that austeer-pl did not write (its own are replaced freely)",
    )
    p.add_argument(
        "--allow_changed_inputs",
        action="store_true",
        help="generate even if the base model's weights differ from the fit's (a warning)",
    )
    p.add_argument("--judge", default=None, help="also score each text: vader, vader:negative or a classifier folder")
    p.add_argument("--model", default=None, help="base model (default: the one the state names)")
    p.add_argument("--chat_template", default=None, choices=["auto", "on", "off"], help="default: the fit's, else auto")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_length", type=int, default=None, help="keep the last N prompt tokens")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (same seed for both sides)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    add_placement_options(p)
    p.add_argument("--cache_dir", default=None)
    return p


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a ``.txt`` file (one a line, blank lines skipped) or ``.jsonl``/``.json`` rows with a ``prompt`` field (or plain strings).

    A behaviour data file (``prompt, positive, negative``) works as is.

    Example:
        >>> read_prompts("prompts.txt")
        ['Write a review of the film.', 'Describe your weekend.']
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise AusteerError(f"{path}: no such prompts file; pass a .txt (one prompt a line) or .jsonl file")
    suffix = path.suffix.lower()
    if suffix not in PROMPT_SUFFIXES:
        raise AusteerError(
            f"{path}: unsupported prompts file type {suffix or '(none)'!r}; use one of {', '.join(PROMPT_SUFFIXES)}"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AusteerError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    except OSError as exc:
        raise AusteerError(f"{path}: cannot read ({exc.strerror}); check the path and its permissions") from None

    def one(row: Any, where: str) -> str:
        value = row.get("prompt") if isinstance(row, dict) else row
        if not isinstance(value, str) or not value.strip():
            raise AusteerError(f"{where}: no prompt text; give a non-empty string or an object with a 'prompt' string")
        return value.strip()

    prompts: list[str] = []
    if suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    elif suffix == ".jsonl":
        for line_no, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                prompts.append(one(parse_json(line, f"{path}:{line_no}"), f"{path}:{line_no}"))
    else:
        data = parse_json(text, str(path))
        if not isinstance(data, list):
            raise AusteerError(f"{path}: expected a JSON list of prompts, got {type(data).__name__}")
        prompts = [one(row, f"{path}: item {i}") for i, row in enumerate(data)]
    if not prompts:
        raise AusteerError(f"{path}: no prompts (the file is empty); add one prompt a line")
    return prompts


def format_user_prompt(tokenizer, text: str, chat_template: bool | None) -> str:
    """``text`` as one user turn of the chat template plus the assistant's opening, or as is without a template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    use = has_template if chat_template is None else bool(chat_template)
    if not use:
        return text
    if not has_template:
        raise AusteerError("--chat_template on but the tokenizer has no chat template; use --chat_template off")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )


#: The fields of each ``--out`` line (also how an earlier one is recognised).
GENERATION_KEYS = ("prompt", "unsteered", "steered")


def _print_table(rows: list[dict[str, str]], scores: dict[str, list[float]] | None, title: str) -> None:

    table = Table(title=escape(title), title_justify="left", show_lines=True)
    table.add_column("#", justify="right")
    for name in ("prompt", "unsteered", "steered"):
        table.add_column(name, overflow="fold", ratio=1)
    for i, row in enumerate(rows):
        cells = [Text(row["prompt"])]
        for side in ("unsteered", "steered"):
            cell = Text(row[side].strip())
            if scores is not None:
                cell.append(f"\n[{scores[side][i]:+.2f}]", style="dim")
            cells.append(cell)
        table.add_row(str(i + 1), *cells)
    Console().print(table)


def generate(argv: Sequence[str] | None = None) -> list[dict[str, str]]:
    """Run ``generate.py``; returns the rows ``{"prompt", "unsteered", "steered"}``."""
    args = build_parser().parse_args(argv)

    for key in ("max_new_tokens", "batch_size", "max_length"):
        value = getattr(args, key)
        if value is not None and value <= 0:
            raise AusteerError(f"--{key} must be positive, got {value}")
    out = None
    if args.out:
        out = jsonl_output(args.out, "generations", GENERATION_KEYS, overwrite=args.overwrite).check(
            inputs=[args.steering, args.prompts, args.model, args.judge]
        )
    if args.prompt is not None:
        prompts = [p.strip() for p in args.prompt]
        if not all(prompts):
            raise AusteerError("--prompt is empty; give some text")
    else:
        prompts = read_prompts(args.prompts)

    state = SteeringState.from_pretrained(args.steering)
    if args.alpha is not None:
        state = state.with_alpha(args.alpha)
    judge = None
    if args.judge:
        judge = load_judge(args.judge)
    model_name = args.model or state.base_model
    if not model_name:
        raise AusteerError("the state does not name its base model; pass --model")
    quiet()

    model, tokenizer = load_model(
        model_name, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir, **placement_of(args)
    )
    layout = locate_units(model)
    state.check_compatible(layout)
    check_model(
        state.metadata.get("inputs"), model_name, model, allow=args.allow_changed_inputs, cache_dir=args.cache_dir
    )
    data = state.metadata.get("data") if isinstance(state.metadata.get("data"), dict) else {}
    chat = {"on": True, "off": False, "auto": None, None: data.get("chat_template")}[args.chat_template]
    if chat not in (True, False, None):
        raise AusteerError(
            f"the state's data setting 'chat_template' must be true, false or null, got {chat!r}; pass --chat_template"
        )
    texts = [format_user_prompt(tokenizer, p, chat) for p in prompts]
    pairs = generate_pairs(
        model,
        tokenizer,
        state,
        texts,
        layout=layout,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        max_length=args.max_length,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    rows = [{"prompt": p, "unsteered": u, "steered": s} for p, u, s in zip(prompts, pairs.unsteered, pairs.steered)]
    scores = (
        None if judge is None else {side: judge.score([r[side] for r in rows]) for side in ("unsteered", "steered")}
    )
    if out is not None:
        write_jsonl_output(out, rows)
    title = f"{state.method} (k={state.k}, alpha={state.alpha:g}) on {model_name}" + (
        f"; [{judge.name} {judge.score_name}]" if judge else ""
    )
    _print_table(rows, scores, title)
    if args.out:
        print(f"wrote {len(rows)} generations to {args.out}")
    return rows


def generate_main(argv: Sequence[str] | None = None) -> int:
    """``generate.py``: 0 on success, 2 with a one-line ``error: ...`` on bad input."""

    return run_main(lambda: generate(argv))


__all__ = [
    "GENERATION_KEYS",
    "PROMPT_SUFFIXES",
    "build_parser",
    "format_user_prompt",
    "generate",
    "generate_main",
    "read_prompts",
]
