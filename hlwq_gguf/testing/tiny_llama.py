"""A tiny random-weight llama checkpoint that llama.cpp can load and run, for tests and scripts."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np


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
