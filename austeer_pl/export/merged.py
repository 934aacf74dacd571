"""Serve a steering state anywhere: export it merged into a model, or as a llama.cpp control vector.

This module holds the provenance record every export carries, the merged outputs' rules, and the
transformers folder.

``python export.py --steering DIR --out OUT [--format transformers|gguf|control-vector|peft|gguf-lora]``:

* ``transformers``: the base model with the state folded into its weights
  (:func:`~austeer_pl.core.merge.merge_into`), saved as a plain folder (config, tokenizer, safetensors
  shards, a model card) that ``AutoModelForCausalLM.from_pretrained(OUT)`` loads without austeer-pl.
* ``gguf`` and ``control-vector``: :mod:`austeer_pl.export.gguf`.
* ``peft``: a LoRA adapter folder (:mod:`austeer_pl.core.lora`) for peft, vLLM, TGI and lm-evaluation-harness.
* ``gguf-lora``: a llama.cpp LoRA adapter GGUF (:mod:`austeer_pl.export.gguf_lora`).

Every output is checked before any work (an existing output is replaced only with ``--overwrite``;
a folder of other files never) and written atomically, so a failure leaves nothing at ``--out``.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from austeer_pl._version import __version__
from austeer_pl.core.fileio import parse_json, sha256_file
from austeer_pl.core.output import Output
from austeer_pl.core.stateio import CONFIG_NAME, WEIGHTS_NAME
from austeer_pl.errors import AusteerError

FORMATS = ("transformers", "gguf", "control-vector", "peft", "gguf-lora")
PROVENANCE_KEY = "austeer_pl"
CARD_NAME = "README.md"


# ============================================================================ provenance
def provenance(state, steering_dir: str | Path | None = None, *, base: str = "") -> dict[str, Any]:
    """What an exported model records about the state folded into it."""
    record: dict[str, Any] = {
        "exported_by": f"austeer-pl {__version__}",
        "base_model": state.base_model,
        "merged_into": base or state.base_model,
        "architecture": state.architecture,
        "method": state.method,
        "k": state.k,
        "alpha": state.alpha,
        "sites": list(state.layers_by_site()),
        "strength": state.strength.get("kind", "momentum"),
        "token_scope": state.token_scope,
    }
    if "combination" in state.metadata:  # several states combined at export: what each was, and its weight
        record["combination"] = state.metadata["combination"]
    if steering_dir is not None:
        folder = Path(steering_dir)
        record["state_sha256"] = sha256_file(folder / WEIGHTS_NAME)
        record["state_config_sha256"] = sha256_file(folder / CONFIG_NAME)
    return record


def _model_card(record: dict[str, Any]) -> str:
    rows = "\n".join(f"| {key} | `{value}` |" for key, value in sorted(record.items()))
    return (
        "---\nlibrary_name: transformers\ntags:\n- austeer-pl\n- activation-steering\n- merged\n---\n\n"
        f"# {record['merged_into']} with a {record['method']} steering state merged in\n\n"
        f"The {record['k']} steered activation units (alpha {record['alpha']:g}) are folded into the attention output and FFN "
        "down projections, so this folder is a plain transformers model: it needs no austeer-pl and no hooks.\n\n"
        f"| field | value |\n|---|---|\n{rows}\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        'model = AutoModelForCausalLM.from_pretrained("PATH")\ntokenizer = AutoTokenizer.from_pretrained("PATH")\n```\n'
    )


#: What a merged folder holds: the model's config, weights and index, the tokenizer's files, the card.
_MERGED_FILES = re.compile(
    r"(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|README\.md"
    r"|tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt"
    r"|chat_template\.(jinja|json))"
)


def _is_merged_folder(path: Path) -> bool:
    """A folder export.py wrote: a config with the provenance key, and only a merged model's files
    (a file a user added makes it theirs: it is not replaced)."""
    try:
        names = [p.name for p in path.iterdir()]
        config = parse_json((path / "config.json").read_bytes(), str(path / "config.json"))
    except (OSError, AusteerError):
        return False
    return isinstance(config, dict) and PROVENANCE_KEY in config and all(_MERGED_FILES.fullmatch(n) for n in names)


def merged_output(out: str | Path, *, overwrite: bool = False) -> Output:
    """A merged transformers folder: replaces one export.py wrote (with ``overwrite``), never anything else."""
    return Output(
        Path(out), "merged model", _is_merged_folder, overwrite=overwrite, folder=True, ours_need_overwrite=True
    )


# ============================================================================ transformers
def save_merged(
    model, tokenizer, out: str | Path, record: dict[str, Any], *, max_shard_size: str = "5GB", overwrite: bool = True
) -> Path:
    """Save a merged model as a plain transformers folder with its provenance, atomically."""

    model.config.austeer_pl = record
    output = merged_output(out, overwrite=overwrite).check()
    with output.writing() as tmp:
        try:
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        except SafetensorError as err:  # safetensors reports I/O errors as its own type
            full = any(s in str(err) for s in ("StorageFull", "No space", "os error 28"))
            raise OSError(errno.ENOSPC if full else errno.EIO, str(err).splitlines()[0]) from None
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / CARD_NAME).write_text(_model_card(record))
    return Path(out)
