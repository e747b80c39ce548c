"""Coding one tensor: the step the checkpoint path (convert/_worker.py) and the full-precision GGUF path
(convert/requantize.py) share.

The patched ggml does the coding (its `quantize_row_hlwq*_ref`, byte-identical to hlwq_gguf.codec), through
ctypes, so the converter and llama-quantize produce the same bytes.
"""
from __future__ import annotations

import numpy as np

from hlwq_gguf import codec, gguf_types


def add_codebook_metadata(writer) -> None:
    """The codebook the HLWQ tensors were coded with (name and fingerprint), which the loader checks."""
    for key, value in gguf_types.codebook_metadata().items():
        (writer.add_string if isinstance(value, str) else writer.add_uint32)(key, value)


def check_finite(name: str, values: np.ndarray) -> None:
    """One HLWQValueError line naming the tensor when any weight is NaN or Inf."""
    finite = np.isfinite(values)
    if not finite.all():
        raise codec.HLWQValueError(f"tensor {name}: {int(finite.size - np.count_nonzero(finite))} NaN/Inf weights")


def encode_tensor(ggml, name: str, values: np.ndarray, type_name: str, threads: int,
                  imatrix: np.ndarray | None = None) -> np.ndarray:
    """`values` (..., n) coded as the ggml type `type_name` (an HLWQ type, or a fallback such as Q8_0) -> uint8
    (..., row bytes).

    `imatrix`: one importance weight per column (llama-imatrix's mean squared input); the blocks' scales and codes
    then minimise the weighted error (the C quantizer only: the numpy codec has no weighted fit).

    Errors are one HLWQValueError line naming the tensor: NaN/Inf weights, or an HLWQ block whose scale exceeds
    fp16 (ggml saturates such a scale at 65504 rather than failing, so it is checked here).
    """
    check_finite(name, values)
    rows = values.reshape(-1, values.shape[-1])
    packed = ggml.quantize(type_name.upper(), rows, threads, imatrix=imatrix)
    block_type = codec.BLOCK_TYPES.get(type_name.upper())
    if block_type is not None:
        scales = np.ascontiguousarray(packed.reshape(-1, block_type.type_size)[:, :2]).view("<f2").reshape(-1)
        saturated = np.flatnonzero(~(np.abs(scales) < codec.FP16_MAX))
        if saturated.size:
            block = int(saturated[0])
            norm = float(codec.block_norms(rows.reshape(-1, block_type.block_size)[block:block + 1])[0])
            raise codec.HLWQValueError(f"tensor {name}: block {block}: block norm {norm:.7g} exceeds fp16 range "
                                       f"(max {codec.FP16_MAX:g})")
    return packed.reshape(*values.shape[:-1], -1)
