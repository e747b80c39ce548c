#!/usr/bin/env python3
"""Fuzz the GGUF loading path and the HLWQ kernels with atheris (libFuzzer for Python).

Each input is a whole GGUF file. It goes through:
  - the patched ggml's own loader (gguf_init_from_buffer, allocating the tensor data in a ggml context), then, for
    every HLWQ tensor it accepts, ggml_validate_row_data, the dequantizer (to_float) and the CPU vec_dot on the
    first row, which is what a model with that tensor would run;
  - our Python reader of downloaded GGUFs, the MoE planner (hlwq_gguf.plan.read_layout): anything but its one-line
    PlanError is a finding; for HLWQ tensors it reads, the numpy codec's dequantizer.
A native crash (SIGSEGV, abort) or an unexpected Python exception stops the run, and libFuzzer writes the input to
`crash-<sha1>` in the artifacts folder.

The seeds are small valid HLWQ GGUFs written here (one per HLWQ weight type family, with llama metadata so the
planner gets past its first checks). A custom mutator mixes libFuzzer's byte mutations with GGUF-aware ones
(counts, lengths, types, dimensions and offsets replaced by boundary values), because the native library is not
coverage-instrumented (only the Python side is).

  python scripts/fuzz_gguf.py --seconds 3600            # the long run
  python scripts/fuzz_gguf.py --seconds 60 --runs-log x  # what tests/test_fuzz.py runs
"""
from __future__ import annotations

import argparse
import ctypes
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

INTERESTING = [0, 1, 2, 3, 4, 7, 8, 31, 32, 63, 64, 127, 128, 255, 256, 1023, 4096, 65535, 65536, 2**31 - 1, 2**31,
               2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
MAX_ELEMENTS = 1 << 20  # larger tensors are only validated, not dequantized (keeps one execution in milliseconds)


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


class NativeTarget:
    """The patched ggml, driven the way llama.cpp loads and runs a GGUF's tensors."""

    def __init__(self, lib_dir: Path):
        from hlwq_gguf import codec, gguf_types
        from hlwq_gguf.ggml_ctypes import GGML

        self.ggml = GGML(lib_dir)
        base = self.ggml.base
        base.gguf_init_from_buffer.restype = ctypes.c_void_p
        base.gguf_init_from_buffer.argtypes = [ctypes.c_char_p, ctypes.c_size_t, _InitParams]
        base.gguf_get_n_tensors.restype = ctypes.c_int64
        base.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
        base.gguf_get_tensor_name.restype = ctypes.c_char_p
        base.gguf_get_tensor_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        base.gguf_get_tensor_type.restype = ctypes.c_int
        base.gguf_get_tensor_type.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        base.gguf_free.argtypes = [ctypes.c_void_p]
        base.ggml_get_tensor.restype = ctypes.c_void_p
        base.ggml_get_tensor.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        base.ggml_get_data.restype = ctypes.c_void_p
        base.ggml_get_data.argtypes = [ctypes.c_void_p]
        base.ggml_nbytes.restype = ctypes.c_size_t
        base.ggml_nbytes.argtypes = [ctypes.c_void_p]
        base.ggml_nelements.restype = ctypes.c_int64
        base.ggml_nelements.argtypes = [ctypes.c_void_p]
        base.ggml_free.argtypes = [ctypes.c_void_p]
        self.hlwq_types = {gguf_types.GGML_TYPE_IDS[name]: name for name in codec.BLOCK_TYPES}

    def run(self, data: bytes) -> None:
        import numpy as np

        base = self.ggml.base
        ctx = ctypes.c_void_p()
        gguf_ctx = base.gguf_init_from_buffer(data, len(data), _InitParams(False, ctypes.pointer(ctx)))
        if not gguf_ctx:
            return
        try:
            for i in range(base.gguf_get_n_tensors(gguf_ctx)):
                type_id = base.gguf_get_tensor_type(gguf_ctx, i)
                name = self.hlwq_types.get(type_id)
                if name is None:
                    continue
                tensor = base.ggml_get_tensor(ctx, base.gguf_get_tensor_name(gguf_ctx, i))
                address, nbytes = base.ggml_get_data(tensor), base.ggml_nbytes(tensor)
                row = ctypes.cast(tensor + 16, ctypes.POINTER(ctypes.c_int64))[0]  # ne[0], after type and buffer
                base.ggml_validate_row_data(type_id, address, nbytes)
                n = base.ggml_nelements(tensor)
                if not 0 < n <= MAX_ELEMENTS or not 0 < row <= n:  # (an empty tensor can claim a huge row)
                    continue
                traits = self.ggml.traits(name)
                out = np.empty(n, np.float32)
                traits.to_float(address, out.ctypes.data, n)
                cpu = self.ggml.cpu_traits(name)
                activations = np.linspace(-1, 1, row, dtype=np.float32)
                dot_type = cpu.vec_dot_type
                dot_traits = self.ggml.cpu.ggml_get_type_traits_cpu(dot_type).contents
                type_traits = self.ggml.base.ggml_get_type_traits(dot_type).contents
                converted = np.empty(row // type_traits.blck_size * type_traits.type_size + 64, np.uint8)
                dot_traits.from_float(activations.ctypes.data, converted.ctypes.data, row)
                result = np.zeros(1, np.float32)
                cpu.vec_dot(int(row), result.ctypes.data, 0, address, 0, converted.ctypes.data, 0, 1)
        finally:
            base.gguf_free(gguf_ctx)
            if ctx:
                base.ggml_free(ctx)


class PythonTarget:
    """The planner's GGUF reader and the numpy dequantizer, on a file as a user would hand it over."""

    def __init__(self, scratch: Path):
        from hlwq_gguf import codec, gguf_types

        self.gguf = gguf_types.register()
        self.codec = codec
        self.path = scratch / "input.gguf"

    def run(self, data: bytes) -> None:
        import numpy as np

        from hlwq_gguf import plan

        self.path.write_bytes(data)
        try:
            layout = plan.read_layout(self.path)
        except plan.PlanError:
            return
        assert layout.n_layer >= 0
        reader = self.gguf.GGUFReader(str(self.path))  # read_layout accepted it, so this must too
        for tensor in reader.tensors:
            block_type = self.codec.BLOCK_TYPES.get(tensor.tensor_type.name)
            if block_type is not None and 0 < tensor.n_elements <= MAX_ELEMENTS:
                packed = np.asarray(tensor.data, np.uint8).reshape(-1, block_type.type_size)
                block_type.dequantize(packed)


def gguf_aware_mutation(data: bytes, max_size: int, seed: int) -> bytes:
    """Replace a 4- or 8-byte field in the header/metadata/tensor-info region by a boundary value, or swap two
    fields, or cut the file: the mutations that reach the loader's length, count and offset checks."""
    rng = random.Random(seed)
    buffer = bytearray(data)
    if len(buffer) < 32:
        return bytes(buffer)
    choice = rng.random()
    region = min(len(buffer) - 8, 1024)
    if choice < 0.6:
        width = rng.choice((4, 8))
        at = rng.randrange(0, region)
        value = rng.choice(INTERESTING) + rng.choice((0, 0, 0, -1, 1))
        buffer[at:at + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    elif choice < 0.8:
        a, b = rng.randrange(0, region), rng.randrange(0, region)
        buffer[a:a + 4], buffer[b:b + 4] = buffer[b:b + 4], buffer[a:a + 4]
    else:
        del buffer[rng.randrange(8, len(buffer)):]
    return bytes(buffer[:max_size])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--corpus", type=Path, default=None, help="corpus folder (default: a fresh one from the seeds)")
    parser.add_argument("--artifacts", type=Path, default=Path("."), help="where crash inputs are written")
    parser.add_argument("--lib-dir", type=Path, default=None, help="the patched build's bin (default: the cached build)")
    parser.add_argument("--reproduce", type=Path, nargs="+", help="run these inputs once each (a crash shows its trace)")
    args, libfuzzer_args = parser.parse_known_args()
    if args.reproduce:
        from hlwq_gguf import build as builder

        native, python = NativeTarget(builder.ensure_build().bin), PythonTarget(Path(tempfile.mkdtemp(prefix="hlwq-fuzz-")))
        for path in args.reproduce:
            print(f"{path}: native", flush=True)
            native.run(path.read_bytes())
            print(f"{path}: python", flush=True)
            python.run(path.read_bytes())
        return

    import atheris

    # coverage feedback comes from the Python side only: instrument it before anything else imports it
    with atheris.instrument_imports(include=["hlwq_gguf", "gguf"]):
        import gguf  # noqa: F401
        from hlwq_gguf import codec, gguf_types, plan  # noqa: F401
    from hlwq_gguf import build as builder
    from hlwq_gguf.testing.fuzz_seeds import write_seeds

    lib_dir = args.lib_dir or builder.ensure_build().bin
    scratch = Path(tempfile.mkdtemp(prefix="hlwq-fuzz-"))
    corpus = args.corpus or scratch / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        for seed in write_seeds(scratch / "seeds"):
            (corpus / seed.name).write_bytes(seed.read_bytes())
    native = NativeTarget(lib_dir)
    python = PythonTarget(scratch)

    def one_input(data: bytes) -> None:
        native.run(data)
        python.run(data)

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        if seed % 2:
            return atheris.Mutate(data, max_size)
        return gguf_aware_mutation(data, max_size, seed)

    args.artifacts.mkdir(parents=True, exist_ok=True)
    atheris.Setup([sys.argv[0], *libfuzzer_args, f"-max_total_time={args.seconds}", "-max_len=8192",
                   f"-artifact_prefix={args.artifacts}/", "-print_final_stats=1", str(corpus)],
                  one_input, custom_mutator=mutate)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
