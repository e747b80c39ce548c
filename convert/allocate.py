"""Bits per tensor for a target size, from measured sensitivity (`hlwq-gguf convert --target-bpw`).

Every quantized matrix starts at the base width b (the widest HLWQ type whose pure bpw fits the target); the
budget left then buys b + 1 bits for whole tensor categories (attn_v, ffn_down, token_embd, ... as
llama-quantize names them), best KL-divergence gain per byte first. A category's gain is measured, not guessed:
the model is coded at b with that one category at b + 1, and llama-perplexity's KLD against the full-precision
model on a few chunks of the calibration text is compared with the all-b model's. The last category that does
not fit whole is upgraded tensor by tensor, in layer order.

A weighted-error proxy alone (relative output error per tensor, no measurement) was tried first and lost to the
fixed HLWQ5_M rule on SmolLM2: it ranks the tied embedding as cheap to cut and sends it to 3 bits
(docs/BENCHMARKS.md, "Closing the gap to the K-quants").
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hlwq_gguf import codec, recipes

from .source import ConversionError

MIN_BITS, MAX_BITS = 3, 6
SENSITIVITY_CHUNKS = 4


@dataclass
class CategoryGain:
    category: str
    tensors: list[str]
    extra_bytes: int  # what b + 1 bits cost over b for the whole category
    kld_gain: float  # KLD(all at b) - KLD(this category at b + 1)


def tensor_category(name: str) -> str:
    """blk.N.attn_v.weight -> attn_v; token_embd.weight -> token_embd (one knob for every layer's tensor)."""
    match = re.match(r"blk\.\d+\.(.+)\.weight$", name)
    return match.group(1) if match else name.removesuffix(".weight")


def base_bits(target_bpw: float) -> int:
    """The widest HLWQ width whose pure files (b + 0.125 bpw with 128-blocks) fit `target_bpw`."""
    bits = int(np.floor(target_bpw - 0.125 + 1e-9))
    if bits < MIN_BITS:
        raise ConversionError(f"--target-bpw {target_bpw:g} is below HLWQ{MIN_BITS}'s {MIN_BITS + 0.125} bits per weight")
    return min(bits, MAX_BITS)


def _row_bytes(name: str, shape: tuple[int, ...], bits: int) -> int:
    type_name = recipes.tensor_type(recipes.Recipe("", 0, bits), name, shape)
    if type_name is None:
        return 0
    block = codec.BLOCK_TYPES.get(type_name.upper())
    rows = int(np.prod(shape[:-1]))
    if block is None:  # a legacy fallback (q8_0/f16) does not change with the bit width
        return 0
    return rows * shape[-1] // block.block_size * block.type_size


def solve(gains: list[CategoryGain], budget_bytes: int, tensor_order: dict[str, list[str]],
          extra_bytes_of: dict[str, int]) -> set[str]:
    """The tensors that get b + 1 bits: whole categories by gain per byte, then part of the next one that fits.

    Categories whose measured gain is not positive (within the noise of a few chunks) come last but still take
    what budget is left: the size asked for is what the file gets.
    """
    upgraded: set[str] = set()
    left = budget_bytes
    for gain in sorted(gains, key=lambda g: g.kld_gain / max(g.extra_bytes, 1), reverse=True):
        if gain.extra_bytes <= left:
            upgraded.update(gain.tensors)
            left -= gain.extra_bytes
            continue
        for name in tensor_order[gain.category]:
            if extra_bytes_of[name] <= left:
                upgraded.add(name)
                left -= extra_bytes_of[name]
    return upgraded


def allocate(source: Path, target_bpw: float, *, imatrix: Path | None, equalize: bool, threads: int | None,
             log=print) -> tuple[str, dict[str, int], list[CategoryGain]]:
    """(base recipe, bits per tensor, measured gains) for coding the full-precision GGUF `source` at `target_bpw`
    bits per quantized-matrix weight."""
    import gguf

    from hlwq_gguf import build as builder
    from hlwq_gguf import gguf_files, gguf_types, llama_tools, textdata

    from .requantize import requantize_gguf

    gguf_types.register(gguf)
    bits = base_bits(target_bpw)
    recipe = f"hlwq{bits}"
    reader = gguf_files.read_gguf(source)
    shapes = {t.name: gguf_types.numpy_shape(t) for t in reader.tensors}
    tied = "output.weight" not in shapes
    quantized = {n: s for n, s in shapes.items()
                 if recipes.tensor_type(recipes.RECIPES[recipe], n, s, tied_embeddings=tied) is not None}
    params = sum(int(np.prod(s)) for s in quantized.values())
    base_bytes = sum(_row_bytes(n, s, bits) for n, s in quantized.items())
    budget = int(target_bpw * params / 8) - base_bytes
    if bits == MAX_BITS or budget <= 0:
        return recipe, {n: bits for n in quantized}, []
    extra_bytes_of = {n: _row_bytes(n, s, bits + 1) - _row_bytes(n, s, bits) for n, s in quantized.items()}
    by_category: dict[str, list[str]] = {}
    for name in quantized:
        by_category.setdefault(tensor_category(name), []).append(name)

    build = builder.ensure_build()
    text = textdata.calibration_text_file()
    gains = []
    with tempfile.TemporaryDirectory(prefix=".hlwq-allocate-") as work:
        work = Path(work)
        kld_base = work / "base.kld"
        llama_tools.perplexity(build, source, text, ctx=512, chunks=SENSITIVITY_CHUNKS, save_kld_base=kld_base,
                               threads=threads)

        def kld_with(upgrade: list[str]) -> float:
            out = work / "probe.gguf"
            requantize_gguf(source, out, recipe, imatrix=imatrix, equalize=equalize, threads=threads, quiet=True,
                            bits_for={n: bits + 1 for n in upgrade})
            return llama_tools.perplexity(build, out, text, ctx=512, chunks=SENSITIVITY_CHUNKS, kld_base=kld_base,
                                          threads=threads).kld_mean

        floor = kld_with([])
        log(f"HLWQ{bits}: KLD {floor:.5f} on {SENSITIVITY_CHUNKS} calibration chunks")
        for category, names in by_category.items():
            extra = sum(extra_bytes_of[n] for n in names)
            if extra == 0:
                continue
            kld = kld_with(names)
            gains.append(CategoryGain(category, names, extra, floor - kld))
            log(f"  {category} at {bits + 1} bits: KLD {kld:.5f} (+{extra / 1e6:.2f} MB)")
    upgraded = solve(gains, budget, by_category, extra_bytes_of)
    return recipe, {n: bits + (n in upgraded) for n in quantized}, gains
