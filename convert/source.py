"""Resolve and validate a checkpoint before anything is converted: a local folder or a Hugging Face hub id."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
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
    # the format indexes the data buffer completely and without overlap (the safetensors library enforces it too):
    # two tensors on the same bytes would silently duplicate weights
    spans = sorted((info["data_offsets"][0], info["data_offsets"][1], name) for name, info in header.items()
                   if name != "__metadata__")
    at, previous = 0, None
    for begin, end, name in spans:
        if begin < at:
            raise ConversionError(f"{path}: tensors {previous} and {name} overlap (bytes {begin}..{at})")
        if begin > at:
            raise ConversionError(f"{path}: bytes {at}..{begin} before tensor {name} belong to no tensor (corrupt header)")
        at, previous = end, name
    if at != data_size:
        raise ConversionError(f"{path}: {data_size - at} bytes after the last tensor belong to no tensor (corrupt header)")
    return header, header_len


def indexed_weight_files(path: Path) -> list[Path] | None:
    """The safetensors files model.safetensors.index.json lists (None without an index). Its names must be plain
    file names inside the folder: a downloaded index naming `../x` or `/etc/x` would make the converter read
    outside the checkpoint."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return None
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index}: no weight_map")
    names = set(weight_map.values())
    for name in sorted(names, key=str):
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise ConversionError(f"{index}: weight file {name!r} is not a plain file name in the checkpoint folder")
        if not (path / name).is_file():
            raise ConversionError(f"{index}: lists {name}, which is missing")
    return sorted(path / name for name in names)


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object, or a one-line ConversionError naming it."""
    try:
        value = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return value


# the tokenizer files llama.cpp's converter can build a vocabulary from
TOKENIZER_PATTERNS = ("tokenizer.json", "tokenizer.model", "vocab.json", "*.tiktoken", "vocab.txt")


def check_tokenizer(path: Path) -> None:
    if not any(next(path.glob(pattern), None) for pattern in TOKENIZER_PATTERNS):
        raise ConversionError(f"{path}: no tokenizer ({', '.join(TOKENIZER_PATTERNS)}); llama.cpp needs the vocabulary")


def load_checkpoint(path: Path) -> Checkpoint:
    """Validate a checkpoint folder: config.json, safetensors weights with sane headers, no pickles to read."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{config_path}: missing (a Hugging Face checkpoint needs its config.json)")
    config = read_json_object(config_path)
    # every JSON file the converter may read is checked here, so a broken one is named instead of surfacing as a
    # traceback from deep inside the tokenizer library
    for json_file in sorted(path.glob("*.json")):
        if json_file != config_path:
            read_json_object(json_file)
    indexed = indexed_weight_files(path)
    safetensors = indexed if indexed is not None else sorted(path.glob("*.safetensors"))
    if not safetensors:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ConversionError(f"{path}: only pickled weights ({', '.join(pickles)}); hlwq-gguf reads safetensors and never unpickles downloaded files")
        raise ConversionError(f"{path}: no *.safetensors weights found")
    names = [name for file in safetensors for name in _check_safetensors_header(file)[0] if name != "__metadata__"]
    return Checkpoint(path, config, safetensors, names)


def staging_prefix(output: Path) -> str:
    """Prefix of the temporary files and folders a conversion writes beside `output` (the rename onto `output` is
    atomic only within one filesystem); the pid lets a later run recognise what a killed one left behind."""
    return f".{output.name}.{os.getpid()}."


def sweep_stale_staging(output: Path) -> list[Path]:
    """Remove what killed conversions to `output` left beside it (SIGKILL runs no cleanup): staging entries whose
    process is gone. Those of a live process (a concurrent conversion) stay. A step that stages its own file
    onto the conversion's staging file leaves a name with one more leading dot, of the same process."""
    pattern = re.compile(rf"^\.+{re.escape(output.name)}\.(\d+)\.")
    removed = []
    for entry in output.parent.iterdir() if output.parent.is_dir() else []:
        match = pattern.match(entry.name)
        if not match or _process_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def die_with_parent() -> None:
    """preexec_fn for child processes: the kernel kills the child when its parent dies, even by SIGKILL, so a killed
    conversion leaves no worker writing on."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def is_short_write(error: BaseException) -> bool:
    """A write the disk or the file-size limit (`ulimit -f`) cut short; numpy's tofile reports one as
    "N requested and M written" without an errno."""
    return isinstance(error, OSError) and (
        error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or " requested and " in str(error))


def short_write_message(output: Path, error: OSError) -> str:
    why = error.strerror or "short write"
    return f"{output}: cannot write the GGUF: {why} (disk full or file-size limit); nothing was written"


def publish(tmp: Path, output: Path) -> None:
    """Rename a finished temporary file onto `output`, with the permissions a plain new file would get (mkstemp
    makes files only their owner can read)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, output)
