#!/usr/bin/env python3
"""Converter throughput beside llama-quantize's Q5_K_M: same model, same machine, same run.

For each HLWQ recipe, `hlwq-gguf convert` of the model's HF checkpoint (read, quantize in the patched ggml, write;
convert.convert_checkpoint) and llama-quantize of its F32 GGUF to the same file type; llama-quantize's Q5_K_M of
that GGUF is the yardstick. Prints the quantizing rate (M weights/s of the quantized matrices), the wall time and
the converter's peak anonymous memory, with each time as a ratio to Q5_K_M's; writes results.json and results.md.

  python scripts/converter_speed.py smollm2-135m -o docs/bench/converter-speed
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPES = ("hlwq4", "hlwq5", "hlwq6", "hlwq5_m")


def measure(model: str, recipes, threads: int, log=print) -> dict:
    """Time every conversion once, in a temporary folder; returns the rows and the machine line."""
    from convert import convert_checkpoint
    from hlwq_gguf import bench, gguf_stats, llama_tools
    from hlwq_gguf.build import ensure_build

    build = ensure_build()
    reference, checkpoint, _ = bench.reference_and_checkpoint(model, "f32", log)
    rows = []
    with tempfile.TemporaryDirectory(prefix="converter-speed-") as tmp:
        def timed_quantize(ftype: str) -> dict:
            out = Path(tmp) / f"{ftype}.gguf"
            started = time.perf_counter()
            llama_tools.llama_quantize(build, reference, out, ftype, threads=threads)
            seconds = time.perf_counter() - started
            weights = gguf_stats.gguf_stats(out).matrix_params  # the elements a quantizer had to code
            out.unlink()
            return {"tool": "llama-quantize", "type": ftype, "weights": weights, "wall_s": seconds,
                    "mweights_per_s": weights / seconds / 1e6}

        rows.append(timed_quantize("Q5_K_M"))
        log(f"Q5_K_M: {rows[-1]['wall_s']:.1f} s")
        for recipe in recipes:
            if checkpoint is not None and recipe != "hlwq5_m":
                out = Path(tmp) / f"{recipe}.gguf"
                report = convert_checkpoint(checkpoint, out, recipe=recipe, quiet=True, threads=threads)
                out.unlink()
                rows.append({"tool": "hlwq-gguf convert", "type": recipe.upper(), "weights": report.weights_quantized,
                             "wall_s": report.wall_seconds, "quantize_s": report.quantize_seconds,
                             "mweights_per_s": report.mweights_per_second,
                             "peak_anon_mib": report.peak_anon_bytes / 2**20})
                log(f"convert {recipe}: {report.mweights_per_second:.1f} M weights/s, {report.wall_seconds:.1f} s")
            rows.append(timed_quantize(recipe.upper()))
            log(f"llama-quantize {recipe.upper()}: {rows[-1]['wall_s']:.1f} s")
    base = rows[0]["wall_s"]
    for row in rows:
        row["wall_vs_q5_k_m"] = row["wall_s"] / base
    return {"model": model, "machine": llama_tools.machine_description(), "build": build.version_line(), "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"**{result['model']}**: {result['machine']}; {result['build']}", "",
             "| tool | type | M weights | M weights/s (quantizing) | wall s | wall vs Q5_K_M | peak anon MiB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        peak = f"{r['peak_anon_mib']:.0f}" if "peak_anon_mib" in r else ""
        lines.append(f"| {r['tool']} | {r['type']} | {r['weights'] / 1e6:.1f} | {r['mweights_per_s']:.1f} | "
                     f"{r['wall_s']:.1f} | {r['wall_vs_q5_k_m']:.2f}x | {peak} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from hlwq_gguf import llama_tools

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m", help="a model name, HF folder or hub id")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="HLWQ recipes, comma-separated")
    parser.add_argument("-t", "--threads", type=int, default=llama_tools.default_threads())
    parser.add_argument("-o", "--out", type=Path, help="folder for results.json and results.md")
    args = parser.parse_args()
    result = measure(args.model, [r.strip().lower() for r in args.recipes.split(",") if r.strip()], args.threads)
    table = markdown(result)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "results.md").write_text(table)


if __name__ == "__main__":
    main()
