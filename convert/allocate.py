"""Bits per tensor for a target size, from measured sensitivity (`hlwq-gguf convert --target-bpw`).

Every quantized matrix starts at the base width b (the widest HLWQ type whose pure bpw fits the target); the
budget left then buys b + 1 bits for whole tensor categories (attn_v, ffn_down, token_embd, ... as
llama-quantize names them), best KL-divergence gain per byte first. A category's gain is measured, not guessed:
the model is coded at b with that one category at b + 1, and llama-perplexity's KLD against the full-precision
model on a few chunks of the calibration text is compared with the all-b model's. The last category that does
not fit whole is upgraded tensor by tensor, in layer order.

Each tensor's code depends only on its own weights (and the equalization plan, which is the same at every
width), so the model is coded twice, at b and at b + 1, and every probe, and the result, is composed from the two
files tensor by tensor (`compose`): the same bytes as coding the mix directly, at the cost of two codings instead
of one per category. `parts_dir` keeps both codings and the measured gains for the next target with the same b.

A weighted-error proxy alone (relative output error per tensor, no measurement) was tried first and lost to the
fixed HLWQ5_M rule on SmolLM2: it ranks the tied embedding as cheap to cut and sends it to 3 bits
(docs/BENCHMARKS.md, "Closing the gap to the K-quants").
"""
from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hlwq_gguf import codec, recipes, upstream

from .source import ConversionError

MIN_BITS, MAX_BITS = 3, 6
SENSITIVITY_CHUNKS = 4


@dataclass
class CategoryGain:
    category: str
    tensors: list[str]
    extra_bytes: int  # what b + 1 bits cost over b for the whole category
    kld_gain: float  # KLD(all at b) - KLD(this category at b + 1)


def allocation_category(name: str) -> str:
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


def compose(narrow: Path, wide: Path, upgraded: set[str], output: Path) -> dict[str, int]:
    """Write `output`: `narrow`'s metadata and tensors, except those named in `upgraded`, taken from `wide` (the
    same model coded at a wider width). Returns {type: count} of the quantized tensors written."""
    import gguf

    from hlwq_gguf import gguf_files, gguf_types

    from .requantize import FULL_PRECISION_TYPES, add_tensor_info, copy_field
    from .sink import staged_output

    gguf_types.register(gguf)
    base, other = gguf_files.read_gguf(narrow), gguf_files.read_gguf(wide)
    wide_tensors = {t.name: t for t in other.tensors}
    missing = upgraded - wide_tensors.keys()
    if missing:
        raise ConversionError(f"{wide}: no tensor {sorted(missing)[0]} to take")
    chosen = [wide_tensors[t.name] if t.name in upgraded else t for t in base.tensors]
    types: dict[str, int] = {}
    with staged_output(output) as tmp:
        writer = gguf.GGUFWriter(tmp, base.fields["general.architecture"].contents())
        for field in base.fields.values():
            copy_field(writer, field)
        for t in chosen:
            add_tensor_info(writer, t.name, gguf_types.numpy_shape(t), t.tensor_type)
            if t.tensor_type.name not in FULL_PRECISION_TYPES:
                name = t.tensor_type.name.lower()
                types[name] = types.get(name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in chosen:
            writer.write_tensor_data(np.ascontiguousarray(t.data))
        writer.close()
    return types


def allocate(source: Path, target_bpw: float, *, imatrix: Path | None, equalize: bool, threads: int | None,
             log=print, output: Path | None = None, parts_dir: Path | None = None,
             smooth_keys: bool | None = None) -> tuple[str, dict[str, int], list[CategoryGain], dict | None]:
    """(base recipe, bits per tensor, measured gains, conversion stats) for coding the full-precision GGUF `source`
    at `target_bpw` bits per quantized-matrix weight; with `output`, that file is written too (the stats are
    requantize_gguf's for it, else None). `parts_dir` keeps the codings at b and b + 1 and the gains for reuse."""
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
    convert_options = {"imatrix": imatrix, "equalize": equalize, "threads": threads, "quiet": True,
                       "smooth_keys": smooth_keys}
    if bits == MAX_BITS or budget <= 0:
        stats = requantize_gguf(source, output, recipe, **convert_options) if output else None
        return recipe, {n: bits for n in quantized}, [], stats
    extra_bytes_of = {n: _row_bytes(n, s, bits + 1) - _row_bytes(n, s, bits) for n, s in quantized.items()}
    by_category: dict[str, list[str]] = {}
    for name in quantized:
        by_category.setdefault(allocation_category(name), []).append(name)

    build = builder.ensure_build()
    text = textdata.calibration_text_file()
    with tempfile.TemporaryDirectory(prefix=".hlwq-allocate-", dir=output.parent if output else None) as work:
        work = Path(work)
        keep = Path(parts_dir) if parts_dir else work
        keep.mkdir(parents=True, exist_ok=True)
        key = _parts_key(source, imatrix, equalize, smooth_keys, bits)
        narrow, wide, gains_file, stats_file = (keep / f"allocate-{key}-{name}" for name in (
            f"hlwq{bits}.gguf", f"hlwq{bits + 1}.gguf", "gains.json", "stats.json"))
        for part, part_recipe in ((narrow, recipe), (wide, f"hlwq{bits + 1}")):
            if not part.exists():
                log(f"coding every matrix at {part_recipe.upper()}")
                part_stats = requantize_gguf(source, part, part_recipe, **convert_options)
                if part == narrow:
                    stats_file.write_text(json.dumps(part_stats))
        if gains_file.exists():
            gains = [CategoryGain(**g) for g in json.loads(gains_file.read_text())]
        else:
            gains = _measure_gains(build, source, text, narrow, wide, by_category, extra_bytes_of, bits, work, threads,
                                   log)
            gains_file.write_text(json.dumps([asdict(g) for g in gains]))
        upgraded = solve(gains, budget, by_category, extra_bytes_of)
        stats = None
        if output:
            stats = {**json.loads(stats_file.read_text()), "types": compose(narrow, wide, upgraded, output)}
    return recipe, {n: bits + (n in upgraded) for n in quantized}, gains, stats


def _measure_gains(build, source: Path, text: Path, narrow: Path, wide: Path, by_category: dict[str, list[str]],
                   extra_bytes_of: dict[str, int], bits: int, work: Path, threads: int | None, log) -> list[CategoryGain]:
    """KLD(all at b) - KLD(one category at b + 1) for every category, on SENSITIVITY_CHUNKS calibration chunks."""
    from hlwq_gguf import llama_tools

    kld_base = work / "base.kld"
    llama_tools.perplexity(build, source, text, ctx=512, chunks=SENSITIVITY_CHUNKS, save_kld_base=kld_base,
                           threads=threads)

    def kld_of(model: Path) -> float:
        return llama_tools.perplexity(build, model, text, ctx=512, chunks=SENSITIVITY_CHUNKS, kld_base=kld_base,
                                      threads=threads).kld_mean

    floor = kld_of(narrow)
    log(f"HLWQ{bits}: KLD {floor:.5f} on {SENSITIVITY_CHUNKS} calibration chunks")
    gains = []
    probe = work / "probe.gguf"
    for category, names in by_category.items():
        extra = sum(extra_bytes_of[n] for n in names)
        if extra == 0:
            continue
        compose(narrow, wide, set(names), probe)
        kld = kld_of(probe)
        gains.append(CategoryGain(category, names, extra, floor - kld))
        log(f"  {category} at {bits + 1} bits: KLD {kld:.5f} (+{extra / 1e6:.2f} MB)")
    return gains


def _parts_key(source: Path, imatrix: Path | None, equalize: bool, smooth_keys: bool | None, bits: int) -> str:
    """What the codings at b and b + 1 depend on: the source and imatrix files (name, size, mtime) and options."""
    def identity(path):
        if path is None:
            return None
        stat = Path(path).stat()
        return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]

    # the quantizer lives in the patch series
    what = json.dumps([identity(source), identity(imatrix), equalize, smooth_keys, bits, upstream.patch_series_hash()])
    return hashlib.sha256(what.encode()).hexdigest()[:12]
