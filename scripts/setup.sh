#!/usr/bin/env bash
# Install hlwq-gguf and what it needs into the current Python environment (idempotent).
# torch is pinned to the CPU wheel; llama-cpp-python is installed without its own native build: hlwq_gguf points
# it at the patched libraries that `hlwq-gguf build` makes, so llama.cpp is built once.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
pip_install() { "$py" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "Running pip as the 'root' user" || true; }

"$py" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null || pip_install torch==2.13.0
pip_install -e '.[convert,bench,test]'
if ! "$py" -c 'import importlib.metadata as m, sys; sys.exit(m.version("llama_cpp_python") != "0.3.36")' 2>/dev/null; then
  sdist=$("$py" -c 'from hlwq_gguf import upstream; print(upstream.fetch_sdist())')
  pip_install typing-extensions 'numpy>=1.26' 'diskcache>=5.6' 'jinja2>=2.11'
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip_install --no-deps "$sdist"
fi
