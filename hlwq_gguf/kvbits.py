"""Which layers keep a 4-bit K in a 3-bit HLWQ cache, measured through llama.cpp (`hlwq.kv_k_bits`).

A 3-bit K costs layers very unequally: on Gemma-3-270M one of its global layers alone adds 0.068 to the cache's KL
divergence, most others under 0.005, three even lower it (one run each, K 3-bit in that layer only, 4-bit elsewhere,
V hlwq3_64; docs/BENCHMARKS.md). So a cache of K and V at 3.5 bits per value on average does best with a 3-bit K in
the layers it hurts least and a 4-bit K in the rest. This module measures that per layer on the calibration text,
with llama-perplexity's KL divergence against the f16 cache (K 3-bit in one layer at a time), chooses the cheapest
layers until the cache fits the asked bits per value, and writes the choice as one digit per layer to the GGUF key
`hlwq.kv_k_bits`. The patched llama.cpp applies it whenever hlwq3_64 is asked for K (LLAMA_KV_HLWQ_K_BITS
replaces it, 0 switches it off); hlwq-gguf's `--kv hlwq3` then asks for it.

The single-layer costs do not add up exactly (nine cheapest layers of Gemma-3: +0.018 measured together against
+0.009 summed), so the choice is a greedy one by measured cost, not an optimum.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

K_BITS_KEY = "hlwq.kv_k_bits"
K_BITS_ENV = "LLAMA_KV_HLWQ_K_BITS"
LOW_K, V_TYPE = "hlwq3_64", "hlwq3_64"  # the digit 4 gives a layer hlwq4_64
DEFAULT_BITS_PER_VALUE = 3.5
# each run of the calibration: 2 chunks of 2048 tokens of the calibration text
DEFAULT_CTX, DEFAULT_CHUNKS = 2048, 2


class KBitsError(ValueError):
    """A model or budget the per-layer K choice cannot use (one line, naming the file)."""


@dataclass
class LayerKBits:
    """One digit per layer (3 or 4; layers without a cache 4), with what they were chosen from."""

    digits: str
    bits_per_value: float       # of the whole K and V cache with these digits
    base_kld: float             # K 4-bit in every layer, V hlwq3_64
    costs: dict[int, float]     # KLD with K 3-bit in that layer only, minus base_kld
    text: str

    @property
    def n_low(self) -> int:
        return self.digits.count("3")


def digits_of(layout, low_layers) -> str:
    """The hlwq.kv_k_bits digits for a layout with a 3-bit K in `low_layers`."""
    return "".join("3" if il in low_layers else "4" for il in range(layout.n_layer_all))


def choose(layout, costs: dict[int, float], bits_per_value: float, safe_k_layers=()) -> tuple[str, float]:
    """(digits, the cache's bits per value) with a 3-bit K in the layers of least cost until the cache fits
    bits_per_value; KBitsError where even a 3-bit K everywhere does not."""
    from . import kvbench

    low: list[int] = []

    def cache_bits() -> float:
        return kvbench.layer_bits_per_value(layout, LOW_K, V_TYPE, safe_k_layers, k_bits=digits_of(layout, low))

    for layer in sorted(costs, key=lambda il: (costs[il], il)):
        if cache_bits() <= bits_per_value + 1e-9:
            break
        low.append(layer)
    bits = cache_bits()
    if bits > bits_per_value + 1e-9:
        raise KBitsError(f"{layout.path}: no mix of 3- and 4-bit K with a {V_TYPE} V fits {bits_per_value} bits per "
                         f"value (a 3-bit K in every layer gives {bits:.3f})")
    return digits_of(layout, low), bits


def check(model: str | Path, bits_per_value: float, ctx: int | None = None):
    """(layout, the layers to measure, the layers whose K the outlier rule keeps at q8_0) of `model`; KBitsError,
    naming it, where its KV rows are not 64-value blocks or no mix of 3- and 4-bit K fits bits_per_value, so that
    an impossible budget fails before any run."""
    from . import kvcache, plan

    layout = plan.read_layout(model)
    if not layout.attention or any(layer.k_width % kvcache.BLOCK or layer.v_width % kvcache.BLOCK
                                   for layer in layout.attention):
        raise KBitsError(f"{model}: per-layer K bits need KV rows that are multiples of {kvcache.BLOCK}")
    safe = tuple(kvcache.safe_k_layers(model, n_ctx=ctx or DEFAULT_CTX))
    layers = [layer.index for layer in layout.attention if layer.index not in safe]
    choose(layout, dict.fromkeys(layers, 0.0), bits_per_value, safe)
    return layout, layers, safe


def measure(model: str | Path, bits_per_value: float = DEFAULT_BITS_PER_VALUE, *, text: str | Path | None = None,
            ctx: int | None = None, chunks: int | None = None, threads: int | None = None,
            progress: bool = True) -> LayerKBits:
    """Measure every cached layer's cost of a 3-bit K on `model` (a GGUF, best with mean keys: hlwq_gguf.kvcalib)
    and choose the digits for a cache of `bits_per_value` (see the module docstring); each run scores `chunks`
    chunks of `ctx` tokens (default DEFAULT_CHUNKS of DEFAULT_CTX)."""
    import tempfile

    from tqdm import tqdm

    from . import build as builder, llama_tools, textdata

    model = Path(model)
    ctx, chunks = ctx or DEFAULT_CTX, chunks or DEFAULT_CHUNKS
    layout, layers, safe = check(model, bits_per_value, ctx)
    text_path = Path(text) if text is not None else textdata.calibration_text_file()
    build = builder.ensure_build()
    cache = ["-fa", "on", "-ctk", LOW_K, "-ctv", V_TYPE]
    all_high = digits_of(layout, ())
    with tempfile.TemporaryDirectory(prefix="hlwq-kvbits-") as tmp:
        base = Path(tmp) / "f16.kld"
        steps = tqdm(total=len(layers) + 2, desc="K bits per layer", unit="run", disable=not progress)

        def kld(env=None, save=False) -> float:
            q = llama_tools.perplexity(build, model, text_path, ctx=ctx, chunks=chunks, threads=threads,
                                       **({"save_kld_base": base} if save else {"kld_base": base}),
                                       extra=["-fa", "on"] if save else cache, env=env)
            steps.update()
            return 0.0 if save else q.kld_mean

        kld(save=True)
        base_kld = kld({K_BITS_ENV: all_high})
        costs = {il: kld({K_BITS_ENV: digits_of(layout, (il,))}) - base_kld for il in layers}
        steps.close()
    digits, bits = choose(layout, costs, bits_per_value, safe)
    return LayerKBits(digits, bits, base_kld, costs, text_path.name)
