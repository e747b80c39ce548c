"""Per-element quantization steps of the GGUF types, and the seeded dither within them."""
from __future__ import annotations

import hashlib

import numpy as np

from .. import gguf_types


def gguf_module():
    import gguf  # PyPI gguf==0.19.0

    return gguf


def _f16(col: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n, 1) float32 from little-endian fp16."""
    return np.ascontiguousarray(col).view("<f2").astype(np.float32)


def _k_scale_min_6bit(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12-byte Q4_K/Q5_K scale field into 8 six-bit (scale, min) pairs."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def quant_steps(raw: np.ndarray, qtype) -> np.ndarray:
    """Per-element quantization step of a raw GGML-quantized tensor.

    ``raw`` is the ``uint8`` array as exposed by ``GGUFReader`` (``(..., bytes_per_row)``).
    Returns float32 ``(..., elements_per_row)``, aligned with ``gguf.quants.dequantize``.
    Formulas: see the module docstring.  Vectorised over blocks (no Python loops).
    """
    gguf = gguf_module()
    Q = gguf.GGMLQuantizationType
    qtype = Q(qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    lead = raw.shape[:-1]
    if raw.shape[-1] % type_size:
        raise ValueError(f"row of {raw.shape[-1]} bytes is not a multiple of {qtype.name} block size {type_size}")
    n_per_row = raw.shape[-1] // type_size * block_size
    b = raw.reshape(-1, type_size)
    nb = b.shape[0]

    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q4_1, Q.Q5_1):
        # all start with the fp16 scale d; one scale per 32-element block
        sub = np.abs(_f16(b[:, 0:2]))  # (nb, 1)
        rep = block_size
    elif qtype == Q.Q2_K:
        # scales[16] (lo nibble: scale, hi nibble: min) | qs[64] | d | dmin
        d = _f16(b[:, 80:82])
        sub = np.abs(d * (b[:, 0:16] & 0x0F).astype(np.float32))  # (nb, 16)
        rep = 16
    elif qtype == Q.Q3_K:
        # hmask[32] | qs[64] | scales[12] (16 x 6-bit, offset 32) | d
        sc12 = b[:, 96:108]
        d = _f16(b[:, 108:110])
        lo = (sc12[:, 0:8].reshape(nb, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(nb, 16)
        hi = (sc12[:, 8:12].reshape(nb, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(nb, 16)
        sc = ((lo & 0x0F) | ((hi & 0x03) << 4)).astype(np.int16) - 32
        sub = np.abs(d * sc.astype(np.float32))
        rep = 16
    elif qtype in (Q.Q4_K, Q.Q5_K):
        # d | dmin | scales[12] (8 x 6-bit scale + 8 x 6-bit min) | ...
        d = _f16(b[:, 0:2])
        sc, _ = _k_scale_min_6bit(b[:, 4:16])
        sub = np.abs(d * sc.astype(np.float32))  # (nb, 8)
        rep = 32
    elif qtype == Q.Q6_K:
        # ql[128] | qh[64] | scales int8[16] | d
        sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
        d = _f16(b[:, 208:210])
        sub = np.abs(d * sc)
        rep = 16
    else:
        raise NotImplementedError(f"no dither step formula for GGML type {qtype.name}")
    step = np.repeat(sub.astype(np.float32), rep, axis=1).reshape(nb * block_size)
    return step.reshape(*lead, n_per_row)


def tensor_seed(seed: int, name: str) -> np.random.SeedSequence:
    """Deterministic per-tensor seed sequence from the global seed and the GGUF tensor name."""
    words = np.frombuffer(hashlib.sha256(name.encode("utf-8")).digest()[:16], dtype="<u4")
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *map(int, words)])


_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def iter_dither(tensor, seed: int = 0, chunk_elems: int = 1 << 22):
    """Yield ``(row0, row1, dithered, step, dequantized)`` row chunks of one ``gguf.ReaderTensor``.

    Rows are the tensor flattened to ``(-1, ne0)`` in numpy order (GGUF layout).  The random
    stream is drawn sequentially, so chunking never changes the result.  Float tensors come
    as a single chunk with ``step=None`` and ``dithered is dequantized`` (copied unchanged).
    """
    gguf = gguf_module()
    qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
    shape = gguf_types.numpy_shape(tensor)
    cols = shape[-1]
    n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    if qtype.name in _FLOAT_TYPES:
        deq = np.asarray(gguf.quants.dequantize(tensor.data, qtype), dtype=np.float32).reshape(n_rows, cols)
        yield 0, n_rows, deq, None, deq
        return
    raw = np.asarray(tensor.data).reshape(n_rows, -1)
    rng = np.random.Generator(np.random.PCG64(tensor_seed(seed, tensor.name)))
    rows_per = max(1, chunk_elems // cols)
    for r0 in range(0, n_rows, rows_per):
        r1 = min(n_rows, r0 + rows_per)
        blk = raw[r0:r1]
        deq = np.asarray(gguf.quants.dequantize(blk, qtype), dtype=np.float32).reshape(r1 - r0, cols)
        step = quant_steps(blk, qtype).reshape(r1 - r0, cols)
        u = rng.random(deq.shape, dtype=np.float64)
        u -= 0.5
        u *= step
        u += deq
        yield r0, r1, u.astype(np.float32), step, deq


def dither_tensor(tensor, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Dequantize + dither one ``gguf.ReaderTensor`` (GGUF layout, numpy order).

    Returns ``(dithered, step, dequantized)`` with the tensor's numpy shape; ``step`` is
    ``None`` (and ``dithered is dequantized``) for float tensors, which are copied unchanged.
    """
    shape = gguf_types.numpy_shape(tensor)
    parts = list(iter_dither(tensor, seed))
    if parts[0][3] is None:
        deq = parts[0][2].reshape(shape)
        return deq, None, deq
    w = np.concatenate([p[2] for p in parts]).reshape(shape)
    step = np.concatenate([p[3] for p in parts]).reshape(shape)
    deq = np.concatenate([p[4] for p in parts]).reshape(shape)
    return w, step, deq
