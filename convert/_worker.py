"""The checkpoint path's adapter to llama.cpp's own converter, which runs in a child process.

llama.cpp's model classes (convert_hf_to_gguf / conversion/) supply tensor names, layouts and metadata for
every architecture they support. They import the pinned tree's gguf-py, which must not meet the PyPI `gguf` the
rest of hlwq-gguf uses, hence the child. They run with output type F32 so that nothing is rounded before HLWQ
sees it; the writer's add_tensor asks the TensorPlan (convert/tensor_plan.py) for each tensor's type and codes it
with convert/encode.py, lazily, while it is written.

`run(job)` is the parent's side (convert/pipeline.py calls it); `main()` the child's:
python -m convert._worker <WorkerJob as JSON>.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


_ERROR_FILE: Path | None = None


@dataclass
class WorkerJob:
    """What the child needs: the checkpoint, the file to write and how to code it."""
    llama_cpp_tree: str
    lib_dir: str
    model_dir: str
    out_tmp: str
    output: str  # the final name, for messages
    recipe: str
    threads: int | None = None
    quiet: bool = False
    verbose: bool = False
    hub_id: str | None = None
    import_format: str | None = None
    codebook: str | None = None
    keep_unquantized: bool = False

    @property
    def stats_file(self) -> Path:
        return Path(self.out_tmp).with_suffix(".stats.json")

    @property
    def error_file(self) -> Path:
        return Path(self.out_tmp).with_suffix(".error")


def run(job: WorkerJob) -> dict:
    """Write `job.out_tmp` in a child process; its stats, or a ConversionError with the child's one-line reason.
    The child dies with this process; an interrupt kills it and removes its files."""
    from .source import ConversionError, die_with_parent

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-m", "convert._worker", json.dumps(asdict(job))], env=env,
                            stdout=subprocess.DEVNULL if job.quiet else None,
                            stderr=subprocess.PIPE if job.quiet else None, text=True, preexec_fn=die_with_parent)
    try:
        try:
            _, stderr = proc.communicate()
        except BaseException:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            raise
        if proc.returncode != 0:
            if job.error_file.exists():
                raise ConversionError(job.error_file.read_text().strip())
            lines = [line for line in (stderr or "").splitlines() if line.strip()]
            last = lines[-1].split("\r")[-1] if lines else f"exit code {proc.returncode} (its output is above)"
            raise ConversionError(f"{job.model_dir}: conversion failed: {last}")
        return json.loads(job.stats_file.read_text())
    finally:
        job.stats_file.unlink(missing_ok=True)
        job.error_file.unlink(missing_ok=True)


def _fail(message: str, code: int = 2) -> None:
    """Report a user-facing error: one line in the error file the parent reads (stderr also carries progress bars)."""
    if _ERROR_FILE is not None:
        _ERROR_FILE.write_text(message)
    print(f"hlwq-gguf convert: error: {message}", file=sys.stderr)
    sys.exit(code)


class _AnonymousMemoryPeak:
    """Samples the process's RssAnon (heap and buffers, not the page cache of mmapped safetensors) in a thread.

    The kernel keeps a high-water mark only for the whole RSS, which counts the checkpoint's file pages that
    mmap brings in and the kernel may drop at will; the memory the conversion really holds is the anonymous part.
    """

    def __init__(self, interval: float = 0.01):
        import threading

        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    @staticmethod
    def current_bytes() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak_bytes = max(self.peak_bytes, self.current_bytes())

    def __enter__(self):
        if Path("/proc/self/status").exists():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if Path("/proc/self/status").exists():
            self.peak_bytes = max(self.peak_bytes, self.current_bytes())


class _CountedTensor:
    """Stands in for a tensor in the writer's queue and advances the progress bar once it is on disk."""

    def __init__(self, tensor, on_written):
        self.tensor, self.nbytes, self.on_written = tensor, tensor.nbytes, on_written

    def tofile(self, fout) -> None:
        self.tensor.tofile(fout)
        self.on_written(self.nbytes)


def _with_progress(writer, stats: dict, enabled: bool):
    """Replace the writer's byte-only bar by one over tensors that also shows bytes and the quantizer's rate."""
    from tqdm import tqdm

    original = writer.write_tensors_to_file

    def write_tensors_to_file(*, progress: bool = False) -> None:
        n_tensors = sum(len(shard) for shard in writer.tensors)
        total_bytes = sum(ti.nbytes for shard in writer.tensors for ti in shard.values())
        with tqdm(total=n_tensors, unit="tensor", desc="Converting", disable=not enabled, file=sys.stderr) as bar:
            written = 0

            def on_written(nbytes: int) -> None:
                nonlocal written
                written += nbytes
                rate = stats["weights"] / max(stats["seconds"], 1e-9) / 1e6
                bar.set_postfix_str(f"{written / 2**20:.0f}/{total_bytes / 2**20:.0f} MiB, {rate:.1f} M weights/s", refresh=False)
                bar.update(1)

            for shard in writer.tensors:
                for ti in shard.values():
                    ti.tensor = _CountedTensor(ti.tensor, on_written)
            original(progress=False)

    return write_tensors_to_file


class _CodedSource:
    """The coded weights behind one lazy source tensor (one matrix, or an expert stack), as llama.cpp's model
    classes see it: the exact reference dequantization. While it is computed the block hashes are kept, so that
    every block that reaches an output tensor unchanged can be found and its codes copied (see _repack)."""

    def __init__(self, weights):
        self.weights = weights if isinstance(weights, list) else [weights]
        self.stacked = isinstance(weights, list)
        self.hashes = None
        self.packed_blocks = None

    @property
    def shape(self):
        rows, cols = self.weights[0].shape
        return (len(self.weights), rows, cols) if self.stacked else (rows, cols)

    def dequantize(self):
        import numpy as np

        # rows whose width is a multiple of 128 can take copied blocks: keep their hashes and ggml blocks, made from
        # the same read of the codes as the values
        copyable = self.weights[0].in_features % 128 == 0
        decoded = [w.decode(packed=copyable) for w in self.weights]
        values = np.stack([v for v, _ in decoded]) if self.stacked else decoded[0][0]
        if copyable:
            self.hashes = _block_hashes(values.reshape(-1, 128))
            self.packed_blocks = np.concatenate([p for _, p in decoded])
        return values

    def release(self) -> None:
        self.hashes = self.packed_blocks = None


def _block_hashes(blocks):
    """A 64-bit hash of the fp32 bytes of each block (matches are verified value by value afterwards)."""
    import numpy as np

    multipliers = np.random.default_rng(0x484C5751).integers(1, 2**63, size=blocks.shape[1], dtype=np.uint64) | np.uint64(1)
    words = np.ascontiguousarray(blocks, dtype=np.float32).view(np.uint32).astype(np.uint64)
    with np.errstate(over="ignore"):
        return (words * multipliers).sum(axis=1, dtype=np.uint64)


def _sources_of(tensor) -> list:
    """The _CodedSource objects at the leaves of a lazy tensor's graph (what this output tensor is made of)."""
    found, seen, stack = [], set(), [tensor]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, _CodedSource):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "_args"):
            stack.extend(item._args or ())
            stack.extend((item._kwargs or {}).values())
    return found


def _repack(array, sources, block_type, ggml, threads: int, report: dict):
    """Copy the codes of every 128-block of `array` that is a block of a source, bit for bit; encode any other
    block with the same type's quantizer and record the error that adds."""
    import numpy as np

    blocks = np.ascontiguousarray(array, dtype=np.float32).reshape(-1, 128)
    out = np.zeros((blocks.shape[0], block_type.type_size), dtype=np.uint8)
    matched = np.zeros(blocks.shape[0], dtype=bool)
    usable = [s for s in sources if s.hashes is not None]
    if usable:
        source_hashes = np.concatenate([s.hashes for s in usable])
        owner = np.concatenate([np.full(s.hashes.size, i) for i, s in enumerate(usable)])
        local = np.concatenate([np.arange(s.hashes.size) for s in usable])
        order = np.argsort(source_hashes, kind="stable")
        wanted = _block_hashes(blocks)
        found = order[np.minimum(np.searchsorted(source_hashes[order], wanted), order.size - 1)]
        hit = source_hashes[found] == wanted
        for i, source in enumerate(usable):
            rows = np.flatnonzero(hit & (owner[found] == i))
            if rows.size:
                candidate = source.packed_blocks[local[found][rows]]
                exact = np.all(block_type.dequantize_blocks(candidate) == blocks[rows], axis=1)
                out[rows[exact]] = candidate[exact]
                matched[rows[exact]] = True
    missing = np.flatnonzero(~matched)
    added = 0.0
    if missing.size:
        out[missing] = ggml.quantize(block_type.name, blocks[missing], threads).reshape(missing.size, -1)
        error = block_type.dequantize_blocks(out[missing]) - blocks[missing]
        added = float(np.sqrt(np.sum(error.astype(np.float64) ** 2) / max(np.sum(blocks.astype(np.float64) ** 2), 1e-30)))
    report.update(blocks=int(blocks.shape[0]), copied=int(matched.sum()), added_rel_rms=added)
    return out.reshape(*array.shape[:-1], -1)


def _importing(model_class, imported, lazy_tensor_cls):
    """`model_class` reading the imported checkpoint: coded weights as their exact dequantization (lazily)."""
    import numpy as np
    import torch

    def coded_leaf(weights):
        source = _CodedSource(weights)
        meta = lazy_tensor_cls.meta_with_dtype_and_shape(torch.float32, source.shape)
        return lazy_tensor_cls(meta=meta, args=(source,), func=lambda s: torch.from_numpy(np.ascontiguousarray(s.dequantize())))

    def plain_leaf(plain):
        dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(plain.dtype)
        if dtype is None:
            return lazy_tensor_cls.from_eager(torch.from_numpy(np.array(plain.file.array(plain.key))))
        meta = lazy_tensor_cls.meta_with_dtype_and_shape(dtype, plain.shape)

        def load(p):
            raw = np.array(p.file.array(p.key))
            return torch.from_numpy(raw.view(np.int16) if p.dtype == "BF16" else raw).view(dtype)
        return lazy_tensor_cls(meta=meta, args=(plain,), func=load)

    class ImportedModel(model_class):
        model_arch = model_class.model_arch

        def index_tensors(self, remote_hf_model_id=None):
            tensors = {}
            entries = [(n, (lambda w=w: coded_leaf(w))) for n, w in imported.coded.items()]
            entries += [(n, (lambda p=p: plain_leaf(p))) for n, p in imported.plain.items()]
            for name, gen in entries:
                if item := self.filter_tensors((name, gen)):
                    tensors[item[0]] = item[1]
            return tensors

    ImportedModel.__name__ = model_class.__name__
    return ImportedModel


def main() -> None:
    global _ERROR_FILE
    job = WorkerJob(**json.loads(sys.argv[1]))
    _ERROR_FILE = job.error_file
    tree = Path(job.llama_cpp_tree)
    sys.path[:0] = [str(tree / "gguf-py"), str(tree)]
    # upstream's converter logs every hyper-parameter at INFO; our own progress bar says what is going on
    logging.basicConfig(level=logging.INFO if job.verbose else logging.ERROR if job.quiet else logging.WARNING,
                        format="%(message)s")

    import numpy as np
    import torch
    import gguf

    from convert import polarquant
    from convert.encode import add_codebook_metadata, check_finite, encode_tensor
    from convert.source import ConversionError
    from convert.tensor_plan import TensorPlan
    from hlwq_gguf import codec, gguf_types, recipes

    gguf_types.register(gguf)
    import convert_hf_to_gguf as upstream
    from hlwq_gguf.ggml_ctypes import GGML

    ggml = GGML(Path(job.lib_dir))
    threads = int(job.threads or os.cpu_count() or 1)

    recipe = recipes.RECIPES[job.recipe]
    dir_model = Path(job.model_dir)
    imported = None
    if job.import_format:
        try:
            imported = polarquant.load(dir_model, job.codebook)
        except ConversionError as e:
            _fail(str(e))
    out_tmp = Path(job.out_tmp)
    stats = {"weights": 0, "seconds": 0.0, "types": {}, "import": []}

    hparams = upstream.ModelBase.load_hparams(dir_model, False)
    architecture = upstream.get_model_architecture(hparams, upstream.ModelType.TEXT)
    try:
        model_class = upstream.get_model_class(architecture, mmproj=False)
    except NotImplementedError:
        _fail(f"{dir_model / 'config.json'}: architecture {architecture} is not supported by the pinned llama.cpp converter")

    if imported is not None:
        from conversion.base import LazyTorchTensor

        model_class = _importing(model_class, imported, LazyTorchTensor)

    with torch.inference_mode():
        model = model_class(dir_model, gguf.LlamaFileType.ALL_F32, out_tmp, is_big_endian=False,
                            use_temp_file=False, eager=False, metadata_override=None, model_name=None,
                            split_max_tensors=0, split_max_size=0, dry_run=False, small_first_shard=False,
                            remote_hf_model_id=job.hub_id)
        writer = model.gguf_writer
        tensor_plan = TensorPlan(recipe, keep_unquantized=job.keep_unquantized, tied_embeddings=not any(
            name in model.model_tensors for name in ("lm_head.weight", "output.weight")))

        def checked_quantize(name: str, qtype, block_type):
            def run(array: np.ndarray) -> np.ndarray:
                started = time.perf_counter()
                if block_type is None:
                    check_finite(name, array)
                    out = gguf.quants.quantize(array, qtype)
                else:
                    out = encode_tensor(ggml, name, array, block_type.name, threads)
                stats["seconds"] += time.perf_counter() - started
                stats["weights"] += int(np.size(array))
                return out
            return run

        original_add_tensor = writer.add_tensor

        def import_type(name, tensor):
            """(type, origin) of a tensor of an imported checkpoint: origin is the list of coded sources whose
            codes it copies, or the report entry of a tensor re-encoded from them, or None for a plain tensor."""
            sources = _sources_of(tensor)
            shape = tuple(tensor.shape)
            if not sources:
                return tensor_plan.type_for_plain(name, shape), None
            decision = tensor_plan.type_for_imported(name, shape, [w for s in sources for w in s.weights])
            if decision.reason is None:
                return decision.type_name, sources
            entry = {"name": name, "copied": 0, "blocks": 0, "added_rel_rms": 0.0, "reason": decision.reason}
            stats["import"].append(entry)
            return decision.type_name, entry

        def add_tensor(name, tensor, raw_shape=None, raw_dtype=None, tensor_endianess=None):
            type_name = None
            origin = None
            if raw_dtype == gguf.GGMLQuantizationType.F32 and not isinstance(tensor, gguf.LazyChunkedTensor):
                if imported is not None:
                    type_name, origin = import_type(name, tensor)
                else:
                    type_name = tensor_plan.type_for(name, tuple(tensor.shape))
            if type_name is None:
                if raw_dtype == gguf.GGMLQuantizationType.F32 and not isinstance(tensor, gguf.LazyChunkedTensor):
                    check = checked_quantize(name, gguf.GGMLQuantizationType.F32, None)
                    tensor = gguf.LazyNumpyTensor._wrap_fn(check, meta_noop=True)(tensor) \
                        if isinstance(tensor, gguf.LazyNumpyTensor) else check(tensor)
                return original_add_tensor(name, tensor, raw_shape=raw_shape, raw_dtype=raw_dtype,
                                           tensor_endianess=tensor_endianess)
            qtype = gguf.GGMLQuantizationType[type_name.upper()]
            stats["types"][type_name] = stats["types"].get(type_name, 0) + 1
            block_type = codec.BLOCK_TYPES.get(type_name.upper())
            quantize = checked_quantize(name, qtype, block_type)
            if isinstance(origin, list):  # codes of an imported checkpoint: copied, not re-quantized
                entry = {"name": name, "type": type_name, "reason": None}
                stats["import"].append(entry)

                def quantize(array, sources=origin, block_type=block_type, entry=entry):
                    started = time.perf_counter()
                    try:
                        return _repack(array, sources, block_type, ggml, threads, entry)
                    finally:
                        for source in sources:
                            source.release()
                        stats["seconds"] += time.perf_counter() - started
                        stats["weights"] += int(np.size(array))
            elif isinstance(origin, dict):  # re-encoded from the exact dequantization: measure what that adds
                origin["type"] = type_name
                encode = quantize

                def quantize(array, encode=encode, entry=origin, qtype=qtype):
                    out = encode(array)
                    entry["blocks"] = int(np.size(array) // gguf.GGML_QUANT_SIZES[qtype][0])
                    error = gguf.quants.dequantize(out, qtype).reshape(array.shape) - array
                    entry["added_rel_rms"] = float(np.sqrt(np.sum(error.astype(np.float64) ** 2) / max(np.sum(np.asarray(array, np.float64) ** 2), 1e-30)))
                    return out
            if isinstance(tensor, gguf.LazyNumpyTensor):
                block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
                tensor = gguf.LazyNumpyTensor._wrap_fn(
                    quantize, meta_noop=(np.uint8, lambda s: (*s[:-1], s[-1] // block_size * type_size)))(tensor)
            else:
                tensor = quantize(tensor)
            return original_add_tensor(name, tensor, raw_dtype=qtype, tensor_endianess=tensor_endianess)

        writer.add_tensor = add_tensor
        writer.write_tensors_to_file = _with_progress(writer, stats, enabled=not job.quiet)
        original_add_file_type = writer.add_file_type
        writer.add_file_type = lambda _ftype: original_add_file_type(recipe.ftype)
        add_codebook_metadata(writer)
        writer.add_string("hlwq.recipe", recipe.name)
        if imported is not None:
            # the _A/_B types name their table; these say where the codes came from
            writer.add_string("hlwq.import.format", imported.format)
            writer.add_string("hlwq.import.codebook", polarquant.TABLE_LETTERS[imported.table_letter])

        started = time.time()
        try:
            with _AnonymousMemoryPeak() as memory:
                model.write()
        except codec.HLWQValueError as e:
            _fail(f"{dir_model}: {e}")
        except ConversionError as e:  # a checkpoint problem found while its tensors are read
            _fail(str(e))
        elapsed = time.time() - started

    stats["wall_seconds"] = elapsed
    stats["peak_anon_bytes"] = memory.peak_bytes
    job.stats_file.write_text(json.dumps(stats))


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


if __name__ == "__main__":
    try:
        main()
    except Exception as e:
        failed = WorkerJob(**json.loads(sys.argv[1]))
        from convert.source import is_short_write, short_write_message

        if is_short_write(e):
            _fail(short_write_message(Path(failed.output), e))
        if failed.verbose:
            import traceback
            traceback.print_exc()
        # upstream's converter meeting a file it cannot read: one line, not its traceback
        _fail(f"{failed.model_dir}: llama.cpp's converter failed: {_one_line(e)}")
