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

from . import codec

# ggml type ids, in the range 100-131 reserved for HLWQ (see docs/TYPES.md)
GGML_TYPE_IDS = {
    "HLWQ3": 100, "HLWQ4": 101, "HLWQ5": 102, "HLWQ6": 103,
    "HLWQ3_64": 104, "HLWQ4_64": 105, "HLWQ5_64": 106, "HLWQ6_64": 107,
    # the reference implementation's codebooks A and B (lossless import)
    "HLWQ3_A": 108, "HLWQ4_A": 109, "HLWQ5_A": 110, "HLWQ6_A": 111,
    "HLWQ3_B": 112, "HLWQ4_B": 113, "HLWQ5_B": 114, "HLWQ6_B": 115,
    "Q8_HLWQ": 120, "Q8_HLWQ_64": 121,
}
# llama_ftype values of the HLWQ file types
FILE_TYPE_IDS = {"MOSTLY_HLWQ3": 100, "MOSTLY_HLWQ4": 101, "MOSTLY_HLWQ5": 102, "MOSTLY_HLWQ6": 103, "MOSTLY_HLWQ5_M": 104,
                 "MOSTLY_HLWQ4_M": 105}

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
    for name, value in GGML_TYPE_IDS.items():
        qtype = _extend_int_enum(constants.GGMLQuantizationType, name, value)
        if name.startswith("Q8_"):
            size = codec.Q8HLWQ.block_size if name == "Q8_HLWQ" else codec.Q8HLWQ.block_size // 2
            constants.GGML_QUANT_SIZES.setdefault(qtype, (size, 4 + size))
            continue
        block_type = codec.BLOCK_TYPES[name]
        constants.GGML_QUANT_SIZES.setdefault(qtype, (block_type.block_size, block_type.type_size))
        if constants.GGML_QUANT_SIZES[qtype] != (block_type.block_size, block_type.type_size):
            raise RuntimeError(f"gguf's size for {name} disagrees with hlwq_gguf.codec")
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
