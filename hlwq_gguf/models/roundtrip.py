"""The check that llama.cpp's converter turns the rebuilt folder back into the same GGUF."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import gguf_types
from .dither import gguf_module, iter_dither
from .hf_layout import gguf_metadata
from .unquantize import open_gguf


def run_converter(
    hf_dir: str | os.PathLike[str],
    outfile: str | os.PathLike[str],
    llama_src: str | os.PathLike[str],
    *,
    outtype: str = "f32",
    extra_args: Sequence[str] = (),
    timeout: float | None = 1800,
) -> Path:
    """Run the pinned ``convert_hf_to_gguf.py`` of ``llama_src`` on ``hf_dir``."""
    script = Path(llama_src) / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found (llama.cpp source tree expected at {llama_src})")
    outfile = Path(outfile)
    cmd = [sys.executable, str(script), str(hf_dir), "--outtype", outtype, "--outfile", str(outfile), *extra_args]
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0 or not outfile.is_file():
        raise RuntimeError(
            f"convert_hf_to_gguf.py failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return outfile


@dataclass
class RoundtripReport:
    ok: bool
    problems: list[str]
    n_tensors: int
    n_quantized: int
    max_excess_over_half_step: float  # max(|conv - deq| - step/2) over quantized tensors (<= ~ulp)
    max_abs_diff_vs_dithered: float  # max |conv - dithered| over all tensors
    max_ulp_diff_vs_dithered: float
    min_nonzero_noise_fraction: float  # min over quantized tensors of mean(conv != deq) (step>0 only)
    mean_abs_noise_over_step: float  # E|conv - deq| / step, ~0.25 for uniform dither
    kv_extra: list[str]  # keys only in the converted GGUF (informational)
    kv_differing_general: list[str]  # general.* keys that differ (informational)
    converted_gguf: str
    per_tensor: dict[str, dict[str, float]] = field(default_factory=dict)


def _kv_equal(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return bool(np.float32(a) == np.float32(b))
        except (TypeError, ValueError):
            return False
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return False
        if a and isinstance(a[0], float):
            return bool(np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)))
        return list(a) == list(b)
    return a == b


def verify_roundtrip(
    model_name: str | os.PathLike[str],
    hf_dir: str | os.PathLike[str],
    llama_src: str | os.PathLike[str],
    *,
    seed: int | None = None,
    converted_gguf: str | os.PathLike[str] | None = None,
    raise_on_error: bool = True,
) -> RoundtripReport:
    """Convert ``hf_dir`` back with llama.cpp's pinned converter and compare with the source GGUF.

    Checks: identical tensor names and shapes; identical tokenizer (model, pre, tokens,
    merges, scores, token types, special token ids, add_* flags, chat template) and
    architecture hyper-parameters (every ``tokenizer.*``/``<arch>.*`` key of the source
    must be present and equal); every converted value within half a quantization step
    of the source's dequantized value and equal to the deterministic dithered value
    (exact, up to one float32 ulp where the converter itself does float math, e.g. the
    Gemma3 ``norm + 1``); dither noise really present.  ``seed`` defaults to the one
    recorded in ``hf_dir/hlwq_unquantize.json``.
    """
    gguf = gguf_module()
    src_path, _ = open_gguf(model_name)
    hf_dir = Path(hf_dir)
    if seed is None:
        seed = int(json.loads((hf_dir / "hlwq_unquantize.json").read_text())["seed"])
    if converted_gguf is None:
        converted_gguf = hf_dir / "roundtrip-f32.gguf"
        run_converter(hf_dir, converted_gguf, llama_src)
    converted_gguf = Path(converted_gguf)

    src = gguf.GGUFReader(src_path)
    dst = gguf.GGUFReader(converted_gguf)
    md_s, md_d = gguf_metadata(src), gguf_metadata(dst)
    arch = str(md_s["general.architecture"])
    problems: list[str] = []

    # ---- metadata
    for k, v in md_s.items():
        if k.startswith("general."):
            continue
        if k not in md_d:
            problems.append(f"metadata key missing after round trip: {k}")
        elif not _kv_equal(v, md_d[k]):
            sv, dv = repr(v)[:80], repr(md_d[k])[:80]
            problems.append(f"metadata {k} differs: {sv} != {dv}")
    kv_extra = sorted(set(md_d) - set(md_s))
    kv_general = sorted(k for k in md_s if k.startswith("general.") and not _kv_equal(md_s[k], md_d.get(k)))

    # ---- tensors
    ts = {t.name: t for t in src.tensors}
    td = {t.name: t for t in dst.tensors}
    if set(ts) != set(td):
        problems.append(f"tensor name sets differ: only source {sorted(set(ts) - set(td))[:10]}, "
                        f"only converted {sorted(set(td) - set(ts))[:10]}")
    excess = 0.0
    max_abs = 0.0
    max_ulp = 0.0
    min_frac = 1.0
    noise_sum = 0.0
    noise_cnt = 0
    nq = 0
    per: dict[str, dict[str, float]] = {}
    for name in sorted(set(ts) & set(td)):
        a, b = ts[name], td[name]
        if list(map(int, a.shape)) != list(map(int, b.shape)):
            problems.append(f"{name}: shape {list(a.shape)} != {list(b.shape)}")
            continue
        if b.tensor_type != gguf.GGMLQuantizationType.F32:
            problems.append(f"{name}: converted type {b.tensor_type.name} is not F32")
            continue
        shape = gguf_types.numpy_shape(b)
        conv_all = np.asarray(b.data, dtype=np.float32).reshape(-1, shape[-1])
        t_abs = t_ulp = t_exc = t_dev = 0.0
        n_live = n_noisy = 0
        quantized = False
        for r0, r1, w, step, deq in iter_dither(a, seed):
            conv = conv_all[r0:r1]
            if not np.array_equal(conv, w):
                diff = np.abs(conv.astype(np.float64) - w)
                t_abs = max(t_abs, float(diff.max()))
                t_ulp = max(t_ulp, float((diff / np.spacing(np.abs(w)).astype(np.float64)).max()))
            if step is None:
                continue
            quantized = True
            dev = np.abs(conv.astype(np.float64) - deq)
            rel = dev - step.astype(np.float64) / 2
            excess = max(excess, float(rel.max(initial=0.0)))
            t_exc = max(t_exc, float((rel - np.spacing(np.abs(conv))).max(initial=0.0)))
            live = step > 0
            n_live += int(live.sum())
            n_noisy += int(np.count_nonzero(conv[live] != deq[live]))
            if live.any():
                r = dev[live] / step[live]
                noise_sum += float(r.sum())
                t_dev = max(t_dev, float(r.max()))
        noise_cnt += n_live
        max_abs, max_ulp = max(max_abs, t_abs), max(max_ulp, t_ulp)
        if t_ulp > 1.0:
            problems.append(f"{name}: converted differs from dithered values by {t_ulp:.3g} ulp ({t_abs:.3g} abs)")
        rec = {"max_abs_vs_dithered": t_abs, "max_ulp_vs_dithered": t_ulp}
        if quantized:
            nq += 1
            frac = n_noisy / n_live if n_live else 1.0
            min_frac = min(min_frac, frac)
            if t_exc > 0:
                problems.append(f"{name}: deviation exceeds half a quantization step by {t_exc:.3g}")
            if frac < 0.99:
                problems.append(f"{name}: only {frac:.3%} of elements carry dither noise")
            rec.update({"noise_fraction": frac, "max_dev_over_step": t_dev})
        per[name] = rec
    rep = RoundtripReport(
        ok=not problems,
        problems=problems,
        n_tensors=len(ts),
        n_quantized=nq,
        max_excess_over_half_step=excess,
        max_abs_diff_vs_dithered=max_abs,
        max_ulp_diff_vs_dithered=max_ulp,
        min_nonzero_noise_fraction=min_frac,
        mean_abs_noise_over_step=noise_sum / max(noise_cnt, 1),
        kv_extra=kv_extra,
        kv_differing_general=kv_general,
        converted_gguf=str(converted_gguf),
        per_tensor=per,
    )
    if raise_on_error and problems:
        raise AssertionError("round trip failed:\n  " + "\n  ".join(problems[:50]))
    return rep
