"""The patched ggml (C) against the numpy codec, and llama.cpp's own kernel test programs."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from hlwq_gguf import codec, gguf_types

WEIGHT_TYPES = list(codec.BLOCK_TYPES)


def _matrix(rng, rows, cols):
    x = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    x[:, 3] *= 25.0  # an outlier input channel, as real models have
    x[rows // 2] = 0.0  # an all-zero row
    return x


@pytest.mark.parametrize("name", WEIGHT_TYPES)
def test_c_quantizer_matches_numpy(ggml, name):
    block_type = codec.BLOCK_TYPES[name]
    rng = np.random.default_rng(block_type.bits * 1000 + block_type.block_size)
    cols = 1024 if block_type.block_size == 128 else 576
    x = _matrix(rng, 96, cols)
    c_bytes = ggml.quantize(name, x)
    py_bytes = block_type.quantize(x)
    assert np.array_equal(ggml.quantize(name, x, threads=3), c_bytes)  # rows split over threads: same bytes
    # both run the same fp32 operations in the same order (tree-summed norm, left-to-right dot products, and no
    # fused multiply-add in ggml-base's baseline x86-64 build), so the scale search picks the same start everywhere
    assert np.array_equal(c_bytes, py_bytes)
    # and the C ref quantizer is what the CPU backend's from_float (SET_ROWS, CPY) runs
    assert np.array_equal(ggml.from_float(name, x[:4]), c_bytes[:4].reshape(-1))


@pytest.mark.parametrize("name", ["HLWQ3", "HLWQ4", "HLWQ5", "HLWQ6", "HLWQ5_64"])
def test_importance_matrix_lowers_the_error_it_weighs(ggml, name):
    """llama-quantize's importance matrix (one weight per column) chooses the block scales and codes."""
    rng = np.random.default_rng(5)
    cols = 1024
    x = _matrix(rng, 64, cols)
    importance = np.exp(rng.standard_normal(cols)).astype(np.float32)  # activation energy: log-normal across columns
    importance[3] *= 50.0

    def weighted_error(packed):
        restored = np.stack([ggml.dequantize(name, row, cols) for row in packed])
        return float((((x - restored) ** 2) * importance).sum())

    plain = ggml.quantize(name, x)
    weighted = ggml.quantize(name, x, imatrix=importance)
    assert np.array_equal(ggml.quantize(name, x, imatrix=importance, threads=3), weighted)
    assert weighted_error(weighted) < 0.95 * weighted_error(plain)
    # uniform importance measures the plain error: the plain fit is one of the candidates, so it can only improve
    uniform = ggml.quantize(name, x, imatrix=np.full(cols, 3.0, np.float32))
    importance[:] = 1.0
    assert weighted_error(uniform) <= weighted_error(plain) * (1 + 1e-5)


@pytest.mark.parametrize("name", WEIGHT_TYPES)
def test_c_dequantizer_matches_numpy(ggml, name):
    block_type = codec.BLOCK_TYPES[name]
    rng = np.random.default_rng(7)
    cols = 512 if block_type.block_size == 128 else 320
    packed = ggml.quantize(name, _matrix(rng, 16, cols))
    c_values = np.stack([ggml.dequantize(name, row, cols) for row in packed])
    py_values = block_type.dequantize(packed)
    assert np.abs(c_values - py_values).max() <= 1e-6 * np.abs(py_values).max()


@pytest.mark.parametrize("name", WEIGHT_TYPES)
def test_vec_dot_is_the_rotated_integer_dot(ggml, name):
    """The CPU dot product (AVX2 here) equals the numpy model of it and the float dot of the dequantized row."""
    block_type = codec.BLOCK_TYPES[name]
    activation_type = "Q8_HLWQ" if block_type.block_size == 128 else "Q8_HLWQ_64"
    assert gguf_types.GGML_TYPE_IDS[activation_type] == ggml.cpu_traits(name).vec_dot_type
    rng = np.random.default_rng(11)
    cols = 2048 if block_type.block_size == 128 else 704
    weights = ggml.quantize(name, _matrix(rng, 32, cols))
    x = rng.standard_normal(cols).astype(np.float32)
    x[17] *= 10.0
    x_q = ggml.from_float(activation_type, x)
    if block_type.block_size == 128:
        assert np.array_equal(x_q, codec.Q8HLWQ.quantize(x).reshape(-1))
    c_dots = np.array([ggml.vec_dot(name, row, x_q, cols) for row in weights])
    model_dots = np.array([codec.vec_dot_reference(row, x, block_type.bits, block_type.block_size, block_type.table)
                           for row in weights]) \
        if block_type.block_size == 128 else None
    if model_dots is not None:
        assert np.abs(c_dots - model_dots).max() <= 1e-5 * np.abs(model_dots).max()
    float_dots = np.stack([ggml.dequantize(name, row, cols) for row in weights]) @ x
    # what remains is the int8 rounding of the rotated activation: well under 2 % of the largest dot
    assert np.abs(c_dots - float_dots).max() <= 0.02 * np.abs(float_dots).max()


@pytest.mark.parametrize("name", WEIGHT_TYPES)
def test_flash_attention_sums_v_rows_in_the_rotated_domain(ggml, name):
    """The CPU flash attention's V side (SIMD for the canonical tables): sum_i p_i v_i accumulated from the codes
    without the inverse rotation equals the numpy codec's rotated-domain values, and rotated once it is the sum of
    the dequantized rows."""
    block_type = codec.BLOCK_TYPES[name]
    rng = np.random.default_rng(13)
    cols = 512 if block_type.block_size == 128 else 576
    rows = ggml.quantize(name, _matrix(rng, 6, cols) * 40.0)
    weights = rng.uniform(0.0, 1.0, len(rows)).astype(np.float32)

    acc = np.zeros(cols, dtype=np.float32)
    for row, weight in zip(rows, weights):
        ggml.mad_rotated(name, row, acc, float(weight))

    codebook = codec.load_codebook(block_type.bits, block_type.table).astype(np.float64)
    expected = np.zeros(cols)
    for row, weight in zip(rows, weights):
        d, codes = block_type.unpack_blocks(row)
        rotated = d.astype(np.float64)[:, None] * codebook[codes] / np.sqrt(block_type.block_size)
        expected += float(weight) * rotated.reshape(-1)
    assert np.abs(acc - expected).max() <= 1e-6 * np.abs(expected).max()

    ggml.unrotate(name, acc)
    dequantized = np.stack([ggml.dequantize(name, row, cols) for row in rows]).astype(np.float64)
    assert np.abs(acc - weights @ dequantized).max() <= 1e-5 * np.abs(weights @ dequantized).max()


def test_codebook_identity(ggml):
    assert ggml.codebook == (gguf_types.CODEBOOK_NAME, gguf_types.codebook_fingerprint())


def test_validation_catches_bad_scales(ggml):
    block_type = codec.BLOCK_TYPES["HLWQ5"]
    good = ggml.quantize("HLWQ5", _matrix(np.random.default_rng(3), 1, 256))[0]
    assert ggml.validate_row("HLWQ5", good)
    for bad_scale in (np.float16(np.inf), np.float16(np.nan)):
        bad = good.copy()
        bad[block_type.type_size:block_type.type_size + 2] = np.array([bad_scale], dtype="<f2").view(np.uint8)
        assert not ggml.validate_row("HLWQ5", bad)


@pytest.mark.parametrize("name", WEIGHT_TYPES)
def test_two_by_two_vec_dot_equals_single_dots(ggml, name):
    """Prompt processing takes the nrc = 2 kernel (two weight rows by two activations, each block decoded once);
    it must give exactly what four single dot products give."""
    if ggml.cpu_traits(name).nrows != 2:
        pytest.skip(f"{name} has no two-row kernel on this CPU")
    block_type = codec.BLOCK_TYPES[name]
    activation_type = "Q8_HLWQ" if block_type.block_size == 128 else "Q8_HLWQ_64"
    rng = np.random.default_rng(13)
    cols = 1024 if block_type.block_size == 128 else 576
    weights = ggml.quantize(name, _matrix(rng, 4, cols))[:2]  # row 2 is the all-zero one
    activations = np.stack([ggml.from_float(activation_type, rng.standard_normal(cols).astype(np.float32))
                            for _ in range(2)])
    singles = np.array([[ggml.vec_dot(name, w, a, cols) for a in activations] for w in weights])
    assert np.abs(singles).min() > 0
    assert np.array_equal(ggml.vec_dot_2x2(name, weights, activations, cols), singles)


def test_quantize_fns(llama_build):
    """llama.cpp's test-quantize-fns: round-trip error and vec_dot against the float reference, every type."""
    result = subprocess.run([str(llama_build.tool("test-quantize-fns"))], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    for name in WEIGHT_TYPES:
        assert f"Testing {name.lower()}" in result.stdout


def test_backend_ops_cpu(llama_build):
    """test-backend-ops on the CPU backend for every op it instantiates with an HLWQ type; FLASH_ATTN_EXT with the
    HLWQ KV-cache types at head sizes 64, 128, 256, 512 and 576/512 (MLA, V a view of K)."""
    result = subprocess.run([str(llama_build.tool("test-backend-ops")), "-b", "CPU", "-p", "hlwq"],
                            capture_output=True, text=True, timeout=1200)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    for op in ("MUL_MAT(", "MUL_MAT_ID(", "GET_ROWS(", "SET_ROWS(", "CPY(", "FLASH_ATTN_EXT("):
        assert any(op in line and "hlwq" in line and "OK" in line for line in out.splitlines()), f"no passing {op} hlwq test"
    # 75 queries: the tiled prompt path (64-query tiles, one partial) against the reference one-query path, also
    # with K and V of two different HLWQ types
    tiled = [line for line in out.splitlines() if "FLASH_ATTN_EXT(" in line and "nb=75" in line and "type_K=hlwq" in line
             and "type_V=hlwq" in line and "OK" in line]
    assert any("type_K=hlwq4_64" in line and "type_V=hlwq3_64" in line for line in tiled), "no tiled K/V pair case"
    assert len(tiled) >= 20
    assert "FAIL" not in out
