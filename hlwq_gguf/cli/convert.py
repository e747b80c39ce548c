"""`hlwq-gguf convert`: a Hugging Face checkpoint to an HLWQ GGUF."""
from __future__ import annotations

import click

from convert import ConversionError, convert_checkpoint
from hlwq_gguf import recipes, upstream


@click.command()
@click.argument("source")
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--type", "recipe", type=click.Choice(sorted(recipes.RECIPES), case_sensitive=False), default="hlwq5",
              show_default=True, help="HLWQ type or mixed recipe.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("-v", "--verbose", is_flag=True, help="Also show llama.cpp's converter log.")
@click.option("-t", "--threads", type=int, default=None, help="Quantizer threads (default: all cores); the output is the same.")
def convert(source: str, output: str, recipe: str, quiet: bool, verbose: bool, threads: int | None) -> None:
    """Convert SOURCE (a checkpoint folder or Hugging Face hub id) to OUTPUT (.gguf)."""
    try:
        report = convert_checkpoint(source, output, recipe=recipe.lower(), quiet=quiet, verbose=verbose,
                                    threads=threads)
    except (ConversionError, upstream.UpstreamError) as e:
        raise click.ClickException(str(e)) from None
    types = ", ".join(f"{n} x{c}" for n, c in sorted(report.tensor_types.items()))
    click.echo(f"{report.output}: {report.bytes / 2**20:.1f} MiB, recipe {report.recipe} ({types}); "
               f"quantized {report.weights_quantized / 1e6:.1f} M weights at {report.mweights_per_second:.1f} M weights/s, "
               f"{report.wall_seconds:.1f} s in all, peak memory {report.peak_anon_bytes / 2**20:.0f} MiB")
