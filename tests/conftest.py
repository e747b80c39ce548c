"""Shared fixtures: the patched llama.cpp build, the default real model as an HF folder, a tiny random llama.

Test tiers (markers, pyproject.toml): a test that asks for the build or a model fixture is marked needs_build or
needs_model here, from the fixtures it uses; modules mark what their fixtures do not show (a converter run builds
llama.cpp) and what is slow. `pytest -m "not needs_build and not needs_model and not slow and not gpu"` is the
fast tier: the codec, recipes, plan, equalize and allocate math, the PolarQuant unpackers, in well under a minute.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hlwq_gguf import build as builder
from hlwq_gguf import models, paths
from hlwq_gguf.testing.tiny_llama import write_tiny_llama


# fixtures that build the patched llama.cpp, and those that download a model
_BUILD_FIXTURES = {"llama_build", "ggml", "emulator", "stand_in_tokenizer"}  # the last: import tests convert
_MODEL_FIXTURES = {"smollm2_hf", "qwen_gguf", "kquant_models"}
_SLOW_FIXTURES = {"quick_bench", "kld_base", "smollm2_imatrix"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(item.fixturenames)  # the transitive closure of the fixtures a test asks for
        if used & _BUILD_FIXTURES:
            item.add_marker(pytest.mark.needs_build)
        if used & _MODEL_FIXTURES:
            item.add_marker(pytest.mark.needs_model)
        if used & _SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def llama_build() -> builder.Build:
    """The patched llama.cpp for the current patch series (built once, then cached by hash)."""
    return builder.ensure_build()


@pytest.fixture(scope="session")
def ggml(llama_build):
    from hlwq_gguf.ggml_ctypes import GGML

    return GGML(llama_build.bin)


@pytest.fixture(scope="session")
def smollm2_hf() -> Path:
    """SmolLM2-135M-Instruct from PyPI, un-quantized (dithered) into a float32 HF folder; cached across runs."""
    out = paths.cache_root() / "tests" / "smollm2-135m-hf"
    if not (out / "hlwq_unquantize.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        models.unquantize_to_hf("smollm2-135m", out, progress=False)
    return out


@pytest.fixture(scope="session")
def smollm2_f32_gguf(smollm2_hf, tmp_path_factory) -> Path:
    from convert.reference import reference_gguf

    out = paths.cache_root() / "tests" / "smollm2-135m-f32.gguf"
    if not out.exists():
        reference_gguf(smollm2_hf, out, "f32")
    return out

@pytest.fixture(scope="session")
def smollm2_q8(smollm2_f32_gguf, llama_build, tmp_path_factory) -> Path:
    """SmolLM2 with Q8_0 weights (head size 64: the case where a graph rotation by H64 would cancel an HLWQ cache
    type's own), the weights the KV-cache tests run on."""
    from hlwq_gguf import llama_tools

    out = tmp_path_factory.mktemp("kv") / "smollm2-q8_0.gguf"
    llama_tools.llama_quantize(llama_build, smollm2_f32_gguf, out, "Q8_0")
    return out


@pytest.fixture
def tiny_llama(tmp_path, smollm2_hf) -> Path:
    return write_tiny_llama(tmp_path / "tiny-llama", smollm2_hf)
