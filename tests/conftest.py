"""Shared fixtures: the patched llama.cpp build, the default real model as an HF folder, a tiny random llama."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hlwq_gguf import build as builder
from hlwq_gguf import models, paths


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


def write_tiny_llama(folder: Path, tokenizer_from: Path, seed: int = 0, hidden: int = 128, intermediate: int = 320,
                     layers: int = 2, dtype=np.float32, overrides: dict[str, np.ndarray] | None = None) -> Path:
    """A random-weight LlamaForCausalLM HF folder with SmolLM2's tokenizer (so llama.cpp can load and run it).

    intermediate=320 makes ffn_down rows 320 wide: not a multiple of 128, so the 64-block types are exercised.
    """
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((tokenizer_from / "config.json").read_text())
    vocab = config["vocab_size"]
    heads, kv_heads, head_dim = 2, 1, hidden // 2
    config.update({"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
                   "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
                   "tie_word_embeddings": True, "torch_dtype": "float32"})
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(dtype)

    tensors = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": np.ones(hidden, dtype)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": np.ones(hidden, dtype), p + "post_attention_layernorm.weight": np.ones(hidden, dtype),
            p + "self_attn.q_proj.weight": w(heads * head_dim, hidden), p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden), p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": w(intermediate, hidden), p + "mlp.up_proj.weight": w(intermediate, hidden),
            p + "mlp.down_proj.weight": w(hidden, intermediate),
        })
    tensors.update(overrides or {})
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, folder / name)
    return folder


@pytest.fixture
def tiny_llama(tmp_path, smollm2_hf) -> Path:
    return write_tiny_llama(tmp_path / "tiny-llama", smollm2_hf)
