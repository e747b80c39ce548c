"""Head-to-head benchmark: HLWQ against llama.cpp's quants on one model, one text, one run.

Quality comes from llama-perplexity's KL-divergence against the full-precision GGUF of the same checkpoint,
speed from llama-bench runs interleaved across the variants (each round visits every variant once, in a rotated
order, so that thermal or background drift lands on all of them alike); medians over rounds.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import build as builder
from . import gguf_stats, llama_tools, models, paths, recipes, textdata

LLAMA_QUANTS = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "IQ4_XS", "Q3_K_M")
HLWQ_RECIPES = ("hlwq6", "hlwq5_m", "hlwq5", "hlwq4_m", "hlwq4", "hlwq3")
QUICK_LLAMA_QUANTS = ("Q5_K_M", "Q4_K_M")
QUICK_HLWQ_RECIPES = ("hlwq5_m", "hlwq5")
BASELINE = "Q5_K_M"
IMATRIX_CHUNKS = 32
# llama.cpp's quants that take an importance matrix (legacy Q8_0 does not use one)
_USES_IMATRIX = re.compile(r"^(Q\d_K|IQ)")


class BenchError(RuntimeError):
    pass


@dataclass
class Settings:
    ctx: int
    chunks: int
    n_prompt: int
    n_gen: int
    rounds: int
    threads: int
    imatrix: bool
    protocol: str
    reference_type: str


@dataclass
class VariantResult:
    name: str
    family: str  # "reference", "llama.cpp" or "hlwq"
    file: str
    file_bytes: int
    params: int
    bpw: float
    matrix_bpw: float | None
    tensor_types: dict[str, int]
    fallbacks: int | None = None  # tensors llama-quantize had to give a fallback type (None: not llama-quantize)
    imatrix: bool = False
    ppl: float | None = None
    ppl_err: float | None = None
    kld_mean: float | None = None
    kld_p99: float | None = None
    same_top_p: float | None = None
    pp_samples: list[float] = field(default_factory=list)
    tg_samples: list[float] = field(default_factory=list)
    pp: float | None = None
    tg: float | None = None
    pp_vs_baseline: float | None = None
    tg_vs_baseline: float | None = None


@dataclass
class BenchResult:
    model: str
    source: str
    machine: str
    llama_cpp: str
    settings: Settings
    text: str
    variants: list[VariantResult]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def variant(self, name: str) -> VariantResult:
        return next(v for v in self.variants if v.name == name)


def _slug(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source).name if Path(source).exists() else source).strip("-") or "model"


def _fingerprint(path: Path) -> str:
    """Names, sizes and mtimes of a file or a folder's files: a cheap key that changes when the weights do."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def reference_and_checkpoint(source: str, reference_type: str, log) -> tuple[Path, Path | None, Path]:
    """The full-precision reference GGUF, the HF checkpoint it came from (None for a GGUF source) and the cache
    folder for this source's quantized variants, keyed by the source's fingerprint so edited weights never meet
    stale files."""
    from convert.reference import reference_gguf
    from convert.source import load_checkpoint, resolve

    if source.endswith(".gguf"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise BenchError(f"{path}: no such GGUF file")
        types = set(gguf_stats.gguf_stats(path).tensor_types) - {"F32", "F16", "BF16"}
        if types:
            raise BenchError(f"{path}: not a full-precision GGUF (has {', '.join(sorted(types))} tensors)")
        return path, None, _workdir(path)
    if source in models.MODELS:
        checkpoint = paths.cache_root() / "models" / f"{source}-hf"
        if not (checkpoint / "hlwq_unquantize.json").exists():
            log(f"un-quantizing {source} into {checkpoint}")
            shutil.rmtree(checkpoint, ignore_errors=True)
            models.unquantize_to_hf(source, checkpoint)
    else:
        checkpoint = resolve(source)
    load_checkpoint(checkpoint)  # a missing config.json or broken safetensors fail here, before any work
    workdir = _workdir(checkpoint)
    reference = workdir / f"{reference_type.upper()}.gguf"
    if not reference.exists():
        log(f"writing the {reference_type} reference GGUF")
        reference_gguf(checkpoint, reference, reference_type)
    return reference, checkpoint, workdir


def _workdir(source: Path) -> Path:
    workdir = paths.cache_root() / "bench" / f"{_slug(str(source))}-{_fingerprint(source)}"
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def _make_variants(build, reference: Path, checkpoint: Path | None, workdir: Path, llama_quants, hlwq_recipes,
                   imatrix: Path | None, threads: int, progress) -> list[VariantResult]:
    from convert import convert_checkpoint

    made = []
    ref_stats = gguf_stats.gguf_stats(reference)
    made.append(VariantResult(reference.stem, "reference", str(reference), ref_stats.file_bytes, ref_stats.params,
                              ref_stats.bpw, None, ref_stats.tensor_types))
    for ftype in llama_quants:
        uses_imatrix = imatrix is not None and bool(_USES_IMATRIX.match(ftype))
        out = workdir / f"{ftype}{'-imat' if uses_imatrix else ''}.gguf"
        progress(f"llama-quantize {ftype}")
        result = llama_tools.llama_quantize(build, reference, out, ftype, imatrix=imatrix if uses_imatrix else None,
                                            threads=threads)
        made.append(_variant(ftype, "llama.cpp", out, result.fallbacks, uses_imatrix))
    for variant in hlwq_recipes:
        recipe, equalize = parse_hlwq_variant(variant)
        name = recipe.upper() + ("+EQ" if equalize and imatrix is None else "")
        out = workdir / f"{name}{'-imat' if imatrix is not None else ''}.gguf"
        if any(v.name == name for v in made):
            continue  # with an importance matrix, "+eq" and the plain recipe are the same variant
        progress(f"convert {name}")
        if recipe.startswith(TARGET_PREFIX):
            from convert.allocate import allocate

            # the codings at b and b + 1 and the measured gains stay in the bench folder for the next target
            allocate(reference, float(recipe[len(TARGET_PREFIX):]), imatrix=imatrix, equalize=equalize,
                     threads=threads, log=lambda *_: None, output=out, parts_dir=workdir)
            fallbacks = None
        elif imatrix is not None or equalize:
            # equalization and the importance-weighted fit work on the full-precision GGUF; the same weights the
            # checkpoint path reads
            convert_checkpoint(reference, out, recipe=recipe, quiet=True, threads=threads, equalize=equalize,
                               imatrix=imatrix)
            fallbacks = None
        elif checkpoint is not None:
            convert_checkpoint(checkpoint, out, recipe=recipe, quiet=True, threads=threads)
            fallbacks = None
        else:
            fallbacks = llama_tools.llama_quantize(build, reference, out, name, threads=threads).fallbacks
        made.append(_variant(name, "hlwq", out, fallbacks, imatrix is not None))
    return made


# a variant "hlwq@5.0" is `hlwq-gguf convert --target-bpw 5.0` (convert/allocate.py)
TARGET_PREFIX = "hlwq@"


def parse_hlwq_variant(variant: str) -> tuple[str, bool]:
    """'hlwq5' -> ('hlwq5', False); 'hlwq5+eq' -> ('hlwq5', True): the recipe with weights-only equalization;
    'hlwq@5.0' -> ('hlwq@5.0', False): the mix that --target-bpw 5.0 allocates."""
    recipe, plus, flag = variant.lower().partition("+")
    if recipe.startswith(TARGET_PREFIX):
        try:
            float(recipe[len(TARGET_PREFIX):])
        except ValueError:
            recipe = ""
    if (recipe not in recipes.RECIPES and not recipe.startswith(TARGET_PREFIX)) or (plus and flag != "eq"):
        raise BenchError(f"unknown HLWQ variant {variant!r}; give a recipe ({', '.join(recipes.RECIPES)}) or "
                         f"{TARGET_PREFIX}BPW for a --target-bpw mix, optionally with +eq")
    return recipe, bool(plus)


def _variant(name: str, family: str, path: Path, fallbacks: int | None, imatrix: bool) -> VariantResult:
    stats = gguf_stats.gguf_stats(path)
    return VariantResult(name, family, str(path), stats.file_bytes, stats.params, stats.bpw, stats.matrix_bpw,
                         stats.tensor_types, fallbacks, imatrix)


def _polarquant_ppl(build, model: Path, text_file: Path, threads: int, windows: int) -> llama_tools.Quality:
    """The reference's protocol: 2048-token windows, stride 512, scoring the last 512 tokens of each window.

    llama-perplexity's strided mode widens the context by stride/2, so -c 1792 gives 2048-token windows.
    """
    out = llama_tools.run_tool([build.tool("llama-perplexity"), "-m", model, "-f", text_file, "-c", "1792",
                                "--ppl-stride", "512", "--chunks", str(windows), "-t", str(threads), "--no-warmup"])
    running = re.findall(r"\[(\d+)\]([0-9.]+|nan|inf),", out)
    if not running:
        raise llama_tools.ToolError(f"{model.name}: llama-perplexity printed no strided perplexity")
    return llama_tools.Quality(ppl=float(running[-1][1]), ppl_err=float("nan"))


def _measure_quality(build, variants: list[VariantResult], text_file: Path, settings: Settings, workdir: Path,
                     progress) -> None:
    reference = variants[0]
    if settings.protocol == "polarquant":
        for v in variants:
            progress(f"perplexity {v.name}")
            q = _polarquant_ppl(build, Path(v.file), text_file, settings.threads, settings.chunks)
            v.ppl, v.ppl_err = q.ppl, q.ppl_err
        return
    base = workdir / f"{reference.name}.ctx{settings.ctx}.chunks{settings.chunks}.kld"
    # the reference's logits for this text are reused while the reference file is unchanged (minutes for F32)
    base_ppl = base.with_suffix(".ppl.json")
    key = {"reference_mtime": Path(reference.file).stat().st_mtime_ns, "text": str(text_file)}
    progress(f"perplexity {reference.name} (KLD base)")
    cached = json.loads(base_ppl.read_text()) if base.exists() and base_ppl.exists() else {}
    if cached.get("key") == key:
        reference.ppl, reference.ppl_err = cached["ppl"], cached["ppl_err"]
    else:
        q = llama_tools.perplexity(build, Path(reference.file), text_file, ctx=settings.ctx, chunks=settings.chunks,
                                   save_kld_base=base, threads=settings.threads)
        reference.ppl, reference.ppl_err = q.ppl, q.ppl_err
        atomic_write(base_ppl, json.dumps({"key": key, "ppl": q.ppl, "ppl_err": q.ppl_err}).encode())
    for v in variants[1:]:
        progress(f"perplexity + KLD {v.name}")
        q = llama_tools.perplexity(build, Path(v.file), text_file, ctx=settings.ctx, chunks=settings.chunks,
                                   kld_base=base, threads=settings.threads)
        v.ppl, v.ppl_err, v.kld_mean, v.kld_p99, v.same_top_p = q.ppl, q.ppl_err, q.kld_mean, q.kld_p99, q.same_top_p


def _measure_speed(build, variants: list[VariantResult], settings: Settings, progress) -> None:
    quantized = [v for v in variants if v.family != "reference"]
    if settings.rounds == 0:  # a quality-only run
        return
    for round_index in range(settings.rounds):
        shift = round_index % len(quantized)
        for v in quantized[shift:] + quantized[:shift]:
            progress(f"llama-bench {v.name} (round {round_index + 1}/{settings.rounds})")
            rows = llama_tools.bench(build, [Path(v.file)], n_prompt=settings.n_prompt, n_gen=settings.n_gen,
                                     repetitions=1, threads=settings.threads)
            for row in rows:
                (v.pp_samples if row["n_prompt"] > 0 else v.tg_samples).append(float(row["avg_ts"]))
    for v in quantized:
        v.pp, v.tg = statistics.median(v.pp_samples), statistics.median(v.tg_samples)
    baseline = next((v for v in quantized if v.name == BASELINE), None)
    if baseline is not None:
        for v in quantized:
            v.pp_vs_baseline, v.tg_vs_baseline = v.pp / baseline.pp, v.tg / baseline.tg


def run_bench(source: str = models.DEFAULT_MODEL, out_dir: Path | None = None, *, quick: bool = False,
              imatrix: bool = False, protocol: str = "kld", llama_quants: tuple[str, ...] | None = None,
              hlwq_recipes: tuple[str, ...] | None = None, ctx: int | None = None, chunks: int | None = None,
              rounds: int | None = None, threads: int | None = None, reference_type: str = "f32",
              show_progress: bool = True, log=print) -> BenchResult:
    """Quantize SOURCE every way, measure quality and speed in one run, write JSON, Markdown and plots to OUT_DIR.

    SOURCE: a registry model name (`hlwq_gguf.models.MODELS`, un-quantized from PyPI), an HF folder or hub id, or a
    full-precision GGUF (then HLWQ variants come from the patched llama-quantize instead of the converter).
    protocol: "kld" (llama-perplexity KL-divergence against the reference, `chunks` x `ctx` tokens) or
    "polarquant" (the reference implementation's strided perplexity on the first 150,000 characters; PPL only).
    """
    from tqdm import tqdm

    started = time.time()
    if protocol not in ("kld", "polarquant"):
        raise BenchError(f"unknown protocol {protocol!r} (kld or polarquant)")
    llama_quants = tuple(llama_quants or (QUICK_LLAMA_QUANTS if quick else LLAMA_QUANTS))
    hlwq_recipes = tuple(hlwq_recipes or (QUICK_HLWQ_RECIPES if quick else HLWQ_RECIPES))
    for variant in hlwq_recipes:
        parse_hlwq_variant(variant)
    threads = threads or llama_tools.default_threads()
    settings = Settings(ctx=ctx or (256 if quick else 512), chunks=chunks or (4 if quick else 16),
                        n_prompt=64 if quick else 512, n_gen=16 if quick else 128,
                        rounds=(1 if quick else 5) if rounds is None else rounds, threads=threads, imatrix=imatrix, protocol=protocol,
                        reference_type=reference_type)
    if protocol == "polarquant":
        settings.ctx, settings.chunks = 2048, chunks or 30
    slug = _slug(source)
    out_dir = Path(out_dir or Path.cwd() / f"bench-{slug}")

    reference, checkpoint, workdir = reference_and_checkpoint(source, reference_type, log)
    build = builder.ensure_build()
    out_dir.mkdir(parents=True, exist_ok=True)
    text_file = textdata.measurement_text_file()
    if protocol == "polarquant":
        text_file = workdir / "polarquant-slice.txt"
        text_file.write_text(textdata.wikitext_polarquant_slice())

    n_variants = 1 + len(llama_quants) + len(hlwq_recipes)
    total = (len(llama_quants) + len(hlwq_recipes)) * (1 + settings.rounds) + n_variants + imatrix
    with tqdm(total=total, desc="bench", unit="step", disable=not show_progress) as bar:
        steps_started = []

        def progress(what: str) -> None:
            """Mark the previous step done and show the next one."""
            if steps_started:
                bar.update(1)
            steps_started.append(what)
            bar.set_description_str(what)

        imatrix_file = None
        notes = []
        if imatrix:
            imatrix_file = workdir / f"imatrix.calibration.ctx{settings.ctx}.chunks{IMATRIX_CHUNKS}.gguf"
            progress("llama-imatrix")
            if not imatrix_file.exists():
                llama_tools.imatrix(build, reference, textdata.calibration_text_file(), imatrix_file,
                                    ctx=settings.ctx, chunks=IMATRIX_CHUNKS, threads=threads)
            notes.append(f"One importance matrix ({IMATRIX_CHUNKS} chunks of {settings.ctx} tokens of the calibration "
                         "text, which the measurement never scores) was given to the K/IQ quants and to the HLWQ "
                         "variants (the importance-weighted block fit, and channel equalization, convert/equalize.py, "
                         "where the architecture has a rule).")
        variants = _make_variants(build, reference, checkpoint, workdir, llama_quants, hlwq_recipes, imatrix_file,
                                  threads, progress)
        _measure_quality(build, variants, text_file, settings, workdir, progress)
        _measure_speed(build, variants, settings, progress)
        bar.update(1)

    if protocol == "polarquant":
        notes.append("Protocol 'polarquant': strided perplexity (2048-token windows, stride 512, last 512 tokens "
                     f"scored, {settings.chunks} windows) on the first 150,000 characters of the measurement text "
                     "(the reference used WikiText-2, which is not available offline): compare ratios to the "
                     "reference row, not absolute values across texts.")
    result = BenchResult(model=slug, source=source, machine=llama_tools.machine_description(), llama_cpp=build.version_line(),
                         settings=settings, text=str(text_file), variants=variants,
                         seconds=time.time() - started, notes=notes)
    write_outputs(result, out_dir)
    log(markdown_table(result))
    log(f"results, table and plots in {out_dir} ({result.seconds / 60:.1f} min)")
    return result


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(result: BenchResult) -> str:
    s = result.settings
    quality = (f"KLD against {result.variants[0].name}, {s.chunks} chunks of {s.ctx} tokens" if s.protocol == "kld"
               else f"strided PPL ({s.chunks} windows of 2048, stride 512)")
    speed = (f"llama-bench pp{s.n_prompt}/tg{s.n_gen}, {s.threads} threads, median of {s.rounds} interleaved rounds"
             if s.rounds else "no speed runs (--rounds 0)")
    lines = [f"**{result.model}** - {quality}; {speed}; {result.machine}; {result.llama_cpp}",
             "",
             f"| variant | bpw (file) | bpw (matrices) | fallbacks | PPL | mean KLD | 99% KLD | same top % | "
             f"pp{s.n_prompt} t/s | tg{s.n_gen} t/s | pp vs {BASELINE} | tg vs {BASELINE} |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in result.variants:
        name = f"{v.name}{' (imatrix)' if v.imatrix else ''}"
        if v.family == "hlwq":
            name = f"**{name}**"
        fallbacks = "-" if v.family == "reference" else ("0 (HLWQ)" if v.fallbacks is None else str(v.fallbacks))
        lines.append(f"| {name} | {v.bpw:.3f} | {_fmt(v.matrix_bpw, '.3f')} | {fallbacks} | {_fmt(v.ppl, '.3f')} | "
                     f"{_fmt(v.kld_mean, '.5f')} | {_fmt(v.kld_p99, '.4f')} | {_fmt(v.same_top_p, '.2f')} | "
                     f"{_fmt(v.pp, '.1f')} | {_fmt(v.tg, '.1f')} | {_fmt(v.pp_vs_baseline, '.2f')} | "
                     f"{_fmt(v.tg_vs_baseline, '.2f')} |")
    lines += [f"\n{note}" for note in result.notes]
    return "\n".join(lines)


def write_outputs(result: BenchResult, out_dir: Path) -> None:
    """results.json, results.md, kld_vs_bpw.png and speed.png in OUT_DIR (each written atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "results.json", json.dumps(asdict(result), indent=1).encode())
    atomic_write(out_dir / "results.md", (markdown_table(result) + "\n").encode())
    plot_quality(result, out_dir / "kld_vs_bpw.png")
    if result.settings.rounds:
        plot_speed(result, out_dir / "speed.png")


def atomic_write(path: Path, data: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(data)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(f.name, 0o666 & ~umask)  # NamedTemporaryFile makes 0600; results are for everyone to read
    Path(f.name).replace(path)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.partial.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def plot_quality(result: BenchResult, path: Path) -> None:
    """The Pareto view: quality loss against real bits per matrix weight (log y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_kld = result.settings.protocol == "kld"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    reference_ppl = result.variants[0].ppl
    for family, style in (("llama.cpp", dict(color="tab:blue", marker="o")), ("hlwq", dict(color="tab:red", marker="s"))):
        points = [(v.matrix_bpw, v.kld_mean if use_kld else v.ppl / reference_ppl - 1, v.name)
                  for v in result.variants if v.family == family]
        points = [p for p in points if p[0] is not None and p[1] is not None and p[1] > 0]
        if not points:
            continue
        ax.scatter([p[0] for p in points], [p[1] for p in points], label=family, **style)
        for x, y, name in points:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (quantized matrices, real file bytes)")
    ax.set_ylabel("mean KL-divergence vs reference" if use_kld else "PPL / reference PPL - 1")
    ax.set_title(f"{result.model}: quality vs size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_speed(result: BenchResult, path: Path) -> None:
    """Prompt processing and generation speed of every variant relative to Q5_K_M from the same run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantized = [v for v in result.variants if v.family != "reference" and v.pp_vs_baseline is not None]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(quantized) + 2), 4))
    xs = range(len(quantized))
    width = 0.4
    s = result.settings
    ax.bar([x - width / 2 for x in xs], [v.pp_vs_baseline for v in quantized], width, label=f"pp{s.n_prompt}")
    ax.bar([x + width / 2 for x in xs], [v.tg_vs_baseline for v in quantized], width, label=f"tg{s.n_gen}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(xs), [v.name for v in quantized], rotation=45, ha="right")
    ax.set_ylabel(f"speed relative to {BASELINE}")
    ax.set_title(f"{result.model}: llama-bench, {s.threads} threads, median of {s.rounds} rounds")
    ax.legend()
    save_figure(fig, path)
