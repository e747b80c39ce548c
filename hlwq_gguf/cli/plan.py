"""`hlwq-gguf plan`: which layers' MoE experts fit on the GPU for a VRAM budget, and the llama.cpp flags for it."""
from __future__ import annotations

import click

from hlwq_gguf import plan as planner


@click.command(name="plan")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--vram", required=True, help="GPU memory budget, e.g. 24GiB, 16GB, 12000MiB.")
@click.option("--ctx", "n_ctx", type=int, default=4096, show_default=True, help="Context size (tokens).")
@click.option("--kv", "kv_type", type=click.Choice(list(planner.KV_TYPES), case_sensitive=False), default="f16",
              show_default=True, help="KV-cache type for K and V; with hlwq3 K is hlwq4 (a 3-bit K costs 3-4x the KL "
                                      "divergence), and with an HLWQ K, K stays q8_0 in the layers whose key bias a "
                                      "low-bit code would wreck (as llama.cpp does); a line says so.")
@click.option("--kv-k", "kv_type_k", type=click.Choice(list(planner.KV_TYPES), case_sensitive=False), default=None,
              help="K's type as given, in every layer (overrides --kv; run llama.cpp with LLAMA_KV_HLWQ_K_OUTLIER=0 "
                   "and LLAMA_KV_HLWQ_K_BITS=0).")
@click.option("--kv-v", "kv_type_v", type=click.Choice(list(planner.KV_TYPES), case_sensitive=False), default=None,
              help="A different type for V (default: --kv).")
@click.option("--reserve", default="512MiB", show_default=True,
              help="VRAM kept free for the CUDA context and allocator slack, which llama.cpp does not count.")
def plan(model: str, vram: str, n_ctx: int, kv_type: str, kv_type_k: str | None, kv_type_v: str | None,
         reserve: str) -> None:
    """Plan where MODEL's tensors go: non-experts and KV cache on the GPU, then as many layers' experts as fit."""
    from hlwq_gguf import kvcache

    pair_k, pair_v, pair_note = kvcache.kv_pair(kv_type, model)
    try:
        result = planner.plan_file(model, vram, n_ctx, kv_type_k or pair_k, kv_type_v or pair_v,
                                   reserve=planner.parse_size(reserve),
                                   **({"safe_k_layers": (), "k_bits": ""} if kv_type_k else {}))
        notes = [] if kv_type_k else [pair_note, kvcache.k_type_note(model, pair_k, n_ctx=n_ctx)]
    except planner.PlanError as e:
        raise click.ClickException(str(e)) from None
    for note in filter(None, notes):
        click.echo(f"hlwq-gguf: {note}", err=True)
    click.echo(result.table())
