"""Seed inputs of the GGUF fuzz harness (scripts/fuzz_gguf.py)."""
from __future__ import annotations

from pathlib import Path


def write_seeds(folder: Path) -> list[Path]:
    """Small valid GGUFs with HLWQ tensors of every block family and llama metadata."""
    import numpy as np

    from hlwq_gguf import codec, gguf_types

    gguf = gguf_types.register()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    seeds = []
    groups = [("HLWQ5", "HLWQ3"), ("HLWQ4_64", "HLWQ6_64"), ("HLWQ5_A", "HLWQ4_B"), ("HLWQ6", "HLWQ3_64")]
    for index, names in enumerate(groups):
        path = folder / f"seed-{index}.gguf"
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_block_count(2)
        writer.add_embedding_length(128)
        writer.add_head_count(2)
        writer.add_head_count_kv(1)
        writer.add_feed_forward_length(256)
        writer.add_string("general.name", "fuzz seed")
        writer.add_array("tokenizer.ggml.scores", [0.5, -1.0])
        for layer, name in enumerate(names):
            block_type = codec.BLOCK_TYPES[name]
            weights = (rng.standard_normal((2, block_type.block_size * 2)) * 0.02).astype(np.float32)
            packed = block_type.quantize(weights)
            writer.add_tensor(f"blk.{layer}.attn_q.weight", packed.reshape(weights.shape[0], -1),
                              raw_dtype=gguf.GGMLQuantizationType[name])
        writer.add_tensor("blk.0.attn_norm.weight", np.ones(128, np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        seeds.append(path)
    return seeds
