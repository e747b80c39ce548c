"""Tiny random-weight Hugging Face checkpoints with the real architectures of the seed models.

Each builder writes a folder that looks like the released checkpoint to llama.cpp's converter: the same config
keys and nesting (text_config inside a *ForConditionalGeneration config, or a flat text-only *ForCausalLM one),
the same tensor names, layouts and dtype (BF16, with the DeltaNet state parameters in F32), and the shapes that
matter for HLWQ kept at their real widths (head dims 256/512, Gemma-4's 704-wide experts and 2112-wide dense FFN,
GLM's 576-wide MLA kv_a rows, 768 q_lora rank, 192/64/256 head split). Widths, heads, layers and experts are
scaled down; every layer kind of the real model occurs at least once, MTP blocks included.

The vocabulary is SmolLM2's (49152 tokens, from the un-quantized test model) because the seed tokenizers are not
available offline: as is for Qwen3.5, with GLM's four special tokens appended for GLM-4.7 (its converter looks
them up), and re-spelled SentencePiece-style (U+2581 for spaces, <0xXX> byte fallback) for Gemma-4, whose
converter and llama.cpp tokenizer ("gemma4") accept only that kind of BPE. Vision towers are written only when
asked for (Gemma-4 `vision=True`: a 2-layer, 64-wide tower with the released tensor names); the text converter
skips them and llama.cpp's mmproj converter reads them.

Beside the seed models (SEED_FAMILIES), MOE_TEST_FAMILIES adds a Qwen3.5-35B-A3B replica (Qwen3.5's hybrid stack
with a routed + shared-expert MoE block in every layer) for the tests of MoE features such as the placement planner.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# GLM-4.7's converter (_set_vocab_glm) reads these from the tokenizer's added tokens
GLM_SPECIAL_TOKENS = ("[gMASK]", "<|user|>", "<|observation|>", "<sop>")


class _Weights:
    """Seeded random tensors in the checkpoint's dtypes (BF16 matrices, as released; F32 where the seed is F32)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.tensors: dict[str, np.ndarray] = {}
        self.float32: set[str] = set()

    def matrix(self, name: str, *shape: int, std: float | None = None) -> None:
        # 1/sqrt(fan_in) keeps activations O(1) through the stack, so the logits are neither flat nor saturated
        std = std if std is not None else shape[-1] ** -0.5
        self.tensors[name] = (self.rng.standard_normal(shape) * std).astype(np.float32)

    def vector(self, name: str, n: int, center: float = 1.0, spread: float = 0.1, float32: bool = False) -> None:
        self.tensors[name] = (center + self.rng.uniform(-spread, spread, n)).astype(np.float32)
        if float32:
            self.float32.add(name)

    def save(self, folder: Path) -> None:
        import torch
        from safetensors.torch import save_file

        tensors = {name: torch.from_numpy(array).to(torch.float32 if name in self.float32 else torch.bfloat16)
                   for name, array in self.tensors.items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _write_config(folder: Path, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))


def _text_only(config: dict, causal_lm_class: str, weights: _Weights) -> dict:
    """The layout of a text-only fine-tune: flat text config, *ForCausalLM, `model.` instead of `model.language_model.`."""
    text = dict(config["text_config"], architectures=[causal_lm_class], tie_word_embeddings=config["tie_word_embeddings"])
    weights.tensors = {name.replace("model.language_model.", "model."): array for name, array in weights.tensors.items()}
    weights.float32 = {name.replace("model.language_model.", "model.") for name in weights.float32}
    return text


def _copy_tokenizer(folder: Path, tokenizer_from: Path, extra_special: tuple[str, ...] = ()) -> int:
    """SmolLM2's tokenizer files, with `extra_special` appended as added special tokens; returns the vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_from / name, folder / name)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    size = len(tokenizer["model"]["vocab"])
    if extra_special:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        for i, content in enumerate(extra_special, start=size):
            entry = {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                     "normalized": False, "special": True}
            tokenizer["added_tokens"].append(entry)
            config["added_tokens_decoder"][str(i)] = {k: v for k, v in entry.items() if k != "id"}
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))
        size += len(extra_special)
    return size


def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: byte-level BPE characters back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes)}


def _write_gemma_style_tokenizer(folder: Path, tokenizer_from: Path) -> int:
    """SmolLM2's vocabulary and merges re-spelled as a Gemma-style (SentencePiece-like) byte-fallback BPE.

    Tokens become their UTF-8 text with U+2581 for spaces; single non-ASCII bytes become <0xXX> byte tokens (so
    every byte is reachable), partial UTF-8 sequences become <unusedN> like Gemma's reserved slots, and the first
    four specials take Gemma's <pad>/<eos>/<bos>/<unk> names and ids. Ids are unchanged, so the size is 49152.
    """
    folder.mkdir(parents=True, exist_ok=True)
    source = json.loads((tokenizer_from / "tokenizer.json").read_text())
    decoder = _gpt2_byte_decoder()
    specials = {t["id"]: t["content"] for t in source["added_tokens"]}
    specials.update({0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>"})

    def respell(token: str) -> str | None:
        raw = bytes(decoder[c] for c in token)
        try:
            return raw.decode("utf-8").replace(" ", "\u2581")
        except UnicodeDecodeError:
            return f"<0x{raw[0]:02X}>" if len(raw) == 1 else None

    vocab: dict[str, int] = {}
    respelled: dict[str, str] = {}
    for token, i in sorted(source["model"]["vocab"].items(), key=lambda item: item[1]):
        text = specials.get(i) or respell(token)
        if text is None or text in vocab:
            text = f"<unused{i}>"
        else:
            respelled[token] = text
        vocab[text] = i
    merges = []
    for merge in source["model"]["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if left in respelled and right in respelled and (left + right) in respelled \
                and respelled[left + right] == respelled[left] + respelled[right]:
            merges.append([respelled[left], respelled[right]])
    added = [{"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, text in sorted(specials.items())]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    special_map = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=1))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
              "model_max_length": 1_000_000, **special_map,
              "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))
    return len(vocab)


# --------------------------------------------------------------------------------------------------- Qwen3.5-27B

def write_tiny_qwen3_5(folder: Path, tokenizer_from: Path, seed: int = 0, text_only: bool = False) -> Path:
    """Qwen3.5-27B's hybrid stack: 3 Gated DeltaNet layers then 1 gated full-attention layer, plus the MTP block.

    Real: 64 layers (every 4th full attention), hidden 5120, FFN 17408, 24 Q / 4 KV heads of 256 with an output
    gate (q_proj is twice as tall), DeltaNet 16 K / 48 V heads of 128 (V heads grouped by K head: the converter
    reorders them), conv kernel 4, partial rotary 0.25 with interleaved MRoPE sections 11/11/10, one MTP layer.
    Tiny: hidden 256, FFN 1024, 6 Q / 1 KV heads of 256, DeltaNet 2 K / 6 V heads of 128 (same 3:1 grouping).
    text_only: the Qwen3_5ForCausalLM layout that text-only fine-tunes are saved in.
    """
    ffn = 1024

    def dense_mlp(w: _Weights, p: str, hidden: int) -> None:
        w.matrix(p + "mlp.gate_proj.weight", ffn, hidden)
        w.matrix(p + "mlp.up_proj.weight", ffn, hidden)
        w.matrix(p + "mlp.down_proj.weight", hidden, ffn)

    return _write_tiny_qwen3_5_stack(folder, tokenizer_from, seed, text_only, heads=6, v_heads=6,
                                     mlp_config={"intermediate_size": ffn}, mlp=dense_mlp, moe=False)


def write_tiny_qwen3_5_moe(folder: Path, tokenizer_from: Path, seed: int = 4, text_only: bool = False) -> Path:
    """Qwen3.5-35B-A3B: Qwen3.5's hybrid DeltaNet / gated-attention stack with a sparse MoE block in every layer.

    Every layer's MLP (the MTP block's too) is a router (mlp.gate), routed experts stored fused as released
    (mlp.experts.gate_up_proj [experts, 2 x width, hidden] and mlp.experts.down_proj [experts, hidden, width]; the
    converter splits gate_up into ffn_gate_exps / ffn_up_exps), one shared expert (mlp.shared_expert.*) and its
    sigmoid gate (mlp.shared_expert_gate, one row). There is no dense FFN and no intermediate_size key.
    Real: 40 layers (every 4th full attention), hidden 2048, 16 Q / 2 KV heads of 256 with an output gate,
    DeltaNet 16 K / 32 V heads of 128, 256 experts top-8 of width 512, shared expert 512, one MTP layer.
    Tiny: hidden 256, 8 Q / 1 KV heads of 256, DeltaNet 2 K / 4 V heads of 128 (same 2:1 grouping), 8 experts
    top-2 of width 320 and a shared expert of width 192: both multiples of 64 but not of 128, so ffn_down_exps and
    ffn_down_shexp take the 64-block HLWQ types, and the two widths differ so that the converter's and llama.cpp's
    expert vs shared-expert lengths cannot be swapped unnoticed.
    text_only: the Qwen3_5MoeForCausalLM layout that text-only fine-tunes are saved in, the one that converts
    with SmolLM2's vocabulary. Its model_type is not the released "qwen3_5_moe_text": for every qwen3_5_moe*
    model type transformers' AutoTokenizer ignores tokenizer.json's pre-tokenizer (Qwen3_5Tokenizer re-builds
    Qwen's), and llama.cpp's converter rejects the resulting hash. An unregistered model_type makes both
    AutoTokenizer and the converter read the files as written; the converter dispatches on `architectures` and
    never reads model_type. (Dense Qwen3.5's "qwen3_5_text" has no such override, but borrowing it would let
    AutoConfig add its default intermediate_size, 12288, as a feed_forward_length this MoE model does not have.)
    """
    experts, top_k, expert_ffn, shared_ffn = 8, 2, 320, 192
    mlp_config = {"moe_intermediate_size": expert_ffn, "num_experts": experts, "num_experts_per_tok": top_k,
                  "output_router_logits": False, "router_aux_loss_coef": 0.001,
                  "shared_expert_intermediate_size": shared_ffn}

    def moe_mlp(w: _Weights, p: str, hidden: int) -> None:
        w.matrix(p + "mlp.gate.weight", experts, hidden)
        w.matrix(p + "mlp.experts.gate_up_proj", experts, 2 * expert_ffn, hidden)
        w.matrix(p + "mlp.experts.down_proj", experts, hidden, expert_ffn)
        w.matrix(p + "mlp.shared_expert.gate_proj.weight", shared_ffn, hidden)
        w.matrix(p + "mlp.shared_expert.up_proj.weight", shared_ffn, hidden)
        w.matrix(p + "mlp.shared_expert.down_proj.weight", hidden, shared_ffn)
        w.matrix(p + "mlp.shared_expert_gate.weight", 1, hidden)

    return _write_tiny_qwen3_5_stack(folder, tokenizer_from, seed, text_only, heads=8, v_heads=4,
                                     mlp_config=mlp_config, mlp=moe_mlp, moe=True,
                                     text_only_model_type="tiny_qwen3_5_moe_text")


def _write_tiny_qwen3_5_stack(folder: Path, tokenizer_from: Path, seed: int, text_only: bool, *, heads: int,
                              v_heads: int, mlp_config: dict, mlp, moe: bool,
                              text_only_model_type: str | None = None) -> Path:
    """The Qwen3.5 text stack shared by the dense and MoE builders: 3 DeltaNet + 1 full-attention layer + MTP.

    `mlp_config` holds the MLP's config keys (placed where the dense config has intermediate_size) and
    `mlp(w, prefix, hidden)` writes one layer's MLP weights; `text_only_model_type` replaces the text config's
    model_type in the text-only layout.
    """
    vocab = _copy_tokenizer(folder, tokenizer_from)
    hidden, kv_heads, head_dim = 256, 1, 256
    k_heads, k_dim, v_dim, conv_kernel = 2, 128, 128, 4
    layer_types = ["linear_attention"] * 3 + ["full_attention"]
    text_config = {
        "attention_bias": False, "attention_dropout": 0.0, "attn_output_gate": True, "dtype": "bfloat16",
        "eos_token_id": 2, "full_attention_interval": 4, "head_dim": head_dim, "hidden_act": "silu",
        "hidden_size": hidden, "initializer_range": 0.02, **mlp_config, "layer_types": layer_types,
        "linear_conv_kernel_dim": conv_kernel, "linear_key_head_dim": k_dim, "linear_num_key_heads": k_heads,
        "linear_num_value_heads": v_heads, "linear_value_head_dim": v_dim, "max_position_embeddings": 262144,
        "mlp_only_layers": [], "model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text",
        "mtp_num_hidden_layers": 1,
        "mtp_use_dedicated_embeddings": False, "num_attention_heads": heads, "num_hidden_layers": len(layer_types),
        "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-06, "use_cache": True, "vocab_size": vocab,
        "mamba_ssm_dtype": "float32",
        "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10], "rope_type": "default",
                            "rope_theta": 10000000, "partial_rotary_factor": 0.25},
    }
    model_type = "qwen3_5_moe" if moe else "qwen3_5"
    config = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"],
        "image_token_id": vocab - 3, "model_type": model_type,
        "text_config": text_config, "tie_word_embeddings": False, "transformers_version": "4.57.0.dev0",
        "video_token_id": vocab - 2,
        # the vision tower's config is kept (the text converter ignores it); its weights are not written
        "vision_config": {"deepstack_visual_indexes": [], "depth": 27, "hidden_act": "gelu_pytorch_tanh",
                          "hidden_size": 1152, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4304,
                          "model_type": model_type, "num_heads": 16, "num_position_embeddings": 2304,
                          "out_hidden_size": hidden, "patch_size": 16, "spatial_merge_size": 2,
                          "temporal_patch_size": 2},
        "vision_end_token_id": vocab - 4, "vision_start_token_id": vocab - 5,
    }
    w = _Weights(seed)

    def attention_and_mlp(p: str) -> None:
        # Qwen3.5 RMSNorms compute x * (1 + weight): the stored weights sit around 0 (the converter adds the 1)
        w.vector(p + "input_layernorm.weight", hidden, center=0.0)
        w.vector(p + "post_attention_layernorm.weight", hidden, center=0.0)
        mlp(w, p, hidden)

    def full_attention(p: str) -> None:
        w.matrix(p + "self_attn.q_proj.weight", 2 * heads * head_dim, hidden)  # query and output gate
        w.matrix(p + "self_attn.k_proj.weight", kv_heads * head_dim, hidden)
        w.matrix(p + "self_attn.v_proj.weight", kv_heads * head_dim, hidden)
        w.matrix(p + "self_attn.o_proj.weight", hidden, heads * head_dim)
        w.vector(p + "self_attn.q_norm.weight", head_dim, center=0.0)
        w.vector(p + "self_attn.k_norm.weight", head_dim, center=0.0)

    conv_dim = 2 * k_heads * k_dim + v_heads * v_dim
    w.matrix("model.language_model.embed_tokens.weight", vocab, hidden, std=1.0)
    for i, kind in enumerate(layer_types):
        p = f"model.language_model.layers.{i}."
        attention_and_mlp(p)
        if kind == "full_attention":
            full_attention(p)
            continue
        a = p + "linear_attn."
        w.matrix(a + "in_proj_qkv.weight", conv_dim, hidden)
        w.matrix(a + "in_proj_z.weight", v_heads * v_dim, hidden)
        w.matrix(a + "in_proj_b.weight", v_heads, hidden)
        w.matrix(a + "in_proj_a.weight", v_heads, hidden)
        w.matrix(a + "conv1d.weight", conv_dim, 1, conv_kernel, std=0.5)
        # decay rates A = exp(A_log) in [1, 16] and dt biases as Mamba initialises them; F32 in the checkpoint
        w.tensors[a + "A_log"] = np.log(w.rng.uniform(1, 16, v_heads)).astype(np.float32)
        w.tensors[a + "dt_bias"] = w.rng.uniform(-4.0, -2.0, v_heads).astype(np.float32)
        w.float32 |= {a + "A_log", a + "dt_bias"}
        w.vector(a + "norm.weight", v_dim)  # the gated RMSNorm multiplies by weight itself (no +1)
        w.matrix(a + "out_proj.weight", hidden, v_heads * v_dim)
    w.vector("model.language_model.norm.weight", hidden, center=0.0)
    w.matrix("lm_head.weight", vocab, hidden, std=3 * hidden ** -0.5)
    # the multi-token-prediction block, stored under mtp.* as in the released checkpoint
    w.matrix("mtp.fc.weight", hidden, 2 * hidden)
    for name in ("mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight"):
        w.vector(name, hidden, center=0.0)
    attention_and_mlp("mtp.layers.0.")
    full_attention("mtp.layers.0.")
    if text_only:
        causal_lm = "Qwen3_5MoeForCausalLM" if moe else "Qwen3_5ForCausalLM"
        config = _text_only(config, causal_lm, w)
        if text_only_model_type:
            config["model_type"] = text_only_model_type
    _write_config(folder, config)
    w.save(folder)
    return folder


# --------------------------------------------------------------------------------------------------- Gemma-4

def _gemma4_config(vocab: int, text: dict) -> dict:
    """Gemma4ForConditionalGeneration's top level around `text` (vision config kept, audio absent as released)."""
    return {
        "architectures": ["Gemma4ForConditionalGeneration"], "audio_config": None, "audio_token_id": vocab - 6,
        "boa_token_id": vocab - 7, "boi_token_id": vocab - 8, "dtype": "bfloat16", "eoa_token_id": vocab - 5,
        "eoa_token_index": vocab - 5, "eoi_token_id": vocab - 4, "eos_token_id": [1, 106],
        "image_token_id": vocab - 3, "initializer_range": 0.02, "model_type": "gemma4", "text_config": text,
        "tie_word_embeddings": True, "transformers_version": "5.5.0.dev0", "video_token_id": vocab - 2,
        "vision_config": {
            "_name_or_path": "", "architectures": None, "attention_bias": False, "attention_dropout": 0.0,
            "chunk_size_feed_forward": 0, "default_output_length": 280, "dtype": "bfloat16", "global_head_dim": 72,
            "head_dim": 72, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
            "initializer_range": 0.02, "intermediate_size": 4304, "is_encoder_decoder": False,
            "max_position_embeddings": 131072, "model_type": "gemma4_vision", "num_attention_heads": 16,
            "num_hidden_layers": 27, "num_key_value_heads": 16, "patch_size": 16, "pooling_kernel_size": 3,
            "position_embedding_size": 10240, "rms_norm_eps": 1e-06,
            "rope_parameters": {"rope_theta": 100.0, "rope_type": "default"}, "standardize": True,
            "use_clipped_linears": False},
        "vision_soft_tokens_per_image": 280,
    }


# Gemma-4's vision tower scaled down (real: hidden 1152, FFN 4304, 27 layers, 16 heads of 72); the patch size,
# the 3x3 pooling and the position table (10240) stay as released, since libmtmd's gemma4v graph fixes them
GEMMA4_TINY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "num_key_value_heads": 2, "head_dim": 32, "global_head_dim": 32}


def _add_gemma4_vision_tower(folder: Path, config: dict, w: "_Weights") -> None:
    """The vision tower and its projection into the text model, and the processor config the mmproj converter reads
    image_mean/image_std from (the values of transformers' Gemma4ImageProcessor)."""
    vision = config["vision_config"]
    vision.update(GEMMA4_TINY_VISION)
    hidden, ffn, patch, head_dim = (vision[k] for k in ("hidden_size", "intermediate_size", "patch_size", "head_dim"))
    heads, kv_heads = vision["num_attention_heads"], vision["num_key_value_heads"]
    v = "model.vision_tower."
    w.matrix(v + "patch_embedder.input_proj.weight", hidden, 3 * patch * patch)
    w.matrix(v + "patch_embedder.position_embedding_table", 2, vision["position_embedding_size"], hidden, std=0.02)
    w.vector(v + "std_bias", hidden, center=0.0)
    w.vector(v + "std_scale", hidden)
    for i in range(vision["num_hidden_layers"]):
        p = f"{v}encoder.layers.{i}."
        w.matrix(p + "self_attn.q_proj.linear.weight", heads * head_dim, hidden)
        w.matrix(p + "self_attn.k_proj.linear.weight", kv_heads * head_dim, hidden)
        w.matrix(p + "self_attn.v_proj.linear.weight", kv_heads * head_dim, hidden)
        w.matrix(p + "self_attn.o_proj.linear.weight", hidden, heads * head_dim)
        w.vector(p + "self_attn.q_norm.weight", head_dim)
        w.vector(p + "self_attn.k_norm.weight", head_dim)
        w.matrix(p + "mlp.gate_proj.linear.weight", ffn, hidden)
        w.matrix(p + "mlp.up_proj.linear.weight", ffn, hidden)
        w.matrix(p + "mlp.down_proj.linear.weight", hidden, ffn)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            w.vector(p + norm + ".weight", hidden)
    w.matrix("model.embed_vision.embedding_projection.weight", config["text_config"]["hidden_size"], hidden)
    (folder / "processor_config.json").write_text(json.dumps({
        "processor_class": "Gemma4Processor", "image_seq_length": 280,
        "image_processor": {"image_processor_type": "Gemma4ImageProcessor", "do_normalize": False,
                            "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0], "patch_size": patch,
                            "pooling_kernel_size": vision["pooling_kernel_size"], "max_soft_tokens": 280}}, indent=1))


def _write_tiny_gemma4(folder: Path, tokenizer_from: Path, seed: int, text_only: bool, hidden: int, ffn: int,
                       heads: int, kv_heads: int, global_kv_heads: int, experts: int = 0, top_k: int = 0,
                       expert_ffn: int = 0, vision: bool = False) -> Path:
    vocab = _write_gemma_style_tokenizer(folder, tokenizer_from)
    head_dim, global_head_dim = 256, 512
    # the real 5 sliding : 1 full pattern, cut to 3 : 1; a 128-token window so that it bites within the test context
    layer_types = ["sliding_attention"] * 3 + ["full_attention"]
    moe = experts > 0
    text = {
        "attention_bias": False, "attention_dropout": 0.0, "attention_k_eq_v": True, "bos_token_id": 2,
        "dtype": "bfloat16", "enable_moe_block": moe, "eos_token_id": 1,
        **({} if moe else {"expert_intermediate_size": None}),
        "final_logit_softcapping": 30.0, "global_head_dim": global_head_dim, "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh", "hidden_size": hidden, "hidden_size_per_layer_input": 0,
        "initializer_range": 0.02, "intermediate_size": ffn, "layer_types": layer_types,
        "max_position_embeddings": 262144, "model_type": "gemma4_text",
        **({"moe_intermediate_size": expert_ffn} if moe else {}),
        "num_attention_heads": heads, "num_experts": experts or None, "num_global_key_value_heads": global_kv_heads,
        "num_hidden_layers": len(layer_types), "num_key_value_heads": kv_heads, "num_kv_shared_layers": 0,
        "pad_token_id": 0, "rms_norm_eps": 1e-06,
        "rope_parameters": {
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}},
        "sliding_window": 128, "tie_word_embeddings": True, "top_k_experts": top_k or None,
        "use_bidirectional_attention": "vision", "use_cache": True, "use_double_wide_mlp": False,
        "vocab_size": vocab, "vocab_size_per_layer_input": vocab,
    }
    config = _gemma4_config(vocab, text)
    w = _Weights(seed)
    # Gemma scales the embeddings by sqrt(hidden); tied, so the same matrix is the output projection
    w.matrix("model.language_model.embed_tokens.weight", vocab, hidden, std=3 * hidden ** -0.5)
    for i, kind in enumerate(layer_types):
        p = f"model.language_model.layers.{i}."
        full = kind == "full_attention"
        dim, n_kv = (global_head_dim, global_kv_heads) if full else (head_dim, kv_heads)
        w.vector(p + "layer_scalar", 1)
        w.matrix(p + "self_attn.q_proj.weight", heads * dim, hidden)
        w.matrix(p + "self_attn.k_proj.weight", n_kv * dim, hidden)
        if not full:  # attention_k_eq_v: the full-attention layers reuse K as V and have no v_proj
            w.matrix(p + "self_attn.v_proj.weight", n_kv * dim, hidden)
        w.matrix(p + "self_attn.o_proj.weight", hidden, heads * dim)
        w.vector(p + "self_attn.q_norm.weight", dim)
        w.vector(p + "self_attn.k_norm.weight", dim)
        w.matrix(p + "mlp.gate_proj.weight", ffn, hidden)
        w.matrix(p + "mlp.up_proj.weight", ffn, hidden)
        w.matrix(p + "mlp.down_proj.weight", hidden, ffn)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            w.vector(p + norm + ".weight", hidden)
        if moe:
            # the dense MLP runs beside the routed experts (Gemma-4's "shared expert"), each with its own norms
            w.vector(p + "router.scale", hidden)
            w.vector(p + "router.per_expert_scale", experts)
            w.matrix(p + "router.proj.weight", experts, hidden)
            w.matrix(p + "experts.gate_up_proj", experts, 2 * expert_ffn, hidden)
            w.matrix(p + "experts.down_proj", experts, hidden, expert_ffn)
            for norm in ("post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2"):
                w.vector(p + norm + ".weight", hidden)
    w.vector("model.language_model.norm.weight", hidden)
    if vision:
        _add_gemma4_vision_tower(folder, config, w)
    if text_only:
        config = _text_only(config, "Gemma4ForCausalLM", w)
    _write_config(folder, config)
    w.save(folder)
    return folder


def write_tiny_gemma4_dense(folder: Path, tokenizer_from: Path, seed: int = 1, text_only: bool = False,
                            vision: bool = False) -> Path:
    """Gemma-4-31B: dense, sliding (head 256) and full (head 512, K = V) attention, tied embeddings, softcap 30.

    Real: 60 layers, hidden 5376, FFN 21504, 32 heads, 16 KV heads (sliding) / 4 (full). Tiny: 4 layers, hidden
    256, FFN 2048, 4 heads, 2 / 1 KV heads.
    """
    return _write_tiny_gemma4(folder, tokenizer_from, seed, text_only, hidden=256, ffn=2048, heads=4, kv_heads=2,
                              global_kv_heads=1, vision=vision)


def write_tiny_gemma4_moe(folder: Path, tokenizer_from: Path, seed: int = 2, text_only: bool = False,
                          vision: bool = False) -> Path:
    """Gemma-4-26B-A4B: every layer has a 2112-wide dense MLP beside 704-wide routed experts (fused gate_up).

    Real: 30 layers, hidden 2816, 16 heads, 8 KV heads (sliding) / 2 (full), 128 experts top-8. Tiny: 4 layers,
    hidden 256, 4 heads, 2 / 1 KV heads, 8 experts top-2. The 2112 and 704 widths are kept: neither is a multiple
    of 128, so the dense ffn_down and the expert ffn_down_exps rows take the 64-block HLWQ types, as in the real model.
    """
    return _write_tiny_gemma4(folder, tokenizer_from, seed, text_only, hidden=256, ffn=2112, heads=4, kv_heads=2,
                              global_kv_heads=1, experts=8, top_k=2, expert_ffn=704, vision=vision)


# --------------------------------------------------------------------------------------------------- GLM-4.7-Flash

def write_tiny_glm4_moe_lite(folder: Path, tokenizer_from: Path, seed: int = 3) -> Path:
    """GLM-4.7-Flash (DeepSeek-V2-style MLA + MoE): a dense first layer, MoE layers, and the MTP layer.

    Real: 47 layers + 1 MTP, hidden 2048, 20 heads, q_lora 768, kv_lora 512 + rope 64 (576-wide kv_a rows),
    qk_nope 192, v_head 256, dense FFN 10240, 64 experts top-4 of width 1536 plus one shared expert.
    Tiny: 2 layers + 1 MTP, hidden 256, 2 heads, the MLA ranks and head split unchanged, dense FFN 1280,
    8 experts top-4 of width 384 plus one shared expert. Experts are stored one tensor per expert, as released.
    """
    vocab = _copy_tokenizer(folder, tokenizer_from, GLM_SPECIAL_TOKENS)
    hidden, ffn, expert_ffn, heads, experts, layers = 256, 1280, 384, 2, 8, 2
    q_lora, kv_lora, nope, rope, v_head = 768, 512, 192, 64, 256
    config = {
        "architectures": ["Glm4MoeLiteForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "pad_token_id": 0, "eos_token_id": [0, 2, vocab - 3], "hidden_act": "silu", "hidden_size": hidden,
        "intermediate_size": ffn, "max_position_embeddings": 202752, "model_type": "glm4_moe_lite",
        "moe_intermediate_size": expert_ffn, "topk_method": "noaux_tc", "norm_topk_prob": True,
        "num_attention_heads": heads, "n_group": 1, "topk_group": 1, "n_routed_experts": experts,
        "n_shared_experts": 1, "routed_scaling_factor": 1.8, "num_experts_per_tok": 4, "first_k_dense_replace": 1,
        "num_hidden_layers": layers, "num_key_value_heads": heads, "num_nextn_predict_layers": 1,
        "partial_rotary_factor": 1.0, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000,
        "tie_word_embeddings": False, "dtype": "bfloat16", "transformers_version": "5.0.0rc0",
        "q_lora_rank": q_lora, "kv_lora_rank": kv_lora, "qk_nope_head_dim": nope, "qk_rope_head_dim": rope,
        "v_head_dim": v_head, "vocab_size": vocab,
    }
    w = _Weights(seed)
    w.matrix("model.embed_tokens.weight", vocab, hidden, std=1.0)
    for i in range(layers + 1):  # the last one is the MTP layer (model.layers.{num_hidden_layers}.*)
        p = f"model.layers.{i}."
        w.vector(p + "input_layernorm.weight", hidden)
        w.vector(p + "post_attention_layernorm.weight", hidden)
        a = p + "self_attn."
        w.matrix(a + "q_a_proj.weight", q_lora, hidden)
        w.vector(a + "q_a_layernorm.weight", q_lora)
        w.matrix(a + "q_b_proj.weight", heads * (nope + rope), q_lora)
        w.matrix(a + "kv_a_proj_with_mqa.weight", kv_lora + rope, hidden)
        w.vector(a + "kv_a_layernorm.weight", kv_lora)
        w.matrix(a + "kv_b_proj.weight", heads * (nope + v_head), kv_lora)
        w.matrix(a + "o_proj.weight", hidden, heads * v_head)
        if i < config["first_k_dense_replace"]:
            w.matrix(p + "mlp.gate_proj.weight", ffn, hidden)
            w.matrix(p + "mlp.up_proj.weight", ffn, hidden)
            w.matrix(p + "mlp.down_proj.weight", hidden, ffn)
        else:
            w.matrix(p + "mlp.gate.weight", experts, hidden)
            w.vector(p + "mlp.gate.e_score_correction_bias", experts, center=0.0, spread=0.01, float32=True)
            for e in range(experts):
                w.matrix(p + f"mlp.experts.{e}.gate_proj.weight", expert_ffn, hidden)
                w.matrix(p + f"mlp.experts.{e}.up_proj.weight", expert_ffn, hidden)
                w.matrix(p + f"mlp.experts.{e}.down_proj.weight", hidden, expert_ffn)
            w.matrix(p + "mlp.shared_experts.gate_proj.weight", expert_ffn, hidden)
            w.matrix(p + "mlp.shared_experts.up_proj.weight", expert_ffn, hidden)
            w.matrix(p + "mlp.shared_experts.down_proj.weight", hidden, expert_ffn)
    mtp = f"model.layers.{layers}."
    w.matrix(mtp + "eh_proj.weight", hidden, 2 * hidden)
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        w.vector(mtp + norm + ".weight", hidden)
    w.vector("model.norm.weight", hidden)
    w.matrix("lm_head.weight", vocab, hidden, std=3 * hidden ** -0.5)
    _write_config(folder, config)
    w.save(folder)
    return folder


SEED_FAMILIES = {
    # text-only layout: see write_tiny_qwen3_5 for why the ConditionalGeneration one cannot carry SmolLM2's vocab
    "qwen3.5-27b": lambda folder, tokenizer_from: write_tiny_qwen3_5(folder, tokenizer_from, text_only=True),
    "gemma-4-31b": write_tiny_gemma4_dense,
    "gemma-4-26b-a4b": write_tiny_gemma4_moe,
    "glm-4.7-flash": write_tiny_glm4_moe_lite,
}

# every MoE replica: the seed MoE models and Qwen3.5-35B-A3B, which is not a seed model (SEED_FAMILIES' tests hold
# per-seed expectations and the README's size estimates)
MOE_TEST_FAMILIES = {
    "gemma-4-26b-a4b": write_tiny_gemma4_moe,
    "glm-4.7-flash": write_tiny_glm4_moe_lite,
    # text-only layout: see write_tiny_qwen3_5_moe for why the ConditionalGeneration one cannot carry SmolLM2's vocab
    "qwen3.5-35b-a3b": lambda folder, tokenizer_from: write_tiny_qwen3_5_moe(folder, tokenizer_from, text_only=True),
}
