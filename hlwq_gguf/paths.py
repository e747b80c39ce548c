"""Where hlwq-gguf keeps its caches and finds the pinned upstream."""
from __future__ import annotations

import os
from pathlib import Path

# llama.cpp as vendored in this sdist: build b11312, commit 0c1e57098
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_PYTHON_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_BUILD_NUMBER = 11312
LLAMA_CPP_COMMIT = "0c1e57098"

REPO_ROOT = Path(__file__).resolve().parents[1]


def _patch_dir() -> Path:
    """ggml_patch/ of the checkout, or the copy a regular (non-editable) install puts beside the package."""
    checkout = REPO_ROOT / "ggml_patch"
    if checkout.is_dir():
        return checkout
    import importlib.util

    spec = importlib.util.find_spec("ggml_patch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the HLWQ patch series (ggml_patch/) is not installed with hlwq-gguf")
    return Path(next(iter(spec.submodule_search_locations)))


PATCH_DIR = _patch_dir()


def cache_root() -> Path:
    """Root of every cache (sdist, pristine and patched trees, builds, models): $HLWQ_GGUF_CACHE or ~/.cache/hlwq-gguf."""
    root = Path(os.environ.get("HLWQ_GGUF_CACHE", Path.home() / ".cache" / "hlwq-gguf"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def upstream_dir() -> Path:
    return cache_root() / f"upstream-b{LLAMA_CPP_BUILD_NUMBER}"


def pristine_tree() -> Path:
    """The vendored llama.cpp exactly as shipped in the sdist (never modified)."""
    return upstream_dir() / "pristine"


def patched_tree_dir() -> Path:
    """A fixed path for the patched tree so that ninja and ccache reuse work across patch revisions."""
    return upstream_dir() / "patched"


def build_dir(variant: str = "cpu") -> Path:
    return upstream_dir() / f"build-{variant}"
