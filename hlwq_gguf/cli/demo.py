"""`hlwq-gguf demo`: the main job on the default small model."""
from __future__ import annotations

import click

from hlwq_gguf import models


@click.command()
@click.option("--model", default=models.DEFAULT_MODEL, show_default=True, help="Reference model from the registry.")
@click.option("--chunks", default=8, show_default=True, help="Perplexity chunks of --ctx tokens.")
@click.option("--ctx", default=512, show_default=True)
def demo(model: str, chunks: int, ctx: int) -> None:
    """Build, fetch the model, convert to HLWQ5/HLWQ5_M, generate, and compare with Q5_K_M."""
    from hlwq_gguf.demo import run_demo

    run_demo(model, chunks=chunks, ctx=ctx)
