"""Thin wrappers over the patched llama.cpp tools: quantize, perplexity/KL-divergence, bench, generation."""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .build import Build


class ToolError(RuntimeError):
    pass


def run_tool(cmd: list, timeout: float | None = None, env: dict | None = None) -> str:
    """Run a llama.cpp tool; its stdout and stderr together, or ToolError with the tail of its output."""
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, errors="replace", timeout=timeout,
                            env={**os.environ, **(env or {})})
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
        raise ToolError(f"{Path(cmd[0]).name} exited with {result.returncode}:\n{tail}")
    return result.stdout + result.stderr


def default_threads() -> int:
    return os.cpu_count() or 2


@dataclass
class QuantizeResult:
    output: Path
    fallbacks: int
    n_tensors: int
    log: str


# the x86 features that decide which ggml kernels run (AVX2, AVX-512 with VNNI/VBMI/BF16) and whether the AMX path exists
_CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi", "avx512_bf16",
                 "avx_vnni", "amx_int8", "amx_bf16")


def machine_description() -> str:
    """CPU model, the instruction sets ggml uses, thread count and kernel: recorded beside every speed figure."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    # the first processor's entries are enough: the cores of one machine report the same model and flags
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    flags = next((set(line.split(":", 1)[1].split()) for line in cpuinfo if line.startswith("flags")), flags)
    features = [f for f in _CPU_FEATURES if f in flags]
    isa = f" ({' '.join(features)}{'' if 'amx_int8' in flags else '; no AMX'})" if flags else ""
    return f"{cpu}{isa}, {default_threads()} threads, {platform.system()} {platform.release()}"


def _run_into(output: Path, command, suffix: str = "") -> str:
    """Run the tool command(tmp) that writes a temporary file beside OUTPUT; rename it to OUTPUT only on success,
    so a failed or interrupted run never leaves a partial output. Returns the tool's log."""
    tmp = output.with_name(f".{output.name}.partial{suffix}")
    try:
        log = run_tool(command(tmp))
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return log


def llama_quantize(build: Build, source: Path, output: Path, ftype: str, imatrix: Path | None = None,
                   threads: int | None = None, pure: bool = False) -> QuantizeResult:
    """llama-quantize SOURCE into OUTPUT as FTYPE (Q5_K_M, HLWQ5, ...), atomically; reports fallbacks.

    pure: every matrix gets FTYPE's base type (llama-quantize --pure), no per-tensor mix.
    """
    options = ["--pure"] if pure else []
    if imatrix is not None:
        options += ["--imatrix", imatrix]
    log = _run_into(output, lambda tmp: [build.tool("llama-quantize"), *options, source, tmp, ftype,
                                         str(threads or default_threads())])
    match = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback quantization", log)
    fallbacks, n_tensors = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    return QuantizeResult(output, fallbacks, n_tensors, log)


@dataclass
class Quality:
    ppl: float
    ppl_err: float
    kld_mean: float | None = None
    kld_err: float | None = None
    kld_p99: float | None = None
    same_top_p: float | None = None


_FLOAT = r"([-+0-9.eE]+|nan|inf)"


def _parse_quality(log: str) -> Quality:
    def grab(pattern: str) -> tuple[float, ...] | None:
        match = re.search(pattern, log)
        return tuple(float(g) for g in match.groups()) if match else None

    ppl = grab(rf"Mean PPL\(Q\)\s*:\s*{_FLOAT}\s*±\s*{_FLOAT}") or grab(rf"Final estimate: PPL = {_FLOAT} \+/- {_FLOAT}")
    if ppl is None:
        raise ToolError("llama-perplexity printed no perplexity")
    kld = grab(rf"Mean\s+KLD:\s*{_FLOAT}\s*±\s*{_FLOAT}")
    p99 = grab(rf"99\.0%\s+KLD:\s*{_FLOAT}")
    top = grab(rf"Same top p:\s*{_FLOAT}\s*±")
    return Quality(ppl=ppl[0], ppl_err=ppl[1], kld_mean=kld[0] if kld else None, kld_err=kld[1] if kld else None,
                   kld_p99=p99[0] if p99 else None, same_top_p=top[0] if top else None)


def perplexity(build: Build, model: Path, text_file: Path, ctx: int = 512, chunks: int | None = None,
               kld_base: Path | None = None, save_kld_base: Path | None = None, threads: int | None = None,
               batch: int | None = None, extra: list[str] | None = None, env: dict | None = None) -> Quality:
    """Perplexity of MODEL on TEXT_FILE; with `kld_base` also the KL-divergence against saved base logits."""
    cmd = [build.tool("llama-perplexity"), "-m", model, "-f", text_file, "-c", str(ctx), "-t", str(threads or default_threads()),
           "--no-warmup"]
    if batch:
        cmd += ["-b", str(batch)]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    if save_kld_base is not None:
        cmd += ["--kl-divergence-base", save_kld_base]
    if kld_base is not None:
        cmd += ["--kl-divergence-base", kld_base, "--kl-divergence"]
    cmd += extra or []
    return _parse_quality(run_tool(cmd, env=env))


def imatrix(build: Build, model: Path, text_file: Path, output: Path, ctx: int = 512, chunks: int | None = None,
            threads: int | None = None) -> Path:
    """llama-imatrix of MODEL over TEXT_FILE into OUTPUT (written atomically)."""
    options = ["--chunks", str(chunks)] if chunks else []
    # the temporary name keeps the .gguf suffix: llama-imatrix picks its output format from it
    _run_into(output, lambda tmp: [build.tool("llama-imatrix"), "-m", model, "-f", text_file, "-c", str(ctx),
                                   "-o", tmp, "-t", str(threads or default_threads()), "--no-ppl", *options],
              suffix=output.suffix)
    return output


def bench(build: Build, models: list[Path], n_prompt: int = 512, n_gen: int = 128, repetitions: int = 3,
          threads: int | None = None, extra: list[str] | None = None, env: dict | None = None) -> list[dict]:
    """llama-bench rows (JSON) for pp`n_prompt` and tg`n_gen` of each model."""
    cmd = [build.tool("llama-bench"), "-o", "json", "-p", str(n_prompt), "-n", str(n_gen), "-r", str(repetitions),
           "-t", str(threads or default_threads())]
    for model in models:
        cmd += ["-m", model]
    cmd += extra or []
    out = run_tool(cmd, env=env)
    start = out.index("[")
    return json.loads(out[start:out.rindex("]") + 1])


def generate(build: Build, model: Path, prompt: str, n_predict: int = 64, seed: int = 1, threads: int | None = None) -> str:
    """Greedy completion of PROMPT with llama-completion (llama.cpp's one-shot text generation tool)."""
    cmd = [build.tool("llama-completion"), "-m", model, "-p", prompt, "-n", str(n_predict), "--seed", str(seed),
           "--temp", "0", "-t", str(threads or default_threads()), "-no-cnv", "--no-display-prompt", "--no-warmup"]
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL, timeout=600)
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower() or "failed" in line.lower()]
        raise ToolError(f"llama-completion exited with {result.returncode}: {' | '.join(errors[-4:] or result.stderr.splitlines()[-3:])}")
    return result.stdout
