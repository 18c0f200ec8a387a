#!/usr/bin/env bash
# Third session, first H100 call: CUDA-graph recapture fix (tiny whole model), the decode layers with a
# per-kernel profile, and the qwen3 --tiny kernels as torch 2.11 writes them (issue 6's cubin gap).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
export PYTHONPATH=$PWD
timeout 150 python3 - <<'PY' > "$OUT/cuda_graphs.log" 2>&1
import json, sys, warnings
sys.path.insert(0, "benchmarks")
warnings.simplefilter("always")
import attention_gpu_check as a
result = a.check_cuda_graphs()
print(json.dumps(result, indent=1, default=str))
json.dump(result, open(sys.argv[1] if len(sys.argv) > 1 else "/dev/null", "w"), default=str)
PY
echo "cuda graphs rc=$?"; grep -i "capture\|error\|passed\|replay" "$OUT/cuda_graphs.log" | cut -c1-300 | head -12
mkdir -p /tmp/d211
CUDA_VISIBLE_DEVICES="" FLAGTREE_DUMP_DIR=/tmp/d211 timeout 120 python3 -m flagtree_py.cli.main compile qwen3 --tiny --target nvidia-sm90 --cache-dir /tmp/c211 > /tmp/d211/compile.log 2>&1
echo "compile rc=$?"; tar czf "$OUT/dump211.tgz" -C /tmp d211
timeout 330 python3 benchmarks/layer.py --max-autotune none --cases "qwen3-8b decode" --profile --out "$OUT/layer_decode_profile.json" > "$OUT/layer.log" 2>&1
echo "layer rc=$?"; grep -v "^\s*$" "$OUT/layer.log" | tail -12 | cut -c1-400
