"""Does a freshly written GGUF load in the patched llama.cpp? Checked before the file is published.

llama.cpp's loader is the authority on what a model needs: tensor shapes that agree with the hyper-parameters
(a checkpoint whose weights disagree with its config.json converts without complaint otherwise), a complete set
of layers, a usable vocabulary. `no_alloc` makes it read only the metadata and simulate the allocations, so the
check costs about a second for any model size. It runs in a child process so that a loader crash is a message.
Usage: python -m convert.loadcheck <gguf> <build-root>
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from .source import ConversionError, die_with_parent

# the lines of llama.cpp's log that say why a load failed, most specific first
_REASONS = (re.compile(r"error loading model: (.*)"), re.compile(r"llama_model_load: error [^:]*: (.*)"),
            re.compile(r"(tensor '[^']+' .*)"), re.compile(r"(key not found in model: .*)"))


def check_loads(gguf_path: Path, build_root: Path, source: Path) -> None:
    """Raise ConversionError naming `source` and llama.cpp's reason when `gguf_path` does not load."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-m", "convert.loadcheck", str(gguf_path), str(build_root)],
                            capture_output=True, text=True, errors="replace", env=env, preexec_fn=die_with_parent,
                            timeout=600)
    if result.returncode == 0:
        return
    log = result.stdout + result.stderr
    for pattern in _REASONS:
        found = pattern.findall(log)
        if found:
            reason = " ".join(found[-1].split())
            break
    else:
        tail = [line for line in log.splitlines() if line.strip()]
        reason = tail[-1].strip() if tail else f"exit code {result.returncode}"
    raise ConversionError(f"{source}: the converted model does not load in llama.cpp ({reason}); "
                          "do the weights match config.json?")


def _load(gguf_path: str, build_root: str) -> int:
    from hlwq_gguf import build as builder
    from hlwq_gguf import runtime

    llama_cpp = runtime.llama_cpp_module(builder.Build(Path(build_root)))
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    params.no_alloc = True
    params.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE  # a simulated load maps nothing
    params.use_extra_bufts = False
    model = llama_cpp.llama_model_load_from_file(gguf_path.encode(), params)
    if not model:
        return 1
    llama_cpp.llama_model_free(model)
    return 0


if __name__ == "__main__":
    sys.exit(_load(sys.argv[1], sys.argv[2]))
