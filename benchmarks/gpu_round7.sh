#!/usr/bin/env bash
# Fourth session, second H100 call: SwiGLU (two accumulators) tiles in the TMA forms; the Qwen3-8B layer
# cases after the m128 split-K and the prefill attention order.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
export PYTHONPATH=$PWD
timeout 200 python3 benchmarks/gemm_hopper_probe.py --shapes gate_up --forms tma,tma_persistent \
  --tiles "128,128,64,8,3;128,128,64,8,4;128,128,128,8,2;64,256,64,8,3;64,256,64,8,4;128,64,128,4,3;256,64,64,8,3;64,128,64,4,4;64,128,128,4,3" \
  --out "$OUT/gemm_hopper_probe_swiglu.json" 2>&1 | tail -8
timeout 360 python3 benchmarks/layer.py --max-autotune anchors --cases qwen3-8b --profile --out "$OUT/layer_qwen3_8b.json" > "$OUT/layer.log" 2>&1
echo "layer rc=$?"; grep -v "^\s*$" "$OUT/layer.log" | tail -5 | cut -c1-300
