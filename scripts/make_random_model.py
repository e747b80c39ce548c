#!/usr/bin/env python3
"""A llama-architecture GGUF with random F16 weights, for kernel speed runs on a machine without models or network.

    PYTHONPATH=<llama.cpp>/gguf-py python3 scripts/make_random_model.py out.gguf --layers 4 --hidden 4096 --ffn 14336

Only numpy and gguf-py are needed (both are on the offline GPU machine once the patched tree is there). The bytes and
shapes are real, the quality is not: the weights are N(0, 0.02) and the vocabulary is synthetic byte tokens.
"""
from __future__ import annotations

import argparse

import numpy as np

import gguf


def write_random_llama(path: str, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int,
                       seed: int = 0) -> None:
    """Write the model tensor by tensor (llama.cpp's names and shapes)."""
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("random-llama")
    writer.add_context_length(8192)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"w{i}" for i in range(vocab - len(tokens))]
    token_types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    token_types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (vocab - 259)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(token_types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def weight(rows: int, cols: int) -> np.ndarray:  # ggml's shape [cols, rows] is numpy's (rows, cols)
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    writer.add_tensor("token_embd.weight", weight(vocab, hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output.weight", weight(vocab, hidden))
    for i in range(layers):
        block = f"blk.{i}."
        writer.add_tensor(block + "attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(block + "attn_q.weight", weight(heads * head_dim, hidden))
        writer.add_tensor(block + "attn_k.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(block + "attn_v.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(block + "attn_output.weight", weight(hidden, heads * head_dim))
        writer.add_tensor(block + "ffn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(block + "ffn_gate.weight", weight(ffn, hidden))
        writer.add_tensor(block + "ffn_up.weight", weight(ffn, hidden))
        writer.add_tensor(block + "ffn_down.weight", weight(hidden, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    write_random_llama(args.out, args.layers, args.hidden, args.ffn, args.heads, args.kv_heads, args.vocab)


if __name__ == "__main__":
    main()
