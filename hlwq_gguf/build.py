"""Build the patched llama.cpp (CPU by default, CUDA on request) into the cache, keyed by the patch series."""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import paths, upstream

TARGETS = [
    "llama",  # libllama.so, which llama-cpp-python loads
    "llama-cli", "llama-completion", "llama-server", "llama-quantize", "llama-perplexity", "llama-bench",
    "llama-imatrix", "llama-mtmd-cli", "ggml-rpc-server", "test-backend-ops", "test-quantize-fns",
]


class BuildError(RuntimeError):
    pass


@dataclass
class Build:
    """A finished build: binaries and shared libraries live in `bin`."""

    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def tool(self, name: str) -> Path:
        path = self.bin / name
        if not path.exists():
            raise BuildError(f"{path} is missing: rebuild with `hlwq-gguf build`")
        return path

    @property
    def source(self) -> Path:
        return paths.patched_tree_dir()

    def version_line(self) -> str:
        """What the build says about itself: llama.cpp build number, commit and the patch series it carries."""
        stamp = self.root / ".hlwq-build-key"
        series = stamp.read_text().strip() if stamp.exists() else "unknown"
        return f"llama.cpp b{paths.LLAMA_CPP_BUILD_NUMBER} ({paths.LLAMA_CPP_COMMIT}) + ggml_patch series {series}"


CUDA_FA_QUANTS = ["q4_0-q4_0", "q8_0-q8_0", "f16-f16", "bf16-bf16", "hlwq4_64-hlwq4_64", "hlwq3_64-hlwq3_64",
                  # an 8-bit K with an HLWQ V: the models whose K does not take a low-bit code (Qwen2's key bias)
                  "q8_0-hlwq4_64", "q8_0-hlwq3_64"]


def build_key(cuda: bool, cuda_arch: str | None) -> str:
    variant = f"cuda-{cuda_arch or 'native'}" if cuda else "cpu"
    return f"{upstream.patch_series_hash()}-{variant}"


def _cmake_args(cuda: bool, cuda_arch: str | None) -> list[str]:
    args = [
        "-G", "Ninja",
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=ON",
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_BUILD_TESTS=ON",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        f"-DLLAMA_BUILD_NUMBER={paths.LLAMA_CPP_BUILD_NUMBER}",
        f"-DLLAMA_BUILD_COMMIT={paths.LLAMA_CPP_COMMIT}",
        "-DLLAMA_OPENSSL=OFF",
        # rpc-server and the RPC client backend, so one HLWQ GGUF can be split across machines
        "-DGGML_RPC=ON",
    ]
    if shutil.which("ccache"):
        args.append("-DGGML_CCACHE=ON")
    if cuda:
        args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch or 'native'}",
                 # upstream's default flash-attention vector kernels plus the HLWQ KV cache pairs
                 f"-DGGML_CUDA_FA_QUANTS={';'.join(CUDA_FA_QUANTS)}"]
    return args


def ensure_build(cuda: bool = False, cuda_arch: str | None = None, jobs: int | None = None, verbose: bool = False) -> Build:
    """Return the build for the current patch series, building (incrementally, with ccache) when it is stale.

    The patched tree and the build directory sit at fixed paths in the cache so that a changed patch series
    recompiles only the files it touches; the stamp file records which series the binaries were built from.
    """
    key = build_key(cuda, cuda_arch)
    build_dir = paths.build_dir(key.split("-", 1)[1])
    if _is_current(build_dir, key):
        return Build(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    # two ninjas in one build directory corrupt it: a second caller (another test process, a converter) waits
    with open(build_dir.parent / f".{build_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_current(build_dir, key):
            return Build(build_dir)
        return _build(build_dir, key, cuda, cuda_arch, jobs, verbose)


def _is_current(build_dir: Path, key: str) -> bool:
    stamp = build_dir / ".hlwq-build-key"
    return stamp.exists() and stamp.read_text().strip() == key and \
        all((build_dir / "bin" / target).exists() for target in TARGETS if target != "llama")


def _build(build_dir: Path, key: str, cuda: bool, cuda_arch: str | None, jobs: int | None, verbose: bool) -> Build:
    stamp = build_dir / ".hlwq-build-key"
    source = upstream.patched_tree()
    if stamp.exists():
        stamp.unlink()
    env = dict(os.environ)
    env.setdefault("CCACHE_DIR", str(paths.cache_root() / "ccache"))
    env.setdefault("CCACHE_BASEDIR", str(paths.upstream_dir()))
    env.setdefault("CCACHE_MAXSIZE", "5G")
    jobs = jobs or os.cpu_count() or 2

    def run(cmd: list[str]) -> None:
        out = None if verbose else subprocess.PIPE
        result = subprocess.run(cmd, cwd=build_dir, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            tail = "\n".join((result.stdout or "").splitlines()[-40:])
            raise BuildError(f"{' '.join(cmd[:3])} failed in {build_dir}:\n{tail}")

    started = time.time()
    print(f"hlwq-gguf: building the patched llama.cpp ({key}) in {build_dir}; the first build takes several minutes",
          file=sys.stderr)
    run(["cmake", str(source), *_cmake_args(cuda, cuda_arch)])
    run(["cmake", "--build", ".", "-j", str(jobs), "--target", *TARGETS])
    stamp.write_text(key + "\n")
    print(f"hlwq-gguf: built {key} in {time.time() - started:.0f} s -> {build_dir / 'bin'}", file=sys.stderr)
    return Build(build_dir)


def existing_build(cuda: bool = False, cuda_arch: str | None = None) -> Build | None:
    """The up-to-date build if there is one, without building."""
    key = build_key(cuda, cuda_arch)
    build_dir = paths.build_dir(key.split("-", 1)[1])
    stamp = build_dir / ".hlwq-build-key"
    if stamp.exists() and stamp.read_text().strip() == key:
        return Build(build_dir)
    return None
