"""HLWQ (Hadamard-Lloyd Weight Quantization) block codec in numpy.

This module is the single source of truth for the HLWQ math used by the
converter, by the tests and as the specification mirrored by the llama.cpp C
kernels.  Everything is vectorised over blocks; the only Python loops run over
the log2(QK) butterfly stages or a handful of least-squares rounds.

One block holds QK (128 or 64) consecutive weights of one row.  With H the
normalised Sylvester Hadamard matrix of order QK (symmetric, self-inverse) and
``c`` a Lloyd-Max codebook for N(0, 1):

    quantize:    y    = (block @ H) * sqrt(QK)        ~ N(0, 1) * ||block||
                 code = nearest(y / s)
    dequantize:  w    = s * (c[code] / sqrt(QK)) @ H

``s`` is the fp16 block scale ``d``.  The reference implementation stores
``s = ||block||_2`` ("norm" scale mode); freshly quantized models default to a
least-squares scale found by a small search ("fit"), which keeps the block semantics above.

Packed block layout (little-endian), QK = block size:

    ggml_half d;                          // the scale s
    bits 3: uint8 qs[QK/4]; uint8 qh[QK/8];
    bits 4: uint8 qs[QK/2];
    bits 5: uint8 qs[QK/2]; uint8 qh[QK/8];
    bits 6: uint8 qs[QK/2]; uint8 qh[QK/4];

* 2-bit quarter planes (bits 3: qs, bits 6: qh): byte i holds the 2-bit
  fields of codes i, i+QK/4, i+QK/2, i+3QK/4 at bit offsets 0, 2, 4, 6.
* nibble planes (bits 4/5/6 qs): byte i = code[i] low nibble | code[i+QK/2]
  low nibble << 4.
* 1-bit planes (bits 3/5 qh): bit k of byte i is the top bit of code
  i + k*QK/8 (the layout of Q5_K's qh).

Splitting codes into planes whose fields sit at the same position of every
quarter / half / eighth of a block lets a SIMD kernel decode 32 or 64 codes
with one shift or bit test, and a CUDA thread its 4 consecutive codes with
one 32-bit read of each plane.

Codebooks are int8 grids, ``c[k] = fp32(step * t[k])`` with ``t`` int8
(:func:`codebook_int8`): every kernel multiplies int8 entries with int8
activations (AVX2 maddubs, AVX-512 VNNI, CUDA dp4a).

The activation side (``Q8HLWQ``) rotates each activation block with the same
H, so the weight side of a dot product is a pure table lookup:

    dot(w_hat, x) = s * dot(c[code] / sqrt(QK), x @ H)
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import ClassVar

import numpy as np

__all__ = [
    "HLWQValueError",
    "TABLES",
    "SCALE_MODES",
    "FIT_STARTS",
    "CANONICAL_TABLE",
    "load_codebook",
    "codebook_midpoints",
    "codebook_int8",
    "codebook_step",
    "hadamard_rotate",
    "nearest_code",
    "block_norms",
    "pack_codes",
    "unpack_codes",
    "quantize_blocks",
    "dequantize_blocks",
    "quantize",
    "dequantize",
    "block_type",
    "HLWQBlockType",
    "HLWQ3",
    "HLWQ4",
    "HLWQ5",
    "HLWQ6",
    "HLWQ3_64",
    "HLWQ4_64",
    "HLWQ5_64",
    "HLWQ6_64",
    "BLOCK_TYPES",
    "Q8HLWQ",
    "Q8HLWQ_64",
    "round_half_away",
    "vec_dot_reference",
]

CODEBOOK_PATH = Path(__file__).resolve().parent / "data" / "codebooks.json"

# lloyd_int8: the Lloyd-Max quantizer of N(0,1) on an int8 grid (scripts/gen_codebook_tables.py), what hlwq-gguf
# quantizes with; reference_A/B: the reference implementation's tables, for imported checkpoints
CANONICAL_TABLE = "lloyd_int8"
TABLES = (CANONICAL_TABLE, "reference_A", "reference_B")
SCALE_MODES = ("fit", "norm")
SUPPORTED_BITS = (3, 4, 5, 6)
SUPPORTED_BLOCK_SIZES = (64, 128)

# Block scale of freshly quantized weights (scale_mode="fit").  Given a scale s
# the best codes are the nearest centroids of y / s; given the codes the best s
# is the least-squares dot(y, c) / dot(c, c).  Alternating the two never raises
# the error but only reaches the local optimum next to its start, and the raw
# norm is a poor start: on Gaussian-like blocks the best optimum usually lies
# near 0.87 x the norm (more weights on the outer codes), on spiky blocks (a
# few large rotated values) well above it.  "fit" therefore tries FIT_STARTS
# start scales evenly spaced from FIT_START_MIN x norm to the larger of
# FIT_START_MAX x norm and FIT_CLIP_MARGIN x max|y| / c_max (the scale that
# clips nothing), takes the codes for each and the least-squares s for those
# codes, keeps the start with the smallest error and refines it with
# FIT_ROUNDS alternations.  Relative squared error against "norm" (the
# reference's s = ||block||), fp16 d, the converged Lloyd-Max tables, from
# `python scripts/measure_block_scale.py` (N(0,1) blocks; SmolLM2-135M's real
# matrices give the same ratios within 0.01):
#
#   bits  QK   10 alternations from the norm   fit (24 starts + 2 rounds)   best of 256 starts + 3 rounds
#     3  128                          0.948                        0.931                          0.931
#     4  128                          0.911                        0.833                          0.833
#     5  128                          0.891                        0.759                          0.757
#     6  128                          0.894                        0.730                          0.721
#     5   64                          0.857                        0.678                          0.675
#
# At 5 bits that is 24 % less squared error than the reference's quantizer.
# On spiky blocks (--cosine: test-quantize-fns's data) fit reaches the wide
# search too (5 bits: 0.103 of "norm"); without the clip-free end of the
# range it stayed at twice that.
# ggml's quantize_row_hlwq*_ref (ggml_patch/) runs the same search with the
# same fp32 operations in the same order, so both produce identical bytes.
FIT_STARTS = 24
FIT_START_MIN = np.float32(0.65)
FIT_START_MAX = np.float32(1.25)
FIT_CLIP_MARGIN = np.float32(1.1)
FIT_ROUNDS = 2

# Smallest scale used to normalise a block; it keeps 1/s finite for all-zero
# and denormal blocks and matches the reference's clamp (which stores 0).
MIN_SCALE = np.float32(1e-10)

FP16_MAX = 65504.0


class HLWQValueError(ValueError):
    """Input that HLWQ cannot represent (non-finite values, fp16 scale overflow)."""


# --------------------------------------------------------------------------
# codebooks
# --------------------------------------------------------------------------


def _check_bits(bits: int, allowed=(2, 3, 4, 5, 6)) -> int:
    if bits not in allowed:
        raise ValueError(f"unsupported bit width {bits!r}, expected one of {allowed}")
    return int(bits)


@functools.lru_cache(maxsize=None)
def load_codebook(bits: int, table: str = CANONICAL_TABLE) -> np.ndarray:
    """Return the 2**bits fp32 centroids of ``table`` (sorted ascending).

    ``table`` is "lloyd_int8" (Lloyd-Max for N(0,1) on the grid step * int8),
    "reference_A" (used by the reference's .codes/.ct files) or "reference_B"
    (reference CLI, KV cache, CompressedTensors export).  Values are rebuilt
    from the json's ``fp32_hex`` so they are bit-exact.  The array is cached
    and read-only.
    """
    entry = _table_entry(bits, table)
    codebook = np.array([int(h, 16) for h in entry["fp32_hex"]], dtype=np.uint32).view(np.float32)
    if codebook.shape != (1 << bits,) or np.any(np.diff(codebook) <= 0):
        raise ValueError(f"codebook {table}/{bits} in {CODEBOOK_PATH} is malformed")
    codebook.setflags(write=False)
    return codebook


@functools.lru_cache(maxsize=None)
def codebook_midpoints(bits: int, table: str = CANONICAL_TABLE) -> np.ndarray:
    """Decision boundaries ``(c[k] + c[k+1]) * 0.5`` in fp32 (2**bits - 1 values)."""
    codebook = load_codebook(bits, table)
    mids = (codebook[:-1] + codebook[1:]) * np.float32(0.5)
    mids.setflags(write=False)
    return mids


def _table_entry(bits: int, table: str) -> dict:
    _check_bits(bits)
    if table not in TABLES:
        raise ValueError(f"unknown codebook table {table!r}, expected one of {TABLES}")
    with open(CODEBOOK_PATH, encoding="utf-8") as f:
        return json.load(f)["tables"][str(bits)][table]


@functools.lru_cache(maxsize=None)
def codebook_int8(bits: int, table: str = CANONICAL_TABLE) -> np.ndarray:
    """The int8 table ``t`` the kernels multiply: ``c[k] = fp32(step * t[k])`` exactly for lloyd_int8, the nearest
    grid point for the reference tables (their int8 image; they still decode with their exact fp32 values)."""
    t = np.array(_table_entry(bits, table)["int8"], dtype=np.int8)
    t.setflags(write=False)
    return t


@functools.lru_cache(maxsize=None)
def codebook_step(bits: int, table: str = CANONICAL_TABLE) -> np.float32:
    """The grid step of :func:`codebook_int8` (fp32)."""
    return np.float32(_table_entry(bits, table)["step"])


# --------------------------------------------------------------------------
# rotation and nearest centroid
# --------------------------------------------------------------------------


def hadamard_rotate(x: np.ndarray) -> np.ndarray:
    """Multiply the last axis by the normalised Sylvester Hadamard matrix H.

    Radix-2 butterfly (a, b) -> (a + b, a - b) for spans 1, 2, ..., n/2, then
    one multiply by fp32(1/sqrt(n)); all arithmetic is fp32.  This is
    ``x @ H`` with ``H[i, j] = (-1)**popcount(i & j) / sqrt(n)``; H is
    symmetric and self-inverse, so the same function undoes itself.  The last
    axis length must be a power of two.
    """
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard length must be a power of two, got {n}")
    lead_shape = x.shape[:-1]
    out = x.reshape(-1, n)
    span = 1
    while span < n:
        # axis 2 selects the first / second half of each 2*span chunk
        pairs = out.reshape(-1, n // (2 * span), 2, span)
        first, second = pairs[:, :, 0, :], pairs[:, :, 1, :]
        out = np.stack((first + second, first - second), axis=2)
        span *= 2
    return (out.reshape(*lead_shape, n) * np.float32(1.0 / np.sqrt(n))).astype(np.float32, copy=False)


def nearest_code(v: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for every value of ``v`` (uint8).

    The code is the number of fp32 midpoints strictly below the value, so an
    exact tie (value on a midpoint, e.g. 0.0 for the symmetric tables) goes to
    the lower index.  The C kernels use the same comparison.
    """
    codebook = np.asarray(codebook, dtype=np.float32)
    mids = (codebook[:-1] + codebook[1:]) * np.float32(0.5)
    v = np.asarray(v, dtype=np.float32)
    return np.searchsorted(mids, v, side="left").astype(np.uint8)


def block_norms(blocks: np.ndarray) -> np.ndarray:
    """fp32 L2 norm of every block (last axis), summed in a fixed pairwise order.

    The squares are added as a halving tree (element i + element i + n/2, ...)
    rather than with np.sum, whose order depends on memory layout; a C
    implementation can reproduce the tree exactly.
    """
    blocks = np.asarray(blocks, dtype=np.float32)
    with np.errstate(over="ignore"):
        acc = blocks * blocks
        while acc.shape[-1] > 1:
            half = acc.shape[-1] // 2
            acc = acc[..., :half] + acc[..., half:]
    return np.sqrt(acc[..., 0])


# --------------------------------------------------------------------------
# bit packing
# --------------------------------------------------------------------------


def _qs_size(bits: int, block_size: int) -> int:
    return block_size // 4 if bits == 3 else block_size // 2


def _qh_size(bits: int, block_size: int) -> int:
    return {3: block_size // 8, 4: 0, 5: block_size // 8, 6: block_size // 4}[bits]


def _pack_quarters(fields: np.ndarray) -> np.ndarray:
    quarters = fields.reshape(fields.shape[0], 4, -1).astype(np.uint8)
    return quarters[:, 0] | quarters[:, 1] << 2 | quarters[:, 2] << 4 | quarters[:, 3] << 6


def _unpack_quarters(packed: np.ndarray) -> np.ndarray:
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)
    return ((packed[:, None, :] >> shifts) & 3).reshape(packed.shape[0], -1)


def _pack_halves(fields: np.ndarray) -> np.ndarray:
    halves = fields.reshape(fields.shape[0], 2, -1).astype(np.uint8)
    return halves[:, 0] | halves[:, 1] << 4


def _unpack_halves(packed: np.ndarray) -> np.ndarray:
    return np.concatenate((packed & 15, packed >> 4), axis=1)


def _pack_bitplane(bit_values: np.ndarray) -> np.ndarray:
    eighths = bit_values.reshape(bit_values.shape[0], 8, -1).astype(np.uint8)
    weights = (1 << np.arange(8, dtype=np.uint8)).reshape(1, 8, 1)
    return np.bitwise_or.reduce(eighths * weights, axis=1)


def _unpack_bitplane(packed: np.ndarray) -> np.ndarray:
    shifts = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    return ((packed[:, None, :] >> shifts) & 1).reshape(packed.shape[0], -1)


def pack_codes(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Pack codes [n_blocks, QK] into the qs/qh planes [n_blocks, QK*bits/8] (uint8).

    The fp16 scale is not included; see the module docstring for the layout.
    """
    _check_bits(bits, SUPPORTED_BITS)
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != block_size:
        raise ValueError(f"codes must have shape [n_blocks, {block_size}], got {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    codes = codes.astype(np.uint8)
    if bits == 3:
        planes = (_pack_quarters(codes & 3), _pack_bitplane(codes >> 2))
    elif bits == 4:
        planes = (_pack_halves(codes),)
    elif bits == 5:
        planes = (_pack_halves(codes & 15), _pack_bitplane(codes >> 4))
    else:
        planes = (_pack_halves(codes & 15), _pack_quarters(codes >> 4))
    return np.concatenate(planes, axis=1)


def unpack_codes(packed: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: [n_blocks, QK*bits/8] uint8 -> codes [n_blocks, QK] uint8."""
    _check_bits(bits, SUPPORTED_BITS)
    packed = np.asarray(packed, dtype=np.uint8)
    n_qs = _qs_size(bits, block_size)
    n_bytes = n_qs + _qh_size(bits, block_size)
    if packed.ndim != 2 or packed.shape[1] != n_bytes:
        raise ValueError(f"packed codes must have shape [n_blocks, {n_bytes}], got {packed.shape}")
    qs, qh = packed[:, :n_qs], packed[:, n_qs:]
    if bits == 3:
        return _unpack_quarters(qs) | _unpack_bitplane(qh) << 2
    if bits == 4:
        return _unpack_halves(qs)
    if bits == 5:
        return _unpack_halves(qs) | _unpack_bitplane(qh) << 4
    return _unpack_halves(qs) | _unpack_quarters(qh) << 4


# --------------------------------------------------------------------------
# quantize / dequantize
# --------------------------------------------------------------------------


def _check_blocks(blocks: np.ndarray, block_size: int) -> np.ndarray:
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"unsupported block size {block_size}, expected one of {SUPPORTED_BLOCK_SIZES}")
    blocks = np.asarray(blocks, dtype=np.float32)
    if blocks.ndim != 2 or blocks.shape[1] != block_size:
        raise ValueError(f"blocks must have shape [n_blocks, {block_size}], got {blocks.shape}")
    finite = np.isfinite(blocks).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise HLWQValueError(f"block {bad}: input contains NaN or Inf ({int((~finite).sum())} such blocks)")
    return blocks


def _sequential_sum(products: np.ndarray) -> np.ndarray:
    """Sum of the last axis, left to right in fp32: the order of the C quantizer, so both pick the same scale."""
    return np.cumsum(products, axis=-1, dtype=np.float32)[..., -1]


def _fit_sums(y: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dot(y, c) and dot(c, c) per block; the least-squares scale for the codes is their ratio (c.c > 0: no table has a 0)."""
    return _sequential_sum(y * centroids), _sequential_sum(centroids * centroids)


def _least_squares_scale(y: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    sum_yc, sum_cc = _fit_sums(y, centroids)
    return sum_yc / sum_cc


def _safe_reciprocal(scale: np.ndarray) -> np.ndarray:
    return np.float32(1.0) / np.maximum(scale, MIN_SCALE)


def _check_fp16_range(scale: np.ndarray, norms: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        d = scale.astype(np.float16)
    overflow = ~np.isfinite(d)
    if overflow.any():
        bad = int(np.flatnonzero(overflow)[0])
        raise HLWQValueError(
            f"block {bad}: block norm {float(norms[bad]):.7g} (scale {float(scale[bad]):.7g}) "
            f"exceeds fp16 range (max {FP16_MAX:g})"
        )
    return d


def fit_start_scales(y: np.ndarray, norms: np.ndarray, codebook: np.ndarray) -> list[np.ndarray]:
    """The FIT_STARTS start scales of every block, computed in fp32 exactly as the C kernel does."""
    lowest = norms * FIT_START_MIN
    highest = np.maximum(norms * FIT_START_MAX, FIT_CLIP_MARGIN * np.abs(y).max(axis=1) / codebook[-1])
    return [lowest + (highest - lowest) * np.float32(i) / np.float32(FIT_STARTS - 1) for i in range(FIT_STARTS)]


def quantize_blocks(
    blocks: np.ndarray,
    bits: int,
    block_size: int,
    table: str = CANONICAL_TABLE,
    scale_mode: str = "fit",
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize fp32 blocks [n_blocks, QK] to (d fp16 [n_blocks], codes uint8 [n_blocks, QK]).

    Both modes compute y = hadamard_rotate(block) * sqrt(QK) and pick codes
    as nearest(y * (1/s)) with fp32 ops in exactly that order.

    scale_mode "norm" reproduces the reference quantizer: s = max(||block||,
    1e-10), d = fp16(s).  The reference normalises first, (block / s) @ H *
    sqrt(QK); rotating first and multiplying by the fp32 reciprocal agrees
    with its fixtures at least as well (1 code in 10^5 differs in both
    orders, always within 2e-7 of a decision boundary) and shares the C
    kernel's code path.

    scale_mode "fit" searches the scale (see FIT_STARTS above): for every
    start scale s0, codes = nearest(y / s0) and s = dot(y, c) /
    dot(c, c); the start with the largest dot(y, c)^2 / dot(c, c) (the
    smallest residual for its least-squares s; the first one on ties) wins,
    then FIT_ROUNDS times the codes are re-picked for s and s refitted to
    them.  The block semantics stay w_hat = s * (c[code] / sqrt(QK)) @ H.

    All-zero blocks store d = 0 with the codes of nearest(0).  Raises
    HLWQValueError for NaN/Inf input, or for a norm or scale that fp16 cannot
    hold (|s| >= 65520, which rounds to inf; 65504 <= |s| < 65520 rounds to
    65504 and is accepted, as the reference stores it).
    """
    _check_bits(bits)
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"unknown scale_mode {scale_mode!r}, expected one of {SCALE_MODES}")
    blocks = _check_blocks(blocks, block_size)
    codebook = load_codebook(bits, table)
    sqrt_qk = np.float32(np.sqrt(block_size))

    norms = block_norms(blocks)
    _check_fp16_range(norms, norms)
    scale = np.maximum(norms, MIN_SCALE)
    y = hadamard_rotate(blocks) * sqrt_qk

    def codes_for(s: np.ndarray) -> np.ndarray:
        return nearest_code(y * _safe_reciprocal(s)[:, None], codebook)

    if scale_mode == "norm":
        codes = codes_for(scale)
    else:
        best_gain = np.full(len(y), -np.inf, dtype=np.float32)
        best_scale = scale
        for start in fit_start_scales(y, scale, codebook):
            sum_yc, sum_cc = _fit_sums(y, codebook[codes_for(start)])
            gain = sum_yc * sum_yc / sum_cc
            better = gain > best_gain
            best_gain = np.where(better, gain, best_gain)
            best_scale = np.where(better, sum_yc / sum_cc, best_scale)
        codes = codes_for(best_scale)
        for _ in range(FIT_ROUNDS):
            scale = _least_squares_scale(y, codebook[codes])
            codes = codes_for(scale)
        scale = _least_squares_scale(y, codebook[codes])

    scale = np.where(norms > 0, scale, np.float32(0))
    d = _check_fp16_range(scale, norms)
    return d, codes


def dequantize_blocks(
    d: np.ndarray, codes: np.ndarray, bits: int, block_size: int, table: str = CANONICAL_TABLE
) -> np.ndarray:
    """Reconstruct fp32 blocks [n_blocks, QK] = d * hadamard_rotate(c[codes] / sqrt(QK)).

    ``d`` may be fp16 (as stored) or any float array; it is widened to fp32.
    """
    _check_bits(bits)
    codebook = load_codebook(bits, table)
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != block_size:
        raise ValueError(f"codes must have shape [n_blocks, {block_size}], got {codes.shape}")
    scale = np.asarray(d).astype(np.float32).reshape(-1, 1)
    rotated = hadamard_rotate(codebook[codes] / np.float32(np.sqrt(block_size)))
    return rotated * scale


# --------------------------------------------------------------------------
# ggml block types
# --------------------------------------------------------------------------


class HLWQBlockType:
    """One HLWQ ggml block type: ``bits``-bit codes, ``block_size`` weights per block.

    Packed blocks are ``type_size`` bytes: fp16 d, then the code planes.
    """

    name: ClassVar[str]
    bits: ClassVar[int]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    # the codebook the type decodes with: the _A/_B types carry the reference implementation's tables
    table: ClassVar[str] = CANONICAL_TABLE

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.type_size = 2 + cls.block_size * cls.bits // 8

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray, table: str | None = None, scale_mode: str = "fit") -> np.ndarray:
        """fp32 [n_blocks, QK] -> packed uint8 [n_blocks, type_size]."""
        table = table or cls.table
        d, codes = quantize_blocks(blocks, cls.bits, cls.block_size, table, scale_mode)
        return cls.pack_blocks(d, codes)

    @classmethod
    def pack_blocks(cls, d: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Assemble packed blocks from fp16 scales [n_blocks] and codes [n_blocks, QK]."""
        d_bytes = np.asarray(d, dtype="<f2").reshape(-1, 1).view(np.uint8)
        return np.concatenate((d_bytes, pack_codes(codes, cls.bits, cls.block_size)), axis=1)

    @classmethod
    def unpack_blocks(cls, packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Split packed blocks [n_blocks, type_size] into (d fp16 [n_blocks], codes uint8 [n_blocks, QK])."""
        packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1, cls.type_size)
        d = packed[:, :2].copy().view("<f2").reshape(-1).astype(np.float16)
        return d, unpack_codes(packed[:, 2:], cls.bits, cls.block_size)

    @classmethod
    def dequantize_blocks(cls, packed: np.ndarray, table: str | None = None) -> np.ndarray:
        """Packed uint8 [n_blocks, type_size] -> fp32 [n_blocks, QK]."""
        table = table or cls.table
        d, codes = cls.unpack_blocks(packed)
        return dequantize_blocks(d, codes, cls.bits, cls.block_size, table)

    @classmethod
    def quantize(cls, data: np.ndarray, table: str | None = None, scale_mode: str = "fit") -> np.ndarray:
        """Quantize an array whose last dim is a multiple of QK.

        Returns uint8 of shape (..., last_dim // QK * type_size), like
        gguf-py's ``quants.quantize``.
        """
        data = np.asarray(data, dtype=np.float32)
        if data.ndim == 0 or data.shape[-1] % cls.block_size:
            raise ValueError(f"{cls.name}: last dimension {data.shape[-1:]} is not a multiple of {cls.block_size}")
        packed = cls.quantize_blocks(data.reshape(-1, cls.block_size), table, scale_mode)
        return packed.reshape(*data.shape[:-1], data.shape[-1] // cls.block_size * cls.type_size)

    @classmethod
    def dequantize(cls, data: np.ndarray, table: str | None = None) -> np.ndarray:
        """Inverse of :meth:`quantize`: uint8 (..., n_blocks*type_size) -> fp32 (..., n_blocks*QK)."""
        data = np.asarray(data, dtype=np.uint8)
        if data.ndim == 0 or data.shape[-1] % cls.type_size:
            raise ValueError(f"{cls.name}: last dimension {data.shape[-1:]} is not a multiple of {cls.type_size}")
        blocks = cls.dequantize_blocks(data.reshape(-1, cls.type_size), table)
        return blocks.reshape(*data.shape[:-1], data.shape[-1] // cls.type_size * cls.block_size)


class HLWQ3(HLWQBlockType):
    name, bits, block_size = "HLWQ3", 3, 128


class HLWQ4(HLWQBlockType):
    name, bits, block_size = "HLWQ4", 4, 128


class HLWQ5(HLWQBlockType):
    name, bits, block_size = "HLWQ5", 5, 128


class HLWQ6(HLWQBlockType):
    name, bits, block_size = "HLWQ6", 6, 128


class HLWQ3_64(HLWQBlockType):
    name, bits, block_size = "HLWQ3_64", 3, 64


class HLWQ4_64(HLWQBlockType):
    name, bits, block_size = "HLWQ4_64", 4, 64


class HLWQ5_64(HLWQBlockType):
    name, bits, block_size = "HLWQ5_64", 5, 64


class HLWQ6_64(HLWQBlockType):
    name, bits, block_size = "HLWQ6_64", 6, 64


def _reference_table_type(bits: int, table: str) -> type[HLWQBlockType]:
    letter = table[-1]
    return type(f"HLWQ{bits}_{letter}", (HLWQBlockType,),
                {"name": f"HLWQ{bits}_{letter}", "bits": bits, "block_size": 128, "table": table,
                 "__doc__": f"{bits}-bit HLWQ blocks decoded with the reference implementation's table {letter}"})


# the reference implementation's tables: lossless import of its checkpoints (convert/polarquant.py)
REFERENCE_TABLE_TYPES: dict[str, type[HLWQBlockType]] = {
    t.name: t for t in (_reference_table_type(bits, table) for table in ("reference_A", "reference_B") for bits in SUPPORTED_BITS)
}

BLOCK_TYPES: dict[str, type[HLWQBlockType]] = {
    cls.name: cls for cls in (HLWQ3, HLWQ4, HLWQ5, HLWQ6, HLWQ3_64, HLWQ4_64, HLWQ5_64, HLWQ6_64)
} | REFERENCE_TABLE_TYPES


def block_type(bits: int, block_size: int = 128, table: str = CANONICAL_TABLE) -> type[HLWQBlockType]:
    """The HLWQ block type class for a bit width, block size and codebook table."""
    for cls in BLOCK_TYPES.values():
        if cls.bits == bits and cls.block_size == block_size and cls.table == table:
            return cls
    raise ValueError(f"no HLWQ type with {bits} bits, block size {block_size} and table {table}")


def quantize(
    data: np.ndarray, bits: int, block_size: int = 128, table: str = CANONICAL_TABLE, scale_mode: str = "fit"
) -> np.ndarray:
    """Quantize (..., k*QK) fp32 to packed uint8 (..., k*type_size)."""
    return block_type(bits, block_size).quantize(data, table, scale_mode)


def dequantize(packed: np.ndarray, bits: int, block_size: int = 128, table: str = CANONICAL_TABLE) -> np.ndarray:
    """Dequantize packed uint8 (..., k*type_size) to fp32 (..., k*QK)."""
    return block_type(bits, block_size).dequantize(packed, table)


# --------------------------------------------------------------------------
# activation side
# --------------------------------------------------------------------------


def round_half_away(v: np.ndarray) -> np.ndarray:
    """C ``roundf``: round to nearest, halves away from zero (fp32 in, fp32 out).

    floor(|v| + 0.5) is wrong for 0.49999997 (the add rounds up), so exact
    halves are detected on the fraction, which is computed exactly.
    """
    v = np.asarray(v, dtype=np.float32)
    whole = np.trunc(v)
    is_half = np.abs(v - whole) == np.float32(0.5)
    return np.where(is_half, whole + np.sign(v), np.rint(v)).astype(np.float32)


class Q8HLWQ:
    """Rotated int8 activation block used by the HLWQ dot product.

    Layout: ``float d`` (fp32, little-endian), then ``int8 qs[QK]``, with
    qs = roundf(xr / d), xr = x @ H, d = max|xr| / 127 (0 for a zero block).
    """

    name: ClassVar[str] = "Q8HLWQ"
    block_size: ClassVar[int] = 128
    type_size: ClassVar[int] = 4 + 128

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """fp32 [n_blocks, QK] -> (d fp32 [n_blocks], qs int8 [n_blocks, QK])."""
        blocks = np.asarray(blocks, dtype=np.float32).reshape(-1, cls.block_size)
        rotated = hadamard_rotate(blocks)
        amax = np.abs(rotated).max(axis=1)
        d = amax / np.float32(127)
        inv_d = np.float32(1) / np.where(d > 0, d, np.float32(1))
        inv_d = np.where(d > 0, inv_d, np.float32(0))
        qs = round_half_away(rotated * inv_d[:, None]).astype(np.int8)
        return d.astype(np.float32), qs

    @classmethod
    def pack_blocks(cls, d: np.ndarray, qs: np.ndarray) -> np.ndarray:
        """(d [n_blocks], qs [n_blocks, QK]) -> uint8 [n_blocks, type_size]."""
        d_bytes = np.asarray(d, dtype="<f4").reshape(-1, 1).view(np.uint8)
        return np.concatenate((d_bytes, np.asarray(qs, dtype=np.int8).view(np.uint8)), axis=1)

    @classmethod
    def unpack_blocks(cls, packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [n_blocks, type_size] -> (d fp32 [n_blocks], qs int8 [n_blocks, QK])."""
        packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1, cls.type_size)
        d = packed[:, :4].copy().view("<f4").reshape(-1).astype(np.float32)
        return d, packed[:, 4:].view(np.int8).copy()

    @classmethod
    def quantize(cls, data: np.ndarray) -> np.ndarray:
        """fp32 (..., k*QK) -> packed uint8 (..., k*type_size)."""
        data = np.asarray(data, dtype=np.float32)
        if data.ndim == 0 or data.shape[-1] % cls.block_size:
            raise ValueError(f"{cls.name}: last dimension {data.shape[-1:]} is not a multiple of {cls.block_size}")
        packed = cls.pack_blocks(*cls.quantize_blocks(data.reshape(-1, cls.block_size)))
        return packed.reshape(*data.shape[:-1], data.shape[-1] // cls.block_size * cls.type_size)

    @classmethod
    def dequantize(cls, data: np.ndarray) -> np.ndarray:
        """Packed -> the *rotated* activations d * qs (fp32, (..., k*QK)); apply hadamard_rotate to undo."""
        data = np.asarray(data, dtype=np.uint8)
        d, qs = cls.unpack_blocks(data.reshape(-1, cls.type_size))
        rotated = qs.astype(np.float32) * d[:, None]
        return rotated.reshape(*data.shape[:-1], data.shape[-1] // cls.type_size * cls.block_size)


class Q8HLWQ_64(Q8HLWQ):
    name = "Q8HLWQ_64"
    block_size = 64
    type_size = 4 + 64


def _activation_type(block_size: int) -> type[Q8HLWQ]:
    return {128: Q8HLWQ, 64: Q8HLWQ_64}[block_size]


def vec_dot_reference(
    weight_packed_row: np.ndarray,
    x_row: np.ndarray,
    bits: int,
    block_size: int = 128,
    table: str = CANONICAL_TABLE,
) -> np.ndarray:
    """Dot product of packed HLWQ weight row(s) with an fp32 activation row, as the C kernel computes it.

    Derivation: w_hat = s * (c[code] / sqrt(QK)) @ H and H is symmetric, so
    dot(w_hat, x) = s / sqrt(QK) * dot(c[code], x @ H).  With x @ H ~= d_x * qs
    (Q8HLWQ) and c ~= step * t (:func:`codebook_int8`, exact for lloyd_int8):

        dot ~= sum_blocks fp32(d_w) * d_x * isum  *  step / sqrt(QK),
        isum  = sum_i t[code_i] * qs_i   (exact in int32).

    The per-block products are accumulated in fp32 and the constant is applied
    once at the end; a C kernel that orders the fp32 work differently agrees to
    fp32 rounding.  ``weight_packed_row`` may be one packed row (1-D) or rows
    [n_rows, n_bytes]; the result is a float32 scalar or [n_rows].
    """
    weight_type = block_type(bits, block_size)
    packed = np.asarray(weight_packed_row, dtype=np.uint8)
    single_row = packed.ndim == 1
    packed = packed.reshape(-1, packed.shape[-1])
    n_rows = packed.shape[0]
    n_blocks = packed.shape[1] // weight_type.type_size
    x_row = np.asarray(x_row, dtype=np.float32).reshape(-1)
    if x_row.shape[0] != n_blocks * block_size or packed.shape[1] != n_blocks * weight_type.type_size:
        raise ValueError(f"row of {packed.shape[1]} bytes does not match {x_row.shape[0]} activations")

    d_w, codes = weight_type.unpack_blocks(packed.reshape(-1, weight_type.type_size))
    d_x, qs = _activation_type(block_size).quantize_blocks(x_row.reshape(n_blocks, block_size))
    table8 = codebook_int8(bits, table).astype(np.int32)

    products = table8[codes].reshape(n_rows, n_blocks, block_size) * qs.astype(np.int32)[None]
    isum = products.sum(axis=-1, dtype=np.int32)
    per_block = d_w.astype(np.float32).reshape(n_rows, n_blocks) * d_x[None] * isum.astype(np.float32)
    result = per_block.sum(axis=-1, dtype=np.float32) * np.float32(codebook_step(bits, table) / np.sqrt(block_size))
    return result[0] if single_row else result
