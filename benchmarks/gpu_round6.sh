#!/usr/bin/env bash
# Fourth session, first H100 call: the GEMM template's TMA form (Hopper) — correctness and timing of the
# four Qwen3-8B projections at every M bucket, then the Qwen3-8B layer cases against eager and Inductor.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
export PYTHONPATH=$PWD
timeout 150 python3 benchmarks/gemm_gpu.py --no-autotune --rows 1 16 32 2048 --out "$OUT/gemm_gpu.json" > "$OUT/gemm_gpu.log" 2>&1
echo "gemm_gpu rc=$?"; grep -v "^\s*$" "$OUT/gemm_gpu.log" | grep -v Warn | tail -12 | cut -c1-300
timeout 420 python3 benchmarks/layer.py --max-autotune anchors --cases qwen3-8b --profile --out "$OUT/layer_qwen3_8b.json" > "$OUT/layer.log" 2>&1
echo "layer rc=$?"; grep -v "^\s*$" "$OUT/layer.log" | tail -8 | cut -c1-300
