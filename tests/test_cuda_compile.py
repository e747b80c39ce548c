"""The CUDA code of the patch series compiles (nvcc, one architecture, cuBLAS headers from the wheel) with no
error and no warning on a patched line. There is no GPU here: that the kernels compute the right thing is
scripts/gpu_selftest.sh's job (test-backend-ops -b CUDA0 against the CPU backend)."""
from __future__ import annotations

import shutil

import pytest

from hlwq_gguf import cudacheck


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_patched_cuda_sources_compile():
    result = cudacheck.check(progress=lambda _: None)
    print(f"compiled for sm_{result.arch}{' (cached)' if result.cached else ''}: {result.compiled}")
    assert result.ok, result.errors + result.introduced_warnings
    # the HLWQ kernels and their dispatch: dequantize (convert.cu), GET_ROWS, the MMVQ exclusion and HLWQ's own
    # vector kernel, the KV cache's SET_ROWS/CPY, the flash-attention dispatch and its HLWQ instances, supports_op
    compiled = {name.rsplit("/", 1)[-1] for name in result.compiled}
    assert {"convert.cu", "getrows.cu", "mmvq.cu", "mmvq-hlwq.cu", "hlwq-kv.cu", "set-rows.cu", "cpy.cu", "fattn.cu",
            "ggml-cuda.cu", "fattn-vec-instance-hlwq4_64-hlwq4_64.cu"} <= compiled
