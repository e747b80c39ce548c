"""Run HLWQ GGUFs from Python through llama-cpp-python, on the patched libraries built by `hlwq-gguf build`.

llama-cpp-python is installed without its own native build (CMAKE_ARGS=-DLLAMA_BUILD=OFF); this module points
it at our libllama before it is first imported, so nobody has to set LLAMA_CPP_LIB_PATH by hand.
"""
from __future__ import annotations

import ctypes
import os
import re
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from unittest import mock

from . import build as builder


def _libllama_path(module: ModuleType) -> Path:
    return Path(module.llama_cpp._lib._name).resolve()


def library_dir() -> Path:
    """The folder of the libllama (and its ggml libraries) that llama_cpp loaded."""
    return _libllama_path(llama_cpp_module()).parent


def llama_cpp_module(build: builder.Build | None = None) -> ModuleType:
    """Import llama_cpp bound to the patched libllama of `build` (the current cached build by default)."""
    if "llama_cpp" in sys.modules:
        module = sys.modules["llama_cpp"]
        loaded = _libllama_path(module)
        wanted = (build or builder.existing_build())
        if wanted is not None and loaded.parent != wanted.bin.resolve():
            raise RuntimeError(f"llama_cpp is already loaded from {loaded}, not from the patched build {wanted.bin}")
        return module
    build = build or builder.existing_build() or builder.ensure_build()
    os.environ["LLAMA_CPP_LIB_PATH"] = str(build.bin)
    import llama_cpp

    return llama_cpp


class OverrideError(ValueError):
    """A tensor override that cannot be applied (bad regex, unknown device); the message is one line."""


class _TensorBuftOverride(ctypes.Structure):
    """struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }"""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


@dataclass
class TensorOverrides:
    """A {NULL, NULL}-terminated llama_model_tensor_buft_override array and the Python objects it points into.

    llama.cpp stores only the pointer: `array` and `patterns` must outlive the model, so open_model attaches this
    object to the Llama it returns (as `tensor_overrides`).
    """

    entries: list[tuple[str, str]]  # (regex, device) in llama.cpp's order: the first matching regex wins
    patterns: list[bytes]
    array: ctypes.Array

    @property
    def address(self) -> int:
        return ctypes.addressof(self.array)


def _ggml_libraries() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """libggml and libggml-cpu from the directory of the libllama that llama_cpp loaded (the same instances:
    the loader compares buffer-type pointers, so a second copy of the library would never match)."""
    lib_dir = library_dir()
    ggml = ctypes.CDLL(str(lib_dir / "libggml.so"))
    ggml_cpu = ctypes.CDLL(str(lib_dir / "libggml-cpu.so"))
    ggml.ggml_backend_dev_by_name.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_name.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_name.restype = ctypes.c_char_p
    ggml.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    ggml_cpu.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
    return ggml, ggml_cpu


def device_names() -> list[str]:
    """The ggml devices of the loaded build, e.g. ['CPU'] or ['CUDA0', 'CPU']."""
    ggml, _ = _ggml_libraries()
    return [ggml.ggml_backend_dev_name(ggml.ggml_backend_dev_get(i)).decode()
            for i in range(ggml.ggml_backend_dev_count())]


def buffer_type(device: str) -> int:
    """The ggml_backend_buffer_type_t (as an address) of a device named as llama.cpp's -ot names it (CPU, CUDA0)."""
    ggml, ggml_cpu = _ggml_libraries()
    if device.upper() == "CPU":
        return ggml_cpu.ggml_backend_cpu_buffer_type()
    dev = ggml.ggml_backend_dev_by_name(device.encode())
    buft = ggml.ggml_backend_dev_buffer_type(dev) if dev else None
    if not buft:
        raise OverrideError(f"unknown device {device!r} in a tensor override; this build has {', '.join(device_names())}")
    return buft


def parse_overrides(overrides) -> list[tuple[str, str]]:
    """'REGEX=DEVICE' strings (one may hold several, comma-separated, as -ot takes them), (regex, device) pairs
    or a {regex: device} dict -> [(regex, device)], each regex checked to compile."""
    if isinstance(overrides, dict):
        items = list(overrides.items())
    elif isinstance(overrides, str):
        items = [overrides]
    else:
        items = list(overrides)
    entries = []
    for item in items:
        if isinstance(item, str):
            for part in item.split(","):
                regex, sep, device = part.rpartition("=")
                if not sep or not regex or not device:
                    raise OverrideError(f"tensor override {part!r} is not REGEX=DEVICE (e.g. 'blk\\.[0-9]\\.ffn_.*_exps=CPU')")
                entries.append((regex, device))
        else:
            regex, device = item
            entries.append((str(regex), str(device)))
    for regex, _ in entries:
        try:
            re.compile(regex)  # llama.cpp's std::regex would throw inside the loader: fail here, by name
        except re.error as e:
            raise OverrideError(f"tensor override regex {regex!r} does not compile: {e}") from None
    return entries


def tensor_overrides(overrides) -> TensorOverrides:
    """Build the C array llama_model_params.tensor_buft_overrides points to (see parse_overrides for the forms)."""
    entries = parse_overrides(overrides)
    patterns = [regex.encode() for regex, _ in entries]
    array = (_TensorBuftOverride * (len(entries) + 1))()  # zero-initialised: the last entry is {NULL, NULL}
    for slot, pattern, (_, device) in zip(array, patterns, entries):
        slot.pattern = pattern
        slot.buft = buffer_type(device)
    return TensorOverrides(entries, patterns, array)


_default_params_lock = threading.Lock()


@contextmanager
def _model_params_with(overrides: TensorOverrides | None):
    """While a Llama is constructed, make llama_model_default_params() carry our overrides.

    llama-cpp-python 0.3.36 declares tensor_buft_overrides as an unused c_void_p and gives Llama no way to set
    it; Llama.__init__ takes its params from llama_model_default_params(), so that is where they go in. The lock
    keeps two threads opening models from seeing each other's overrides.
    """
    if overrides is None:
        yield
        return
    bindings = llama_cpp_module().llama_cpp
    with _default_params_lock:
        original = bindings.llama_model_default_params

        def with_overrides():
            params = original()
            params.tensor_buft_overrides = overrides.address
            return params

        bindings.llama_model_default_params = with_overrides
        try:
            yield
        finally:
            bindings.llama_model_default_params = original


def ggml_type_id(name: str) -> int:
    """KV-cache type name as llama.cpp spells it (f16, q8_0, hlwq3_64, ...; hlwq3/hlwq4 for short) -> ggml type id."""
    from . import gguf_types, plan

    if name.lower() not in plan.KV_TYPES:
        raise OverrideError(f"KV type {name!r} is not one llama.cpp knows; use one of {', '.join(plan.KV_TYPES)}")
    name = plan.KV_TYPE_ALIASES.get(name.lower(), name)
    return int(gguf_types.register().GGMLQuantizationType[name.upper()])


def open_model(path: str | Path, n_ctx: int = 2048, n_threads: int | None = None, seed: int = 1, verbose: bool = False,
               overrides=None, vram: int | str | None = None, kv_type: str | None = None,
               kv_type_k: str | None = None, kv_type_v: str | None = None, **kwargs):
    """A llama_cpp.Llama for an HLWQ (or any) GGUF, loaded through the patched libraries.

    overrides: tensor buffer overrides like llama.cpp's -ot ('REGEX=DEVICE' strings, (regex, device) pairs or a
    dict); the first matching regex decides a tensor's buffer. vram: a VRAM budget ('24GiB' or bytes): the
    placement planner (hlwq_gguf.plan) chooses which layers' routed experts stay in system RAM, every layer is
    offloaded (n_gpu_layers=-1) and the plan's overrides come after any explicit ones; the plan is attached as
    `.placement_plan`. kv_type: KV-cache type for K and V by name (f16, q8_0, ...); a quantized V cache needs
    flash attention, which is then switched on; hlwq3 keeps K at hlwq4, or at the file's calibrated 3 or 4 bits
    per layer (kvcache.kv_pair). With an HLWQ K type, llama.cpp keeps K at q8_0 in the layers whose key bias a
    low-bit code would wreck (hlwq_gguf.kvcache); `.kv_note` (one line, or None) says so, and what
    kvcache.calibration_hint says of a file without mean keys. kv_type_k / kv_type_v: the user's types for K and V,
    taken as they are in every layer (LLAMA_KV_HLWQ_K_OUTLIER=0 and LLAMA_KV_HLWQ_K_BITS=0 while the cache is made
    when K is HLWQ). Without these arguments the behaviour is llama-cpp-python's.
    """
    from . import kvbits, kvcache

    llama_cpp = llama_cpp_module()
    pair_k, pair_v, pair_note = kvcache.kv_pair(kv_type, path) if kv_type is not None else (None, None, None)
    type_k = kv_type_k or pair_k
    type_v = kv_type_v or pair_v
    notes = [pair_note] if kv_type_k is None and pair_note else []
    forced_k = {"LLAMA_KV_HLWQ_K_OUTLIER": "0", kvbits.K_BITS_ENV: "0"} \
        if kv_type_k is not None and kvcache.is_hlwq(kv_type_k) else {}
    if not forced_k and type_k is not None:
        notes.append(kvcache.k_type_note(path, type_k, n_ctx=n_ctx or kvcache.DEFAULT_CONTEXT))
    if type_k is not None and kvcache.is_hlwq(type_k):
        notes.append(kvcache.calibration_hint(path, type_k))
    kv_note = "; ".join(note for note in notes if note) or None
    for key, name in (("type_k", type_k), ("type_v", type_v)):
        if name is not None:
            kwargs.setdefault(key, ggml_type_id(name))
    if any(name is not None and name.lower() not in ("f32", "f16", "bf16") for name in (type_k, type_v)):
        kwargs.setdefault("flash_attn", True)
    entries = parse_overrides(overrides) if overrides is not None else []
    placement = None
    if vram is not None:
        from . import plan

        placement = plan.plan_file(path, vram, n_ctx, type_k or "f16", type_v,
                                   **({"safe_k_layers": (), "k_bits": ""} if kv_type_k is not None else {}))
        entries += parse_overrides(placement.overrides())
        kwargs.setdefault("n_gpu_layers", -1)
        kwargs.setdefault("swa_full", False)  # what the plan sized (llama-cpp-python's default is the full SWA cache)
    c_overrides = tensor_overrides(entries) if entries else None
    with _model_params_with(c_overrides), mock.patch.dict(os.environ, forced_k):  # read when llama.cpp makes the cache
        model = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads or os.cpu_count(), seed=seed,
                                verbose=verbose, **kwargs)
    model.tensor_overrides = c_overrides  # keeps the array and pattern strings alive as long as the model
    model.placement_plan = placement
    model.kv_note = kv_note
    return model
