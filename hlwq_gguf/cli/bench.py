"""`hlwq-gguf bench`: HLWQ against llama.cpp's quants, quality and speed, in one run."""
from __future__ import annotations

from pathlib import Path

import click

from convert.source import ConversionError
from hlwq_gguf import bench as benchmark
from hlwq_gguf import build, kvbench, llama_tools, models, recipes


def _names(value: str | None) -> tuple[str, ...] | None:
    return tuple(part.strip() for part in value.split(",") if part.strip()) if value else None


@click.command()
@click.argument("source", default=models.DEFAULT_MODEL)
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where results.json, results.md and the plots go (default: ./bench-<model>).")
@click.option("--quick", is_flag=True, help="A few-minute run: Q5_K_M, Q4_K_M, HLWQ5, HLWQ5_M, short text and benches.")
@click.option("--imatrix", is_flag=True, help="Compute an importance matrix on the calibration text and give it to the "
              "K/IQ quants and the HLWQ variants (channel equalization).")
@click.option("--protocol", type=click.Choice(["kld", "polarquant"]), default="kld", show_default=True,
              help="kld: KL-divergence vs the reference; polarquant: the reference implementation's strided PPL.")
@click.option("--quants", help=f"llama.cpp quants, comma-separated (default: {','.join(benchmark.LLAMA_QUANTS)}).")
@click.option("--recipes", "hlwq", help=f"HLWQ recipes, comma-separated (default: {','.join(benchmark.HLWQ_RECIPES)}; "
              f"known: {','.join(recipes.RECIPES)}; add +eq for weights-only channel equalization, e.g. hlwq5+eq).")
@click.option("--ctx", type=int, help="Tokens per perplexity chunk (default 512, --quick 256).")
@click.option("--chunks", type=int, help="Perplexity chunks (default 16, --quick 4; polarquant: windows, default 30).")
@click.option("--rounds", type=int, help="Interleaved llama-bench rounds (default 5, --quick 1; 0: quality only).")
@click.option("-t", "--threads", type=int, help="Threads for every tool (default: all cores).")
@click.option("--reference-type", type=click.Choice(["f32", "f16", "bf16"]), default="f32", show_default=True,
              help="Type of the full-precision reference GGUF built from a checkpoint.")
@click.option("--kv", is_flag=True, help="Compare KV-cache types instead of weight types (ctx default 2048, 4 chunks).")
@click.option("--kv-types", help=f"KV variants for --kv, comma-separated (default: {','.join(kvbench.KV_VARIANTS)}; "
              "also any K/V pair such as hlwq4/hlwq3; add "
              f"{kvbench.RAW_K_SUFFIX} to store K uncentered as upstream does, e.g. q4_0{kvbench.RAW_K_SUFFIX}, and "
              f"{kvbench.SMOOTHED_SUFFIX} to run one on K-smoothed weights, e.g. hlwq4{kvbench.SMOOTHED_SUFFIX}, or "
              f"{kvbench.KEY_MEANS_SUFFIX} on the weights with measured mean keys (K centered in every layer), e.g. "
              f"hlwq4{kvbench.KEY_MEANS_SUFFIX}).")
def bench(source: str, out_dir: Path | None, quick: bool, imatrix: bool, protocol: str, quants: str | None,
          hlwq: str | None, ctx: int | None, chunks: int | None, rounds: int | None, threads: int | None,
          reference_type: str, kv: bool, kv_types: str | None) -> None:
    """Benchmark SOURCE: a model name (smollm2-135m, gemma3-270m), an HF folder or hub id, or an F16/BF16/F32 GGUF."""
    if kv:
        try:
            kvbench.run_kv_bench(source, out_dir, variants=_names(kv_types), ctx=ctx or 2048, chunks=chunks or 4,
                                 rounds=3 if rounds is None else rounds, threads=threads, log=click.echo)
        except (ValueError, benchmark.BenchError, llama_tools.ToolError, build.BuildError, ConversionError) as e:
            raise click.ClickException(str(e)) from None
        return
    try:
        benchmark.run_bench(source, out_dir, quick=quick, imatrix=imatrix, protocol=protocol,
                            llama_quants=_names(quants), hlwq_recipes=_names(hlwq), ctx=ctx, chunks=chunks,
                            rounds=rounds, threads=threads, reference_type=reference_type, log=click.echo)
    except (benchmark.BenchError, llama_tools.ToolError, build.BuildError, ConversionError) as e:
        raise click.ClickException(str(e)) from None
