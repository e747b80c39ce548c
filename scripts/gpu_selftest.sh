#!/usr/bin/env bash
# The HLWQ CUDA kernels on a GPU machine that has nvcc, cmake, ninja and numpy but no network and no pip.
#
#   bash scripts/gpu_selftest.sh pack                   # here: .gpu/ gets the patched tree (about 12 MB) and this script
#   bash .gpu/gpu_selftest.sh build test perf bench     # there, from the checkout root (stages run in the order given)
#
# Stages: probe (GPU, nvcc), build (CUDA build of the patched tree under /tmp, one architecture: ARCH, default 90),
# test (test-backend-ops -b CUDA0 on every case with an HLWQ type), perf (one 4096x14336 product at 1, 8 and 512
# columns for HLWQ and the K-quants, same run), bench (a random-weight 4-layer 4096/14336 llama quantized to QTYPES,
# llama-bench pp512/tg128 with everything offloaded, then the KV types with flash attention at depth 4096).
# Logs go to $OUT (the device tool's output folder) when set. Quote ratios from one run, not absolute times.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)

if [ "${1:-}" = pack ]; then
  top=$(git -C "$here" rev-parse --show-toplevel); cd "$top"
  grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  tree=$(python3 -c 'from hlwq_gguf import upstream; print(upstream.patched_tree())') || exit 1
  mkdir -p .gpu
  name=$(basename "$tree")
  tar -C "$(dirname "$tree")" --exclude="$name/models" --exclude="$name/docs" --exclude="$name/examples" \
      --exclude="$name/benches" --transform "s|^$name|patched|" -czf .gpu/llama.tar.gz "$name"
  cp "$here/gpu_selftest.sh" "$here/make_random_model.py" .gpu/
  du -sh .gpu; echo "carry .gpu; on the device: bash .gpu/gpu_selftest.sh build test perf bench"
  exit 0
fi

B=${GPU_BUILD_DIR:-/tmp/hlwq-gpu}; SRC=$B/src/patched; BIN=$B/build/bin; OUT=${OUT:-$B/out}
mkdir -p "$B" "$OUT"
ARCH=${ARCH:-90}   # 90: H100/H200, 89: RTX 40xx, 86: RTX 30xx
FA_QUANTS=${FA_QUANTS:-"f16-f16;q8_0-q8_0;q4_0-q4_0;hlwq4_64-hlwq4_64;hlwq3_64-hlwq3_64;q8_0-hlwq4_64;hlwq5_64-hlwq4_64"}
QTYPES=${QTYPES:-"Q5_K_M HLWQ5 HLWQ5_M Q4_K_M"}
start=$(date +%s)
say() { echo "[$(( $(date +%s) - start ))s] $*"; }

stage_probe() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader
  echo "nproc $(nproc); $(nvcc --version | tail -1); $(cmake --version | head -1)"
}

stage_build() {   # about 5 minutes on 16 cores
  [ -d "$SRC" ] || { mkdir -p "$B/src" && tar -xzf "$here/llama.tar.gz" -C "$B/src"; } || return 1
  if [ ! -f "$B/build/build.ninja" ]; then
    cmake -S "$SRC" -B "$B/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES="$ARCH" "-DGGML_CUDA_FA_QUANTS=$FA_QUANTS" -DLLAMA_BUILD_TESTS=ON \
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF -DGGML_RPC=OFF \
      > "$OUT/cmake.log" 2>&1 || { say "cmake failed"; tail -30 "$OUT/cmake.log"; return 1; }
  fi
  timeout "${BUILD_S:-480}" cmake --build "$B/build" -j "$(nproc)" --target test-backend-ops llama-quantize llama-bench \
    > "$OUT/build.log" 2>&1
  local rc=$?
  say "build rc=$rc"; grep -E "error" "$OUT/build.log" | head -20; return $rc
}

stage_test() {
  for op in MUL_MAT MUL_MAT_ID GET_ROWS SET_ROWS CPY FLASH_ATTN_EXT; do
    timeout 150 "$BIN/test-backend-ops" test -b CUDA0 -o "$op" -p hlwq > "$OUT/tbo-$op.log" 2>&1
    say "$op rc=$?: $(grep -E 'tests passed' "$OUT/tbo-$op.log" | tail -1)," \
        "$(grep -c 'not supported' "$OUT/tbo-$op.log") not supported"
    grep -E 'FAIL' "$OUT/tbo-$op.log" | head -6
  done
}

stage_perf() {
  timeout 240 "$BIN/test-backend-ops" perf -b CUDA0 -o MUL_MAT \
    -p "${PERF_FILTER:-type_a=(hlwq[456]|q4_K|q5_K|q6_K|q8_0),type_b=f32,m=4096,n=(1|2|8|512),k=14336}" 2>&1 \
    | sed -E 's/\x1b\[[0-9;]*m//g' | grep -E 'MUL_MAT' | tee "$OUT/perf.log"
}

stage_bench() {
  local model=$B/random-f16.gguf files=""
  [ -s "$model" ] || PYTHONPATH=$SRC/gguf-py python3 "$here/make_random_model.py" "$model" > "$OUT/model.log" 2>&1 \
    || { say "model generation failed"; tail -5 "$OUT/model.log"; return 1; }
  for t in $QTYPES; do
    if [ ! -s "$B/random-$t.gguf" ]; then
      "$BIN/llama-quantize" "$model" "$B/random-$t.gguf.tmp" "$t" "$(nproc)" > "$OUT/quantize-$t.log" 2>&1 \
        && mv "$B/random-$t.gguf.tmp" "$B/random-$t.gguf"
    fi
    files="$files,$B/random-$t.gguf"
  done
  timeout 300 "$BIN/llama-bench" -m "${files#,}" -ngl 99 -p 512 -n 128 -r 3 -o md 2>&1 | grep -E '^\|' | tee "$OUT/bench.md"
  set -- $QTYPES
  for kv in f16 q4_0 hlwq4_64 hlwq3_64; do
    timeout 120 "$BIN/llama-bench" -m "$B/random-$2.gguf" -ngl 99 -fa 1 -ctk "$kv" -ctv "$kv" -d 4096 -p 512 -n 128 \
      -r 2 -o md 2>&1 | grep -E '^\| .*(pp|tg)|error' | sed "s/^/kv $kv: /" | tee -a "$OUT/bench.md"
  done
}

[ $# -gt 0 ] || { sed -n '2,12p' "$0"; exit 2; }
for stage in "$@"; do
  say "== $stage"
  "stage_$stage" 2>&1 | tee -a "$OUT/log.txt"
done
say done
