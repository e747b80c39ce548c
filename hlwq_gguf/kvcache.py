"""Which layers' K a low-bit HLWQ cache can hold, read from a GGUF's weights.

A 3-4-bit HLWQ code cannot hold the K of a layer whose key bias has outlier channels (Qwen2's): the 64-value block
rotation spreads one huge, nearly constant channel over the whole block, and what the other channels carry is lost
in its quantization steps (Qwen2.5-Coder-1.5B with hlwq4_64 K and V: perplexity 20 -> 19642). The patched llama.cpp
keeps such layers' K at q8_0 whenever an HLWQ K type is asked for (llama_kv_k_outlier_ratio in
ggml_patch's KV cache patch); this module computes the same rule for hlwq-gguf's own messages and memory plan.

The rule: in each 64-channel block of a layer's K, the bias energy of its largest channel against the energy the
weights give the block, sum_c |w_c * gamma|^2 over its channels for RMS-normalised inputs (gamma: the attention
norm's gain). On Qwen2.5-Coder-1.5B the four layers that wreck it score 29-2215 and the other 24 score under 4.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# the llama.cpp default (LLAMA_KV_HLWQ_K_OUTLIER overrides it there, 0 switches the rule off)
OUTLIER_LIMIT = 8.0
# the K type of the layers the rule keeps off a low-bit code
SAFE_K_TYPE = "q8_0"
BLOCK = 64


def outlier_ratio(k_weight: np.ndarray, k_bias: np.ndarray, norm_gain: np.ndarray) -> float:
    """The rule for one layer: k_weight [n_out, n_in] (HF layout), k_bias [n_out], norm_gain [n_in]."""
    energy = ((k_weight.astype(np.float64) * norm_gain.astype(np.float64)[None, :]) ** 2).sum(axis=1)
    bias = k_bias.astype(np.float64) ** 2
    ratios = [bias[c:c + BLOCK].max() / energy[c:c + BLOCK].sum() if energy[c:c + BLOCK].sum() > 0 else 0.0
              for c in range(0, len(bias) - len(bias) % BLOCK, BLOCK)]
    return float(max(ratios, default=0.0))


def layer_ratios(path: str | Path) -> dict[int, float]:
    """outlier_ratio of every layer of a GGUF that has a separate K weight, K bias and attention norm."""
    from . import gguf_types

    gguf = gguf_types.register()
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}

    def values(name: str) -> np.ndarray:
        tensor = tensors[name]
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        return np.asarray(data, dtype=np.float32).reshape([int(n) for n in reversed(tensor.shape)])

    ratios = {}
    layer = 0
    while f"blk.{layer}.attn_norm.weight" in tensors or f"blk.{layer}.attn_k.weight" in tensors:
        names = [f"blk.{layer}.attn_k.weight", f"blk.{layer}.attn_k.bias", f"blk.{layer}.attn_norm.weight"]
        if all(name in tensors for name in names):
            weight, bias, gain = (values(name) for name in names)
            if weight.ndim == 2 and bias.shape == (weight.shape[0],) and gain.shape == (weight.shape[1],) \
                    and weight.shape[0] % BLOCK == 0:
                ratios[layer] = outlier_ratio(weight, bias, gain)
        layer += 1
    return ratios


def safe_k_layers(path: str | Path, limit: float | None = None) -> list[int]:
    """The layers whose K llama.cpp keeps at SAFE_K_TYPE when an HLWQ K type is asked for."""
    if limit is None:
        limit = float(os.environ.get("LLAMA_KV_HLWQ_K_OUTLIER", OUTLIER_LIMIT))
    if limit <= 0:
        return []
    return sorted(layer for layer, ratio in layer_ratios(path).items() if ratio > limit)


def is_hlwq(kv_type: str) -> bool:
    return kv_type.lower().startswith("hlwq")


def k_type_note(path: str | Path, kv_type: str) -> str | None:
    """The one line to say when an HLWQ K type was asked for and some layers keep K at q8_0; None otherwise."""
    if not is_hlwq(kv_type):
        return None
    layers = safe_k_layers(path)
    if not layers:
        return None
    which = f"layer {layers[0]}" if len(layers) == 1 else f"layers {', '.join(map(str, layers))}"
    hint = "" if is_smoothed(path) else "; hlwq-gguf convert's K smoothing leaves fewer such layers"
    return (f"K stays {SAFE_K_TYPE} instead of {kv_type} in {which} of {Path(path).name}: its key bias has outlier "
            f"channels that a low-bit code destroys (--kv-k {kv_type} forces it{hint})")


def is_smoothed(path: str | Path) -> bool:
    """Whether the GGUF's K outlier channels were moved into Q when it was converted (convert/equalize.py)."""
    from . import gguf_types

    gguf = gguf_types.register()
    return "hlwq.smooth_keys" in gguf.GGUFReader(str(path)).fields
