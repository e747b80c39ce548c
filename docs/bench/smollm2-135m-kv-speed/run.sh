#!/usr/bin/env bash
# interleaved llama-bench rounds: CPU flash attention with quantized KV caches, before (old: the one-query-at-a-time
# path for prompts) and after (new: HLWQ caches take the tiled prompt path) the tiled HLWQ change in patch 0006.
# OLD is a copy of build-cpu/bin made before rebuilding.
set -u
M=${M:-$(ls $HOME/.cache/hlwq-gguf/bench/smollm2-135m-hf-*/Q8_0.gguf | head -1)}
NEW=$HOME/.cache/hlwq-gguf/upstream-b11312/build-cpu/bin
OLD=${OLD:-/tmp/oldbin}
ROUNDS=${ROUNDS:-2}
for r in $(seq $ROUNDS); do
  for cfg in "new f16 f16" "new q4_0 q4_0" "new q8_0 q8_0" "old hlwq4_64 hlwq4_64" "new hlwq4_64 hlwq4_64" "old hlwq4_64 hlwq3_64" "new hlwq4_64 hlwq3_64" "old hlwq3_64 hlwq3_64" "new hlwq3_64 hlwq3_64"; do
    set -- $cfg
    if [ $1 = old ]; then LIB=$OLD; else LIB=$NEW; fi
    LD_LIBRARY_PATH=$LIB $LIB/llama-bench -m $M -fa 1 -ctk $2 -ctv $3 -d ${DEPTH:-2048} -p 512 -n 128 -r 1 -t 2 -o csv 2>/dev/null | tail -n +2 | sed "s/^/$r,$1,/"
  done
done
