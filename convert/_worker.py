"""The conversion itself, run in a child process that imports the pinned llama.cpp's own converter.

llama.cpp's model classes (convert_hf_to_gguf / conversion/) supply tensor names, layouts and metadata for
every architecture they support; they run with output type F32 so that nothing is rounded before HLWQ sees
it, and the writer's add_tensor is wrapped to quantize each selected tensor (lazily, while it is written).
Usage: python -m convert._worker <json-args>
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path


_ERROR_FILE: Path | None = None


def _fail(message: str, code: int = 2) -> None:
    """Report a user-facing error: one line in the error file the parent reads (stderr also carries progress bars)."""
    if _ERROR_FILE is not None:
        _ERROR_FILE.write_text(message)
    print(f"hlwq-gguf convert: error: {message}", file=sys.stderr)
    sys.exit(code)


def _quantize_with_ggml(ggml, block_type, array, threads: int):
    """HLWQ-code an array (..., n) with the patched ggml, which produces the same bytes as hlwq_gguf.codec.

    ggml saturates a block scale beyond fp16 at 65504 rather than failing; such a block is refused here.
    """
    import numpy as np

    from hlwq_gguf import codec

    rows = array.reshape(-1, array.shape[-1])
    packed = ggml.quantize(block_type.name, rows, threads)
    scales = np.ascontiguousarray(packed.reshape(-1, block_type.type_size)[:, :2]).view("<f2").reshape(-1)
    saturated = np.flatnonzero(~(np.abs(scales) < codec.FP16_MAX))
    if saturated.size:
        block = int(saturated[0])
        norm = float(codec.block_norms(rows.reshape(-1, block_type.block_size)[block:block + 1])[0])
        raise codec.HLWQValueError(f"block {block}: block norm {norm:.7g} exceeds fp16 range (max {codec.FP16_MAX:g})")
    return packed.reshape(*array.shape[:-1], -1)


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


def main() -> None:
    global _ERROR_FILE
    args = json.loads(sys.argv[1])
    _ERROR_FILE = Path(args["error_out"])
    tree = Path(args["llama_cpp_tree"])
    sys.path[:0] = [str(tree / "gguf-py"), str(tree)]
    # upstream's converter logs every hyper-parameter at INFO; our own progress bar says what is going on
    logging.basicConfig(level=logging.INFO if args.get("verbose") else logging.ERROR if args.get("quiet") else logging.WARNING,
                        format="%(message)s")

    import numpy as np
    import torch
    import gguf

    from hlwq_gguf import codec, gguf_types, recipes

    gguf_types.register(gguf)
    import convert_hf_to_gguf as upstream
    from hlwq_gguf.ggml_ctypes import GGML

    ggml = GGML(Path(args["lib_dir"]))
    threads = int(args.get("threads") or os.cpu_count() or 1)

    recipe = recipes.RECIPES[args["recipe"]]
    dir_model = Path(args["model_dir"])
    out_tmp = Path(args["out_tmp"])
    stats = {"weights": 0, "seconds": 0.0, "types": {}}

    hparams = upstream.ModelBase.load_hparams(dir_model, False)
    architecture = upstream.get_model_architecture(hparams, upstream.ModelType.TEXT)
    try:
        model_class = upstream.get_model_class(architecture, mmproj=False)
    except NotImplementedError:
        _fail(f"{dir_model / 'config.json'}: architecture {architecture} is not supported by the pinned llama.cpp converter")

    with torch.inference_mode():
        model = model_class(dir_model, gguf.LlamaFileType.ALL_F32, out_tmp, is_big_endian=False,
                            use_temp_file=False, eager=False, metadata_override=None, model_name=args.get("model_name"),
                            split_max_tensors=0, split_max_size=0, dry_run=False, small_first_shard=False,
                            remote_hf_model_id=args.get("hub_id"))
        writer = model.gguf_writer
        tied = not any(name in model.model_tensors for name in ("lm_head.weight", "output.weight"))

        def checked_quantize(name: str, qtype, block_type):
            def run(array: np.ndarray) -> np.ndarray:
                started = time.perf_counter()
                if not np.isfinite(array).all():
                    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
                    raise codec.HLWQValueError(f"tensor {name}: {bad} NaN/Inf weights")
                try:
                    if block_type is None:
                        out = gguf.quants.quantize(array, qtype)
                    else:
                        out = _quantize_with_ggml(ggml, block_type, array, threads)
                except codec.HLWQValueError as e:
                    raise codec.HLWQValueError(f"tensor {name}: {e}") from None
                stats["seconds"] += time.perf_counter() - started
                stats["weights"] += int(np.size(array))
                return out
            return run

        original_add_tensor = writer.add_tensor

        def add_tensor(name, tensor, raw_shape=None, raw_dtype=None, tensor_endianess=None):
            type_name = None
            if raw_dtype == gguf.GGMLQuantizationType.F32 and not isinstance(tensor, gguf.LazyChunkedTensor):
                type_name = recipes.tensor_type(recipe, name, tuple(tensor.shape), tied_embeddings=tied)
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
            if isinstance(tensor, gguf.LazyNumpyTensor):
                block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
                tensor = gguf.LazyNumpyTensor._wrap_fn(
                    quantize, meta_noop=(np.uint8, lambda s: (*s[:-1], s[-1] // block_size * type_size)))(tensor)
            else:
                tensor = quantize(tensor)
            return original_add_tensor(name, tensor, raw_dtype=qtype, tensor_endianess=tensor_endianess)

        writer.add_tensor = add_tensor
        writer.write_tensors_to_file = _with_progress(writer, stats, enabled=not args.get("quiet"))
        original_add_file_type = writer.add_file_type
        writer.add_file_type = lambda _ftype: original_add_file_type(recipe.ftype)
        for key, value in gguf_types.codebook_metadata().items():
            (writer.add_string if isinstance(value, str) else writer.add_uint32)(key, value)
        writer.add_string("hlwq.recipe", recipe.name)

        started = time.time()
        try:
            with _AnonymousMemoryPeak() as memory:
                model.write()
        except codec.HLWQValueError as e:
            _fail(f"{dir_model}: {e}")
        elapsed = time.time() - started

    stats["wall_seconds"] = elapsed
    stats["peak_anon_bytes"] = memory.peak_bytes
    with open(args["stats_out"], "w") as f:
        json.dump(stats, f)


if __name__ == "__main__":
    main()
