"""The CUDA code of the patch series compiles (nvcc, one architecture, cuBLAS headers from the wheel) with no
error and no warning on a patched line. There is no GPU here: that the kernels compute the right thing is
scripts/gpu_selftest.sh's job (test-backend-ops -b CUDA0 against the CPU backend)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from hlwq_gguf import cudacheck, upstream

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_patched_cuda_sources_compile():
    result = cudacheck.check(progress=lambda _: None)
    print(f"compiled for sm_{result.arch}{' (cached)' if result.cached else ''}: {result.compiled}")
    assert result.ok, result.errors + result.introduced_warnings
    # the HLWQ kernels and their dispatch: dequantize (convert.cu), GET_ROWS, the MMVQ exclusion and HLWQ's own
    # vector kernel, the KV cache's SET_ROWS/CPY, the flash-attention dispatch and its HLWQ instances, supports_op
    compiled = {name.rsplit("/", 1)[-1] for name in result.compiled}
    assert {"convert.cu", "getrows.cu", "mmvq.cu", "mmvq-hlwq.cu", "hlwq-kv.cu", "set-rows.cu", "cpy.cu", "fattn.cu",
            "ggml-cuda.cu", "fattn-vec-instance-hlwq4_64-hlwq4_64.cu", "fattn-vec-instance-q8_0-hlwq4_64.cu"} <= compiled


@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake on this machine")
@pytest.mark.parametrize("quants, outcome", [
    ("hlwq4_64-hlwq4_64;hlwq3_64-hlwq3_64;q4_0-q4_0", "GGML_CUDA_FA_HLWQ4_64_HLWQ4_64=1"),
    ("q8_0-hlwq4_64", "GGML_CUDA_FA_Q8_0_HLWQ4_64=1"),
    ("all", "57 instances"),
    ("hlwq4_64-q8_0", "an HLWQ K only with an HLWQ V"),
    ("q4_0-hlwq4_64", "an HLWQ K only with an HLWQ V"),
    ("hlwq5_64-hlwq5_64", "unknown type \"hlwq5_64\""),
])
def test_flash_attention_type_option(tmp_path, quants, outcome):
    """GGML_CUDA_FA_QUANTS as the patched ggml/cmake/common.cmake reads it: the HLWQ pairs compile their vector
    kernel instances, an HLWQ V also pairs with a q8_0 or f16 K (the models whose K needs 8 bits), `all` adds those
    eight pairs to upstream's 49, and any other pair with an HLWQ type (which no kernel reads) or an HLWQ type
    without a kernel is refused with a message."""
    tree = upstream.patched_tree()
    (tmp_path / "CMakeLists.txt").write_text(f"""cmake_minimum_required(VERSION 3.14)
project(fa_option NONE)
include({tree}/ggml/cmake/common.cmake)
ggml_cuda_fattn_vec_instances({tree}/ggml/src/ggml-cuda SRCS)
list(LENGTH SRCS N)
message(STATUS "${{N}} instances")
get_directory_property(DEFS COMPILE_DEFINITIONS)
message(STATUS "${{DEFS}}")
""")
    result = subprocess.run(["cmake", "-S", str(tmp_path), "-B", str(tmp_path / "build"), f"-DGGML_CUDA_FA_QUANTS={quants}"],
                            capture_output=True, text=True)
    out = " ".join((result.stdout + result.stderr).split())
    assert outcome in out, out[-2000:]
    assert (result.returncode == 0) == (outcome.startswith("GGML") or outcome.endswith("instances")), out[-2000:]
