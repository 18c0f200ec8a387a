#!/usr/bin/env bash
# The lead's third H100 round: why CUDA graph capture fails, the layer benchmark's decode cases.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
export PYTHONPATH=$PWD
timeout 120 python3 - <<'PY' > "$OUT/cuda_graphs_debug.log" 2>&1
import json, sys, warnings
sys.path.insert(0, "benchmarks")
warnings.simplefilter("always")
import attention_gpu_check as a
try:
    print(json.dumps(a.check_cuda_graphs(), indent=1, default=str))
except Exception as e:
    import traceback; traceback.print_exc()
PY
echo "cuda graphs rc=$?"; grep -i "capture\|error" "$OUT/cuda_graphs_debug.log" | cut -c1-600 | head -8
timeout 300 python3 benchmarks/layer.py --max-autotune anchors --cases decode --out "$OUT/layer_decode.json" > "$OUT/layer_decode.log" 2>&1
echo "layer rc=$?"; tail -8 "$OUT/layer_decode.log" | cut -c1-300
