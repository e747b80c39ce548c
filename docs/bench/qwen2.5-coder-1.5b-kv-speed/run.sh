#!/usr/bin/env bash
# one llama-bench round per cache on Qwen2.5-Coder-1.5B (Q8_0 weights): CPU flash attention, depth 2048, K centered;
# "old" is a copy of build-cpu/bin made before the tiled HLWQ prompt path (patch 0006), run in the same round
set -u
M=${M:-$(ls $HOME/.cache/hlwq-gguf/bench/qwen2.5-coder-1.5b-hf-*/Q8_0.gguf | head -1)}
NEW=$HOME/.cache/hlwq-gguf/upstream-b11312/build-cpu/bin
OLD=${OLD:-/tmp/oldbin}
for cfg in "new f16 f16" "new q8_0 q8_0" "new q4_0 q4_0" "old hlwq4_64 hlwq4_64" "new hlwq4_64 hlwq4_64" "new hlwq5_64 hlwq4_64" "new q8_0 hlwq4_64" "new hlwq4_64 hlwq3_64"; do
  set -- $cfg
  if [ $1 = old ]; then LIB=$OLD; else LIB=$NEW; fi
  LD_LIBRARY_PATH=$LIB $LIB/llama-bench -m $M -fa 1 -ctk $2 -ctv $3 -d 2048 -p 512 -n 128 -r 1 -t 2 -o csv 2>/dev/null | tail -n +2 | sed "s/^/1,$1,/"
done
