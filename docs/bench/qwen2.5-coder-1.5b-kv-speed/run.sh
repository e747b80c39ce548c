#!/usr/bin/env bash
# one llama-bench round per cache on Qwen2.5-Coder-1.5B (Q8_0 weights): CPU flash attention, depth 2048, K centered
set -u
M=$HOME/.cache/hlwq-gguf/bench/qwen2.5-coder-1.5b-hf-448163864326/Q8_0.gguf
B=$HOME/.cache/hlwq-gguf/upstream-b11312/build-cpu/bin
for cfg in "f16 f16" "q8_0 q8_0" "q4_0 q4_0" "hlwq4_64 hlwq4_64" "hlwq5_64 hlwq4_64" "q8_0 hlwq4_64" "hlwq4_64 hlwq3_64"; do
  set -- $cfg
  $B/llama-bench -m $M -fa 1 -ctk $1 -ctv $2 -d 2048 -p 512 -n 128 -r 1 -t 2 -o csv 2>/dev/null | tail -n +2 | sed "s/^/1,new,/"
done
