"""Conversion as one pipeline: source -> tensor plan -> encoder -> sink.

    options = ConversionOptions(recipe="hlwq5", ...)     # checked once, here
    source = open_source(path_or_hub_id, options)        # validated before anything is written
    with staged_output(output, load_check_source=...):   # convert/sink.py: atomic, must load in llama.cpp
        stats = source.encode(tmp, options, output)       # the tensor plan (convert/tensor_plan.py) picks each
                                                          # tensor's type, convert/encode.py codes it

Two kinds of source take this line. A checkpoint (BF16/F16/F32 safetensors, or PolarQuant/HLWQ codes to import
losslessly) streams through llama.cpp's own converter one tensor at a time, in a child process
(convert/_worker.py). A full-precision GGUF is read tensor by tensor (convert/requantize.py, or
convert/allocate.py for a target size); a checkpoint whose conversion needs whole layers at once (channel
equalization, an importance matrix, a target size, K smoothing) becomes such a GGUF first.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from hlwq_gguf import build as builder
from hlwq_gguf import recipes, upstream

from . import polarquant
from .reference import reference_gguf
from .sink import staged_output
from .source import ConversionError, Checkpoint, check_tokenizer, load_checkpoint, resolve, staging_prefix, \
    sweep_stale_staging

# checkpoints below this size go through an F32 intermediate GGUF, larger ones through BF16
FULL_PRECISION_F32_LIMIT = 8 << 30
IMATRIX_CHUNKS = 32


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


@dataclass(frozen=True)
class ConversionOptions:
    """How to code: the recipe (or a target size), what to apply first, and how the run behaves."""
    recipe: str = "hlwq5"
    threads: int | None = None
    quiet: bool = False
    verbose: bool = False
    codebook: str | None = None          # imports: the reference table (A/B) of layouts that store none
    keep_unquantized: bool = False       # imports: what the checkpoint left unquantized stays BF16
    equalize: bool = False
    imatrix: str | Path | None = None    # a llama-imatrix GGUF, or "auto"
    target_bpw: float | None = None
    smooth_keys: bool | None = None

    def check(self) -> None:
        """The one check of the options themselves (the click verb only parses them)."""
        if self.recipe not in recipes.RECIPES:
            raise ConversionError(f"unknown recipe {self.recipe!r}; choose one of {', '.join(recipes.RECIPES)}")
        if self.imatrix is not None and str(self.imatrix) != "auto" and not Path(self.imatrix).expanduser().is_file():
            raise ConversionError(f"{self.imatrix}: no such importance-matrix file (give a llama-imatrix GGUF or 'auto')")

    @property
    def needs_whole_layers(self) -> bool:
        """Whether the coding needs a layer's tensors together (the full-precision GGUF path)."""
        return self.equalize or self.imatrix is not None or self.target_bpw is not None or bool(self.smooth_keys)


class GGUFSource:
    """A full-precision GGUF (F32/F16/BF16 tensors), coded tensor by tensor."""

    def __init__(self, path: Path):
        if not path.is_file():
            raise ConversionError(f"{path}: no such GGUF file")
        self.path = path
        self.has_vision_tower = False
        self.import_format = None

    def encode(self, tmp: Path, options: ConversionOptions, output: Path, work_dir: Path | None = None) -> dict:
        from hlwq_gguf import llama_tools, textdata

        from .requantize import requantize_gguf

        with tempfile.TemporaryDirectory(prefix=staging_prefix(output), dir=output.parent) as scratch:
            imatrix = options.imatrix
            if str(imatrix) == "auto":
                imatrix = llama_tools.imatrix(builder.ensure_build(), self.path, textdata.calibration_text_file(),
                                              Path(work_dir or scratch) / "imatrix.gguf", chunks=IMATRIX_CHUNKS,
                                              threads=options.threads)
            imatrix = Path(imatrix) if imatrix else None
            if options.target_bpw is None:
                return requantize_gguf(self.path, tmp, options.recipe, imatrix=imatrix, equalize=options.equalize,
                                       threads=options.threads, quiet=options.quiet, smooth_keys=options.smooth_keys)
            from .allocate import allocate

            recipe, _, _, stats = allocate(self.path, options.target_bpw, imatrix=imatrix, equalize=options.equalize,
                                           threads=options.threads, log=(lambda *_: None) if options.quiet else print,
                                           output=tmp, smooth_keys=options.smooth_keys)
            return {**stats, "recipe": recipe}


class CheckpointSource:
    """A Hugging Face checkpoint folder: full-precision safetensors, or a PolarQuant/HLWQ code checkpoint."""

    def __init__(self, model_dir: Path, checkpoint: Checkpoint, import_format: str | None, hub_id: str | None):
        self.path, self.checkpoint, self.import_format, self.hub_id = model_dir, checkpoint, import_format, hub_id
        self.has_vision_tower = checkpoint.has_vision_tower

    def encode(self, tmp: Path, options: ConversionOptions, output: Path) -> dict:
        if options.needs_whole_layers:
            with tempfile.TemporaryDirectory(prefix=staging_prefix(output), dir=output.parent) as work:
                full = Path(work) / "full-precision.gguf"
                # F32 keeps F16 checkpoints exact; large BF16 ones go through BF16, which holds them exactly too
                small = sum(p.stat().st_size for p in self.checkpoint.safetensors) < FULL_PRECISION_F32_LIMIT
                reference_gguf(self.path, full, "f32" if small else "bf16")
                return GGUFSource(full).encode(tmp, options, output, work_dir=Path(work))
        from ._worker import WorkerJob, run

        return run(WorkerJob(
            llama_cpp_tree=str(upstream.patched_tree()), lib_dir=str(builder.ensure_build().bin),
            model_dir=str(self.path), out_tmp=str(tmp), output=str(output), recipe=options.recipe,
            threads=options.threads, quiet=options.quiet, verbose=options.verbose, hub_id=self.hub_id,
            import_format=self.import_format, codebook=options.codebook, keep_unquantized=options.keep_unquantized))


def open_source(source: str | Path, options: ConversionOptions) -> GGUFSource | CheckpointSource:
    """The source behind a path or hub id, validated (and a code checkpoint's codes read) before any output."""
    if str(source).endswith(".gguf"):
        return GGUFSource(Path(source).expanduser())
    model_dir = polarquant.code_folder(resolve(source))
    polarquant.refuse_codeless(model_dir)  # its message names the release, before any generic complaint
    import_format = polarquant.detect(model_dir) if (model_dir / "config.json").is_file() else None
    checkpoint = load_checkpoint(model_dir)
    check_tokenizer(model_dir)
    if import_format:
        if options.needs_whole_layers:
            raise ConversionError(f"{model_dir}: a code checkpoint is imported as it is; --equalize/--imatrix/"
                                  "--target-bpw/--smooth-keys apply only to full-precision checkpoints")
        polarquant.load(model_dir, options.codebook)  # every layout and shape problem surfaces here
    if not checkpoint.architectures:
        raise ConversionError(f"{model_dir / 'config.json'}: no 'architectures' entry, cannot tell the model class")
    hub_id = None if Path(str(source)).expanduser().is_dir() else str(source)
    return CheckpointSource(model_dir, checkpoint, import_format, hub_id)


def convert_checkpoint(source: str | Path, output: str | Path, recipe: str = "hlwq5", quiet: bool = False,
                       verbose: bool = False, threads: int | None = None, codebook: str | None = None,
                       keep_unquantized: bool = False, equalize: bool = False,
                       imatrix: str | Path | None = None, mmproj: bool | None = None,
                       target_bpw: float | None = None, smooth_keys: bool | None = None) -> ConversionReport:
    """Convert `source` (a checkpoint folder, hub id or full-precision GGUF) to an HLWQ GGUF at `output`.

    llama.cpp's own converter classes supply names and metadata; the tensors the recipe selects are HLWQ-coded
    while they are written, one at a time, so memory stays bounded by the largest tensor. The output appears
    atomically, once it has loaded in llama.cpp.

    A PolarQuant/HLWQ code checkpoint (convert/polarquant.py) is imported without re-quantizing: its codes and
    norms are copied into the HLWQ types of its codebook (`codebook` A or B for layouts that store no table;
    ignored otherwise), and the tensors it keeps unquantized follow `recipe` or, with `keep_unquantized`, stay BF16.

    `equalize` applies convert/equalize.py's function-preserving channel scales before coding, estimated from the
    weights; `imatrix` (a llama-imatrix GGUF, or "auto" to compute one on the calibration text) estimates them from
    activations instead and implies `equalize`. `target_bpw` replaces `recipe` by measured bits per tensor for
    that many bits per quantized-matrix weight (convert/allocate.py). `smooth_keys` (off by default) moves K's
    outlier channels into Q (equalize._smooth_keys).

    A checkpoint with a vision tower also gets its projector, `mmproj-<output stem>-f16.gguf` beside `output`, in
    F16 as llama.cpp's converter writes it (`mmproj` False skips it, True requires a vision tower).
    """
    options = ConversionOptions(recipe, threads, quiet, verbose, codebook, keep_unquantized, equalize, imatrix,
                                target_bpw, smooth_keys)
    options.check()
    output = Path(output).expanduser().resolve()
    if not output.parent.is_dir():
        raise ConversionError(f"{output.parent}: output folder does not exist")
    sweep_stale_staging(output)
    src = open_source(source, options)
    if mmproj and not src.has_vision_tower:
        raise ConversionError(f"{src.path}: no vision tower weights, so no projector (mmproj) to write")

    started = time.time()
    with staged_output(output, load_check_source=src.path) as tmp:
        stats = src.encode(tmp, options, output)
    report = ConversionReport(
        output=output, recipe=stats.get("recipe", recipe), bytes=output.stat().st_size,
        weights_quantized=stats["weights"], quantize_seconds=stats["seconds"],
        wall_seconds=stats.get("wall_seconds", time.time() - started), tensor_types=stats["types"],
        peak_anon_bytes=stats.get("peak_anon_bytes", 0), import_format=src.import_format,
        imported_tensors=stats.get("import", []), equalized_tensors=stats.get("equalized", 0),
        smoothed_layers=stats.get("smoothed_layers", 0))

    if mmproj is False or not src.has_vision_tower:
        return report
    projector = output.with_name(f"mmproj-{output.stem}-f16.gguf")
    try:
        reference_gguf(src.path, projector, "f16", mmproj=True)
    except ConversionError as e:
        if mmproj:  # asked for explicitly
            raise
        report.mmproj_error = str(e)  # the text model stands on its own; the caller warns
        return report
    report.mmproj = projector
    return report
