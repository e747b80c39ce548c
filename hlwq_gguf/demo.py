"""The main job end to end on the default small model: build, fetch, convert, run, compare against Q5_K_M."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import build as builder
from . import gguf_stats, llama_tools, models, paths, textdata

PROMPT = "The capital of France is Paris. The capital of Italy is"


@dataclass
class Row:
    variant: str
    file_mib: float
    bpw: float
    matrix_bpw: float
    fallbacks: str
    ppl: float
    kld_mean: float | None
    kld_p99: float | None
    same_top_p: float | None


def _cached(path: Path, make) -> Path:
    if not path.exists():
        make(path)
    return path


def run_demo(model_name: str = models.DEFAULT_MODEL, chunks: int = 8, ctx: int = 512, workdir: Path | None = None,
             log=print) -> list[Row]:
    """Build llama.cpp, rebuild the default model as an HF folder, convert it to HLWQ5 and HLWQ5_M, generate text
    with llama.cpp and llama-cpp-python, and compare size, perplexity and KL-divergence against Q5_K_M."""
    from convert import convert_checkpoint
    from convert.reference import reference_gguf

    from . import runtime

    started = time.time()
    build = builder.ensure_build(verbose=True)
    log(f"[{time.time() - started:5.0f}s] llama.cpp built: {build.bin}")
    workdir = workdir or paths.cache_root() / "demo" / model_name
    workdir.mkdir(parents=True, exist_ok=True)
    hf_dir = workdir / "hf"
    if not (hf_dir / "config.json").exists():
        models.unquantize_to_hf(model_name, hf_dir)
    log(f"[{time.time() - started:5.0f}s] full-precision checkpoint: {hf_dir}")
    text_file = textdata.measurement_text_file()

    f32 = _cached(workdir / "f32.gguf", lambda p: reference_gguf(hf_dir, p, "f32"))
    variants: dict[str, tuple[Path, str]] = {}
    for recipe in ("hlwq5", "hlwq5_m"):
        out = workdir / f"{recipe}.gguf"
        report = convert_checkpoint(hf_dir, out, recipe=recipe, quiet=True)
        log(f"[{time.time() - started:5.0f}s] converted {recipe}: {report.bytes / 2**20:.1f} MiB, "
            f"{report.mweights_per_second:.1f} M weights/s")
        variants[recipe.upper()] = (out, "0 (HLWQ: none needed)")
    for ftype in ("Q5_K_M", "Q4_K_M"):
        result = llama_tools.llama_quantize(build, f32, workdir / f"{ftype.lower()}.gguf", ftype)
        variants[ftype] = (result.output, f"{result.fallbacks} of {result.n_tensors}")

    hlwq5 = variants["HLWQ5"][0]
    log(f"\n--- llama.cpp (llama-completion) on {hlwq5.name} ---")
    log(PROMPT + llama_tools.generate(build, hlwq5, PROMPT, n_predict=48).strip())
    llm = runtime.open_model(hlwq5, n_ctx=512)
    out = llm(PROMPT, max_tokens=48, temperature=0.0)
    log(f"\n--- llama-cpp-python on {hlwq5.name} ---\n{PROMPT}{out['choices'][0]['text']}\n")
    del llm

    base_logits = workdir / "f32.kld"
    base = llama_tools.perplexity(build, f32, text_file, ctx=ctx, chunks=chunks, save_kld_base=base_logits)
    f32_stats = gguf_stats.gguf_stats(f32)
    rows = [Row("F32 (reference)", f32_stats.file_bytes / 2**20, f32_stats.bpw, 32.0, "-", base.ppl, None, None, None)]
    for name, (path, fallbacks) in variants.items():
        quality = llama_tools.perplexity(build, path, text_file, ctx=ctx, chunks=chunks, kld_base=base_logits)
        stats = gguf_stats.gguf_stats(path)
        rows.append(Row(name, stats.file_bytes / 2**20, stats.bpw, stats.matrix_bpw, fallbacks, quality.ppl,
                        quality.kld_mean, quality.kld_p99, quality.same_top_p))
    log(format_table(rows, model_name, chunks, ctx))
    (workdir / "demo.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    log(f"[{time.time() - started:5.0f}s] done; results in {workdir / 'demo.json'}")
    return rows


def format_table(rows: list[Row], model_name: str, chunks: int, ctx: int) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"{model_name}: {chunks} chunks of {ctx} tokens, KLD against the F32 model",
             "| variant | MiB | bpw (file) | bpw (matrices) | K-quant fallbacks | PPL | mean KLD | 99% KLD | same top % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.variant} | {r.file_mib:.1f} | {r.bpw:.3f} | {r.matrix_bpw:.3f} | {r.fallbacks} | {r.ppl:.3f} | "
                     f"{f(r.kld_mean, '.5f')} | {f(r.kld_p99, '.4f')} | {f(r.same_top_p, '.2f')} |")
    return "\n".join(lines)
