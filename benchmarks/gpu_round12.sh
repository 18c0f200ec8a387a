#!/usr/bin/env bash
# Sixth session: kernels built in parallel before the first call (runtime/parallel_builds.py).
# STEP=check: the JIT process against the parallel one (parallel_builds_gpu.py, Qwen3-8B shapes, 2 layers) and
# the warm start from JIT binaries (warm_start_gpu.py, parallel builds off there). STEP=decode: the whole
# Qwen3-8B benchmark, MODES (default eager,flagtree,reduce-overhead) in one run.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
export PYTHONPATH=$PWD
if [ "${STEP:-check}" = check ]; then
  timeout 280 python3 benchmarks/parallel_builds_gpu.py --model qwen3-8b --layers 2 --length 64 \
    --out "$OUT/parallel_builds_qwen3.json" > "$OUT/parallel_builds.log" 2>&1
  echo "parallel_builds rc=$?"; tail -c 1500 "$OUT/parallel_builds.log"
  timeout 200 python3 benchmarks/warm_start_gpu.py --model qwen3-8b --layers 2 --out "$OUT/warm_start_qwen3.json" \
    > "$OUT/warm_start.log" 2>&1
  echo "warm_start rc=$?"; tail -c 600 "$OUT/warm_start.log"
else
  timeout 585 python3 benchmarks/decode.py --model "${MODEL:-qwen3}" --modes "${MODES:-eager,flagtree,reduce-overhead}" \
    --budget-s 520 --mode-timeout-s 520 --out "$OUT/decode_${MODEL:-qwen3}.json" > "$OUT/decode.log" 2>&1
  echo "decode rc=$?"; grep "^decode:" "$OUT/decode.log" | cut -c1-500
fi
