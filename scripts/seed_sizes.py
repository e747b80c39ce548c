#!/usr/bin/env python3
"""Expected text-model GGUF sizes of the seed models at BF16, Q5_K_M, HLWQ5 and HLWQ5_M, from their real configs.

    python scripts/seed_sizes.py [CONFIG_DIR]      # default: ../shared/seed-configs

The parameter shapes come from transformers itself (each config instantiated on the meta device, no weights).
Vision towers and projectors go to the mmproj file and are listed apart. Per tensor:
- 1-D tensors and MoE routers: F32 in every quantized file (as llama.cpp writes them), BF16 in the BF16 file;
- HLWQ5: 5-bit HLWQ blocks of 128 (5.125 bpw), of 64 for rows that are a multiple of 64 only (5.25), Q8_0 below;
  HLWQ5_M: 6 bits for attn_v (a fused qkv too), ffn_down (experts too) and the output projection (token_embd when
  tied), as hlwq_gguf/recipes.py;
- Q5_K_M: llama-quantize's rules (Q5_K; Q6_K for output, fused attn_qkv, and attn_v / ffn_down on the layers its
  use_more_bits picks), with its fallbacks for rows that are not a multiple of 256 (Q5_K -> Q5_1, Q6_K -> Q8_0).
MTP (next-token-prediction) layers, which transformers does not build but the checkpoints carry and llama.cpp keeps
(GLM-4.7-Flash's num_nextn_predict_layers, Qwen3.5's mtp_num_hidden_layers), are counted as a copy of the last
decoder layer plus the eh_proj matrix [hidden, 2 x hidden].
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

SEEDS = {  # hub id -> (config file, published size of the reference's Q5 release in GB)
    "zai-org/GLM-4.7-Flash": ("zai-org__GLM-4.7-Flash.json", 19.0),
    "Qwen/Qwen3.5-27B": ("Qwen__Qwen3.5-27B.json", None),
    "Jackrong/Qwopus3.5-27B-v3": ("Qwen__Qwen3.5-27B.json", 16.2),
    "google/gemma-4-31B-it": ("google__gemma-4-31B-it.json", 21.8),
    "TeichAI/gemma-4-31B-it-Claude-Opus-Distill": ("google__gemma-4-31B-it.json", None),
    "google/gemma-4-26B-A4B-it": ("google__gemma-4-26B-A4B-it.reconstructed.json", 26.9),
}
VISION = ("visual", "vision_tower", "embed_vision", "multi_modal_projector", "audio")
ROUTER = re.compile(r"(mlp\.gate\.weight|router|e_score_correction)")


def _parameters(config_file: Path) -> tuple[dict, list[tuple[str, tuple[int, ...]]]]:
    import torch
    import transformers

    raw = json.loads(config_file.read_text())
    config = transformers.AutoConfig.for_model(**raw)
    with torch.device("meta"):
        model = getattr(transformers, raw["architectures"][0])(config)
    params = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    text = raw.get("text_config", raw)
    n_mtp = int(text.get("num_nextn_predict_layers") or text.get("mtp_num_hidden_layers") or 0)
    last = f"layers.{text['num_hidden_layers'] - 1}."
    for i in range(n_mtp):
        mtp = f"layers.{text['num_hidden_layers'] + i}."
        params += [(name.replace(last, mtp), shape) for name, shape in params if last in name]
        params.append((f"model.{mtp}eh_proj.weight", (text["hidden_size"], 2 * text["hidden_size"])))
    return raw, params


def _hlwq_bpw(width: int, bits: int) -> float:
    if width % 128 == 0:
        return bits + 16 / 128
    if width % 64 == 0:
        return bits + 16 / 64
    return 8.5


def _kquant_bpw(width: int, six: bool) -> float:
    if width % 256 == 0:
        return 6.5625 if six else 5.5
    return 8.5 if six else 6.0


def sizes(config_file: Path) -> dict[str, float]:
    raw, params = _parameters(config_file)
    text = raw.get("text_config", raw)
    n_layer = text["num_hidden_layers"]
    tied = bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    more = lambda i: i < n_layer // 8 or i >= 7 * n_layer // 8 or (i - n_layer // 8) % 3 == 2  # noqa: E731
    total = {"BF16": 0.0, "Q5_K_M": 0.0, "HLWQ5": 0.0, "HLWQ5_M": 0.0, "mmproj F16": 0.0}
    for name, shape in params:
        count = 1
        for d in shape:
            count *= d
        if any(v in name for v in VISION):
            total["mmproj F16"] += count * 2
            continue
        if len(shape) < 2 or ROUTER.search(name):
            total["BF16"] += count * (2 if len(shape) >= 2 else 4)
            for key in ("Q5_K_M", "HLWQ5", "HLWQ5_M"):
                total[key] += count * 4
            continue
        width = shape[-1]
        layer = re.search(r"layers\.(\d+)\.", name)
        # llama.cpp's attn_v category includes a fused qkv (Qwen3.5's linear attention in_proj_qkv); with tied
        # embeddings token_embd is the output projection too
        is_v = ".v_proj." in name or "in_proj_qkv" in name
        is_down = "down_proj" in name
        is_output = name.startswith("lm_head") or (tied and "embed_tokens" in name and "per_layer" not in name)
        total["BF16"] += count * 2
        total["HLWQ5"] += count * _hlwq_bpw(width, 5) / 8
        total["HLWQ5_M"] += count * _hlwq_bpw(width, 6 if (is_v or is_down or is_output) else 5) / 8
        six = is_output or "in_proj_qkv" in name or ((is_v or is_down) and layer is not None and more(int(layer[1])))
        total["Q5_K_M"] += count * _kquant_bpw(width, six) / 8
    return total


def main() -> None:
    config_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "seed-configs"
    print("| hub id | BF16 | Q5_K_M | HLWQ5 | HLWQ5_M | reference Q5 release | mmproj (F16) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    cache: dict[str, dict[str, float]] = {}
    for hub_id, (file, published) in SEEDS.items():
        total = cache.setdefault(file, sizes(config_dir / file))
        gb = {k: v / 1e9 for k, v in total.items()}
        print(f"| {hub_id} | {gb['BF16']:.1f} GB | {gb['Q5_K_M']:.1f} GB | {gb['HLWQ5']:.1f} GB | {gb['HLWQ5_M']:.1f} GB | "
              f"{f'{published:.1f} GB' if published else '-'} | {gb['mmproj F16']:.2f} GB |")


if __name__ == "__main__":
    main()
