"""`hlwq-gguf convert`: a Hugging Face checkpoint to an HLWQ GGUF."""
from __future__ import annotations

import click

from convert import ConversionError, convert_checkpoint
from convert.equalize import SUPPORTED_ARCHITECTURES
from hlwq_gguf import recipes, upstream


@click.command()
@click.argument("source")
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--type", "recipe", type=click.Choice(sorted(recipes.RECIPES), case_sensitive=False), default="hlwq5",
              show_default=True, help="HLWQ type or mixed recipe.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("-v", "--verbose", is_flag=True, help="Also show llama.cpp's converter log.")
@click.option("-t", "--threads", type=int, default=None, help="Quantizer threads (default: all cores); the output is the same.")
@click.option("--codebook", type=click.Choice(["A", "B"], case_sensitive=False), default=None,
              help="PolarQuant/HLWQ code checkpoints that store no table (PQ-Multi, hlwq-q*): the reference table their "
                   "codes index. Default: A for hlwq-q*, B for PQ-Multi (what the reference's own tools use).")
@click.option("--keep-unquantized", is_flag=True,
              help="Code checkpoints: keep the tensors the checkpoint left unquantized in BF16 instead of applying --type.")
@click.option("--equalize", is_flag=True,
              help="Scale input channels before coding and undo it in the preceding norm, up or v weights (exact in "
                   "float; no graph change), estimated from the weights alone: llama architectures only (it hurts "
                   "Gemma-3); --imatrix is better everywhere.")
@click.option("--imatrix", metavar="FILE|auto", default=None,
              help="Activation statistics: a llama-imatrix GGUF, or 'auto' to compute one on the calibration text "
                   "(text the benchmarks never score). Every block's scale and codes minimise the importance-weighted "
                   f"error; on {', '.join(SUPPORTED_ARCHITECTURES)} the channels are also equalized from it (implies "
                   "--equalize there).")
@click.option("--smooth-keys", is_flag=True, default=None,
              help="Move K's outlier channels into Q (exact in float). Off by default: the patched llama.cpp "
                   "centers a quantized K instead, which holds Qwen2's key biases better (docs/BENCHMARKS.md).")
@click.option("--target-bpw", type=float, default=None, metavar="BPW",
              help="Instead of --type: HLWQ bits per tensor for this many bits per quantized-matrix weight, from the "
                   "measured KLD gain of each tensor category (a few minutes of llama-perplexity runs).")
@click.option("--kv-calibrate", is_flag=True,
              help="Then measure every layer's mean key on the calibration text and add it (hlwq-gguf kv-calibrate): "
                   "llama.cpp centers a quantized K cache on it, which cuts a 4-bit K's KL divergence by 26-29 % on "
                   "models without a key bias (about 10 s per 100M weights on 2 cores).")
@click.option("--mmproj/--no-mmproj", default=None,
              help="Write the vision projector (F16) beside OUTPUT as mmproj-<name>-f16.gguf. Default: when the "
                   "checkpoint has vision tower weights.")
def convert(source: str, output: str, recipe: str, quiet: bool, verbose: bool, threads: int | None,
            codebook: str | None, keep_unquantized: bool, equalize: bool, imatrix: str | None,
            smooth_keys: bool | None, kv_calibrate: bool, mmproj: bool | None, target_bpw: float | None) -> None:
    """Convert SOURCE (a checkpoint folder, Hugging Face hub id or full-precision GGUF) to OUTPUT (.gguf).

    A BF16/F16 checkpoint is quantized; a PolarQuant/HLWQ code checkpoint is imported with its codes copied bit for bit.
    """
    try:
        report = convert_checkpoint(source, output, recipe=recipe.lower(), quiet=quiet, verbose=verbose,
                                    threads=threads, codebook=codebook, keep_unquantized=keep_unquantized,
                                    equalize=equalize, imatrix=imatrix, mmproj=mmproj,
                                    target_bpw=target_bpw, smooth_keys=smooth_keys)
    except (ConversionError, upstream.UpstreamError) as e:
        raise click.ClickException(str(e)) from None
    if report.import_format:
        copied = [t for t in report.imported_tensors if t["reason"] is None]
        blocks = sum(t["copied"] for t in copied)
        click.echo(f"imported {report.import_format} codes: {len(copied)} tensors with all {blocks} blocks copied bit for bit, "
                   f"{len(report.imported_tensors) - len(copied)} re-encoded")
        for entry in report.imported_tensors:
            if entry["reason"] is not None or entry["copied"] < entry["blocks"]:
                click.echo(f"  {entry['name']}: {entry['blocks'] - entry['copied']} blocks encoded as {entry['type']} "
                           f"({entry['reason'] or 'changed by the model converter'}), added relative RMS error {entry['added_rel_rms']:.2e}")
    types = ", ".join(f"{count} {name}" for name, count in sorted(report.tensor_types.items()))
    click.echo(f"wrote {report.output} ({report.bytes / 1e6:.1f} MB; {types or 'no tensor quantized'})")
    if report.smoothed_layers:
        click.echo(f"K smoothing moved K's outlier channels into Q in {report.smoothed_layers} layers (exact in float)")
    if report.equalized_tensors:
        click.echo(f"equalization and smoothing rescaled {report.equalized_tensors} tensors (exact in float)")
    if kv_calibrate:
        from hlwq_gguf import kvcalib

        try:
            key_means = kvcalib.calibrate(report.output, report.output, threads=threads, progress=not quiet)
        except (kvcalib.CalibrationError, ValueError) as e:
            raise click.ClickException(str(e)) from None
        click.echo(f"mean keys of {len(key_means.means)} layers over {key_means.tokens} tokens added (K centering)")
    if report.mmproj_error:
        click.echo(f"warning: no vision projector written: {report.mmproj_error}", err=True)
    if report.mmproj:
        click.echo(f"vision projector: {report.mmproj} (F16; use it with llama-mtmd-cli --mmproj)")
