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
@click.option("--cuda-check", is_flag=True,
              help="Instead of building: compile the CUDA files the patches touch with nvcc (no GPU needed), failing "
                   "on errors and on warnings in the patched lines; --arch picks the one architecture (default 89).")
def build(cuda: bool, cuda_arch: str | None, jobs: int | None, print_dir: bool, cuda_check: bool) -> None:
    """Build llama.cpp with the HLWQ patches (cached by patch-series hash)."""
    if cuda_check:
        from hlwq_gguf import cudacheck

        try:
            result = cudacheck.check(arch=cuda_arch or cudacheck.DEFAULT_ARCH, jobs=jobs or 2,
                                     progress=lambda m: click.echo(m, err=True))
        except (cudacheck.CudaCheckError, upstream.UpstreamError) as e:
            raise click.ClickException(str(e)) from None
        for line in result.errors + result.introduced_warnings:
            click.echo(line, err=True)
        state = "ok (cached)" if result.cached else "ok" if result.ok else "FAILED"
        click.echo(f"CUDA compile check sm_{result.arch}: {state}: {', '.join(result.compiled)}")
        if not result.ok:
            raise SystemExit(1)
        return
    try:
        result = builder.ensure_build(cuda=cuda, cuda_arch=cuda_arch, jobs=jobs, verbose=not print_dir)
    except (builder.BuildError, upstream.UpstreamError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(result.bin)
