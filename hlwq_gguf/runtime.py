"""Run HLWQ GGUFs from Python through llama-cpp-python, on the patched libraries built by `hlwq-gguf build`.

llama-cpp-python is installed without its own native build (CMAKE_ARGS=-DLLAMA_BUILD=OFF); this module points
it at our libllama before it is first imported, so nobody has to set LLAMA_CPP_LIB_PATH by hand.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType

from . import build as builder


def llama_cpp_module(build: builder.Build | None = None) -> ModuleType:
    """Import llama_cpp bound to the patched libllama of `build` (the current cached build by default)."""
    if "llama_cpp" in sys.modules:
        module = sys.modules["llama_cpp"]
        loaded = Path(module.llama_cpp._lib._name).resolve()
        wanted = (build or builder.existing_build())
        if wanted is not None and loaded.parent != wanted.bin.resolve():
            raise RuntimeError(f"llama_cpp is already loaded from {loaded}, not from the patched build {wanted.bin}")
        return module
    build = build or builder.existing_build() or builder.ensure_build()
    os.environ["LLAMA_CPP_LIB_PATH"] = str(build.bin)
    import llama_cpp

    return llama_cpp


def open_model(path: str | Path, n_ctx: int = 2048, n_threads: int | None = None, seed: int = 1, verbose: bool = False,
               **kwargs):
    """A llama_cpp.Llama for an HLWQ (or any) GGUF, loaded through the patched libraries."""
    llama_cpp = llama_cpp_module()
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads or os.cpu_count(), seed=seed,
                           verbose=verbose, **kwargs)
