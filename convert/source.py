"""Resolve and validate a checkpoint before anything is converted: a local folder or a Hugging Face hub id."""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path


# what the vision towers' weight names contain in the supported multimodal checkpoints (llama.cpp's mmproj classes)
VISION_TENSOR_PARTS = ("vision_tower.", "visual.", "vision_model.", "embed_vision.")


class ConversionError(RuntimeError):
    """A problem with the input that the user can fix; its message is one line naming the file or tensor."""


# files a conversion needs from a hub repo: weights, their index, configs and tokenizer files
HUB_ALLOW_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer.model", "*.tiktoken", "merges.txt",
    "vocab.txt", "*.jinja",
]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

SAFETENSORS_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


@dataclass
class Checkpoint:
    path: Path
    config: dict
    safetensors: list[Path]
    tensor_names: list[str] = field(default_factory=list)  # from the headers load_checkpoint validated

    @property
    def architectures(self) -> list[str]:
        return list(self.config.get("architectures") or [])

    @property
    def has_vision_tower(self) -> bool:
        """A vision config with the tower's weights present (text-only fine-tunes keep the config, not the weights)."""
        return "vision_config" in self.config and any(
            part in name for name in self.tensor_names for part in VISION_TENSOR_PARTS)


def resolve(source: str | Path) -> Path:
    """A local folder as is; anything shaped like `owner/name` that is not a folder is downloaded from the hub.

    Only weights, indexes, configs and tokenizer files are fetched (resumable); pickles never are.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"{path}: not a folder (give a Hugging Face checkpoint folder or hub id)")
    text = str(source)
    if not _HUB_ID.match(text) or ".." in text:
        raise ConversionError(f"{text}: no such folder, and not a Hugging Face hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
        local = snapshot_download(repo_id=text, allow_patterns=HUB_ALLOW_PATTERNS)
    except Exception as e:  # network, auth, missing repo: one line is enough
        raise ConversionError(f"{text}: download from the Hugging Face hub failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return Path(local)


def _check_safetensors_header(path: Path) -> tuple[dict, int]:
    """The validated JSON header of a safetensors file and its length in bytes (data starts at 8 + length)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path}: truncated safetensors file (no header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100 * 1024 * 1024:
            raise ConversionError(f"{path}: truncated or corrupt safetensors file (header of {header_len} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{path}: corrupt safetensors header ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path}: tensor {name}: malformed header entry") from None
        if dtype not in SAFETENSORS_DTYPE_SIZES:
            raise ConversionError(f"{path}: tensor {name}: unsupported dtype {dtype}")
        count = 1
        for dim in shape:
            if not isinstance(dim, int) or dim < 0:
                raise ConversionError(f"{path}: tensor {name}: invalid shape {shape}")
            count *= dim
        if not (isinstance(begin, int) and isinstance(end, int)) or begin < 0 or end < begin:
            raise ConversionError(f"{path}: tensor {name}: invalid data offsets {begin}..{end}")
        if end - begin != count * SAFETENSORS_DTYPE_SIZES[dtype]:
            raise ConversionError(f"{path}: tensor {name}: {dtype}{shape} needs {count * SAFETENSORS_DTYPE_SIZES[dtype]} bytes, header gives {end - begin}")
        if end > data_size:
            raise ConversionError(f"{path}: tensor {name}: data ends at byte {end} but the file holds {data_size} (truncated)")
    return header, header_len


def load_checkpoint(path: Path) -> Checkpoint:
    """Validate a checkpoint folder: config.json, safetensors weights with sane headers, no pickles to read."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{config_path}: missing (a Hugging Face checkpoint needs its config.json)")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{config_path}: not a JSON object")
    safetensors = sorted(path.glob("*.safetensors"))
    if not safetensors:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ConversionError(f"{path}: only pickled weights ({', '.join(pickles)}); hlwq-gguf reads safetensors and never unpickles downloaded files")
        raise ConversionError(f"{path}: no *.safetensors weights found")
    names = [name for file in safetensors for name in _check_safetensors_header(file)[0] if name != "__metadata__"]
    return Checkpoint(path, config, safetensors, names)


def publish(tmp: Path, output: Path) -> None:
    """Rename a finished temporary file onto `output`, with the permissions a plain new file would get (mkstemp
    makes files only their owner can read)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, output)
