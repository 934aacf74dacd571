"""``python export.py``: a steering state merged into its base model (a transformers folder or a GGUF
file) or written as a llama.cpp control vector (:mod:`austeer_pl.export`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from austeer_pl.cli.runtime import OneLineParser, add_placement_options, placement_of, quiet, run_main
from austeer_pl.core.embedded import DEFAULT_MODEL, embedded_gguf_path
from austeer_pl.core.lora import adapter_output
from austeer_pl.core.merge import check_foldable, merge_into
from austeer_pl.core.models import load_model, resolve_dtype
from austeer_pl.core.paths import paths_overlap
from austeer_pl.core.pins import check_model
from austeer_pl.core.sites import LayoutSpec, locate_units
from austeer_pl.core.state import SteeringState
from austeer_pl.core.statehub import resolve_state_dir
from austeer_pl.errors import AusteerError
from austeer_pl.export.gguf import export_control_vector, export_gguf, gguf_output
from austeer_pl.export.gguf_lora import export_gguf_lora
from austeer_pl.export.merged import FORMATS, merged_output, provenance, save_merged


def export_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="export.py",
        description="Merge a steering state into its base model, or write it as a LoRA adapter or control vector, for serving without austeer-pl.",
    )
    p.add_argument(
        "--steering",
        required=True,
        nargs="+",
        help="steering state folder (written by train.py); several are combined into one: their weighted edits add",
    )
    p.add_argument(
        "--weights", type=float, nargs="+", default=None, help="one weight per --steering state (default: 1 each)"
    )
    p.add_argument(
        "--out", required=True, help="output folder (transformers, peft) or .gguf file (gguf, control-vector)"
    )
    p.add_argument("--format", default="transformers", choices=FORMATS)
    p.add_argument(
        "--model", default=None, help="base model (default: the one the state names); a .gguf file for --format gguf"
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="transformers: float32, bfloat16 or float16 (default: the model's); gguf: float32 or float16 for re-encoded tensors",
    )
    p.add_argument(
        "--alpha", type=float, default=None, help="rescale the state's edits to this strength before merging"
    )
    p.add_argument("--max_shard_size", default="5GB", help="transformers: largest safetensors shard")
    p.add_argument("--cache_dir", default=None, help="cache folder of the embedded model")
    add_placement_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an output that export.py wrote before")
    p.add_argument(
        "--allow_changed_inputs",
        action="store_true",
        help="merge even if the base model's weights differ from the fit's (a warning)",
    )
    return p


def _gguf_base(name: str) -> Path:

    if name.strip().lower() == DEFAULT_MODEL:
        return embedded_gguf_path()
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        return path
    raise AusteerError(
        f"--format gguf and gguf-lora need a GGUF base, and '{name}' is not a .gguf file; pass --model PATH.gguf, or use --format transformers"
    )


def _gguf_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None

    resolved = resolve_dtype(dtype)
    if resolved not in (torch.float32, torch.float16):
        raise AusteerError(f"--dtype {dtype} is not a GGUF float type; use float32 or float16 with --format gguf")
    return "F32" if resolved == torch.float32 else "F16"


def export(argv: Sequence[str] | None = None) -> Path:
    """Run ``export.py``; returns the path written."""

    args = export_parser().parse_args(argv)
    if args.weights is not None and len(args.weights) != len(args.steering):
        raise AusteerError(
            f"{len(args.steering)} --steering folders but {len(args.weights)} --weights; pass one weight per state"
        )
    out = Path(args.out)
    for folder in args.steering:
        if paths_overlap(out, folder):
            raise AusteerError(f"--out {out} overlaps the steering state folder {folder}; choose another path")
    if args.alpha is not None and (len(args.steering) > 1 or args.weights is not None):
        raise AusteerError("--alpha rescales one state; to scale several, give each a --weights value instead")
    states = [SteeringState.from_pretrained(folder) for folder in args.steering]
    state = states[0] if len(states) == 1 and args.weights is None else SteeringState.combine(states, args.weights)
    source = resolve_state_dir(args.steering[0]) if len(states) == 1 else None  # a hub id: its downloaded folder
    if args.alpha is not None:
        state = state.with_alpha(args.alpha)
    name = args.model or state.base_model
    pins = states[0].metadata.get("inputs")
    if args.format == "transformers":
        merged_output(out, overwrite=args.overwrite).check(inputs=[*args.steering, name])
    elif args.format == "peft":
        adapter_output(out, overwrite=args.overwrite).check(inputs=[*args.steering, name])
    else:
        what = {"control-vector": "control vector", "gguf-lora": "LoRA adapter GGUF"}.get(
            args.format, "merged GGUF model"
        )
        gguf_output(out, what, overwrite=args.overwrite).check(inputs=[*args.steering, name])

    if args.format == "control-vector":
        if args.dtype is not None:
            raise AusteerError("--dtype does not apply to control vectors (llama.cpp reads them as F32); drop it")
        export_control_vector(state, out, record=provenance(state, source), overwrite=args.overwrite)
        print(f"control vector written to {out}")
        return out
    check_foldable(state)
    if not name:
        raise AusteerError("the state does not name its base model; pass --model")

    if args.format in ("gguf", "gguf-lora"):
        base = _gguf_base(name)
        if paths_overlap(out, base):
            raise AusteerError(f"--out {out} is the GGUF base itself; choose another path")
        pin = pins.get("model") if isinstance(pins, dict) else None
        if isinstance(pin, dict) and pin.get("kind") == "file":  # fitted on a GGUF file: merge into that same file
            check_model(pins, str(base), allow=args.allow_changed_inputs, cache_dir=args.cache_dir)
        write = export_gguf if args.format == "gguf" else export_gguf_lora
        write(
            state,
            base,
            out,
            dtype=_gguf_dtype(args.dtype),
            record=provenance(state, source, base=str(name)),
            overwrite=args.overwrite,
        )
        print(f"{what} written to {out}")
        return out

    quiet()

    target = resolve_dtype(args.dtype)
    model, tokenizer = load_model(
        name, dtype="float32" if target is not None else None, cache_dir=args.cache_dir, **placement_of(args)
    )

    state.check_compatible(locate_units(model, LayoutSpec.from_dict(state.layout) if state.layout else None))
    for each in states:  # every combined state was fitted on this base
        check_model(each.metadata.get("inputs"), name, model, allow=args.allow_changed_inputs, cache_dir=args.cache_dir)
    if args.format == "peft":
        kept = ("state_sha256", "state_config_sha256", "combination")
        record = {key: value for key, value in provenance(state, source).items() if key in kept}
        state.to_peft(model, out, dtype=target, overwrite=args.overwrite, record=record)
        print(
            f"LoRA adapter written to {out} (peft.PeftModel.from_pretrained(base, '{out}'); scale s steers at alpha x s)"
        )
        return out
    merge_into(state, model)  # in float32 when a lower precision is asked for, then cast once
    if target is not None:
        model.to(dtype=target)
    save_merged(
        model,
        tokenizer,
        out,
        provenance(state, source, base=str(name)),
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    print(f"merged model written to {out}")
    return out


def export_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``export.py`` / ``austeer-export``: 0 on success, 2 with one ``error:`` line on bad input."""

    return run_main(lambda: export(argv))
