#!/usr/bin/env bash
# The test suite: install, build the patched llama.cpp (cached by patch-series hash), check the patch series
# applies cleanly to the pristine tree, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/patches.sh check
hlwq-gguf build --print-dir
python3 -m pytest -q -p no:cacheprovider "$@"
