"""GGUF tensor names, layouts and metadata mapped back to a Hugging Face config and checkpoint."""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from .registry import ModelSpec


# --------------------------------------------------------------------------- HF mapping

_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")

_COMMON_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_COMMON_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
ARCH_BLOCK = {
    "llama": {**_COMMON_BLOCK, "ffn_norm.weight": "post_attention_layernorm.weight"},
    "gemma3": {
        **_COMMON_BLOCK,
        "attn_q_norm.weight": "self_attn.q_norm.weight",
        "attn_k_norm.weight": "self_attn.k_norm.weight",
        "post_attention_norm.weight": "post_attention_layernorm.weight",
        "ffn_norm.weight": "pre_feedforward_layernorm.weight",
        "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    },
    # Qwen2 = llama layout plus biases on q/k/v (Qwen2Attention: q/k/v_proj bias=True, o_proj none)
    "qwen2": {
        **_COMMON_BLOCK,
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "attn_q.bias": "self_attn.q_proj.bias",
        "attn_k.bias": "self_attn.k_proj.bias",
        "attn_v.bias": "self_attn.v_proj.bias",
    },
}
_HF_ARCH = {"llama": "LlamaForCausalLM", "gemma3": "Gemma3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_HF_MODEL_TYPE = {"llama": "llama", "gemma3": "gemma3_text", "qwen2": "qwen2"}


def hf_name(arch: str, gguf_name: str) -> str:
    if arch not in ARCH_BLOCK:
        raise NotImplementedError(f"GGUF architecture {arch!r} is not supported (supported: {sorted(ARCH_BLOCK)})")
    if gguf_name in _COMMON_GLOBAL:
        return _COMMON_GLOBAL[gguf_name]
    m = _BLK.match(gguf_name)
    if m and m.group(2) in ARCH_BLOCK[arch]:
        return f"model.layers.{m.group(1)}.{ARCH_BLOCK[arch][m.group(2)]}"
    raise NotImplementedError(f"no HF name for GGUF tensor {gguf_name!r} (arch {arch})")


def _llama_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's LlamaModel.permute (rows of q_proj / k_proj)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_hf_tensor(arch: str, gguf_name: str, w: np.ndarray, md: Mapping[str, Any]) -> np.ndarray:
    """Undo what convert_hf_to_gguf did to this tensor (exact inverse up to float32 rounding)."""
    if arch == "llama":
        n_head = int(md["llama.attention.head_count"])
        n_kv = int(md.get("llama.attention.head_count_kv", n_head))
        if gguf_name.endswith("attn_q.weight"):
            return _llama_unpermute(w, n_head)
        if gguf_name.endswith("attn_k.weight"):
            return _llama_unpermute(w, n_kv)
    elif arch == "gemma3":
        # Gemma3Model.modify_tensors adds 1.0 to every "*norm.weight" (Gemma3RMSNorm uses 1+w)
        if gguf_name.endswith("norm.weight"):
            return (w.astype(np.float64) - 1.0).astype(np.float32)
    # qwen2: Qwen2Model (conversion/qwen.py) inherits TextModel.modify_tensors, which maps names only:
    # q/k rows are not permuted (HF Qwen2 uses the same rotate_half RoPE as the GGUF's NEOX rope type),
    # so every tensor, biases included, goes back unchanged.
    return w


# --------------------------------------------------------------------------- metadata


def _field_value(f) -> Any:
    v = f.contents()
    if isinstance(v, np.generic):
        v = v.item()
    return v


def gguf_metadata(reader) -> dict[str, Any]:
    out = {}
    for k, f in reader.fields.items():
        if k.startswith("GGUF."):
            continue
        out[k] = _field_value(f)
    return out


def _f32(x: float) -> float:
    """Shortest decimal that round-trips the float32 value (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


_SPECIAL_KEYS = {  # GGUF key suffix -> HF name
    "bos": "bos",
    "eos": "eos",
    "unknown": "unk",
    "seperator": "sep",
    "padding": "pad",
    "cls": "cls",
    "mask": "mask",
}


def special_ids(md: Mapping[str, Any]) -> dict[str, int]:
    out = {}
    for g, hf in _SPECIAL_KEYS.items():
        key = f"tokenizer.ggml.{g}_token_id"
        if key in md:
            out[hf] = int(md[key])
    return out


def hf_config(spec: ModelSpec | None, arch: str, md: Mapping[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    a = arch
    n_head = int(md[f"{a}.attention.head_count"])
    hidden = int(md[f"{a}.embedding_length"])
    n_vocab = len(md["tokenizer.ggml.tokens"])
    if f"{a}.vocab_size" in md:
        n_vocab = int(md[f"{a}.vocab_size"])
    head_dim = int(md.get(f"{a}.attention.key_length", md.get(f"{a}.rope.dimension_count", hidden // n_head)))
    if a == "qwen2" and head_dim * n_head != hidden:
        raise NotImplementedError(f"qwen2 GGUF with head_dim {head_dim} != hidden/heads: Qwen2Config has no head_dim")
    for k in md:
        if k.startswith(f"{a}.rope.scaling.") and str(md.get(f"{a}.rope.scaling.type", "none")) != "none":
            raise NotImplementedError(f"RoPE scaling in GGUF ({k}) is not mapped back to HF config")
    special = special_ids(md)
    cfg: dict[str, Any] = {
        "architectures": [spec.hf_architecture if spec else _HF_ARCH[a]],
        "model_type": _HF_MODEL_TYPE[a],
        "hidden_size": hidden,
        "intermediate_size": int(md[f"{a}.feed_forward_length"]),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(md.get(f"{a}.attention.head_count_kv", n_head)),
        "num_hidden_layers": int(md[f"{a}.block_count"]),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(md[f"{a}.attention.layer_norm_rms_epsilon"]),
        "rope_theta": _f32(md.get(f"{a}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(md[f"{a}.context_length"]),
        "vocab_size": n_vocab,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": "float32",
    }
    if a == "qwen2":
        # the published Qwen2 configs carry no head_dim (always hidden/heads); leaving it out keeps
        # convert_hf_to_gguf from adding attention.key_length/value_length keys the source lacks
        del cfg["head_dim"]
    for typ in ("bos", "eos", "pad"):
        if typ in special:
            cfg[f"{typ}_token_id"] = special[typ]
    if a == "gemma3":
        if f"{a}.attention.sliding_window" in md:
            cfg["sliding_window"] = int(md[f"{a}.attention.sliding_window"])
        if f"{a}.rope.freq_base_swa" in md:
            cfg["rope_local_base_freq"] = _f32(md[f"{a}.rope.freq_base_swa"])
        if f"{a}.final_logit_softcapping" in md:
            cfg["final_logit_softcapping"] = _f32(md[f"{a}.final_logit_softcapping"])
    extra = dict(spec.hf_config_extra) if spec else {}
    for k, v in extra.items():
        cfg.setdefault(k, v)
    if a == "gemma3":
        pattern = int(cfg.get("_sliding_window_pattern", 6))  # llama.cpp hard-codes 6 for gemma3
        cfg["layer_types"] = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(cfg["num_hidden_layers"])
        ]
    return dict(sorted(cfg.items()))


def generation_config(md: Mapping[str, Any]) -> dict[str, Any]:
    special = special_ids(md)
    out = {f"{t}_token_id": special[t] for t in ("bos", "eos", "pad") if t in special}
    out["_from_model_config"] = True
    return out
