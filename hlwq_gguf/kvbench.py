"""`hlwq-gguf bench --kv`: KV-cache types head to head on one model, one text, one run.

For each cache configuration (llama.cpp's f16, q8_0, q5_0, q4_0, iq4_nl, all with llama.cpp's graph rotation as
users get them; the HLWQ types, with the layers whose key bias has outlier channels keeping K at q8_0 as llama.cpp
does, and forced everywhere ("!"); and the pairs of an 8-bit or 5-bit K with a 4-bit HLWQ V) llama-perplexity runs with flash attention at a context of `ctx` tokens: PPL, and the
KL-divergence against the f16-cache run of the same weights. llama-bench measures pp/tg with flash attention at a
cache depth of `depth` tokens. The HLWQ types rotate each 64-value block themselves and opt out of llama.cpp's
graph rotation; `hlwq3+rot` / `hlwq4+rot` keep the graph rotation on top (LLAMA_ATTN_ROT_HLWQ=1), which is how the
choice was measured. In the layers with a key bias the patched llama.cpp stores every quantized K centered
(hlwq_gguf.kvcache); `+raw` variants store it as upstream does, and `+km` variants run on the same weights with
every layer's mean key measured (hlwq_gguf.kvcalib), which llama.cpp then centers K on in every layer. Also: bits per value and KV bytes per token of each type, and the longest context a 4 GiB
cache holds for the seed models' attention shapes (from their config.json).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import build as builder
from . import kvbits, kvcache, llama_tools, plan, textdata

# name -> (K type, V type, extra environment). With an HLWQ K type llama.cpp keeps K at q8_0 in the layers whose key
# bias has outlier channels (hlwq_gguf.kvcache); "!" forces the HLWQ K everywhere (LLAMA_KV_HLWQ_K_OUTLIER=0).
_FORCE_K = {"LLAMA_KV_HLWQ_K_OUTLIER": "0"}
KV_VARIANTS: dict[str, tuple[str, str, dict[str, str]]] = {
    "f16": ("f16", "f16", {}), "q8_0": ("q8_0", "q8_0", {}), "q5_0": ("q5_0", "q5_0", {}), "q4_0": ("q4_0", "q4_0", {}),
    "iq4_nl": ("iq4_nl", "iq4_nl", {}),
    "q8_0/hlwq4": ("q8_0", "hlwq4_64", {}), "hlwq5/hlwq4": ("hlwq5_64", "hlwq4_64", {}),
    "hlwq4": ("hlwq4_64", "hlwq4_64", {}), "hlwq3": ("hlwq3_64", "hlwq3_64", {}),
    "hlwq4!": ("hlwq4_64", "hlwq4_64", _FORCE_K), "hlwq3!": ("hlwq3_64", "hlwq3_64", _FORCE_K),
    "hlwq4+rot": ("hlwq4_64", "hlwq4_64", {"LLAMA_ATTN_ROT_HLWQ": "1"}),
    "hlwq3+rot": ("hlwq3_64", "hlwq3_64", {"LLAMA_ATTN_ROT_HLWQ": "1"}),
}
# a variant name ending in this runs on K-smoothed weights (convert/equalize.py's _smooth_keys)
SMOOTHED_SUFFIX = "+sk"
# ... or in this, on the same weights with every layer's mean key measured (hlwq_gguf.kvcalib), which the patched
# llama.cpp centers a quantized K on in every layer, with or without a key bias
KEY_MEANS_SUFFIX = "+km"
# ... or in this, with the mean keys and a hlwq3_64 K's bits per layer calibrated for a 3.5-bit cache (hlwq_gguf.kvbits)
K_BITS_SUFFIX = "+kb"
# ... and in this (before any +sk), with K stored as is: the patched llama.cpp centers a quantized K in the layers
# with a key bias (hlwq_gguf.kvcache), LLAMA_KV_K_CENTER=0 is upstream's behaviour
RAW_K_SUFFIX = "+raw"
_RAW_K = {"LLAMA_KV_K_CENTER": "0"}
SEED_CONFIGS = {"Qwen3.5-27B": "Qwen__Qwen3.5-27B.json", "Gemma-4-31B": "google__gemma-4-31B-it.json"}
CACHE_BUDGET = 4 * 2**30


@dataclass
class KVResult:
    name: str
    type_k: str
    type_v: str
    bits_per_value: float  # K and V together, over every layer (the layers whose K stays q8_0 included)
    safe_k_layers: list[int] = field(default_factory=list)
    bytes_per_token: float | None = None
    ppl: float | None = None
    kld_mean: float | None = None
    kld_p99: float | None = None
    same_top_p: float | None = None
    pp: float | None = None
    tg: float | None = None
    pp_vs_f16: float | None = None
    tg_vs_f16: float | None = None


@dataclass
class KVBenchResult:
    model: str
    weights: str
    ctx: int
    chunks: int
    depth: int
    text: str
    results: list[KVResult]
    max_context_4gib: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0
    machine: str = ""


def bits_per_value(cache_type: str) -> float:
    block, size = plan.KV_TYPES[cache_type]
    return size * 8 / block


def layer_bits_per_value(layout, type_k: str, type_v: str, safe_k_layers=(), k_bits: str | None = None) -> float:
    """Bits per cached K or V value of a model's cache, the layers whose K stays q8_0 and a hlwq3_64 K's calibrated
    bits per layer (plan.layer_k_type; k_bits: those digits instead of the file's) included."""
    bits = values = 0.0
    for layer in layout.attention:
        k_type = plan.layer_k_type(layout, layer.index, type_k, tuple(safe_k_layers), k_bits)
        bits += layer.k_width * bits_per_value(k_type) + layer.v_width * bits_per_value(type_v)
        values += layer.k_width + layer.v_width
    return bits / values


def seed_max_context(config_dir: Path, budget: int = CACHE_BUDGET) -> dict[str, dict[str, int]]:
    """Longest context whose K+V cache fits `budget` bytes, per seed model and cache type.

    Qwen3.5-27B: only its 16 full-attention layers cache tokens (the 48 DeltaNet layers keep a fixed-size state,
    not counted). Gemma-4-31B: 50 sliding layers hold at most sliding_window + 512 (one ubatch) cells, the 10
    global layers (head 512) hold the whole context; K and V are both counted.
    """
    table: dict[str, dict[str, int]] = {}
    for model, file in SEED_CONFIGS.items():
        path = config_dir / file
        if not path.is_file():
            continue
        text = json.loads(path.read_text())
        text = text.get("text_config", text)
        kinds = text.get("layer_types") or ["full_attention"] * text["num_hidden_layers"]
        head, kv_heads = text.get("head_dim"), text["num_key_value_heads"]
        global_head = text.get("global_head_dim") or head
        global_kv = text.get("num_global_key_value_heads") or kv_heads
        window = text.get("sliding_window") or 0
        full_values = kinds.count("full_attention") * 2 * global_kv * global_head
        swa_values = kinds.count("sliding_attention") * 2 * kv_heads * head
        row = {}
        for name, (type_k, type_v, env) in KV_VARIANTS.items():
            if "+" in name or "!" in name:
                continue
            # the seeds have no key biases: their K takes the asked type in every layer
            bytes_per_value = (bits_per_value(type_k) + bits_per_value(type_v)) / 16
            swa_bytes = swa_values * (window + 512) * bytes_per_value
            row[name] = max(0, int((budget - swa_bytes) / (full_values * bytes_per_value)))
        table[model] = row
    return table


def _weights(build, model: str, log) -> tuple[Path, Path, Path]:
    """A Q8_0 GGUF of the model (the weights every cache type runs with), its reference and the bench cache folder."""
    from .bench import reference_and_checkpoint

    reference, _, workdir = reference_and_checkpoint(model, "f32", log)
    weights = workdir / "Q8_0.gguf"
    if not weights.exists():
        llama_tools.llama_quantize(build, reference, weights, "Q8_0")
    return weights, reference, workdir


def _smoothed_weights(build, reference: Path, workdir: Path, log) -> Path:
    """The Q8_0 weights after K smoothing (convert/equalize.py: K's outlier channels moved into Q, exact in float)."""
    from convert.requantize import requantize_gguf

    weights = workdir / "Q8_0-smoothK.gguf"
    if not weights.exists():
        log("K smoothing, then llama-quantize Q8_0")
        smoothed = workdir / "F32-smoothK.gguf"
        try:
            requantize_gguf(reference, smoothed, None, smooth_keys=True, quiet=True)
            llama_tools.llama_quantize(build, smoothed, weights, "Q8_0")
        finally:
            smoothed.unlink(missing_ok=True)
    return weights


def _key_mean_weights(plain: Path, workdir: Path, threads: int, log) -> Path:
    """The Q8_0 weights with every layer's mean key measured on the calibration text (hlwq_gguf.kvcalib)."""
    from . import kvcalib

    weights = workdir / "Q8_0-kmean.gguf"
    if not weights.exists():
        log("mean keys on the calibration text")
        kvcalib.calibrate(plain, weights, threads=threads, progress=False)
    return weights


def _k_bits_weights(plain: Path, workdir: Path, threads: int, log) -> Path:
    """The Q8_0 weights with mean keys and a hlwq3_64 K's bits per layer for a 3.5-bit cache (hlwq_gguf.kvbits)."""
    from . import kvbits, kvcalib

    weights = workdir / "Q8_0-kbits.gguf"
    if not weights.exists():
        log("mean keys and per-layer K bits on the calibration text (one perplexity run per layer)")
        kvcalib.calibrate(plain, weights, threads=threads, kv_bits=kvbits.DEFAULT_BITS_PER_VALUE, progress=False)
    return weights


def variant(name: str) -> tuple[str, str, dict[str, str], str]:
    """(K type, V type, environment, weights suffix) of a KV variant name: a KV_VARIANTS name or a K/V pair of
    cache types, then optionally RAW_K_SUFFIX (K not centered), then optionally SMOOTHED_SUFFIX, KEY_MEANS_SUFFIX or
    K_BITS_SUFFIX (which weights it runs on; "" for the plain ones)."""
    weights = next((suffix for suffix in (SMOOTHED_SUFFIX, KEY_MEANS_SUFFIX, K_BITS_SUFFIX) if name.endswith(suffix)),
                   "")
    base = name[:len(name) - len(weights)]
    raw = base.endswith(RAW_K_SUFFIX)
    base = base[:-len(RAW_K_SUFFIX)] if raw else base
    halves = base.split("/")
    if base in KV_VARIANTS:
        type_k, type_v, env = KV_VARIANTS[base]
    elif len(halves) == 2 and all(half in plan.KV_TYPES for half in halves):
        (type_k, type_v), env = (plan.KV_TYPE_ALIASES.get(half, half) for half in halves), {}
    else:
        raise ValueError(f"unknown KV variant {name!r}; known: {', '.join(KV_VARIANTS)}, any K/V pair of "
                         f"{', '.join(plan.KV_TYPES)} (each also with {RAW_K_SUFFIX} for K stored uncentered and "
                         f"{SMOOTHED_SUFFIX} for K-smoothed weights, {KEY_MEANS_SUFFIX} for measured mean keys or "
                         f"{K_BITS_SUFFIX} for mean keys and a 3-bit K's calibrated bits per layer)")
    return type_k, type_v, {**env, **(_RAW_K if raw else {})}, weights


def run_kv_bench(model: str = "smollm2-135m", out_dir: Path | None = None, *, variants: tuple[str, ...] | None = None,
                 ctx: int = 2048, chunks: int = 4, depth: int = 2048, rounds: int = 3, threads: int | None = None,
                 log=print) -> KVBenchResult:
    """Measure every KV variant on `model`; write results.json, results.md and kld_vs_bits.png to `out_dir`."""
    started = time.time()
    build = builder.ensure_build()
    names = list(variants or KV_VARIANTS)
    for name in names:
        variant(name)  # unknown names fail before any work
    if "f16" not in names:
        names.insert(0, "f16")
    plain, reference, workdir = _weights(build, model, log)
    threads = threads or llama_tools.default_threads()
    suffixes = {variant(n)[3] for n in names}
    smoothed = _smoothed_weights(build, reference, workdir, log) if SMOOTHED_SUFFIX in suffixes else None
    key_means = _key_mean_weights(plain, workdir, threads, log) if KEY_MEANS_SUFFIX in suffixes else None
    k_bits = _k_bits_weights(plain, workdir, threads, log) if K_BITS_SUFFIX in suffixes else None
    weights_of = {name: {"": plain, SMOOTHED_SUFFIX: smoothed, KEY_MEANS_SUFFIX: key_means,
                         K_BITS_SUFFIX: k_bits}[variant(name)[3]] for name in names}
    text = textdata.measurement_text_file()
    layouts = {weights: plan.read_layout(weights) for weights in set(weights_of.values())}  # hlwq.kv_k_bits differs
    uncentered = {name: variant(name)[2].get("LLAMA_KV_K_CENTER") == "0" for name in names}
    kept_in = {(w, raw): kvcache.safe_k_layers(w, limit=kvcache.OUTLIER_LIMIT, n_ctx=None if raw else ctx)
               for w, raw in {(weights_of[name], uncentered[name]) for name in names}}
    results = {}
    for name in names:
        type_k, type_v, env, _ = variant(name)
        kept = kept_in[weights_of[name], uncentered[name]]
        safe = kept if kvcache.is_hlwq(type_k) and env.get("LLAMA_KV_HLWQ_K_OUTLIER") != "0" else []
        # bytes per token are what the cache of ctx tokens costs (sliding-window layers hold fewer cells); bits per
        # value are the types' own, over every layer's K and V row
        layout = layouts[weights_of[name]]
        per_token = plan.kv_cache_bytes(layout, ctx, type_k, type_v, safe_k_layers=tuple(safe)) / ctx
        results[name] = KVResult(name, type_k, type_v, layer_bits_per_value(layout, type_k, type_v, safe), safe,
                                 per_token)

    # every variant is scored against the f16 cache on the plain weights, smoothed ones included
    base = workdir / f"kv-f16.ctx{ctx}.chunks{chunks}.kld"
    for name in names:
        type_k, type_v, env, _ = variant(name)
        log(f"perplexity, KV {name}")
        cache = ["-fa", "on", "-ctk", type_k, "-ctv", type_v]
        if name == "f16":
            q = llama_tools.perplexity(build, plain, text, ctx=ctx, chunks=chunks, save_kld_base=base, threads=threads, extra=cache)
        else:
            q = llama_tools.perplexity(build, weights_of[name], text, ctx=ctx, chunks=chunks, kld_base=base,
                                       threads=threads, extra=cache, env=env)
        r = results[name]
        r.ppl, r.kld_mean, r.kld_p99, r.same_top_p = q.ppl, q.kld_mean, q.kld_p99, q.same_top_p

    samples: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
    for round_index in range(rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            type_k, type_v, env, _ = variant(name)
            log(f"llama-bench round {round_index + 1}/{rounds}, KV {name}")
            rows = llama_tools.bench(build, [weights_of[name]], repetitions=1, threads=threads, env=env,
                                     extra=["-fa", "1", "-ctk", type_k, "-ctv", type_v, "-d", str(depth)])
            for row in rows:
                (samples[name][0] if row["n_prompt"] else samples[name][1]).append(float(row["avg_ts"]))
    for name, (pp, tg) in samples.items():
        results[name].pp = sorted(pp)[len(pp) // 2] if pp else None
        results[name].tg = sorted(tg)[len(tg) // 2] if tg else None
    f16 = results["f16"]
    for r in results.values():
        r.pp_vs_f16 = r.pp / f16.pp if r.pp and f16.pp else None
        r.tg_vs_f16 = r.tg / f16.tg if r.tg and f16.tg else None

    shared = Path(__file__).resolve().parents[2] / "shared" / "seed-configs"
    weights_note = f"{plain.name} (Q8_0 weights, the same for every cache type" + \
        (f"; {SMOOTHED_SUFFIX}: {smoothed.name}, the same after K smoothing" if smoothed else "") + \
        (f"; {KEY_MEANS_SUFFIX}: {key_means.name}, the same with mean keys measured" if key_means else "") + \
        (f"; {K_BITS_SUFFIX}: {k_bits.name}, the same with mean keys and a hlwq3_64 K's bits per layer calibrated "
         f"for {kvbits.DEFAULT_BITS_PER_VALUE} bits per value" if k_bits else "") + ")"
    result = KVBenchResult(model=model, weights=weights_note, ctx=ctx,
                           chunks=chunks, depth=depth, text=text.name, results=list(results.values()),
                           max_context_4gib=seed_max_context(shared), seconds=time.time() - started,
                           machine=llama_tools.machine_description())
    out_dir = out_dir or Path(f"bench-kv-{model}")
    write_outputs(result, out_dir)
    log(markdown(result))
    return result


def markdown(result: KVBenchResult) -> str:
    def num(value, spec):
        return "-" if value is None else format(value, spec)

    lines = [f"KV cache types on {result.model} ({result.weights}); perplexity at ctx {result.ctx} x {result.chunks} "
             f"chunks, KLD against the f16 cache; llama-bench pp512/tg128 at depth {result.depth}, flash attention; "
             f"{result.machine}.", "",
             "| cache (K/V) | K q8_0 in layers | bits/value | KV bytes/token | PPL | mean KLD | KLD p99 | same top % | pp512 t/s | tg128 t/s | pp vs f16 | tg vs f16 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result.results:
        kept = ", ".join(map(str, r.safe_k_layers)) or "-"
        lines.append(f"| {r.name} | {kept} | {r.bits_per_value:.2f} | {num(r.bytes_per_token, '.0f')} | {num(r.ppl, '.3f')} | "
                     f"{num(r.kld_mean, '.5f')} | {num(r.kld_p99, '.4f')} | {num(r.same_top_p, '.2f')} | {num(r.pp, '.1f')} | "
                     f"{num(r.tg, '.1f')} | {num(r.pp_vs_f16, '.2f')} | {num(r.tg_vs_f16, '.2f')} |")
    if result.max_context_4gib:
        names = list(next(iter(result.max_context_4gib.values())))
        lines += ["", "Longest context whose KV cache fits 4 GiB (from the seed configs; see kvbench.seed_max_context):", "",
                  "| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for model, row in result.max_context_4gib.items():
            lines.append(f"| {model} | " + " | ".join(f"{row[n]:,}" for n in names) + " |")
    return "\n".join(lines)


def write_outputs(result: KVBenchResult, out_dir: Path) -> None:
    from .bench import atomic_write, save_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "results.json", json.dumps(asdict(result), indent=1).encode())
    atomic_write(out_dir / "results.md", (markdown(result) + "\n").encode())
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in result.results:
        if r.kld_mean is None:
            continue
        hlwq = r.name.startswith("hlwq")
        ax.scatter(r.bits_per_value, r.kld_mean, marker="o" if hlwq else "s", color="tab:red" if hlwq else "tab:blue")
        ax.annotate(r.name, (r.bits_per_value, r.kld_mean), textcoords="offset points", xytext=(4, 3), fontsize=8)
    ax.set_xlabel("KV bits per value")
    ax.set_ylabel("mean KLD vs f16 cache")
    ax.set_yscale("log")
    ax.set_title(f"KV cache: {result.model}, ctx {result.ctx}")
    ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, out_dir / "kld_vs_bits.png")
    plt.close(fig)
