#!/usr/bin/env bash
# GPU self-test of the HLWQ CUDA kernels; run it on a machine with an NVIDIA GPU:
#   bash scripts/gpu_selftest.sh [ARCH]          # ARCH: e.g. 89 (default: native)
# 1. builds the patched llama.cpp with CUDA for this GPU;
# 2. test-backend-ops -b CUDA0 (CUDA against the CPU backend) for every op with an HLWQ type in it;
# 3. llama-bench pp512/tg128, everything offloaded, for HLWQ5, HLWQ5_M, Q5_K_M and Q4_K_M on SmolLM2-135M and on
#    a generated random-weight 1.1B llama (TinyLlama's shape; large enough to be bandwidth-bound), with the
#    token-generation bandwidth (model bytes x tokens/s) against the GPU's peak;
# 4. the HLWQ KV cache types with flash attention against f16 and q4_0, on both models.
# Everything it prints is meant to be quoted. Targets (issue #5): every HLWQ op passes test-backend-ops;
# HLWQ5 tg128 >= 1.05x Q5_K_M; >= 75 % of peak bandwidth on the 1.1B model; HLWQ KV >= 0.9x q4_0 KV.
set -uo pipefail
cd "$(dirname "$0")/.."
arch=${1:-native}
out=${HLWQ_SELFTEST_DIR:-$HOME/.cache/hlwq-gguf/gpu-selftest}
mkdir -p "$out"

bash scripts/setup.sh
bin=$(hlwq-gguf build --cuda --arch "$arch" 2>"$out/build.log" | tail -1) || { tail -40 "$out/build.log"; exit 1; }
echo "== build: $bin"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "== test-backend-ops -b CUDA0 (HLWQ types)"
status=0
for op in GET_ROWS MUL_MAT MUL_MAT_ID SET_ROWS CPY FLASH_ATTN_EXT; do
  "$bin/test-backend-ops" test -b CUDA0 -o "$op" > "$out/tbo-$op.log" 2>&1
  grep -iE "hlwq" "$out/tbo-$op.log" | grep -vE "^\s*$" > "$out/tbo-$op-hlwq.log"
  ok=$(grep -c "OK" "$out/tbo-$op-hlwq.log"); fail=$(grep -c "FAIL" "$out/tbo-$op-hlwq.log")
  skipped=$(grep -ciE "not supported" "$out/tbo-$op-hlwq.log")
  echo "$op: HLWQ cases $ok OK, $fail FAIL, $skipped not supported on CUDA0"
  grep "FAIL" "$out/tbo-$op-hlwq.log" | head -20
  [ "$fail" -gt 0 ] && status=1
done

peak_gbs=$(python3 - <<'EOF'
import ctypes
for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12"):
    try:
        rt = ctypes.CDLL(name)
        break
    except OSError:
        rt = None
if rt is None:
    print("nan")
else:
    clock, width = ctypes.c_int(), ctypes.c_int()
    rt.cudaDeviceGetAttribute(ctypes.byref(clock), 36, 0)  # cudaDevAttrMemoryClockRate, kHz
    rt.cudaDeviceGetAttribute(ctypes.byref(width), 37, 0)  # cudaDevAttrGlobalMemoryBusWidth, bits
    print(f"{2 * clock.value * 1e3 * width.value / 8 / 1e9:.0f}")
EOF
)
echo "== peak memory bandwidth: ${peak_gbs} GB/s"

echo "== models"
python3 - "$out" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import write_tiny_llama
from convert import convert_checkpoint
from convert.reference import reference_gguf
from hlwq_gguf import build, llama_tools, models, paths

out = Path(sys.argv[1])
cpu = build.ensure_build()
hf = paths.cache_root() / "tests" / "smollm2-135m-hf"
if not (hf / "hlwq_unquantize.json").exists():
    models.unquantize_to_hf("smollm2-135m", hf, progress=False)
big = out / "random-1.1b-hf"
if not (big / "config.json").exists():
    write_tiny_llama(big, hf, hidden=2048, intermediate=5632, layers=22)
for name, folder in {"smollm2-135m": hf, "random-1.1b": big}.items():
    f32 = out / f"{name}-F32.gguf"
    if not f32.exists():
        reference_gguf(folder, f32, "f32")
    for recipe in ("hlwq5", "hlwq5_m"):
        target = out / f"{name}-{recipe.upper()}.gguf"
        if not target.exists():
            convert_checkpoint(folder, target, recipe=recipe, quiet=True)
    for ftype in ("Q5_K_M", "Q4_K_M"):
        target = out / f"{name}-{ftype}.gguf"
        if not target.exists():
            llama_tools.llama_quantize(cpu, f32, target, ftype)
print("models ready")
EOF

echo "== llama-bench -ngl 99 (pp512, tg128)"
for model in smollm2-135m random-1.1b; do
  for variant in HLWQ5 HLWQ5_M Q5_K_M Q4_K_M; do
    file="$out/$model-$variant.gguf"
    bytes=$(stat -c %s "$file")
    "$bin/llama-bench" -m "$file" -ngl 99 -p 512 -n 128 -r 3 -o json 2>/dev/null > "$out/bench-$model-$variant.json"
    python3 - "$file" "$bytes" "$peak_gbs" "$out/bench-$model-$variant.json" <<'EOF'
import json, sys
path, size, peak, table = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
for row in json.load(open(table)):
    test = f"tg{row['n_gen']}" if row["n_gen"] else f"pp{row['n_prompt']}"
    extra = ""
    if row["n_gen"] and peak == peak:
        gbs = size * row["avg_ts"] / 1e9  # every weight byte is read once per generated token
        extra = f", {gbs:.0f} GB/s = {100 * gbs / peak:.0f} % of peak"
    print(f"{path.rsplit('/', 1)[-1]}: {test} {row['avg_ts']:.1f} t/s{extra}")
EOF
  done
done

echo "== KV cache with flash attention (HLWQ5 weights, pp512 and tg128 at depth 4096; target: hlwq >= 0.9x q4_0)"
for model in smollm2-135m random-1.1b; do
  for kv in f16 q4_0 hlwq4_64 hlwq3_64; do
    "$bin/llama-bench" -m "$out/$model-HLWQ5.gguf" -ngl 99 -fa 1 -ctk $kv -ctv $kv -d 4096 -p 512 -n 128 -r 3 2>&1 \
      | grep -E "pp512|tg128|error" | sed "s/^/$model $kv: /"
  done
done
exit $status
