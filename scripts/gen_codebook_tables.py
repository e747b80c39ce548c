#!/usr/bin/env python3
"""Print the C tables of the HLWQ codebooks for ggml-common.h.

    python scripts/gen_codebook_tables.py                      # converged tables, 2-6 bits: hlwq_codebook_{bits}
    python scripts/gen_codebook_tables.py reference_A a 3,4,5,6  # hlwq_codebook_a{bits} (lossless import types)

The fp32 tables are emitted as hex-float literals (exact bit patterns); the int16
tables used by the integer dot product are round(c * scale) with the scale of
hlwq_gguf.codec.int16_scale (4096 unless the table reaches |c| >= 4, as the
reference's 6-bit table A does: then 2048), which keeps |t| < 2^14 for the SIMD split.
"""
import json
import struct
import sys
from pathlib import Path

import numpy as np

TABLES = Path(__file__).resolve().parents[1] / "hlwq_gguf" / "data" / "codebooks.json"


def _hex(v: np.float32) -> str:
    mantissa, exponent = float(v).hex().split("p")
    return f"{mantissa.rstrip('0').rstrip('.')}p{exponent}"


def int16_scale(vals: np.ndarray) -> int:
    scale = 4096
    while np.abs(vals).max() * scale >= 2**14:
        scale //= 2
    return scale


def main(table: str = "converged", suffix: str = "", bit_list: str = "2,3,4,5,6") -> None:
    data = json.loads(TABLES.read_text())["tables"]
    for bits in (int(b) for b in bit_list.split(",")):
        hexes = data[str(bits)][table]["fp32_hex"]
        vals = np.array([struct.unpack(">f", bytes.fromhex(h))[0] for h in hexes], dtype=np.float32)
        n = len(vals)
        name = f"{suffix}{bits}"
        scale = int16_scale(vals)
        print(f"GGML_TABLE_BEGIN(float, hlwq_codebook_{name}, {n})")
        for i in range(0, n, 4):
            print("    " + " ".join(f"{_hex(v)}f," for v in vals[i:i + 4]))
        print("GGML_TABLE_END()\n")
        i16 = np.rint(vals.astype(np.float64) * scale).astype(np.int64)
        assert np.all(np.abs(i16) < 2**14), "int16 table must fit the 7-bit split used by the SIMD dot"
        if scale != 4096:
            print(f"// int16 scale {scale}: this table reaches |c| >= 4")
        print(f"GGML_TABLE_BEGIN(int16_t, hlwq_codebook_i16_{name}, {n})")
        for i in range(0, n, 8):
            print("    " + " ".join(f"{int(v)}," for v in i16[i:i + 8]))
        print("GGML_TABLE_END()\n")
        # The SIMD dot product uses the symmetry of the tables, t[n-1-m] = -t[m] (exact in int16): it looks up
        # the magnitude |t| of the lower half (index m = code ^ (n-1) when the code's top bit is set, else code)
        # and moves the sign onto the activation. |t| = 128*hi + lo is split in two byte tables (both < 128, so
        # the products stay in maddubs range), padded to 16 entries so a 16-byte shuffle table can always be loaded.
        half = n // 2
        assert np.array_equal(i16[::-1], -i16) and np.all(i16[:half] < 0), f"{bits}-bit table is not symmetric"
        magnitude = np.zeros(max(half, 16), dtype=np.int64)
        magnitude[:half] = -i16[:half]
        assert magnitude.max() < 128 * 128
        for part, values in (("lo", magnitude & 127), ("hi", magnitude >> 7)):
            print(f"GGML_TABLE_BEGIN(uint8_t, hlwq_codebook_mag{part}_{name}, {len(values)})")
            for i in range(0, len(values), 16):
                print("    " + " ".join(f"{int(v)}," for v in values[i:i + 16]))
            print("GGML_TABLE_END()\n")

if __name__ == "__main__":
    main(*sys.argv[1:])
