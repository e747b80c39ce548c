"""Every layer's mean key before RoPE, measured on text, for llama.cpp's K centering (`blk.N.attn_k_mean`).

A quantized K cache may hold k - c instead of k for any constant c: every score of a query shifts by the same
q . c, and softmax does not change (exact in float). The K-centering patch takes c from the mean after RoPE of the
keys' constant part. Without a measurement that is the key bias, which only some models have (Qwen2's); keys
without one still share a large mean on a few channels, and a 3-4-bit code spends its steps on it. This module runs
the model through the patched llama.cpp on calibration text, reads each layer's key just before RoPE (the input of
the ROPE node llama.cpp names `Kcur-<layer>`, after any bias and key norm, in the file's channel order) and writes
the mean into a copy of the GGUF, which the patched loader reads and every architecture's cache then centers on.
The first token of each chunk (the BOS, an attention sink whose key is unlike the others) is left out.

Measured on SmolLM2-135M and Gemma-3-270M (docs/BENCHMARKS.md): centering on the mean cuts a 4-bit K cache's KL
divergence by 26-29 % (0.047 -> 0.035, 0.101 -> 0.074) and a 3-bit one's by 31-37 %.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# the calibration the CLI and the benchmarks use: 8 chunks of 512 tokens of the calibration text
DEFAULT_CHUNKS = 8
DEFAULT_CHUNK_TOKENS = 512
MEAN_TENSOR = "blk.{}.attn_k_mean"
CALIBRATION_KEY = "hlwq.kv_calibration"

_GGML_MAX_DIMS, _GGML_MAX_SRC, _GGML_MAX_OP_PARAMS, _GGML_MAX_NAME = 4, 10, 64, 64
_GGML_TYPE_F32 = 0


class _GGMLTensor(ctypes.Structure):
    """struct ggml_tensor of the pinned ggml (ggml.h); its size is checked against GGML_TENSOR_SIZE (336)."""


_GGMLTensor._fields_ = [
    ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * _GGML_MAX_DIMS),
    ("nb", ctypes.c_size_t * _GGML_MAX_DIMS), ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (_GGML_MAX_OP_PARAMS // 4)), ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(_GGMLTensor) * _GGML_MAX_SRC), ("view_src", ctypes.c_void_p),
    ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * _GGML_MAX_NAME),
    ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]
assert ctypes.sizeof(_GGMLTensor) == 336


class CalibrationError(ValueError):
    """A model or text the calibration cannot use (one line, naming the file)."""


@dataclass
class KeyMeans:
    """Per layer, the mean key before RoPE [n_head_kv * head_dim] (float32) over `tokens` tokens."""

    means: dict[int, np.ndarray]
    tokens: int
    text: str
    k_bits: object = None  # hlwq_gguf.kvbits.LayerKBits where calibrate chose per-layer K bits


def _tensor_values(tensor: _GGMLTensor) -> np.ndarray:
    """A float32 tensor in host memory as a [rows, ne0] array (a copy; views with any strides)."""
    if tensor.type != _GGML_TYPE_F32 or not tensor.data:
        raise CalibrationError(f"{tensor.name.decode()}: not an F32 tensor in host memory")
    ne, nb = list(tensor.ne), list(tensor.nb)
    span = sum((n - 1) * b for n, b in zip(ne, nb)) + 4
    buffer = (ctypes.c_char * span).from_address(tensor.data)
    flat = np.frombuffer(buffer, dtype=np.float32, count=span // 4)
    view = np.lib.stride_tricks.as_strided(flat, shape=tuple(reversed(ne)), strides=tuple(reversed(nb)))
    return np.array(view, dtype=np.float32).reshape(-1, ne[0] * ne[1])


def measure_key_means(model_path: str | Path, text: str, *, chunks: int = DEFAULT_CHUNKS,
                      chunk_tokens: int = DEFAULT_CHUNK_TOKENS, threads: int | None = None,
                      text_name: str = "text", progress: bool = True, verbose: bool = False) -> KeyMeans:
    """Run `model_path` on `chunks` chunks of `chunk_tokens` tokens of `text` (each a fresh sequence from position 0,
    one batch) and return every layer's mean key before RoPE; the first token of each chunk is left out."""
    from tqdm import tqdm

    from . import runtime

    llama_cpp = runtime.llama_cpp_module()
    importlib.import_module(f"{llama_cpp.__name__}._logger").set_verbose(verbose)  # llama.cpp's log: errors only
    # the instance libllama uses; ggml_op_name names an op id
    base = ctypes.CDLL(str(runtime.library_dir() / "libggml-base.so"))
    base.ggml_op_name.restype = ctypes.c_char_p
    base.ggml_op_name.argtypes = [ctypes.c_int]
    is_rope: dict[int, bool] = {}
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}

    def key_layer(tensor: _GGMLTensor) -> int | None:
        if tensor.op not in is_rope:
            is_rope[tensor.op] = base.ggml_op_name(tensor.op) == b"ROPE"
        name = tensor.name.decode(errors="replace")
        if not is_rope[tensor.op] or not name.startswith("Kcur-") or not name[5:].isdigit():
            return None
        return int(name[5:])

    failures: list[Exception] = []

    def observe(tensor_ptr, ask, _user_data):
        # an exception cannot cross the C callback: it is kept, and returning False stops the graph
        try:
            tensor = ctypes.cast(tensor_ptr, ctypes.POINTER(_GGMLTensor)).contents
            layer = key_layer(tensor)
            if ask or layer is None:
                return layer is not None
            keys = _tensor_values(tensor.src[0].contents)[1:]  # one batch from position 0: row 0 is the BOS
            sums[layer] = sums.get(layer, 0.0) + keys.sum(axis=0, dtype=np.float64)
            counts[layer] = counts.get(layer, 0) + len(keys)
            return True
        except Exception as e:  # noqa: BLE001 - re-raised after llama_decode returns
            failures.append(e)
            return False

    callback = llama_cpp.ggml_backend_sched_eval_callback(observe)
    llama_cpp.llama_backend_init()
    model_params = llama_cpp.llama_model_default_params()
    model_params.n_gpu_layers = 0  # the callback reads tensors in host memory
    model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), model_params)
    if not model:
        raise CalibrationError(f"{model_path}: llama.cpp cannot load this model")
    try:
        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx = context_params.n_batch = context_params.n_ubatch = chunk_tokens
        context_params.n_threads = context_params.n_threads_batch = threads or os.cpu_count() or 1
        context_params.cb_eval = callback
        context_params.cb_eval_user_data = None
        context = llama_cpp.llama_init_from_model(model, context_params)
        if not context:
            raise CalibrationError(f"{model_path}: llama.cpp cannot create a context of {chunk_tokens} tokens")
        try:
            tokens = _tokenize(llama_cpp, model, text, chunks * (chunk_tokens - 1))
            if len(tokens) < chunk_tokens - 1:
                raise CalibrationError(f"{text_name}: {len(tokens)} tokens, fewer than one chunk of {chunk_tokens}")
            bos = llama_cpp.llama_vocab_bos(llama_cpp.llama_model_get_vocab(model))
            step = chunk_tokens - 1
            for start in tqdm(range(0, len(tokens) - step + 1, step), desc="mean keys", unit="chunk",
                              disable=not progress):
                # a vocabulary without a BOS starts the chunk with one more text token, left out like the BOS
                chunk = [bos, *tokens[start:start + step]] if bos >= 0 else tokens[max(start - 1, 0):start + step]
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(context), True)
                batch_tokens = (llama_cpp.llama_token * len(chunk))(*chunk)
                status = llama_cpp.llama_decode(context, llama_cpp.llama_batch_get_one(batch_tokens, len(chunk)))
                if failures:
                    raise CalibrationError(f"{model_path}: {failures[0]}")
                if status != 0:
                    raise CalibrationError(f"{model_path}: llama_decode failed on calibration chunk at token {start}")
        finally:
            llama_cpp.llama_free(context)
    finally:
        llama_cpp.llama_model_free(model)
    if not sums:
        raise CalibrationError(f"{model_path}: no RoPE'd key (a ROPE node named Kcur-<layer>) in this model's graph")
    means = {layer: (sums[layer] / counts[layer]).astype(np.float32) for layer in sorted(sums)}
    return KeyMeans(means, tokens=counts[min(counts)], text=text_name)


def _tokenize(llama_cpp, model, text: str, n_tokens: int) -> list[int]:
    """The first n_tokens tokens of `text` without special tokens (enough characters for them, at most all)."""
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_chars = min(len(text), 8 * n_tokens)
    while True:
        raw = text[:n_chars].encode()
        buffer = (llama_cpp.llama_token * (len(raw) + 16))()
        n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buffer, len(buffer), False, False)
        if n < 0:
            raise CalibrationError(f"llama_tokenize failed ({n})")
        if n >= n_tokens or n_chars >= len(text):
            return list(buffer[:min(n, n_tokens)])
        n_chars = min(len(text), 2 * n_chars)


def write_key_means(source: str | Path, output: str | Path, key_means: KeyMeans, k_bits=None) -> None:
    """Copy the GGUF `source` to `output` with `blk.N.attn_k_mean` (F32) for every measured layer, replacing any it
    had, and `hlwq.kv_calibration` saying what was measured; with k_bits (hlwq_gguf.kvbits.LayerKBits) also its
    digits as `hlwq.kv_k_bits`. Written beside `output` and renamed onto it."""
    import gguf

    from convert.requantize import add_tensor_info, copy_field
    from convert.sink import staged_output

    from . import gguf_files, kvbits

    reader = gguf_files.read_gguf(source)
    architecture = reader.fields["general.architecture"].contents()
    kept = [t for t in reader.tensors if not (t.name.startswith("blk.") and t.name.endswith(".attn_k_mean"))]
    with staged_output(Path(output)) as tmp:
        writer = gguf.GGUFWriter(tmp, architecture)
        replaced = (CALIBRATION_KEY,) + ((kvbits.K_BITS_KEY,) if k_bits is not None else ())
        for field in reader.fields.values():
            if field.name not in replaced:
                copy_field(writer, field)
        calibration = f"mean key before RoPE over {key_means.tokens} tokens of {key_means.text}"
        if k_bits is not None:
            calibration += (f"; K 3-bit in {k_bits.n_low} layers of a hlwq3_64 cache ({k_bits.bits_per_value:.3f} bits "
                            f"per value), by each layer's KL divergence on {k_bits.text}")
            writer.add_string(kvbits.K_BITS_KEY, k_bits.digits)
        writer.add_string(CALIBRATION_KEY, calibration + " (hlwq-gguf kv-calibrate)")
        for t in kept:
            add_tensor_info(writer, t.name, tuple(int(n) for n in reversed(t.shape)), t.tensor_type)
        for layer, mean in key_means.means.items():
            writer.add_tensor_info(MEAN_TENSOR.format(layer), mean.shape, np.dtype(np.float32), mean.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in kept:
            writer.write_tensor_data(np.ascontiguousarray(t.data))
        for mean in key_means.means.values():
            writer.write_tensor_data(mean)
        writer.close()


def read_key_means(path: str | Path) -> dict[int, np.ndarray]:
    """The `blk.N.attn_k_mean` tensors of a GGUF, by layer (empty where it has none)."""
    from . import gguf_files

    means = {}
    for t in gguf_files.header_reader(path).tensors:
        if t.name.startswith("blk.") and t.name.endswith(".attn_k_mean"):
            means[int(t.name.split(".")[1])] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    return means


def calibrate(model: str | Path, output: str | Path, *, text: str | Path | None = None, chunks: int = DEFAULT_CHUNKS,
              chunk_tokens: int = DEFAULT_CHUNK_TOKENS, threads: int | None = None, kv_bits: float | None = None,
              progress: bool = True) -> KeyMeans:
    """Measure `model`'s mean keys on `text` (default: hlwq-gguf's calibration text, which no benchmark scores on)
    and write `output`: the same GGUF with them added (see the module docstring). With kv_bits, then also choose
    which layers of a hlwq3_64 cache keep a 4-bit K for kv_bits bits per value (hlwq_gguf.kvbits) and add that."""
    from . import gguf_files, kvbits, textdata

    model = Path(model)
    gguf_files.read_gguf(model, header_only=True)  # a one-line GGUFFileError for what is not a GGUF llama.cpp reads
    if kv_bits is not None:
        kvbits.check(model, kv_bits)
    text_path = Path(text) if text is not None else textdata.calibration_text_file()
    try:
        body = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{text_path}: cannot read the calibration text ({e})") from None
    key_means = measure_key_means(model, body, chunks=chunks, chunk_tokens=chunk_tokens, threads=threads,
                                  text_name=text_path.name, progress=progress)
    if kv_bits is None:
        write_key_means(model, output, key_means)
        return key_means
    with tempfile.TemporaryDirectory(prefix="hlwq-kvcalib-", dir=Path(output).resolve().parent) as tmp:
        centered = Path(tmp) / "means.gguf"  # the per-layer costs are measured with K centered, as it will run
        write_key_means(model, centered, key_means)
        key_means.k_bits = kvbits.measure(centered, kv_bits, text=text_path, threads=threads, progress=progress)
        write_key_means(centered, output, key_means, key_means.k_bits)
    return key_means
