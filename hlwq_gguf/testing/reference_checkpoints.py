"""Write an HF checkpoint in the reference implementation's "dot" code layout (polar_engine_v5, table A, 5 bits).

For architectures the fixtures do not cover (MoE with 3-D expert parameters, rows that are not a multiple of 128).
The codes come from hlwq_gguf.codec's "norm" scale mode, which reproduces the reference quantizer's codes and norms
(tests/test_codec_fixtures.py); the selection follows REFERENCE.md: 2-D (or per-expert slices of 3-D) tensors of
at least 256 elements except norms, SSM parameters, biases and routers. 3-D expert parameters are written per
expert with an `_e{index}` suffix, as some releases do.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from hlwq_gguf import codec

SKIP = ("norm", "A_log", ".D", "dt_bias", "conv1d", "bias", ".gate.weight", "router")


def _coded(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) in (2, 3) and int(np.prod(shape[-2:])) >= 256 and not any(s in name for s in SKIP)


def _encode(matrix: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, int]:
    out, width = matrix.shape
    padded = -(-width // 128) * 128
    blocks = np.pad(matrix, ((0, 0), (0, padded - width))).reshape(-1, 128)
    d, codes = codec.quantize_blocks(blocks, bits, 128, "reference_A", "norm")
    return codes.reshape(out, padded).astype(np.int8), np.asarray(d, dtype=np.float16).reshape(out, -1), padded


def write_dot_checkpoint(source: Path, target: Path, bits: int = 5) -> dict[str, np.ndarray]:
    """Code `source` into `target`; returns the reference dequantization of every coded weight (HF names, fp32)."""
    import torch
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.suffix != ".safetensors" and item.name != "model.safetensors.index.json":
            shutil.copy(item, target / item.name)
    tensors = load_file(str(source / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    expected: dict[str, np.ndarray] = {}
    table = torch.from_numpy(codec.load_codebook(bits, "reference_A").copy())
    for name, tensor in tensors.items():
        shape = tuple(tensor.shape)
        if not _coded(name, shape):
            out[name] = tensor
            continue
        stem = name[:-len(".weight")] if name.endswith(".weight") else name
        values = tensor.float().numpy()
        slices = [(f"{stem}_e{i}", values[i]) for i in range(shape[0])] if len(shape) == 3 else [(stem, values)]
        decoded = []
        for key, matrix in slices:
            codes, norms, padded = _encode(matrix, bits)
            out[key + ".codes"] = torch.from_numpy(codes)
            out[key + ".norms"] = torch.from_numpy(norms)
            out[key + ".ct"] = table.clone()
            layers[key] = {"in_features": matrix.shape[1], "out_features": matrix.shape[0], "in_f_padded": padded,
                           "n_blocks": padded // 128, "bits": bits, "block_size": 128}
            blocks = codec.dequantize_blocks(norms.reshape(-1), codes.view(np.uint8).reshape(-1, 128), bits, 128, "reference_A")
            decoded.append(blocks.reshape(matrix.shape[0], padded)[:, :matrix.shape[1]])
        expected[name] = np.stack(decoded) if len(shape) == 3 else decoded[0]
    save_file(out, str(target / "model.safetensors"), metadata={"format": "pt"})
    (target / "polar_config.json").write_text(json.dumps({"format": "polar_engine_v5", "block_size": 128, "bits": bits,
                                                          "layers": layers}, indent=1))
    return expected
