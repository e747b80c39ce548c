"""The patched ggml's quantizer, dequantizer and dot product through ctypes (tests and cross-checks)."""
from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

import numpy as np

from . import gguf_types

_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class _TypeTraits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", _TO_FLOAT),
                ("from_float_ref", _FROM_FLOAT)]


class _TypeTraitsCpu(ctypes.Structure):
    _fields_ = [("from_float", _FROM_FLOAT), ("vec_dot", _VEC_DOT), ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]


class _GGUFInitParams(ctypes.Structure):
    """struct gguf_init_params { bool no_alloc; struct ggml_context ** ctx; }"""

    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


class GGML:
    """ggml-base and ggml-cpu of a build, loaded with ctypes."""

    def __init__(self, lib_dir: Path):
        self.base = ctypes.CDLL(str(lib_dir / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        self.cpu = ctypes.CDLL(str(lib_dir / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
        self.base.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        self.base.ggml_get_type_traits.argtypes = [ctypes.c_int]
        self.cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_TypeTraitsCpu)
        self.cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
        self.base.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.base.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                  ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        self.base.ggml_hlwq_codebook_name.restype = ctypes.c_char_p
        self.base.ggml_hlwq_codebook_fingerprint.restype = ctypes.c_uint32
        self.base.ggml_validate_row_data.restype = ctypes.c_bool
        self.base.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        self.base.ggml_log_set.argtypes = [_LOG_CALLBACK, ctypes.c_void_p]
        self.base.gguf_init_from_file.restype = ctypes.c_void_p
        self.base.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GGUFInitParams]
        self.base.gguf_free.argtypes = [ctypes.c_void_p]
        self.cpu.ggml_hlwq_mad_row_rotated.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float,
                                                       ctypes.c_int64]
        self.cpu.ggml_hlwq_unrotate_row.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64]
        self.cpu.ggml_cpu_init()

    @staticmethod
    def type_id(name: str) -> int:
        return gguf_types.GGML_TYPE_IDS[name.upper()]

    def traits(self, name: str) -> _TypeTraits:
        return self.base.ggml_get_type_traits(self.type_id(name)).contents

    def cpu_traits(self, name: str) -> _TypeTraitsCpu:
        return self.cpu.ggml_get_type_traits_cpu(self.type_id(name)).contents

    def row_bytes(self, name: str, n: int) -> int:
        t = self.traits(name)
        return n // t.blck_size * t.type_size

    def quantize(self, name: str, x: np.ndarray, threads: int = 1, imatrix: np.ndarray | None = None) -> np.ndarray:
        """ggml_quantize_chunk over the rows of a 2-D float32 array (what llama-quantize runs).

        ``imatrix``: one importance weight per column, as llama-quantize passes from an importance matrix.
        With threads > 1 the rows are split into chunks quantized concurrently (ctypes releases the GIL); every
        row is coded on its own, so the bytes do not depend on the thread count.
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, n = x.shape
        out = np.empty((rows, self.row_bytes(name, n)), dtype=np.uint8)
        type_id = self.type_id(name)
        weights = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        if weights is not None and weights.shape != (n,):
            raise ValueError(f"imatrix has shape {weights.shape}, expected ({n},)")

        def run(first: int, count: int) -> None:
            self.base.ggml_quantize_chunk(type_id, _ptr(x[first:]), _ptr(out[first:]), 0, count, n,
                                          None if weights is None else _ptr(weights))

        chunk = max(1, -(-rows // (4 * threads)))
        if threads <= 1 or rows <= chunk:
            run(0, rows)
            return out
        with ThreadPoolExecutor(threads) as pool:
            for future in [pool.submit(run, first, min(chunk, rows - first)) for first in range(0, rows, chunk)]:
                future.result()
        return out

    def from_float(self, name: str, x: np.ndarray) -> np.ndarray:
        """The CPU backend's from_float for a type (SET_ROWS/CPY, and activations for vec_dot)."""
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        out = np.zeros(self.row_bytes(name, x.size), dtype=np.uint8)
        self.cpu_traits(name).from_float(_ptr(x), _ptr(out), x.size)
        return out

    def dequantize(self, name: str, q: np.ndarray, n: int) -> np.ndarray:
        q = np.ascontiguousarray(q, dtype=np.uint8)
        out = np.zeros(n, dtype=np.float32)
        self.traits(name).to_float(_ptr(q), _ptr(out), n)
        return out

    def vec_dot(self, name: str, weight_row: np.ndarray, activation_row: np.ndarray, n: int) -> float:
        """The CPU vec_dot of one quantized weight row with one row already in the type's vec_dot_type."""
        result = np.zeros(1, dtype=np.float32)
        w = np.ascontiguousarray(weight_row, dtype=np.uint8)
        a = np.ascontiguousarray(activation_row, dtype=np.uint8)
        self.cpu_traits(name).vec_dot(n, _ptr(result), 0, _ptr(w), 0, _ptr(a), 0, 1)
        return float(result[0])

    def vec_dot_2x2(self, name: str, weight_rows: np.ndarray, activation_rows: np.ndarray, n: int) -> np.ndarray:
        """The vec_dot of two weight rows with two activation rows in one call (nrc = 2, the path prompt
        processing takes when the type's traits say nrows = 2): result[i, j] = weight_rows[i] . activation_rows[j]."""
        w = np.ascontiguousarray(weight_rows, dtype=np.uint8)
        a = np.ascontiguousarray(activation_rows, dtype=np.uint8)
        assert w.shape[0] == a.shape[0] == 2
        result = np.zeros(18, dtype=np.float32)  # s[0], s[1] for the first activation, s[bs], s[bs+1] for the second
        bs = 16
        self.cpu_traits(name).vec_dot(n, _ptr(result), bs, _ptr(w), w.strides[0], _ptr(a), a.strides[0], 2)
        return np.array([[result[0], result[bs]], [result[1], result[bs + 1]]])

    def mad_rotated(self, name: str, row: np.ndarray, acc: np.ndarray, weight: float) -> None:
        """acc += weight * (the HLWQ row decoded without its inverse rotation): flash attention's V side."""
        assert acc.dtype == np.float32 and acc.flags.c_contiguous
        row = np.ascontiguousarray(row, dtype=np.uint8)
        self.cpu.ggml_hlwq_mad_row_rotated(self.type_id(name), _ptr(row), _ptr(acc), weight, acc.size)

    def unrotate(self, name: str, acc: np.ndarray) -> None:
        """The inverse rotation of each block of acc, in place: what flash attention applies once per query."""
        assert acc.dtype == np.float32 and acc.flags.c_contiguous
        self.cpu.ggml_hlwq_unrotate_row(self.type_id(name), _ptr(acc), acc.size)

    def validate_row(self, name: str, data: np.ndarray) -> bool:
        data = np.ascontiguousarray(data, dtype=np.uint8)
        return bool(self.base.ggml_validate_row_data(self.type_id(name), _ptr(data), data.size))

    def gguf_parse_error(self, path: str | Path) -> str | None:
        """None when ggml's own GGUF parser (the one llama.cpp loads models with) accepts the file's header,
        metadata and tensor table, else its first complaint. It checks every count, length and offset against
        the file size; its log is captured instead of printed."""
        messages: list[str] = []
        collect = _LOG_CALLBACK(lambda _level, text, _user: messages.append(text.decode(errors="replace")))
        self.base.ggml_log_set(collect, None)
        try:
            context = self.base.gguf_init_from_file(str(path).encode(), _GGUFInitParams(True, None))
        finally:
            self.base.ggml_log_set(_LOG_CALLBACK(), None)  # NULL: ggml's default logger again
        if context:
            self.base.gguf_free(context)
            return None
        lines = [line.split(": ", 1)[-1].strip() for line in "".join(messages).splitlines() if line.strip()]
        return lines[0] if lines else "refused"

    @cached_property
    def codebook(self) -> tuple[str, int]:
        return self.base.ggml_hlwq_codebook_name().decode(), int(self.base.ggml_hlwq_codebook_fingerprint())
