"""A steering state as a llama.cpp LoRA adapter GGUF (``--format gguf-lora``).

The factors are those of :mod:`austeer_pl.core.lora`, computed from the GGUF base's own (dequantized)
weights, so base + adapter in llama.cpp computes the hooked edit of that very base: for the
attention site ``A = E_S^T`` and ``B = W[:, S] diag(g)`` on ``blk.N.attn_output``, for the FFN site
``B = E_S`` and ``A = diag(g) W[S, :]`` on ``blk.N.ffn_down``. The file is what llama.cpp's
``convert_lora_to_gguf.py`` writes: ``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha`` equal to the rank (so ``--lora-scaled FILE s`` and a request's
``"lora": [{"id": 0, "scale": s}]`` steer at ``alpha x s``), and for each target ``<name>.lora_a``
(ggml ``ne = [in, r]``) and ``<name>.lora_b`` (``ne = [r, out]``) in F32 or F16, one rank for all.
llama.cpp's LoRA adds no bias, so a biased ``ffn_down`` is refused (``--format gguf`` merges it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from austeer_pl.core.merge import check_foldable, site_edits
from austeer_pl.errors import AusteerError
from austeer_pl.export.gguf import GGUF_PROVENANCE_KEY, check_gguf_base, gguf_output, gguf_weight
from austeer_pl.export.merged import provenance

__all__ = ["export_gguf_lora", "gguf_lora_factors"]


def gguf_lora_factors(state, reader) -> tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``(rank, {base tensor name: (A (r, in), B (out, r))})`` in float64 from a GGUF base's weights."""
    import gguf  # noqa: PLC0415 - GGUF exports only

    if bool(state.shift.ne(0).any()):
        raise AusteerError(
            "this state adds shifts (a + t), which a LoRA update cannot add; export it merged (--format gguf) "
            "or, for residual shifts, as a control vector"
        )
    tensors = {t.name: t for t in reader.tensors}
    edits = site_edits(state)
    if not edits:
        raise AusteerError(
            "this state steers no unit (the fit found no help), so there is no adapter to write; use the base model as it is"
        )
    rank = max(int(edit.unit.numel()) for edit in edits)
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for edit in edits:
        name, _ = gguf_weight(edit)
        if edit.site == "ffn" and name.replace(".weight", ".bias") in tensors:
            raise AusteerError(
                f"the GGUF base has a bias on {name}, and llama.cpp's LoRA adds no bias, so the FFN edit of layer {edit.layer} "
                "cannot be an adapter; export it merged (--format gguf)"
            )
        t = tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(t.data.shape[0], -1)  # (out, in)
        unit = edit.unit.numpy()
        g = edit.factor.numpy().astype(np.float64) - 1.0
        n = len(unit)
        a = np.zeros((rank, w.shape[1]))
        b = np.zeros((w.shape[0], rank))
        if edit.site == "attention":
            a[np.arange(n), unit] = 1.0
            b[:, :n] = w[:, unit] * g
        else:
            a[:n] = w[unit] * g[:, None]
            b[unit, np.arange(n)] = 1.0
        factors[name] = (a, b)
    return rank, factors


def export_gguf_lora(
    state,
    source: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    record: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``state`` as a llama.cpp LoRA adapter GGUF for the GGUF base ``source``, atomically.

    Example:
        >>> export_gguf_lora(state, embedded_gguf_path(), "rt.lora.gguf")  # llama-server -m BASE --lora rt.lora.gguf
    """
    import gguf  # noqa: PLC0415 - GGUF exports only

    check_foldable(state)
    source, out = Path(source), Path(out)
    try:
        reader = gguf.GGUFReader(source)
    except (OSError, ValueError) as err:
        raise AusteerError(
            f"cannot read the GGUF base {source} ({str(err).splitlines()[0]}); pass a valid .gguf file"
        ) from None
    arch = check_gguf_base(state, reader, source)
    rank, factors = gguf_lora_factors(state, reader)
    target = np.float16 if dtype == "F16" else np.float32
    with gguf_output(out, "LoRA adapter GGUF", overwrite=overwrite).check(inputs=[source]).writing() as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
            writer.add_string(GGUF_PROVENANCE_KEY, json.dumps(record or provenance(state), sort_keys=True))
            for name, (a, b) in sorted(factors.items()):
                writer.add_tensor(f"{name}.lora_a", a.astype(target))
                writer.add_tensor(f"{name}.lora_b", b.astype(target))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return out
