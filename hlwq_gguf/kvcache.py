"""Which layers' K a low-bit HLWQ cache can hold, read from a GGUF's weights.

A 3-4-bit HLWQ code cannot hold the K of a layer whose key bias has outlier channels (Qwen2's): the 64-value block
rotation spreads one huge, nearly constant channel over the whole block, and what the other channels carry is lost
in its quantization steps (Qwen2.5-Coder-1.5B with hlwq4_64 K and V: perplexity 20 -> 19642). The patched llama.cpp
keeps such layers' K at q8_0 whenever an HLWQ K type is asked for (llama_kv_k_outlier_ratio in
ggml_patch's KV cache patch); this module computes the same rule for hlwq-gguf's own messages and memory plan.

The rule: in each 64-channel block of a layer's K, the bias energy of its largest channel against the energy the
weights give the block, sum_c |w_c * gamma|^2 over its channels for RMS-normalised inputs (gamma: the attention
norm's gain). On Qwen2.5-Coder-1.5B the four layers that wreck it score 29-2215 and the other 24 score under 4.

K centering: subtracting one constant vector c from every cached key shifts every score of a query by the same
q . c, so attention does not change; llama.cpp (the K-centering patch) stores k - c in a quantized K cache, with c
the mean over the cache's positions of the keys' constant part after RoPE (`center`): the mean key measured on
text where the file has one (`blk.N.attn_k_mean`, hlwq_gguf.kvcalib; it includes the bias), else the key bias. A
bias of a few hundred on the lowest-frequency RoPE pairs barely turns over the context and is almost all removed;
the rule then weighs what is left of that constant part (`center`'s second result). A sliding-window layer is
centered over the whole context too: its cells hold only the last window, but c must be one constant for all of it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# the llama.cpp default (LLAMA_KV_HLWQ_K_OUTLIER overrides it there, 0 switches the rule off)
OUTLIER_LIMIT = 8.0
# architectures whose RoPE turns channel i with channel i + n_rot/2 (llama.cpp's LLAMA_ROPE_TYPE_NEOX) rather than
# with channel i + 1; the subset hlwq-gguf converts
ROPE_NEOX_ARCHITECTURES = ("qwen2", "qwen3", "gemma3")
# the context llama.cpp's cache is centered for when nothing says otherwise (the K-centering patch uses its size)
DEFAULT_CONTEXT = 4096
CONTEXT_PADDING = 256  # llama_context rounds n_ctx up to this (GGML_PAD(cparams.n_ctx, 256))
# the K type of the layers the rule keeps off a low-bit code
SAFE_K_TYPE = "q8_0"
BLOCK = 64


def _mean_turn(phi: np.ndarray, n_pos: int) -> np.ndarray:
    """mean over p < n_pos of exp(i p phi), elementwise."""
    step = np.exp(1j * phi)
    flat = np.abs(1 - step) < 1e-12
    return np.where(flat, 1.0 + 0j, (1 - np.exp(1j * phi * n_pos)) / np.where(flat, 1.0, (1 - step) * n_pos))


def center(k_bias: np.ndarray, head_dim: int, n_rot: int, freq_base: float, n_pos: int, neox: bool,
           freq_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(c, what the cache still sees of each channel's bias) for one layer's key bias [n_heads_kv * head_dim].

    c = mean_{p < n_pos} R(p theta) b per RoPE pair (theta = freq_scale * freq_base^(-2i/n_rot)); channels RoPE does
    not turn keep c = b and see nothing of it. The second array is mean_p |(R(p theta) b - c)_i|^2.
    """
    bias = k_bias.astype(np.float64).reshape(-1, head_dim)
    c = bias.copy()
    energy = np.zeros_like(bias)
    half = n_rot // 2
    i = np.arange(half)
    first, second = (i, i + half) if neox else (2 * i, 2 * i + 1)
    theta = freq_scale * freq_base ** (-2.0 * i / n_rot)
    turn, turn2 = _mean_turn(theta, n_pos), _mean_turn(2 * theta, n_pos)
    b0, b1 = bias[:, first], bias[:, second]
    c0 = b0 * turn.real - b1 * turn.imag
    c1 = b0 * turn.imag + b1 * turn.real
    cos2, sin2, sincos = 0.5 + 0.5 * turn2.real, 0.5 - 0.5 * turn2.real, 0.5 * turn2.imag
    c[:, first], c[:, second] = c0, c1
    energy[:, first] = np.maximum(0.0, b0 * b0 * cos2 + b1 * b1 * sin2 - 2 * b0 * b1 * sincos - c0 * c0)
    energy[:, second] = np.maximum(0.0, b0 * b0 * sin2 + b1 * b1 * cos2 + 2 * b0 * b1 * sincos - c1 * c1)
    return c.reshape(-1), energy.reshape(-1)


def outlier_ratio(k_weight: np.ndarray, k_bias: np.ndarray, norm_gain: np.ndarray,
                  bias_energy: np.ndarray | None = None) -> float:
    """The rule for one layer: k_weight [n_out, n_in] (HF layout), k_bias [n_out], norm_gain [n_in]; bias_energy
    [n_out] is what the cache sees of the bias per channel (default: all of it, bias^2)."""
    energy = ((k_weight.astype(np.float64) * norm_gain.astype(np.float64)[None, :]) ** 2).sum(axis=1)
    bias = k_bias.astype(np.float64) ** 2 if bias_energy is None else bias_energy
    ratios = [bias[c:c + BLOCK].max() / energy[c:c + BLOCK].sum() if energy[c:c + BLOCK].sum() > 0 else 0.0
              for c in range(0, len(bias) - len(bias) % BLOCK, BLOCK)]
    return float(max(ratios, default=0.0))


def _rope(reader) -> dict:
    """The GGUF's attention shape and RoPE parameters, as llama.cpp reads them."""
    def field(key, default=None):
        value = reader.fields.get(key)
        return default if value is None else value.contents()

    arch = field("general.architecture")
    n_embd, n_head = field(f"{arch}.embedding_length"), field(f"{arch}.attention.head_count")
    head_dim = field(f"{arch}.attention.key_length") or (n_embd // n_head if n_embd and n_head else None)
    scaling = field(f"{arch}.rope.scaling.type", "none")
    factor = field(f"{arch}.rope.scaling.factor", 0.0) or 0.0
    freq_base = field(f"{arch}.rope.freq_base", 10000.0)
    return {"head_dim": head_dim, "n_rot": field(f"{arch}.rope.dimension_count", head_dim),
            "freq_base": freq_base, "freq_base_swa": field(f"{arch}.rope.freq_base_swa", freq_base),
            "neox": arch in ROPE_NEOX_ARCHITECTURES,
            "freq_scale": 1.0 / factor if scaling == "linear" and factor else 1.0}


def layer_ratios(path: str | Path, n_ctx: int | None = DEFAULT_CONTEXT) -> dict[int, float]:
    """outlier_ratio of every layer of a GGUF that has a separate K weight, attention norm and a constant part of its
    keys (a measured mean key, else a K bias), for a cache centered for n_ctx positions (None: not centered,
    LLAMA_KV_K_CENTER=0). Sliding-window layers turn with the file's rope.freq_base_swa where it has one."""
    from . import gguf_files, gguf_types, plan

    gguf = gguf_types.register()
    reader = gguf_files.header_reader(path)
    tensors = {t.name: t for t in reader.tensors}
    rope = _rope(reader)
    sliding = set()
    if rope["freq_base_swa"] != rope["freq_base"]:  # which layers slide matters only then: a second read of the file
        try:
            sliding = {layer.index for layer in plan.read_layout(path).attention if layer.sliding}
        except ValueError:  # a layout the plan cannot read: no sliding layers known
            pass

    def values(name: str) -> np.ndarray:
        tensor = tensors[name]
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        return np.asarray(data, dtype=np.float32).reshape([int(n) for n in reversed(tensor.shape)])

    ratios = {}
    layer = 0
    while f"blk.{layer}.attn_norm.weight" in tensors or f"blk.{layer}.attn_k.weight" in tensors:
        offset = next((name for name in (f"blk.{layer}.attn_k_mean", f"blk.{layer}.attn_k.bias") if name in tensors),
                      None)
        names = [f"blk.{layer}.attn_k.weight", offset, f"blk.{layer}.attn_norm.weight"]
        if all(name in tensors for name in names):
            weight, bias, gain = (values(name) for name in names)
            if weight.ndim == 2 and bias.shape == (weight.shape[0],) and gain.shape == (weight.shape[1],) \
                    and weight.shape[0] % BLOCK == 0:
                seen = None
                if n_ctx is not None and rope["head_dim"] and bias.size % rope["head_dim"] == 0:
                    swa = layer in sliding
                    seen = center(bias, rope["head_dim"], rope["n_rot"],
                                  rope["freq_base_swa"] if swa else rope["freq_base"], n_ctx, rope["neox"],
                                  rope["freq_scale"])[1]
                ratios[layer] = outlier_ratio(weight, bias, gain, seen)
        layer += 1
    return ratios


def centering(n_ctx: int | None = DEFAULT_CONTEXT) -> int | None:
    """The positions llama.cpp centers a quantized K cache for asked for n_ctx: its cache size, which llama_context
    rounds up to a multiple of CONTEXT_PADDING; None where LLAMA_KV_K_CENTER=0 turns it off."""
    if n_ctx is None or os.environ.get("LLAMA_KV_K_CENTER", "1").strip() == "0":
        return None
    return -(-n_ctx // CONTEXT_PADDING) * CONTEXT_PADDING


def safe_k_layers(path: str | Path, limit: float | None = None, n_ctx: int | None = DEFAULT_CONTEXT) -> list[int]:
    """The layers whose K llama.cpp keeps at SAFE_K_TYPE when an HLWQ K type is asked for, with a cache of n_ctx."""
    if limit is None:
        limit = float(os.environ.get("LLAMA_KV_HLWQ_K_OUTLIER", OUTLIER_LIMIT))
    if limit <= 0:
        return []
    return sorted(layer for layer, ratio in layer_ratios(path, centering(n_ctx)).items() if ratio > limit)


def is_hlwq(kv_type: str) -> bool:
    return kv_type.lower().startswith("hlwq")


# the K type `--kv` gives with an HLWQ type of fewer bits: K carries the scores, which softmax sharpens, and a 3-bit K
# has 2.7-4.5x a 4-bit K's KL divergence on SmolLM2-135M and Gemma-3-270M (hlwq3 against hlwq4/hlwq3 V, with or
# without mean keys: 0.144 against 0.064 and 0.231 against 0.080 with them; docs/BENCHMARKS.md), above 0.1 on both,
# while V's bits are cheap (hlwq4/hlwq3 against hlwq4: 1.1-1.8x)
LOW_BIT_K_FLOOR = "hlwq4"


def _hlwq_bits(kv_type: str) -> int:
    return int(kv_type.lower().removeprefix("hlwq").split("_")[0])


def kv_pair(kv_type: str, path: str | Path | None = None) -> tuple[str, str, str | None]:
    """(K type, V type, note) that hlwq-gguf's `--kv kv_type` means for the GGUF at `path`: kv_type for both, except
    that an HLWQ type under LOW_BIT_K_FLOOR's bits keeps K at LOW_BIT_K_FLOOR, and the note (one line) says so;
    `--kv-k` sets K as given. On a file whose 3-bit K was calibrated per layer (hlwq.kv_k_bits, hlwq_gguf.kvbits)
    hlwq3 is hlwq3_64 for both, which llama.cpp then gives 3 or 4 bits per layer, and the note says that. An MLA
    cache stores V as a view of K, so there both stay kv_type."""
    if not is_hlwq(kv_type) or _hlwq_bits(kv_type) >= _hlwq_bits(LOW_BIT_K_FLOOR):
        return kv_type, kv_type, None
    if path is not None:
        from . import kvbench, plan

        try:
            layout = plan.read_layout(path)
        except ValueError:  # a layout the plan cannot read: the open or the plan says why
            layout = None
        if layout is not None and all(layer.v_width == 0 for layer in layout.attention):
            return kv_type, kv_type, None
        digits = plan.calibrated_k_bits(layout) if layout is not None else ""
        if digits and plan.KV_TYPE_ALIASES.get(kv_type.lower(), kv_type.lower()) == "hlwq3_64":
            bits = kvbench.layer_bits_per_value(layout, "hlwq3_64", "hlwq3_64", safe_k_layers(path))
            return kv_type, kv_type, (
                f"K is 3-bit in {digits.count('3')} and 4-bit in {digits.count('4')} layers of {Path(path).name}, "
                f"as kv-calibrate measured their cost, with a {kv_type} V: {bits:.2f} bits per value "
                f"(--kv-k {kv_type} forces 3 bits in all)")
    return LOW_BIT_K_FLOOR, kv_type, (
        f"K is {LOW_BIT_K_FLOOR} with a {kv_type} V: a {_hlwq_bits(kv_type)}-bit K has 2.7-4.5x the KL divergence of a "
        f"4-bit one on SmolLM2-135M and Gemma-3-270M (--kv-k {kv_type} forces it)")


def calibration_hint(path: str | Path, type_k: str) -> str | None:
    """One line for a quantized K cache on a GGUF that gives llama.cpp nothing to center K on in any layer (no
    measured mean keys, no key bias): `hlwq-gguf kv-calibrate` adds them; None otherwise."""
    from . import gguf_files

    if type_k.lower() in ("f16", "f32", "bf16"):
        return None
    names = {t.name for t in gguf_files.header_reader(path).tensors}
    if any(name.endswith((".attn_k_mean", ".attn_k.bias")) for name in names):
        return None
    return (f"{Path(path).name} has no mean keys, so llama.cpp stores the {type_k} K uncentered: `hlwq-gguf "
            f"kv-calibrate {Path(path).name} OUT.gguf` adds them (a 4-bit K's KL divergence falls 26-29 % on "
            f"SmolLM2-135M and Gemma-3-270M)")


def k_type_note(path: str | Path, kv_type: str, n_ctx: int | None = DEFAULT_CONTEXT) -> str | None:
    """The one line to say when an HLWQ K type was asked for and some layers keep K at q8_0 with a cache of n_ctx;
    None otherwise."""
    if not is_hlwq(kv_type):
        return None
    layers = safe_k_layers(path, n_ctx=n_ctx)
    if not layers:
        return None
    which = f"layer {layers[0]}" if len(layers) == 1 else f"layers {', '.join(map(str, layers))}"
    positions = centering(n_ctx)
    why = "" if positions is None else f"RoPE turns too fast to center over {positions} positions and "
    return (f"K stays {SAFE_K_TYPE} instead of {kv_type} in {which} of {Path(path).name}: its key bias has outlier "
            f"channels that {why}a low-bit code destroys (--kv-k {kv_type} forces it)")
