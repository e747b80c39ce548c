"""Simulate a low-bit K/V cache in torch to choose what to keep out of its codes, before touching llama.cpp.

    python scripts/kv_center_sim.py smollm2-135m 1024 4,4,- 4,4,c 3,3,c 4,3,cz

Runs the un-quantized HF model (the bench cache's `<model>-hf` folder) on the first n_ctx tokens of the measurement
text, with each layer's post-RoPE keys and values coded by the HLWQ codec (hlwq_gguf.codec, 64-value blocks) inside
attention, and prints the KL divergence of the logits against the uncoded run. A config is KBITS,VBITS,FLAGS
(16 bits: not coded); flags: c = K minus the mean post-RoPE key of a calibration run (the calibration text), v = V
minus its mean (added back after attention), s = K divided and Q multiplied per RoPE pair by (E[k^2]/E[q^2])^(1/4),
z = the first token kept uncoded (an attention sink). This is how K centering on measured mean keys was chosen
(docs/BENCHMARKS.md, "Mean-key centering"); llama.cpp's numbers differ in detail (its keys are rotated in the
file's channel order, its flash attention rounds to f16).
"""
import sys
import time

import numpy as np
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hlwq_gguf import codec, paths, textdata


def coded(x: torch.Tensor, bits: int) -> torch.Tensor:
    if bits >= 16:
        return x
    blocks = x.reshape(-1, 64).numpy().astype(np.float32)
    d, codes = codec.quantize_blocks(blocks, bits, 64)
    return torch.from_numpy(codec.dequantize_blocks(d, codes, bits, 64)).reshape(x.shape)


def main(name: str, n_ctx: int, configs: list[tuple[int, int, str]]) -> None:
    torch.set_num_threads(2)
    path = paths.cache_root() / "models" / f"{name}-hf"
    tokenizer = AutoTokenizer.from_pretrained(path)
    eval_ids = tokenizer(textdata.measurement_text()[:200000], return_tensors="pt").input_ids[:, :n_ctx]
    calibration = textdata.calibration_text_file().read_text(encoding="utf-8")
    calib_ids = tokenizer(calibration[:200000], return_tensors="pt").input_ids[:, :n_ctx]
    mode: dict = {"now": None}
    stats: dict[int, dict] = {}

    def attention(module, query, key, value, attention_mask, **kw):
        layer, now = module.layer_idx, mode["now"]
        if now == "calibrate":
            group = query.shape[1] // key.shape[1]
            k_mean = key[0].mean(dim=1)
            q_sq = (query[0].reshape(key.shape[1], group, -1, query.shape[-1]) ** 2).mean(dim=(1, 2))
            k_sq = ((key[0] - k_mean[:, None]) ** 2).mean(dim=1)
            half = key.shape[-1] // 2  # rotate_half pairs (i, i + half)
            scale = ((k_sq[:, :half] + k_sq[:, half:]) / (q_sq[:, :half] + q_sq[:, half:])).clamp_min(1e-12) ** 0.25
            stats[layer] = {"k": k_mean, "v": value[0].mean(dim=1), "s": torch.cat([scale, scale], -1)}
        elif now is not None:
            k_bits, v_bits, flags = now
            st = stats[layer]
            kc = st["k"][None, :, None] if "c" in flags else 0
            vc = st["v"][None, :, None] if "v" in flags else 0
            s = st["s"][None, :, None] if "s" in flags else 1
            k2, v2 = coded((key - kc) / s, k_bits) * s + kc, coded(value - vc, v_bits) + vc
            if "z" in flags:
                k2[:, :, :1], v2[:, :, :1] = key[:, :, :1], value[:, :, :1]
            key, value = k2, v2
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("hlwq_sim", attention)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="hlwq_sim").eval()

    def log_probs(ids):
        with torch.no_grad():
            return torch.log_softmax(model(ids).logits[0].float(), -1)

    mode["now"] = "calibrate"
    log_probs(calib_ids)
    mode["now"] = None
    base = log_probs(eval_ids)
    for k_bits, v_bits, flags in configs:
        started = time.time()
        mode["now"] = (k_bits, v_bits, flags)
        kld = (base.exp() * (base - log_probs(eval_ids))).sum(-1).mean().item()
        print(f"{name} K{k_bits} V{v_bits} {flags or '-':4s} KLD {kld:.5f} ({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    parsed = [(int(k), int(v), "" if f == "-" else f) for k, v, f in (c.split(",") for c in sys.argv[3:])]
    main(sys.argv[1], int(sys.argv[2]), parsed)
