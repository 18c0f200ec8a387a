#!/usr/bin/env bash
# The lead's second H100 round: correctness after the fixes, CUDA graphs, then the layer benchmark.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
export PYTHONPATH=$PWD
run() { local t=$1; shift; echo "=== $* (limit ${t}s)"; local s=$SECONDS; timeout "$t" "$@" > "$OUT/$(basename "$2" .py).log" 2>&1; echo "rc=$? in $((SECONDS-s))s"; tail -3 "$OUT/$(basename "$2" .py).log" | cut -c1-400; }
run 150 python3 benchmarks/spine_gpu.py --out "$OUT/spine_gpu.json"
run 100 python3 benchmarks/attention_gpu_check.py --out "$OUT/attention_gpu.json"
run 320 python3 benchmarks/layer.py --max-autotune none --out "$OUT/layer.json"
ls "$OUT"
