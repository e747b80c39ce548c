"""A quantized GGUF to a continuous full-precision Hugging Face folder (dequantize and dither)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .dither import dither_tensor, gguf_module
from .fetch import fetch_gguf, sha256_file
from .hf_layout import ARCH_BLOCK, generation_config, gguf_metadata, hf_config, hf_name, to_hf_tensor
from .registry import MODELS, ModelSpec
from .tokenizers import write_tokenizer


def open_gguf(model_name_or_path: str | os.PathLike[str]) -> tuple[Path, ModelSpec | None]:
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
    gguf = gguf_module()
    from safetensors.numpy import save_file
    from tqdm.auto import tqdm

    path, spec = open_gguf(model_name)
    reader = gguf.GGUFReader(path)
    md = gguf_metadata(reader)
    arch = str(md["general.architecture"])
    if arch not in ARCH_BLOCK:
        raise NotImplementedError(f"GGUF architecture {arch!r} not supported")
    names = {t.name for t in reader.tensors}
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], int(md[f"{arch}.block_count"]))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc=f"unquantize {path.name}", unit="tensor", disable=not progress):
        hf = hf_name(arch, t.name)
        fwd = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if fwd != t.name:  # self-check against gguf-py's own HF->GGUF table
            raise AssertionError(f"name map mismatch: {t.name} -> {hf} -> {fwd}")
        w, _, _ = dither_tensor(t, seed)
        tensors[hf] = np.ascontiguousarray(to_hf_tensor(arch, t.name, w, md))
    tmp = out / "model.safetensors.partial"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    del tensors

    cfg = hf_config(spec, arch, md, names)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps(generation_config(md), indent=2) + "\n", encoding="utf-8")
    write_tokenizer(out, md, arch)
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
