"""Convert a BF16/F16/F32 Hugging Face checkpoint straight to an HLWQ GGUF."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hlwq_gguf import build as builder
from hlwq_gguf import recipes, upstream

from . import polarquant
from .loadcheck import check_loads
from .reference import reference_gguf
from .source import (ConversionError, check_tokenizer, die_with_parent, load_checkpoint, publish, resolve, staging_prefix,
                     sweep_stale_staging)


@dataclass
class ConversionReport:
    output: Path
    recipe: str
    bytes: int
    weights_quantized: int
    quantize_seconds: float
    wall_seconds: float
    tensor_types: dict[str, int] = field(default_factory=dict)
    # peak anonymous memory of the converting process (RssAnon: not the checkpoint's mmapped file pages)
    peak_anon_bytes: int = 0
    # imported code checkpoints: the layout read, and per coded tensor how many blocks were copied bit for bit
    # and the relative RMS error that re-encoding the others added (0 when all were copied)
    import_format: str | None = None
    imported_tensors: list[dict] = field(default_factory=list)
    # tensors changed by channel equalization and K smoothing (0: none)
    equalized_tensors: int = 0
    # layers whose K outlier channels were moved into Q (equalize._smooth_keys)
    smoothed_layers: int = 0
    # the vision projector written beside the output (None: the checkpoint has no vision tower)
    mmproj: Path | None = None
    mmproj_error: str | None = None

    @property
    def mweights_per_second(self) -> float:
        return self.weights_quantized / max(self.quantize_seconds, 1e-9) / 1e6


# checkpoints below this size go through an F32 intermediate GGUF, larger ones through BF16
FULL_PRECISION_F32_LIMIT = 8 << 30
IMATRIX_CHUNKS = 32


def _convert_gguf(source: Path, output: Path, recipe: str, equalize: bool, imatrix: str | Path | None,
                  threads: int | None, quiet: bool, work_dir: Path | None = None,
                  target_bpw: float | None = None, smooth_keys: bool | None = None) -> ConversionReport:
    """The full-precision GGUF path (convert/requantize.py), computing the importance matrix first for "auto"
    and the bits per tensor for a target size (convert/allocate.py)."""
    import time

    from hlwq_gguf import llama_tools, textdata

    from .requantize import requantize_gguf

    if not source.is_file():
        raise ConversionError(f"{source}: no such GGUF file")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix=staging_prefix(output), dir=output.parent) as scratch:
        if str(imatrix) == "auto":
            imatrix = llama_tools.imatrix(builder.ensure_build(), source, textdata.calibration_text_file(),
                                          Path(work_dir or scratch) / "imatrix.gguf", chunks=IMATRIX_CHUNKS,
                                          threads=threads)
        imatrix = Path(imatrix) if imatrix else None
        if target_bpw is not None:
            from .allocate import allocate

            recipe, _, _, stats = allocate(source, target_bpw, imatrix=imatrix, equalize=equalize, threads=threads,
                                           log=(lambda *_: None) if quiet else print, output=output,
                                           smooth_keys=smooth_keys)
        else:
            stats = requantize_gguf(source, output, recipe, imatrix=imatrix, equalize=equalize, threads=threads,
                                    quiet=quiet, smooth_keys=smooth_keys)
    return ConversionReport(output=output, recipe=recipe, bytes=output.stat().st_size,
                            weights_quantized=stats["weights"], quantize_seconds=stats["seconds"],
                            wall_seconds=time.time() - started, tensor_types=stats["types"],
                            equalized_tensors=stats["equalized"], smoothed_layers=stats["smoothed_layers"])


def convert_checkpoint(source: str | Path, output: str | Path, recipe: str = "hlwq5", quiet: bool = False,
                       verbose: bool = False, threads: int | None = None, codebook: str | None = None,
                       keep_unquantized: bool = False, equalize: bool = False,
                       imatrix: str | Path | None = None, mmproj: bool | None = None,
                       target_bpw: float | None = None, smooth_keys: bool | None = None) -> ConversionReport:
    """Convert `source` (a checkpoint folder or hub id) to an HLWQ GGUF at `output` using `recipe`.

    A checkpoint with a vision tower also gets its projector, `mmproj-<output stem>-f16.gguf` beside `output`, in
    F16 as llama.cpp's converter writes it (`mmproj` False skips it, True requires a vision tower).
    See _convert for the rest.
    """
    checkpoint = None
    if mmproj is not False and not str(source).endswith(".gguf"):
        model_dir = polarquant.code_folder(resolve(source))
        polarquant.refuse_codeless(model_dir)  # its message names the release, before any generic complaint
        checkpoint = load_checkpoint(model_dir)
        if mmproj and not checkpoint.has_vision_tower:
            raise ConversionError(f"{checkpoint.path}: no vision tower weights, so no projector (mmproj) to write")
    report = _convert(source, output, recipe, quiet, verbose, threads, codebook, keep_unquantized, equalize, imatrix,
                      target_bpw, smooth_keys)
    if checkpoint is None or not checkpoint.has_vision_tower:
        return report
    projector = report.output.with_name(f"mmproj-{report.output.stem}-f16.gguf")
    try:
        reference_gguf(checkpoint.path, projector, "f16", mmproj=True)
    except ConversionError as e:
        if mmproj:  # asked for explicitly
            raise
        report.mmproj_error = str(e)  # the text model stands on its own; the caller warns
        return report
    report.mmproj = projector
    return report


def _convert(source: str | Path, output: str | Path, recipe: str, quiet: bool, verbose: bool, threads: int | None,
             codebook: str | None, keep_unquantized: bool, equalize: bool,
             imatrix: str | Path | None, target_bpw: float | None = None,
             smooth_keys: bool | None = None) -> ConversionReport:
    """The text model of `source` to an HLWQ GGUF at `output`.

    llama.cpp's own converter classes supply names and metadata; the selected tensors are HLWQ-coded while they
    are written, one at a time, so memory stays bounded by the largest tensor. The output appears atomically:
    it is written to a temporary file beside `output` and renamed only on success.

    A PolarQuant/HLWQ code checkpoint (convert/polarquant.py) is imported without re-quantizing: its codes and
    norms are copied into the HLWQ types of its codebook (`codebook` A or B for layouts that store no table;
    ignored otherwise), and the tensors it keeps unquantized follow `recipe` or, with `keep_unquantized`, stay BF16.

    `equalize` applies convert/equalize.py's function-preserving channel scales before coding, estimated from the
    weights; `imatrix` (a llama-imatrix GGUF, or "auto" to compute one on the calibration text) estimates them from
    activations instead and implies `equalize`. `target_bpw` replaces `recipe` by measured bits per tensor for
    that many bits per quantized-matrix weight (convert/allocate.py). These take the full-precision GGUF path
    (convert/requantize.py), which a full-precision GGUF `source` always takes. `smooth_keys` (off by default; takes the
    full-precision GGUF path) moves K's outlier channels into Q (equalize._smooth_keys).
    """
    if recipe not in recipes.RECIPES:
        raise ConversionError(f"unknown recipe {recipe!r}; choose one of {', '.join(recipes.RECIPES)}")
    output = Path(output).expanduser().resolve()
    if not output.parent.is_dir():
        raise ConversionError(f"{output.parent}: output folder does not exist")
    if imatrix is not None and str(imatrix) != "auto" and not Path(imatrix).expanduser().is_file():
        raise ConversionError(f"{imatrix}: no such importance-matrix file (give a llama-imatrix GGUF or 'auto')")
    sweep_stale_staging(output)
    if str(source).endswith(".gguf"):
        return _convert_gguf(Path(source).expanduser(), output, recipe, equalize, imatrix, threads, quiet,
                             target_bpw=target_bpw, smooth_keys=smooth_keys)
    model_dir = polarquant.code_folder(resolve(source))
    polarquant.refuse_codeless(model_dir)
    import_format = polarquant.detect(model_dir) if (model_dir / "config.json").is_file() else None
    checkpoint = load_checkpoint(model_dir)
    check_tokenizer(model_dir)
    if import_format:
        if equalize or imatrix is not None or target_bpw is not None or smooth_keys:
            raise ConversionError(f"{model_dir}: a code checkpoint is imported as it is; --equalize/--imatrix/"
                                  "--target-bpw/--smooth-keys apply only to full-precision checkpoints")
        polarquant.load(model_dir, codebook)  # every layout and shape problem surfaces here, before any output
    elif equalize or imatrix is not None or target_bpw is not None or smooth_keys:
        if not checkpoint.architectures:
            raise ConversionError(f"{model_dir / 'config.json'}: no 'architectures' entry, cannot tell the model class")
        with tempfile.TemporaryDirectory(prefix=staging_prefix(output), dir=output.parent) as work:
            full = Path(work) / "full-precision.gguf"
            # F32 keeps F16 checkpoints exact; large BF16 ones go through BF16, which holds them exactly too
            small = sum(p.stat().st_size for p in checkpoint.safetensors) < FULL_PRECISION_F32_LIMIT
            reference_gguf(model_dir, full, "f32" if small else "bf16")
            return _convert_gguf(full, output, recipe, equalize, imatrix, threads, quiet, work_dir=Path(work),
                                 target_bpw=target_bpw, smooth_keys=smooth_keys)
    if not checkpoint.architectures:
        raise ConversionError(f"{model_dir / 'config.json'}: no 'architectures' entry, cannot tell the model class")
    tree = upstream.patched_tree()
    lib_dir = builder.ensure_build().bin  # the HLWQ quantizer is the patched ggml's

    fd, tmp_name = tempfile.mkstemp(prefix=staging_prefix(output), suffix=".partial", dir=output.parent)
    os.close(fd)
    out_tmp = Path(tmp_name)
    stats_file = out_tmp.with_suffix(".stats.json")
    error_file = out_tmp.with_suffix(".error")
    hub_id = None if Path(str(source)).expanduser().is_dir() else str(source)
    args = {"llama_cpp_tree": str(tree), "model_dir": str(model_dir), "out_tmp": str(out_tmp), "recipe": recipe,
            "output": str(output), "stats_out": str(stats_file), "error_out": str(error_file), "hub_id": hub_id, "quiet": quiet,
            "verbose": verbose, "lib_dir": str(lib_dir), "threads": threads, "import_format": import_format,
            "codebook": codebook, "keep_unquantized": keep_unquantized}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-m", "convert._worker", json.dumps(args)], env=env,
                            stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE if quiet else None,
                            text=True, preexec_fn=die_with_parent)
    try:
        _, stderr = proc.communicate()
    except BaseException:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for leftover in (out_tmp, stats_file, error_file):
            leftover.unlink(missing_ok=True)
        raise
    try:
        if proc.returncode != 0:
            if error_file.exists():
                raise ConversionError(error_file.read_text().strip())
            lines = [line for line in (stderr or "").splitlines() if line.strip()]
            last = lines[-1].split("\r")[-1] if lines else f"exit code {proc.returncode} (its output is above)"
            raise ConversionError(f"{model_dir}: conversion failed: {last}")
        stats = json.loads(stats_file.read_text())
        check_loads(out_tmp, lib_dir.parent, model_dir)
        publish(out_tmp, output)
    finally:
        for leftover in (out_tmp, stats_file, error_file):
            leftover.unlink(missing_ok=True)
    return ConversionReport(output=output, recipe=recipe, bytes=output.stat().st_size,
                            weights_quantized=stats["weights"], quantize_seconds=stats["seconds"],
                            wall_seconds=stats["wall_seconds"], tensor_types=stats["types"],
                            peak_anon_bytes=stats["peak_anon_bytes"], import_format=import_format,
                            imported_tensors=stats.get("import", []))
