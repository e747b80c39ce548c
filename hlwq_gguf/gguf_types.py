"""Register the HLWQ tensor types with a `gguf` package (PyPI's or llama.cpp's vendored gguf-py) at runtime.

After `register(gguf)`, `gguf.GGUFReader` reads HLWQ files, `gguf.quants.quantize/dequantize` handle the
types (eagerly and lazily) and gguf-dump prints their names. All the math comes from `hlwq_gguf.codec`.
"""
from __future__ import annotations

import enum
import importlib
import struct
from types import ModuleType

import numpy as np

from . import codec, typetable

# the ids come from the one type table (hlwq_gguf/typetable.py, docs/TYPES.md)
GGML_TYPE_IDS = typetable.GGML_TYPE_IDS
FILE_TYPE_IDS = typetable.FILE_TYPE_IDS

CODEBOOK_KEY = "hlwq.codebook"
CODEBOOK_FINGERPRINT_KEY = "hlwq.codebook_fingerprint"
CODEBOOK_NAME = "lloyd_int8"


def codebook_fingerprint(table: str = CODEBOOK_NAME) -> int:
    """FNV-1a over the little-endian fp32 bytes of the 2..6-bit tables, as ggml_hlwq_codebook_fingerprint()."""
    value = 2166136261
    for bits in range(2, 7):
        for byte in codec.load_codebook(bits, table).astype("<f4").tobytes():
            value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return value


def _extend_int_enum(enum_cls: type[enum.IntEnum], name: str, value: int) -> enum.IntEnum:
    if name in enum_cls.__members__:
        member = enum_cls[name]
        if int(member) != value:
            raise RuntimeError(f"{enum_cls.__name__}.{name} is {int(member)} in this gguf package, expected {value}")
        return member
    if value in enum_cls._value2member_map_:
        other = enum_cls._value2member_map_[value]
        raise RuntimeError(f"{enum_cls.__name__} value {value} is already taken by {other.name}")
    member = int.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    enum_cls._member_names_.append(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    type.__setattr__(enum_cls, name, member)
    return member


def _make_quant_class(gguf: ModuleType, block_type: type[codec.HLWQBlockType], qtype) -> type:
    quants = gguf.quants
    base = getattr(quants, "__Quant")

    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return block_type.quantize_blocks(blocks)

    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return block_type.dequantize_blocks(blocks)

    namespace = {
        "quantize_blocks": classmethod(quantize_blocks),
        "dequantize_blocks": classmethod(dequantize_blocks),
        "__doc__": f"{block_type.__name__}: {block_type.bits}-bit HLWQ, {block_type.block_size}-weight blocks",
    }
    return type(block_type.__name__, (base,), namespace, qtype=qtype)


def register(gguf: ModuleType | None = None) -> ModuleType:
    """Add the HLWQ types to `gguf` (the imported PyPI package by default); idempotent."""
    if gguf is None:
        gguf = importlib.import_module("gguf")
    constants = gguf.constants
    if getattr(constants, "_hlwq_registered", False):
        return gguf
    for entry in typetable.GGML_TYPES:
        qtype = _extend_int_enum(constants.GGMLQuantizationType, entry.name, entry.id)
        constants.GGML_QUANT_SIZES.setdefault(qtype, (entry.block_size, entry.type_size))
        if constants.GGML_QUANT_SIZES[qtype] != (entry.block_size, entry.type_size):
            raise RuntimeError(f"gguf's size for {entry.name} disagrees with hlwq_gguf.typetable")
        if entry.is_activation:
            continue
        block_type = codec.BLOCK_TYPES[entry.name]
        if (block_type.block_size, block_type.type_size, block_type.table) != \
                (entry.block_size, entry.type_size, entry.codebook):
            raise RuntimeError(f"hlwq_gguf.codec's {entry.name} disagrees with hlwq_gguf.typetable")
        if qtype not in gguf.quants._type_traits:
            _make_quant_class(gguf, block_type, qtype)
    for name, value in FILE_TYPE_IDS.items():
        _extend_int_enum(constants.LlamaFileType, name, value)
    constants._hlwq_registered = True
    return gguf


def codebook_metadata() -> dict[str, object]:
    """The GGUF key/values an HLWQ file must carry for llama.cpp to accept its codes."""
    return {CODEBOOK_KEY: CODEBOOK_NAME, CODEBOOK_FINGERPRINT_KEY: codebook_fingerprint()}


def fingerprint_hex(value: int) -> str:
    return struct.pack(">I", value).hex()


def numpy_shape(tensor) -> tuple[int, ...]:
    """A GGUFReader tensor's logical shape in numpy order (GGUF lists ne0, the row, first); for quantized or BF16
    tensors `tensor.data.shape` counts bytes instead."""
    return tuple(int(x) for x in reversed(tensor.shape))
