"""GGUF exports, edited without a float detour where the format allows it.

* ``gguf``: a copy of a GGUF base (the embedded model or any ``.gguf``) with every tensor and
  metadata key copied byte for byte except the edited ones. A row scale (FFN site: rows of
  ``ffn_down``) of a block-quantized tensor multiplies each block's f16 scale (and minimum) by the
  factor: the quantized values are untouched, and the one f16 rounding of ``d * f`` (relative
  error at most 2**-11) is the only inexactness, none at all when ``f`` is a power of two. A
  column scale (attention site: columns of ``attn_output``) cuts across blocks, so that tensor is
  dequantized, scaled and stored as F32 (or ``--dtype float16``).
* ``control-vector``: an additive residual state (CAA) as the GGUF that llama.cpp's
  ``--control-vector`` reads (the format repeng exports): one F32 ``direction.N`` per layer ``N``,
  added to that decoder layer's output at every token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from austeer_pl.core.merge import check_foldable, site_edits
from austeer_pl.core.output import Output
from austeer_pl.errors import AusteerError
from austeer_pl.export.merged import provenance

GGUF_PROVENANCE_KEY = "austeer_pl.provenance"


CONTROL_VECTOR_ARCH = "controlvector"


# HF model_type -> llama.cpp's general.architecture, where they differ.
_GGUF_ARCH = {"mistral": "llama", "gemma3_text": "gemma3", "gpt_neox": "gptneox"}


# Byte offsets, inside one block, of the f16 fields that scale the whole block linearly
# (d, and the minimum m or dmin where the format has one); see ggml-common.h.
_BLOCK_SCALES = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
    "IQ4_NL": (0,),
    "IQ4_XS": (0,),
    "TQ1_0": (52,),
    "TQ2_0": (64,),
}


_FLOAT_TYPES = ("F32", "F16", "BF16")


def _is_our_gguf(path: Path) -> bool:
    try:
        import gguf  # noqa: PLC0415 - GGUF exports only

        return GGUF_PROVENANCE_KEY in gguf.GGUFReader(path).fields
    except Exception:  # anything unreadable is not a file we wrote
        return False


def gguf_output(out: str | Path, what: str = "merged GGUF model", *, overwrite: bool = False) -> Output:
    """A GGUF file: replaces one export.py wrote (with ``overwrite``), never anything else."""
    return Output(Path(out), what, _is_our_gguf, overwrite=overwrite, ours_need_overwrite=True)


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def check_gguf_base(state, reader, source: Path) -> str:
    """Raise unless the GGUF holds the model the state was fitted on; returns its architecture."""
    arch = str(_field(reader, "general.architecture") or "?")
    blocks = _field(reader, f"{arch}.block_count")
    fitted = f" (fitted on {state.base_model})" if state.base_model else ""
    fix = "pass the GGUF of the model the state was fitted on (--model PATH.gguf)"
    if arch not in (state.architecture, _GGUF_ARCH.get(state.architecture)):
        raise AusteerError(
            f"the GGUF base {source} is a '{arch}' model but the steering state is for a '{state.architecture}' model{fitted}; {fix}"
        )
    if blocks != state.n_layers:
        raise AusteerError(
            f"the GGUF base {source} has {blocks} layers but the steering state is for {state.n_layers}{fitted}; {fix}"
        )
    tensors = {t.name: t for t in reader.tensors}
    for edit in site_edits(state):
        name, axis = gguf_weight(edit)
        tensor = tensors.get(name)
        size = state.site_sizes[edit.site]
        if tensor is None or len(tensor.shape) != 2 or int(tensor.shape[axis]) != size:
            found = "is missing" if tensor is None else f"has shape {[int(n) for n in tensor.shape]}"
            raise AusteerError(
                f"the GGUF base {source} does not match the steering state: {name} {found}, expected {size} {edit.site} units{fitted}; {fix}"
            )
    return arch


def gguf_weight(edit) -> tuple[str, int]:
    """The GGUF tensor an edit lands on and the ``ne`` axis its units index (ne[0] is the input)."""
    if edit.site == "attention":
        return f"blk.{edit.layer}.attn_output.weight", 0
    return f"blk.{edit.layer}.ffn_down.weight", 1


def scale_block_rows(data: np.ndarray, qtype_name: str, rows: np.ndarray, factor: np.ndarray) -> np.ndarray | None:
    """Scale whole rows of a block-quantized tensor by rescaling each block's f16 scale fields.

    Args:
        data: the tensor's bytes, ``(n_rows, row_bytes)`` uint8 as ``GGUFReader`` maps them.
        qtype_name: its ``GGMLQuantizationType`` name.
        rows: the rows (output units) to scale.
        factor: one factor per row.

    Returns:
        New bytes with only the scale fields of those rows changed (``fl16(d * f)``), or None when
        the format has no such fields or a new scale would not be a finite f16.
    """
    import gguf  # noqa: PLC0415 - GGUF exports only

    offsets = _BLOCK_SCALES.get(qtype_name)
    if offsets is None:
        return None
    type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype_name]][1]
    out = np.array(data, dtype=np.uint8, copy=True)
    blocks = out[rows].reshape(len(rows), -1, type_size)
    for off in offsets:
        old = np.ascontiguousarray(blocks[..., off : off + 2]).view(np.float16)
        # f16 * f32 is exact in f64, so the only rounding is the final one to f16.
        with np.errstate(over="ignore"):
            new = (old.astype(np.float64) * factor.astype(np.float64)[:, None, None]).astype(np.float16)
        if not np.isfinite(new).all():
            return None
        blocks[..., off : off + 2] = new.view(np.uint8)
    out[rows] = blocks.reshape(len(rows), -1)
    return out


def _encode(values: np.ndarray, qtype_name: str):
    """Values as the array GGUFWriter takes for type ``qtype_name`` (F32, F16 or BF16); None if not finite."""
    import gguf  # noqa: PLC0415 - GGUF exports only

    if qtype_name == "F16":
        with np.errstate(over="ignore"):
            arr = values.astype(np.float16)
        return arr if np.isfinite(arr).all() else None
    if qtype_name == "BF16":
        return gguf.quants.quantize(values.astype(np.float32), gguf.GGMLQuantizationType.BF16)
    return values.astype(np.float32)


def _edit_gguf_tensors(state, reader, dtype: str | None) -> dict[str, tuple[np.ndarray, Any]]:
    """New ``(array, GGML type)`` for every tensor the state edits; the rest are copied as they are."""
    import gguf  # noqa: PLC0415 - GGUF exports only

    tensors = {t.name: t for t in reader.tensors}
    new: dict[str, tuple[np.ndarray, Any]] = {}

    def values(name: str) -> np.ndarray:  # the current (possibly already edited) values, float64
        if name in new and new[name][1] in _FLOAT_TYPES:
            arr, qtype = new[name]
            return (
                gguf.quants.dequantize(arr, gguf.GGMLQuantizationType[qtype]).astype(np.float64)
                if qtype == "BF16"
                else arr.astype(np.float64)
            )
        t = tensors[name]
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(t.data.shape[0], -1)

    def store(name: str, vals: np.ndarray) -> None:
        source = tensors[name].tensor_type.name
        target = dtype or (source if source in _FLOAT_TYPES else "F32")
        arr = _encode(vals, target)
        if arr is None:  # out of the f16 range: keep the value rather than an inf
            target, arr = "F32", _encode(vals, "F32")
        new[name] = (arr, target)

    for edit in site_edits(state):
        weight_name, _ = gguf_weight(edit)
        bias_name = weight_name.replace(".weight", ".bias")
        unit, factor, shift = (
            edit.unit.numpy(),
            edit.factor.numpy().astype(np.float64),
            edit.shift.numpy().astype(np.float64),
        )
        if edit.shifts and bias_name not in tensors:
            raise AusteerError(
                f"this state adds a shift at the {edit.site} site of layer {edit.layer}, but the GGUF has no {bias_name} to absorb it, "
                "so it cannot fold into the weights; apply it with hooks (state.apply(model)) instead"
            )
        if edit.site == "attention":
            w = values(weight_name)  # (out, in): units are columns
            if edit.shifts:
                store(bias_name, values(bias_name).reshape(-1) + w[:, unit] @ shift)
            if edit.scales:
                w[:, unit] *= factor
                store(weight_name, w)
            continue
        t = tensors[weight_name]
        if edit.scales:
            blocked = None if weight_name in new else scale_block_rows(t.data, t.tensor_type.name, unit, factor)
            if blocked is not None:
                new[weight_name] = (blocked, t.tensor_type.name)
            else:
                w = values(weight_name)
                w[unit, :] *= factor[:, None]
                store(weight_name, w)
        if bias_name in tensors:
            b = values(bias_name).reshape(-1)
            b[unit] = b[unit] * factor + shift
            store(bias_name, b)
    return new


def export_gguf(
    state,
    source: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    record: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``source`` GGUF with ``state`` folded in to ``out``, atomically.

    Every metadata key and every tensor the state does not touch is copied byte for byte; the
    provenance goes into one added key, ``austeer_pl.provenance`` (JSON).

    Args:
        state: a foldable state (see :func:`~austeer_pl.core.merge.check_foldable`).
        source: the base GGUF file (llama.cpp tensor names ``blk.N.attn_output``, ``blk.N.ffn_down``).
        out: the GGUF file to write.
        dtype: ``F32`` or ``F16`` for re-encoded tensors; None keeps a float tensor's own type and
            stores dequantized ones as F32.
        record: provenance to embed.

    Example:
        >>> export_gguf(state, embedded_gguf_path(), "rt-steered.Q4_1.gguf")
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
    if reader.endianess != gguf.GGUFEndian.LITTLE:
        raise AusteerError(f"the GGUF base {source} is big-endian; convert it with gguf_convert_endian.py first")
    arch = check_gguf_base(state, reader, source)
    edited = _edit_gguf_tensors(state, reader, dtype)
    with gguf_output(out, overwrite=overwrite).check(inputs=[source]).writing() as tmp:
        writer = gguf.GGUFWriter(None, arch)
        try:
            for field in reader.fields.values():
                if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                    continue  # written by GGUFWriter itself
                if field.name == gguf.Keys.General.ALIGNMENT:
                    writer.data_alignment = int(field.contents())
                sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
            writer.add_string(GGUF_PROVENANCE_KEY, json.dumps(record or provenance(state), sort_keys=True))
            payload = []
            for t in reader.tensors:
                if t.name in edited:
                    arr, qtype = edited[t.name]
                    writer.add_tensor_info(t.name, arr.shape, arr.dtype, arr.nbytes, gguf.GGMLQuantizationType[qtype])
                    payload.append(arr)
                else:
                    writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
                    payload.append(t.data)
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for arr in payload:
                writer.write_tensor_data(arr)
        finally:
            writer.close()
    return out


# ---------------------------------------------------------------------------- control vector
def control_vector_directions(state) -> dict[int, np.ndarray]:
    """The per-layer residual shifts of an additive residual state (CAA), as llama.cpp adds them.

    Raises:
        AusteerError: when the state is not exactly a shift of whole decoder-layer outputs at every token.
    """
    why = "a control vector only adds one vector to each decoder layer's output at every token"
    kind = state.strength.get("kind", "momentum")
    if kind == "gate" or state.token_scope != "all":
        what = "a learned gate" if kind == "gate" else f"token scope '{state.token_scope}'"
        raise AusteerError(
            f"this state uses {what}, but {why}, so it cannot be exported as one; apply it with hooks (state.apply(model)) instead"
        )
    directions: dict[int, np.ndarray] = {}
    for i, site in enumerate(state.sites):
        rows = state.site_index == i
        if not bool(((state.scale[rows] != 0) | (state.shift[rows] != 0)).any()):
            continue
        if site != "residual" or bool(state.scale[rows].ne(0).any()):
            raise AusteerError(
                f"this state {'scales' if site == 'residual' else 'edits the ' + site + ' site'} rather than shifting the residual stream, "
                f"but {why}; export it with --format transformers or gguf (which fold attention and FFN scales), or apply it with hooks"
            )
        for layer in sorted(set(state.layer[rows].tolist())):
            sel = rows & (state.layer == layer)
            vec = np.zeros(state.site_sizes["residual"], dtype=np.float32)
            np.add.at(vec, state.unit[sel].numpy(), state.shift[sel].numpy())
            if layer == 0 and vec.any():
                raise AusteerError(
                    "this state shifts the output of layer 0, which llama.cpp's control vectors cannot reach (they start at layer 1); "
                    "apply it with hooks (state.apply(model)) instead"
                )
            directions[int(layer)] = vec
    if not directions:
        raise AusteerError("this state shifts nothing, so there is no control vector to export; fit it again")
    return directions


def export_control_vector(
    state, out: str | Path, *, record: dict[str, Any] | None = None, overwrite: bool = True
) -> Path:
    """Write an additive residual state as a llama.cpp control-vector GGUF (``--control-vector FILE``), atomically.

    Example:
        >>> export_control_vector(caa, "rt-caa.gguf")  # llama-cli -m model.gguf --control-vector rt-caa.gguf
    """
    import gguf  # noqa: PLC0415 - GGUF exports only

    directions = control_vector_directions(state)
    with gguf_output(out, "control vector", overwrite=overwrite).check().writing() as tmp:
        writer = gguf.GGUFWriter(tmp, CONTROL_VECTOR_ARCH)
        try:
            writer.add_string(f"{CONTROL_VECTOR_ARCH}.model_hint", state.architecture)
            writer.add_uint32(f"{CONTROL_VECTOR_ARCH}.layer_count", len(directions))
            writer.add_string(GGUF_PROVENANCE_KEY, json.dumps(record or provenance(state), sort_keys=True))
            for layer, vec in directions.items():
                writer.add_tensor(f"direction.{layer}", vec)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return Path(out)


__all__ = [
    "CONTROL_VECTOR_ARCH",
    "GGUF_PROVENANCE_KEY",
    "check_gguf_base",
    "control_vector_directions",
    "export_control_vector",
    "export_gguf",
    "gguf_output",
    "scale_block_rows",
]
