#!/usr/bin/env bash
# Third session, second H100 call: the Qwen3-8B layer cases with Inductor max-autotune on the anchors and
# a per-kernel profile, after the decode tile and split-K changes; then the large-bucket GEMM tile sweep.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
export PYTHONPATH=$PWD
timeout 400 python3 benchmarks/layer.py --max-autotune anchors --cases qwen3-8b --profile --out "$OUT/layer_qwen3_8b.json" > "$OUT/layer.log" 2>&1
echo "layer rc=$?"; grep -v "^\s*$" "$OUT/layer.log" | tail -6 | cut -c1-300
timeout 150 python3 benchmarks/gemm_tiles_sweep.py --buckets large --budget-s 120 --out "$OUT/gemm_sweep_large.json" 2>&1 | grep -v Warn | tail -4 | cut -c1-400
