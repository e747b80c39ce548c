#!/usr/bin/env python3
"""What a lossless import is worth: a reference-coded checkpoint imported vs re-quantized, KLD against F32.

    python scripts/import_vs_requantize.py [MODEL] [--chunks 8]

On a registry model (default gemma3-270m: every row width a multiple of 128, so every block can be copied):
  1. emulate the reference quantizer (table A, raw-norm scale, 5 bits) into its "dot" checkpoint layout
     (hlwq_gguf/testing/reference_checkpoints.py; the codes match the reference's own on >= 99.999 % of weights);
  2. import it with `hlwq-gguf convert` (codes copied: HLWQ5_A);
  3. what users do without an import: dequantize that checkpoint to BF16 and quantize again, with our HLWQ5 and
     with the reference's own quantizer again;
  4. and, for scale, our HLWQ5 from the original weights.
All are measured with llama-perplexity against the F32 GGUF of the original weights, in one run, same text.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from convert import convert_checkpoint  # noqa: E402
from hlwq_gguf import bench, build as builder, gguf_stats, llama_tools, textdata  # noqa: E402
from hlwq_gguf.testing.reference_checkpoints import write_dot_checkpoint  # noqa: E402


def _bf16_folder(source: Path, target: Path, weights: dict[str, np.ndarray]) -> Path:
    """`source` with the given weights replaced (BF16), as a dequantized release would be saved."""
    import torch
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, target / item.name)
    tensors = load_file(str(source / "model.safetensors"))
    tensors.update({name: torch.from_numpy(np.ascontiguousarray(values)).to(torch.bfloat16) for name, values in weights.items()})
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="gemma3-270m")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=512)
    args = parser.parse_args()

    build = builder.ensure_build()
    reference, checkpoint, workdir = bench.reference_and_checkpoint(args.model, "f32", print)
    work = workdir / "import-vs-requantize"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()

    print("emulating the reference quantizer (table A, 5 bits)")
    expected = write_dot_checkpoint(checkpoint, work / "reference-q5")
    variants = {"imported (codes copied)": convert_checkpoint(work / "reference-q5", work / "imported.gguf", quiet=True)}
    dequantized = _bf16_folder(checkpoint, work / "reference-q5-bf16", expected)
    variants["re-quantized, HLWQ5"] = convert_checkpoint(dequantized, work / "requant-hlwq5.gguf", quiet=True)
    write_dot_checkpoint(dequantized, work / "requant-reference-q5")
    variants["re-quantized, reference quantizer"] = convert_checkpoint(work / "requant-reference-q5", work / "requant-reference.gguf", quiet=True)
    variants["HLWQ5 from the original"] = convert_checkpoint(checkpoint, work / "hlwq5.gguf", quiet=True)

    text = textdata.measurement_text_file()
    base = work / "f32.kld"
    f32 = llama_tools.perplexity(build, reference, text, ctx=args.ctx, chunks=args.chunks, save_kld_base=base)
    rows = [("F32", reference, f32, None)]
    for name, report in variants.items():
        print(f"measuring {name}")
        quality = llama_tools.perplexity(build, report.output, text, ctx=args.ctx, chunks=args.chunks, kld_base=base)
        rows.append((name, report.output, quality, report))
    results = []
    print(f"\n{args.model}, {args.chunks} x {args.ctx} tokens, KLD against F32\n")
    print("| variant | bpw (matrices) | copied blocks | PPL | mean KLD | KLD p99 | same top % |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, path, q, report in rows:
        stats = gguf_stats.gguf_stats(path)
        copied = "" if report is None or not report.import_format else \
            f"{sum(t['copied'] for t in report.imported_tensors)}/{sum(t['blocks'] for t in report.imported_tensors)}"
        bpw = "32" if name == "F32" else f"{stats.matrix_bpw:.3f}"
        print(f"| {name} | {bpw} | {copied} | {q.ppl:.3f} | {_num(q.kld_mean, '.4f')} | {_num(q.kld_p99, '.4f')} | {_num(q.same_top_p, '.2f')} |")
        results.append({"variant": name, "bpw_matrices": stats.matrix_bpw, "copied": copied, "ppl": q.ppl, "kld_mean": q.kld_mean,
                        "kld_p99": q.kld_p99, "same_top_p": q.same_top_p})
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n{work / 'results.json'}")


if __name__ == "__main__":
    main()
