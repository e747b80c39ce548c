"""Fetch the pinned llama.cpp (from the llama-cpp-python sdist) and apply ggml_patch/ to it."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from . import paths


class UpstreamError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def patch_files() -> list[Path]:
    return sorted(paths.PATCH_DIR.glob("*.patch"))


def patch_series_hash() -> str:
    """Hash of the patch series (names and contents, in order): the key of the patched tree and its builds."""
    digest = hashlib.sha256()
    for patch in patch_files():
        digest.update(patch.name.encode() + b"\0" + patch.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def fetch_sdist() -> Path:
    """Download llama-cpp-python's sdist with pip (once) and verify its pinned sha256."""
    target_dir = paths.upstream_dir() / "sdist"
    name = f"llama_cpp_python-{paths.LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    target = target_dir / name
    if target.exists() and _sha256(target) == paths.LLAMA_CPP_PYTHON_SDIST_SHA256:
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={paths.LLAMA_CPP_PYTHON_VERSION}", "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        downloaded = Path(tmp) / name
        if not downloaded.exists():
            # pip may fail to prepare metadata after the download itself succeeded; only the file matters
            raise UpstreamError(f"pip could not download {name}: {result.stderr.strip().splitlines()[-1:]}")
        digest = _sha256(downloaded)
        if digest != paths.LLAMA_CPP_PYTHON_SDIST_SHA256:
            raise UpstreamError(f"{name}: sha256 {digest} does not match the pinned {paths.LLAMA_CPP_PYTHON_SDIST_SHA256}")
        downloaded.replace(target)
    return target


def pristine_tree() -> Path:
    """The sdist's vendored llama.cpp, extracted once into the cache."""
    tree = paths.pristine_tree()
    stamp = tree / ".hlwq-pristine"
    if stamp.exists():
        return tree
    sdist = fetch_sdist()
    prefix = f"llama_cpp_python-{paths.LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    staging = Path(tempfile.mkdtemp(dir=paths.upstream_dir(), prefix="pristine-"))
    try:
        with tarfile.open(sdist) as tar:
            members = []
            for member in tar.getmembers():
                if not member.name.startswith(prefix) or not (member.isfile() or member.isdir()):
                    continue
                member.name = member.name[len(prefix):]
                if member.name == ".git":  # a dangling submodule link in the sdist
                    continue
                members.append(member)
            tar.extractall(staging, members=members, filter="data")
        (staging / ".hlwq-pristine").write_text(paths.LLAMA_CPP_COMMIT + "\n")
        if tree.exists():
            shutil.rmtree(tree)
        staging.rename(tree)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return tree


def apply_patches(tree: Path, patches: list[Path] | None = None) -> None:
    """Apply the patch series in order with `patch -p1`, failing on the first patch that does not apply cleanly."""
    for patch in patches if patches is not None else patch_files():
        result = subprocess.run(["patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch", "-i", str(patch)],
                                cwd=tree, capture_output=True, text=True)
        if result.returncode != 0 or "offset" in result.stdout or "fuzz" in result.stdout:
            raise UpstreamError(f"{patch.name} does not apply cleanly to the pinned llama.cpp:\n{result.stdout}{result.stderr}")


def _sync_tree(source: Path, target: Path) -> None:
    """Make target equal to source, touching only files whose bytes differ so that ninja rebuilds only those."""
    target.mkdir(parents=True, exist_ok=True)
    source_files = {p.relative_to(source) for p in source.rglob("*") if p.is_file() or p.is_symlink()}
    for rel in sorted(source_files):
        src, dst = source / rel, target / rel
        if dst.is_file() and not dst.is_symlink() and src.stat().st_size == dst.stat().st_size \
                and src.read_bytes() == dst.read_bytes():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        shutil.copy2(src, dst, follow_symlinks=False)
    for path in sorted(target.rglob("*"), reverse=True):
        rel = path.relative_to(target)
        if (path.is_file() or path.is_symlink()) and rel not in source_files:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def patched_tree() -> Path:
    """The pinned llama.cpp with ggml_patch/*.patch applied, at a fixed path in the cache."""
    key = patch_series_hash()
    tree = paths.patched_tree_dir()
    stamp = tree / ".hlwq-patch-series"
    if stamp.exists() and stamp.read_text().strip() == key:
        return tree
    pristine = pristine_tree()
    with tempfile.TemporaryDirectory(dir=paths.upstream_dir(), prefix="patching-") as tmp:
        staging = Path(tmp) / "llama.cpp"
        shutil.copytree(pristine, staging, symlinks=True)
        apply_patches(staging)
        (staging / ".hlwq-patch-series").write_text(key + "\n")
        _sync_tree(staging, tree)
    return tree
