"""`hlwq-gguf build`: fetch the pinned llama.cpp, apply ggml_patch/, build it into the cache."""
from __future__ import annotations

import click

from hlwq_gguf import build as builder
from hlwq_gguf import upstream


@click.command()
@click.option("--cuda", is_flag=True, help="Build the CUDA backend too.")
@click.option("--arch", "cuda_arch", default=None, help="CUDA architecture(s), e.g. 86 or 89;120 (default: native).")
@click.option("-j", "--jobs", type=int, default=None, help="Parallel compile jobs (default: all cores).")
@click.option("--print-dir", is_flag=True, help="Only print where the binaries are.")
def build(cuda: bool, cuda_arch: str | None, jobs: int | None, print_dir: bool) -> None:
    """Build llama.cpp with the HLWQ patches (cached by patch-series hash)."""
    try:
        result = builder.ensure_build(cuda=cuda, cuda_arch=cuda_arch, jobs=jobs, verbose=not print_dir)
    except (builder.BuildError, upstream.UpstreamError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(result.bin)
