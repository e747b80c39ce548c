"""The HLWQ CUDA kernels, run on the CPU. There is no GPU here, so tests/cuda_emu/shim/common.cuh stands in for
ggml-cuda's common.cuh: every CUDA thread is a std::thread, barriers and warp shuffles are emulated, and the
kernels' source from the patched tree (hlwq.cuh, hlwq-kv.cu, mmvq-hlwq.cu) is compiled with g++ unchanged but for
the launch syntax. tests/cuda_emu/hlwq_emu_test.cpp compares them with ggml's CPU code: the KV quantizer must give
the CPU quantizer's bytes for all 16 types, the dequantizer, GET_ROWS and the rotation its values, and the vector
kernel (MUL_MAT with 1-8 columns and broadcast channels, MUL_MAT_ID) the products within test-backend-ops'
tolerance, and flash attention's HLWQ functions (cut out of fattn-common.cuh) the rotated-domain K . Q and V values
for the lanes fattn-vec.cuh gives them. What this cannot show (timing, coalescing, a real GPU's memory model, the
flash-attention kernel itself and fattn.cu's calls of the rotation around it) is scripts/gpu_selftest.sh's job."""
from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hlwq_gguf import paths, upstream

pytestmark = [pytest.mark.gpu, pytest.mark.needs_build]

HERE = Path(__file__).parent / "cuda_emu"
KERNEL_FILES = ["hlwq.cuh", "hlwq-kv.cuh", "hlwq-kv.cu", "mmvq-hlwq.cuh", "mmvq-hlwq.cu"]
FATTN_START = "// HLWQ K and V are read in their rotated domain"
FATTN_END = "template <ggml_type type_K, int D, int nthreads>\nconstexpr __device__ vec_dot_KQ_t get_vec_dot_KQ()"
# `kernel<T><<<grid, block, shmem, stream>>>(` -> `emu_launch(grid, block, shmem, stream, <a call of kernel<T>>, `
# (a generic lambda, so template arguments CUDA deduces from the call are deduced here too)
_LAUNCH = re.compile(r"(\b[A-Za-z_]\w*(?:<[^;<>]*>)?)<<<(.*?)>>>\(", re.S)


def emulator_sources(tree: Path, target: Path) -> None:
    """The kernels of the patched tree with their launches rewritten, next to the shim headers and the harness."""
    target.mkdir(parents=True, exist_ok=True)
    for name in KERNEL_FILES:
        text = (tree / "ggml/src/ggml-cuda" / name).read_text()
        (target / name).write_text(_LAUNCH.sub(
            lambda m: f"emu_launch({m.group(2)}, [](auto... emu_args) {{ {m.group(1)}(emu_args...); }}, ", text))
    # flash attention's HLWQ K and V functions, cut out of fattn-common.cuh (the rest of it needs real CUDA)
    common = (tree / "ggml/src/ggml-cuda/fattn-common.cuh").read_text()
    start = common.index(FATTN_START)
    end = common.index(FATTN_END, start)
    (target / "fattn-hlwq.cuh").write_text('#pragma once\n#include "hlwq.cuh"\n' + common[start:end])
    for shim in (HERE / "shim").iterdir():
        shutil.copy(shim, target / shim.name)
    shutil.copy(HERE / "hlwq_emu_test.cpp", target / "hlwq_emu_test.cpp")


@pytest.fixture(scope="module")
def emulator(llama_build) -> Path:
    tree = upstream.patched_tree()
    # the whole series, not only the kernel files: the harness compiles against ggml.h's type ids and ggml-common.h
    digest = hashlib.sha256(b"".join(
        [upstream.patch_series_hash().encode()]
        + [p.read_bytes() for p in sorted(HERE.rglob("*")) if p.is_file()])).hexdigest()[:16]
    work = paths.cache_root() / "cuda-emu" / digest
    binary = work / "hlwq_emu_test"
    if not binary.exists():
        source = work / "src"
        emulator_sources(tree, source)
        lib = llama_build.bin
        cmd = ["g++", "-std=c++20", "-O2", "-mfma", "-ffp-contract=fast", "-pthread", "-Wall", "-Wno-unknown-pragmas",
               "-Wno-unused-variable", "-Wno-unused-but-set-variable", "-Wno-sign-compare",
               "-I", str(source), "-I", str(tree / "ggml/include"), "-I", str(tree / "ggml/src"),
               "-I", str(tree / "ggml/src/ggml-cuda"), str(source / "hlwq_emu_test.cpp"),
               "-L", str(lib), "-lggml-base", f"-Wl,-rpath,{lib}", "-o", str(binary) + ".tmp"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-6000:]
        Path(str(binary) + ".tmp").rename(binary)
    return binary


def test_cuda_kernels_emulated_on_cpu(emulator):
    result = subprocess.run([str(emulator)], capture_output=True, text=True, timeout=1800)
    print(result.stdout)
    lines = result.stdout.splitlines()
    failed = [line for line in lines if line.startswith("FAIL")]
    assert result.returncode == 0 and not failed, "\n".join(failed) + result.stderr[-3000:]
    # every kind of case ran, for every type where it applies
    for kind, count in {"SET_ROWS": 16, "CPY f32": 16, "-> f32": 16, "GET_ROWS": 16, "rotate qk=": 2,
                        "MUL_MAT ": 32, "MUL_MAT_ID": 24, "FA vec_dot_KQ": 4, "FA dequantize_V": 4}.items():
        assert sum(kind in line for line in lines if line.startswith("OK")) == count, kind
