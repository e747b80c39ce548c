"""A full-precision GGUF to an HLWQ GGUF, optionally equalized first (convert/equalize.py).

This is the converter's second path: `hlwq-gguf convert` takes it for a GGUF source, and for a checkpoint when
equalization is asked for (the checkpoint goes through llama.cpp's converter to a full-precision GGUF first,
because equalization needs a layer's tensors together while the streaming path sees one at a time).
Tensors are read from the memory-mapped source and written one at a time.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from hlwq_gguf import build as builder
from hlwq_gguf import codec, gguf_files, gguf_types, recipes

from . import equalize as equalizer
from .sink import staged_output
from .source import ConversionError
from .tensor_plan import TensorPlan

FULL_PRECISION_TYPES = ("F32", "F16", "BF16")


def _hparams(reader, architecture: str) -> dict:
    """The hyper-parameters equalization needs; per-layer arrays read as None (not supported)."""
    def value(key):
        field = reader.fields.get(f"{architecture}.{key}")
        contents = None if field is None else field.contents()
        return contents if isinstance(contents, int) else None
    return {"block_count": value("block_count"), "head_count": value("attention.head_count"),
            "head_count_kv": value("attention.head_count_kv")}


def requantize_gguf(source: Path, output: Path, recipe: str | None = "hlwq5", *, imatrix: Path | None = None,
                    equalize: bool = False, threads: int | None = None, quiet: bool = False,
                    bits_for: dict[str, int] | None = None, smooth_keys: bool | None = None) -> dict:
    """Code the matrices of the full-precision GGUF `source` with `recipe` into `output` (written atomically).

    `bits_for` (tensor name -> HLWQ bits) overrides the recipe's bit width per tensor; the block size still
    follows the row width (recipes.tensor_type). `recipe` None keeps every tensor's type (an equalized
    full-precision GGUF, e.g. for llama-quantize).
    With `equalize` (implied by `imatrix` where the architecture has an equalization rule) the per-channel scales
    of convert/equalize.py are applied first, from the importance matrix when given, else from the weights alone.
    With `imatrix` every matrix it covers is also coded by the importance-weighted error (ggml's quantizer with
    quant_weights, as llama-quantize --imatrix), equalized or not. `smooth_keys` moves K's outlier channels into
    Q (off by default: llama.cpp's K centering, patch 0006, does better without it).
    Returns {"types": {type: count}, "weights": n, "seconds": s, "equalized": n_tensors, "weighted": n_tensors,
    "smoothed_layers": n}.
    """
    import gguf
    from tqdm import tqdm

    from .encode import add_codebook_metadata, encode_tensor
    from hlwq_gguf.ggml_ctypes import GGML

    gguf_types.register(gguf)
    recipe_def = recipes.RECIPES.get(recipe) if recipe is not None else None
    if recipe is not None and recipe_def is None:
        raise ConversionError(f"unknown recipe {recipe!r}; choose one of {', '.join(recipes.RECIPES)}")
    source, output = Path(source), Path(output)
    try:
        reader = gguf_files.read_gguf(source)
    except gguf_files.GGUFFileError as e:
        raise ConversionError(str(e)) from None
    quantized = sorted({t.tensor_type.name for t in reader.tensors} - set(FULL_PRECISION_TYPES))
    if quantized:
        raise ConversionError(f"{source}: not a full-precision GGUF (has {', '.join(quantized)} tensors); "
                              "HLWQ codes full-precision weights only")
    architecture = reader.fields["general.architecture"].contents()
    tensors = _FloatTensors(reader)
    tensor_plan = TensorPlan(recipe_def, tied_embeddings="output.weight" not in tensors, bits_for=bits_for)

    scales = None
    importance = equalizer.load_imatrix(imatrix) if imatrix is not None else {}
    smooth_keys = bool(smooth_keys)
    channels = equalize or (imatrix is not None and architecture in equalizer.SUPPORTED_ARCHITECTURES)
    if channels or smooth_keys:
        scales = equalizer.plan(architecture, tensors, _hparams(reader, architecture), importance or None,
                                channels=channels, smooth_keys=smooth_keys)
    if scales is not None and scales.left_alone and not quiet:
        print("hlwq-gguf convert: equalization leaves alone " +
              "; ".join(f"{kind} ({why})" for kind, why in scales.left_alone.items()), file=sys.stderr)
    if imatrix is not None and not channels and not quiet:
        print(f"hlwq-gguf convert: no channel-equalization rule for {architecture!r}: the importance matrix only "
              "weights each block's scale and codes", file=sys.stderr)

    ggml = GGML(builder.ensure_build().bin)
    threads = threads or os.cpu_count() or 1
    stats = {"types": {}, "weights": 0, "seconds": 0.0, "weighted": 0,
             "equalized": 0 if scales is None else len(scales.column_scales.keys() | scales.row_divisors.keys()),
             "smoothed_layers": 0 if scales is None else len(scales.smoothed_layers)}
    with staged_output(output) as tmp:
        writer = gguf.GGUFWriter(tmp, architecture)
        for field in reader.fields.values():
            if field.name.startswith("hlwq."):
                continue
            if field.name == gguf.Keys.General.FILE_TYPE and recipe_def is not None:
                writer.add_file_type(recipe_def.ftype)
                continue
            copy_field(writer, field)
        add_codebook_metadata(writer)
        if recipe_def is not None:
            writer.add_string("hlwq.recipe", recipe_def.name)
        if channels:
            writer.add_string("hlwq.equalize", scales.source)
        if scales is not None and scales.smoothed_layers:
            writer.add_string("hlwq.smooth_keys", scales.source)

        planned = []
        for t in reader.tensors:
            shape = gguf_types.numpy_shape(t)
            type_name = tensor_plan.type_for(t.name, shape)
            planned.append((t, shape, type_name))
            if type_name is None:  # in its own type (an equalized one is re-encoded in it)
                add_tensor_info(writer, t.name, shape, t.tensor_type)
                continue
            add_tensor_info(writer, t.name, shape, gguf.GGMLQuantizationType[type_name.upper()])
            stats["types"][type_name] = stats["types"].get(type_name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, shape, type_name in tqdm(planned, desc="HLWQ", unit="tensor", disable=quiet):
            if type_name is None:
                data = t.data
                if scales is not None and (t.name in scales.row_divisors or t.name in scales.column_scales):
                    data = gguf.quants.quantize(scales.apply(t.name, _to_float32(t)), t.tensor_type)
                writer.write_tensor_data(np.ascontiguousarray(data))
                continue
            started = time.perf_counter()
            values = _to_float32(t)
            if scales is not None:
                values = scales.apply(t.name, values)
            weights = importance.get(t.name)
            if weights is not None and weights.size == shape[-1]:
                # equalized columns see inputs divided by their scale: E[(x/s)^2] = E[x^2] / s^2
                if scales is not None and t.name in scales.column_scales:
                    weights = weights / np.square(scales.column_scales[t.name].astype(np.float64))
                weights = weights.astype(np.float32)
                stats["weighted"] += 1
            else:
                weights = None
            try:
                packed = encode_tensor(ggml, t.name, values, type_name, threads, imatrix=weights)
            except codec.HLWQValueError as e:
                raise ConversionError(f"{source}: {e}") from None
            writer.write_tensor_data(packed)
            stats["seconds"] += time.perf_counter() - started
            stats["weights"] += int(values.size)
        writer.close()
    return stats


def copy_field(writer, field) -> None:
    """Copy one metadata field of a GGUFReader to a GGUFWriter, except those the writer sets itself (the
    architecture, and GGUF.* header entries)."""
    import gguf

    if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
        return
    value_type = field.types[0]
    sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
    writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)


def add_tensor_info(writer, name: str, shape: tuple[int, ...], qtype) -> None:
    """Declare tensor `name` of ggml type `qtype` and numpy-order element `shape` (quantized rows as bytes)."""
    import gguf

    if qtype.name in FULL_PRECISION_TYPES:
        writer.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * gguf.GGML_QUANT_SIZES[qtype][1],
                               raw_dtype=qtype)
        return
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    packed_shape = (*shape[:-1], shape[-1] // block * type_size)
    writer.add_tensor_info(name, packed_shape, np.dtype(np.uint8), int(np.prod(packed_shape)), raw_dtype=qtype)


def _to_float32(tensor) -> np.ndarray:
    """A full-precision GGUF tensor as float32 in numpy order (BF16 data reads as raw bytes)."""
    import gguf

    shape = gguf_types.numpy_shape(tensor)
    if tensor.tensor_type == gguf.GGMLQuantizationType.BF16:
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
    return np.asarray(tensor.data, dtype=np.float32).reshape(shape)


class _FloatTensors(Mapping):
    """name -> float32 array, decoded on access (the source stays memory-mapped)."""

    def __init__(self, reader):
        self._tensors = {t.name: t for t in reader.tensors}

    def __getitem__(self, name: str) -> np.ndarray:
        return _to_float32(self._tensors[name])

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)
