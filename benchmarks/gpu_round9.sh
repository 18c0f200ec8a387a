#!/usr/bin/env bash
# Fourth session: every layer case (Qwen3-8B, Qwen3-30B-A3B, Step3) against eager and Inductor after the
# Hopper GEMM changes; compile time of the 36-layer Qwen3-8B (dynamic=True), cold and warm.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
export PYTHONPATH=$PWD
timeout 420 python3 benchmarks/layer.py --max-autotune anchors --profile --out "$OUT/layer_all.json" > "$OUT/layer.log" 2>&1
echo "layer rc=$?"; grep -v "^\s*$" "$OUT/layer.log" | tail -9 | cut -c1-250
timeout 160 python3 benchmarks/compile_time.py --device cuda --layers 36 --label s4 --out "$OUT/compile_time.json" > "$OUT/compile_time.log" 2>&1
echo "compile_time rc=$?"; grep -v "^\s*$" "$OUT/compile_time.log" | grep -v Warn | tail -6 | cut -c1-300
