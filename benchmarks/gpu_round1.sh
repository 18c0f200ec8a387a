#!/usr/bin/env bash
# The lead's first H100 round on the merged branch: correctness first, then kernel timings.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
run() { local t=$1; shift; echo "=== $* (limit ${t}s)"; local s=$SECONDS; timeout "$t" "$@" > "$OUT/$(basename "$2" .py).log" 2>&1; echo "rc=$? in $((SECONDS-s))s"; tail -5 "$OUT/$(basename "$2" .py).log"; }
run 170 python3 benchmarks/spine_gpu.py --out "$OUT/spine_gpu.json"
run 110 python3 benchmarks/attention_gpu_check.py --out "$OUT/attention_gpu.json"
run 150 python3 benchmarks/gemm_gpu.py --no-autotune --out "$OUT/gemm_gpu.json"
run 120 python3 benchmarks/aot_cubin_gpu.py --out "$OUT/aot_cubin.json"
