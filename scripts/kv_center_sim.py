"""Simulate a low-bit K/V cache in torch to choose what to keep out of its codes, before touching llama.cpp.

    python scripts/kv_center_sim.py smollm2-135m 1024 4,4,- 4,4,c 3,3,c 4,3,cz 5:3,3,c

Runs the un-quantized HF model (the bench cache's `<model>-hf` folder) on the first n_ctx tokens of the measurement
text, with each layer's post-RoPE keys and values coded by the HLWQ codec (hlwq_gguf.codec, 64-value blocks) inside
attention, and prints the KL divergence of the logits against the uncoded run. A config is KBITS,VBITS,FLAGS (16 bits:
not coded); flags: c = K minus the mean post-RoPE key of a calibration run (the calibration text), v = V minus its
mean (added back after attention), s = K divided and Q multiplied per RoPE pair by (E[k^2]/E[q^2])^(1/4), z = the
first token kept uncoded (an attention sink). KBITS may also be HOT:COLD, e.g. 5:3: per KV head, the quarter of the
RoPE pairs with the largest E[k^2] * E[q^2] (K centered, Q averaged over its group) is coded at HOT bits and the rest
at COLD, each group in its own Hadamard blocks (64 values, or the largest power of two dividing the group) with its
own scale (flag r: a random quarter instead, the control; flag f: the quarter of lowest RoPE frequency, which needs
no calibration); such groups are coded by a plain fit (norm start, two least-squares refits), the uniform configs by
the codec. KBITS may also give one digit per layer after an L (L4434...: layer 0 at 4 bits, layer 2 at 3, ...), and
flag b codes the uniform configs (K and V) in 128-value blocks instead of 64, and flag g replaces their codes by the
Gaussian rate-distortion bound at the same bits (which may then be fractional: 3.25,3.25,cg); flag q codes K and V
as llama.cpp's q4_0 after upstream's graph Hadamard rotation (the bits are then ignored; without c, as upstream
stores them: the target the KV goals are set against). Flags that reproduce llama.cpp's details: C = K centered as
llama.cpp does it (the pre-RoPE mean key, BOS left out, turned by RoPE and averaged over the positions) instead of
c's measured post-RoPE mean; Q = Q as int8 per 64 rotated values; H = Q, K and V rounded to f16. o / O = K / V
centered on the first token's own key / value instead (V added back). Each line prints K's bits per value with one
fp16 scale per block. This is how K centering on measured mean keys was chosen (docs/BENCHMARKS.md, "Mean-key
centering"); llama.cpp's numbers differ in detail (its keys are rotated in the file's channel order, its flash
attention rounds to f16).
"""
import sys
import time

import numpy as np
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hlwq_gguf import codec, paths, textdata


def coded(x: torch.Tensor, bits: float, qk: int = 64, ideal: bool = False) -> torch.Tensor:
    if bits >= 16:
        return x
    if ideal:
        return ideal_coded(x, bits, qk)
    blocks = x.reshape(-1, qk).numpy().astype(np.float32)
    d, codes = codec.quantize_blocks(blocks, int(bits), qk)
    return torch.from_numpy(codec.dequantize_blocks(d, codes, int(bits), qk)).reshape(x.shape)


def ideal_coded(x: torch.Tensor, bits: float, qk: int) -> torch.Tensor:
    """x through the Gaussian rate-distortion test channel at `bits` per value, per Hadamard block of qk values
    relative to the block's mean square: the error no code of that rate can beat on Gaussian data (a Lloyd-Max code
    has 2.2x its error at 3 bits), a bound for any better-than-scalar code (trellis, lattice) at the same rate."""
    y = torch.from_numpy(codec.hadamard_rotate(x.reshape(-1, qk).numpy()))
    distortion = 2.0 ** (-2.0 * bits)
    sigma = y.pow(2).mean(1, keepdim=True).sqrt()
    noise = torch.randn(y.shape, generator=seeded(int(bits * 1000) + y.shape[0]))
    y = (1 - distortion) * y + (distortion * (1 - distortion)) ** 0.5 * sigma * noise
    return torch.from_numpy(codec.hadamard_rotate(y.numpy())).reshape(x.shape)


def q4_0_coded(x: torch.Tensor, rotation: int) -> torch.Tensor:
    """x in llama.cpp's q4_0 (32-value blocks, d = the signed largest value / -8, fp16 d) after the Hadamard rotation
    of `rotation` values that upstream's graph applies to a quantized cache: the target to reach."""
    rotated = torch.from_numpy(codec.hadamard_rotate(x.reshape(-1, rotation).numpy()))
    blocks = rotated.reshape(-1, 32)
    largest = blocks.gather(1, blocks.abs().argmax(1, keepdim=True))
    d = (largest / -8).half().float()
    inverse = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    codes = (blocks * inverse + 8.5).floor().clamp(0, 15)
    decoded = ((codes - 8) * d).reshape(-1, rotation).numpy()
    return torch.from_numpy(codec.hadamard_rotate(decoded)).reshape(x.shape)


def rope_angles(config, layer: int, n_pos: int, d: int) -> torch.Tensor:
    """HF rotate_half RoPE angles [n_pos, d] of `layer` (a sliding-window layer's own base where the config has one)."""
    params = config.rope_parameters
    if "rope_theta" not in params:
        params = params[config.layer_types[layer]]
    base = params["rope_theta"]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv[None]
    return torch.cat([ang, ang], -1)  # [n_pos, d]


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def coded_group(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """x [..., m] in Hadamard blocks of n values (the largest power of two dividing m, at most 64), each scaled by
    one least-squares fit; returns the decoded values and the number of blocks per row."""
    m = x.shape[-1]
    n = min(m & -m, 64)
    y = codec.hadamard_rotate(x.reshape(-1, n).numpy()) * np.float32(np.sqrt(n))
    codebook = codec.load_codebook(bits)
    scale = np.maximum(np.linalg.norm(y, axis=1, keepdims=True) / np.float32(np.sqrt(n)), 1e-10)
    for _ in range(3):
        c = codebook[codec.nearest_code(y / scale, codebook)]
        scale = np.maximum((y * c).sum(1, keepdims=True) / (c * c).sum(1, keepdims=True), 1e-10)
    c = codebook[codec.nearest_code(y / scale, codebook)]
    decoded = codec.hadamard_rotate(c * scale.astype(np.float16).astype(np.float32) / np.float32(np.sqrt(n)))
    return torch.from_numpy(decoded).reshape(x.shape), m // n


def coded_hot_pairs(key: torch.Tensor, order: torch.Tensor, hot_bits: int,
                    cold_bits: int) -> tuple[torch.Tensor, float]:
    """key [1, n_kv, n_tokens, d] with each head's hottest quarter of RoPE pairs (order: pairs, hottest first; pair p is
    channels p and p + d/2) coded at hot_bits, the rest at cold_bits; returns it and K's bits per value."""
    out, half = torch.empty_like(key), key.shape[-1] // 2
    bits = 0.0
    for head in range(key.shape[1]):
        hot, cold = order[head][: half // 4], order[head][half // 4 :]
        for pairs, b in ((hot, hot_bits), (cold, cold_bits)):
            channels = torch.cat([pairs, pairs + half])
            out[0, head][:, channels], blocks = coded_group(key[0, head][:, channels].contiguous(), b)
            bits += (len(channels) * b + 16 * blocks) / (2 * half) / key.shape[1]
    return out, bits


def main(name: str, n_ctx: int, configs: list[tuple[str, int, str]]) -> None:
    torch.set_num_threads(2)
    path = paths.cache_root() / "models" / f"{name}-hf"
    tokenizer = AutoTokenizer.from_pretrained(path)
    eval_ids = tokenizer(textdata.measurement_text()[:200000], return_tensors="pt").input_ids[:, :n_ctx]
    calibration = textdata.calibration_text_file().read_text(encoding="utf-8")
    calib_ids = tokenizer(calibration[:200000], return_tensors="pt").input_ids[:, :n_ctx]
    mode: dict = {"now": None}
    stats: dict[int, dict] = {}
    bits_k: dict[int, float] = {}

    def attention(module, query, key, value, attention_mask, **kw):
        layer, now = module.layer_idx, mode["now"]
        if now == "calibrate":
            group = query.shape[1] // key.shape[1]
            k_mean = key[0].mean(dim=1)
            q_sq = (query[0].reshape(key.shape[1], group, -1, query.shape[-1]) ** 2).mean(dim=(1, 2))
            k_sq = ((key[0] - k_mean[:, None]) ** 2).mean(dim=1)
            half = key.shape[-1] // 2  # rotate_half pairs (i, i + half)
            scale = ((k_sq[:, :half] + k_sq[:, half:]) / (q_sq[:, :half] + q_sq[:, half:])).clamp_min(1e-12) ** 0.25
            energy = (k_sq[:, :half] + k_sq[:, half:]) * (q_sq[:, :half] + q_sq[:, half:])
            angles = rope_angles(module.config, layer, key.shape[2], key.shape[-1])
            cos, sin = angles.cos().float(), angles.sin().float()
            before_rope = (key[0] * cos - rotate_half(key[0]) * sin)[:, 1:].mean(dim=1)  # BOS left out, as kv-calibrate
            closed_form = before_rope * cos.mean(0) + rotate_half(before_rope) * sin.mean(0)
            stats[layer] = {"k": k_mean, "kC": closed_form, "v": value[0].mean(dim=1),
                            "s": torch.cat([scale, scale], -1),
                            "order": torch.argsort(energy, dim=1, descending=True),
                            "lowfreq": torch.arange(half - 1, -1, -1).repeat(key.shape[1], 1),
                            "random": torch.stack([torch.randperm(half, generator=seeded(1000 * layer + head))
                                                   for head in range(key.shape[1])])}
        elif now is not None:
            k_bits, v_bits, flags = now
            st = stats[layer]
            kc = st["k"][None, :, None] if "c" in flags else 0
            vc = st["v"][None, :, None] if "v" in flags else 0
            s = st["s"][None, :, None] if "s" in flags else 1
            if "C" in flags:
                kc = st["kC"][None, :, None]
            if "o" in flags:
                kc = key[:, :, :1].clone()
            if "O" in flags:
                vc = value[:, :, :1].clone()
            qk = 128 if "b" in flags else 64
            if "q" in flags:
                k_rotation = max(n for n in (64, 128, 256) if key.shape[-1] % n == 0)  # as llama-kv-cache.cpp picks it
                k2, v2 = q4_0_coded(key - kc, k_rotation) + kc, q4_0_coded(value - vc, 64) + vc
                bits_k[layer] = 4.5
            elif ":" in k_bits:
                hot_bits, cold_bits = (int(b) for b in k_bits.split(":"))
                order = st["random" if "r" in flags else "lowfreq" if "f" in flags else "order"]
                k2, bits_k[layer] = coded_hot_pairs((key - kc) / s, order, hot_bits, cold_bits)
                k2 = k2 * s + kc
            else:
                layer_bits = float(k_bits[1 + layer] if k_bits.startswith("L") else k_bits)
                k2 = coded((key - kc) / s, layer_bits, qk, "g" in flags) * s + kc
                bits_k[layer] = layer_bits + 16 / qk if layer_bits < 16 else 16
            if "q" not in flags:
                v2 = coded(value - vc, v_bits, qk, "g" in flags) + vc
            if "z" in flags:
                k2[:, :, :1], v2[:, :, :1] = key[:, :, :1], value[:, :, :1]
            if "Q" in flags:  # Q as int8 per 64 rotated values (q8_hlwq_64), as llama.cpp's K dot product takes it
                rotated = torch.from_numpy(codec.hadamard_rotate(query.reshape(-1, 64).numpy()))
                step = (rotated.abs().amax(1, keepdim=True) / 127).clamp_min(1e-30)
                rotated = torch.round(rotated / step) * step
                query = torch.from_numpy(codec.hadamard_rotate(rotated.numpy())).reshape(query.shape)
            if "H" in flags:  # Q, K and V rounded to f16, as llama.cpp's flash attention stores them
                query, k2, v2 = query.half().float(), k2.half().float(), v2.half().float()
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
        k_bpv = sum(bits_k.values()) / len(bits_k)
        print(f"{name} K{k_bits} ({k_bpv:.3f} bpv) V{v_bits} {flags or '-':4s} KLD {kld:.5f} "
              f"({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    parsed = [(k, float(v), "" if f == "-" else f) for k, v, f in (c.split(",") for c in sys.argv[3:])]
    main(sys.argv[1], int(sys.argv[2]), parsed)
