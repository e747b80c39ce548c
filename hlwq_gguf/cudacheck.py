"""Compile-check the CUDA sources the patch series touches, without a GPU and without a full ggml-cuda build.

Every .cu file under ggml/src/ggml-cuda/ that differs from the pristine tree (and every .cu file including a
touched or new .cuh) is compiled with the machine's nvcc for one architecture, with ggml-cuda's own flags and
the cuBLAS headers from the `nvidia-cublas` wheel (cached; the machine has no cuBLAS). The check fails on any
error, and on any warning pointing at a line the patches added. A pass is cached by the sources' hash, flags
and nvcc version. It proves the code compiles, not that it runs: that needs scripts/gpu_selftest.sh on a GPU.
"""
from __future__ import annotations

import difflib
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import paths, upstream

CUBLAS_WHEEL = "nvidia-cublas==13.10.0.20"
DEFAULT_ARCH = "89"  # Ada: the consumer cards the seeds' users have
CUDA_DIR = Path("ggml/src/ggml-cuda")
# ggml-cuda's CMakeLists: its definitions and CUDA_FLAGS, host warnings as GGML_ALL_WARNINGS sets them
DEFINES = ["GGML_USE_CUDA", "GGML_CUDA_NO_VMM", "GGML_CUDA_USE_GRAPHS", "GGML_BUILD", "GGML_SHARED",
           "GGML_BACKEND_BUILD", "GGML_BACKEND_SHARED", "GGML_SCHED_MAX_COPIES=4", "GGML_CUDA_PEER_MAX_BATCH_SIZE=128",
           "_GNU_SOURCE", "_XOPEN_SOURCE=600", "NDEBUG"]
HOST_FLAGS = "-Wall -Wextra -Wcast-qual -Wno-unused-function -Wmissing-declarations -Wmissing-noreturn -Wno-pedantic"
# "file:line:col: warning:" from the host compiler, "file(line): warning #N-D:" from nvcc's front end
_DIAGNOSTIC = re.compile(r"^(?P<file>[^\s:()]+?)(?::(?P<line>\d+):\d+:|\((?P<line2>\d+)\):) (?P<kind>warning|error)")


class CudaCheckError(RuntimeError):
    pass


@dataclass
class CudaCheck:
    arch: str
    compiled: list[str] = field(default_factory=list)
    introduced_warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cached: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors and not self.introduced_warnings


def cublas_include_dir() -> Path:
    """cuBLAS headers from the pip wheel, extracted once into the cache (the libraries are not needed)."""
    target = paths.cache_root() / "cublas-headers" / CUBLAS_WHEEL.split("==")[1]
    if (target / "cublas_v2.h").exists():
        return target
    with tempfile.TemporaryDirectory(dir=paths.cache_root()) as tmp:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, CUBLAS_WHEEL],
                                capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise CudaCheckError(f"cannot download {CUBLAS_WHEEL} for its headers: {result.stderr.strip()[-300:]}")
        staging = Path(tmp) / "include"
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in wheel.namelist():
                if "/include/" in name and name.endswith(".h"):
                    (staging / Path(name).name).parent.mkdir(parents=True, exist_ok=True)
                    (staging / Path(name).name).write_bytes(wheel.read(name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def _added_lines(pristine: Path, patched: Path) -> set[int]:
    """1-based numbers of the lines of `patched` that the patches added or changed."""
    old = pristine.read_text().splitlines() if pristine.exists() else []
    new = patched.read_text().splitlines()
    added = set()
    for tag, _, _, j1, j2 in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes():
        if tag in ("replace", "insert"):
            added.update(range(j1 + 1, j2 + 1))
    return added


def touched_sources(pristine_root: Path, patched_root: Path) -> tuple[list[Path], dict[Path, set[int]]]:
    """The .cu files to compile (relative paths) and, per touched file, the lines the patches added."""
    added: dict[Path, set[int]] = {}
    for path in sorted((patched_root / CUDA_DIR).rglob("*")):
        if path.suffix not in (".cu", ".cuh") or not path.is_file():
            continue
        relative = path.relative_to(patched_root)
        original = pristine_root / relative
        if not original.exists() or original.read_bytes() != path.read_bytes():
            added[relative] = _added_lines(original, path)
    headers = {p.name for p in added if p.suffix == ".cuh"}
    sources = {p for p in added if p.suffix == ".cu"}
    for path in (patched_root / CUDA_DIR).glob("*.cu"):  # the top-level .cu files that include a touched header
        text = path.read_text(errors="replace")
        if any(f'#include "{name}"' in text for name in headers if name != "common.cuh"):
            sources.add(path.relative_to(patched_root))
    return sorted(sources), added


def flash_attention_defines(tree: Path) -> list[str]:
    """Every flash-attention vector kernel pair switched on: the definitions the tree's own cmake function
    (ggml_cuda_fattn_vec_instances in ggml/cmake/common.cmake) makes for GGML_CUDA_FA_QUANTS=all."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "CMakeLists.txt").write_text(f"""cmake_minimum_required(VERSION 3.14)
project(fa_pairs NONE)
include({tree}/ggml/cmake/common.cmake)
ggml_cuda_fattn_vec_instances({tree}/ggml/src/ggml-cuda SRCS)
get_directory_property(DEFS COMPILE_DEFINITIONS)
message(STATUS "FA_DEFINES ${{DEFS}}")
""")
        result = subprocess.run(["cmake", "-S", tmp, "-B", str(Path(tmp) / "build"), "-DGGML_CUDA_FA_QUANTS=all"],
                                capture_output=True, text=True)
    match = re.search(r"FA_DEFINES (.*)", result.stdout)
    if result.returncode != 0 or match is None:
        raise CudaCheckError(f"ggml/cmake/common.cmake did not list the flash-attention pairs: {result.stderr.strip()[-500:]}")
    return [d for d in match.group(1).split(";") if d.startswith("GGML_CUDA_FA_") and d.endswith("=1")]


def _nvcc_command(source: Path, tree: Path, include_cublas: Path, arch: str, out: Path) -> list[str]:
    return ["nvcc", "-std=c++17", f"-arch=sm_{arch}", "-O3", "-use_fast_math", "-extended-lambda",
            "-I", str(tree / "ggml/include"), "-I", str(tree / "ggml/src"), "-I", str(tree / CUDA_DIR),
            "-I", str(include_cublas), *[f"-D{d}" for d in DEFINES + flash_attention_defines(tree)],
            "-Xcompiler", HOST_FLAGS, "-c", str(tree / source), "-o", str(out)]


def check(arch: str = DEFAULT_ARCH, jobs: int = 2, progress=print) -> CudaCheck:
    """Compile the touched CUDA sources of the current patch series; cached when they passed before."""
    if shutil.which("nvcc") is None:
        raise CudaCheckError("nvcc not found: the CUDA compile check needs the CUDA toolkit's compiler")
    tree = upstream.patched_tree()
    pristine = upstream.pristine_tree()
    sources, added = touched_sources(pristine, tree)
    version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    key = hashlib.sha256("\n".join([version, arch, HOST_FLAGS, *DEFINES, *flash_attention_defines(tree), *(
        f"{p}:{hashlib.sha256((tree / p).read_bytes()).hexdigest()}" for p in sorted(
            q.relative_to(tree) for q in (tree / CUDA_DIR).rglob("*") if q.is_file()))]).encode()).hexdigest()[:16]
    stamp = paths.cache_root() / "cuda-check" / f"{key}.ok"
    result = CudaCheck(arch=arch, compiled=[str(s) for s in sources])
    if stamp.exists():
        result.cached = True
        return result
    include_cublas = cublas_include_dir()

    def compile_one(source: Path) -> tuple[Path, subprocess.CompletedProcess]:
        progress(f"nvcc sm_{arch}: {source}")
        with tempfile.TemporaryDirectory() as tmp:
            cmd = _nvcc_command(source, tree, include_cublas, arch, Path(tmp) / "out.o")
            return source, subprocess.run(cmd, capture_output=True, text=True, errors="replace", cwd=tree)

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        outcomes = list(pool.map(compile_one, sources))
    for source, outcome in outcomes:
        for line in (outcome.stdout + outcome.stderr).splitlines():
            match = _DIAGNOSTIC.match(line.strip())
            if not match:
                continue
            file = Path(match.group("file"))
            relative = file.relative_to(tree) if file.is_absolute() and tree in file.parents else file
            number = int(match.group("line") or match.group("line2"))
            if match.group("kind") == "error":
                result.errors.append(line.strip())
            elif number in added.get(relative, set()):
                result.introduced_warnings.append(line.strip())
        if outcome.returncode != 0 and not any(str(source) in e or "error" in e for e in result.errors):
            tail = (outcome.stdout + outcome.stderr).strip().splitlines()[-5:]
            result.errors.append(f"{source}: nvcc exit {outcome.returncode}: {' | '.join(tail)}")
    if result.ok:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text("\n".join(result.compiled) + "\n")
    return result
