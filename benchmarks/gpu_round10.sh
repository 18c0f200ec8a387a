#!/usr/bin/env bash
# Fifth session: the whole Qwen3-8B decode benchmark with the precompiled step (torch's aot_compile through
# flagtree_py.precompile): warm first call with no Dynamo trace, beside cold, warm, eager and Inductor.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
export PYTHONPATH=$PWD
timeout 585 python3 benchmarks/decode.py --model qwen3 --modes "${MODES:-eager,flagtree,reduce-overhead}" --budget-s 500 \
  --out "$OUT/decode_qwen3.json" > "$OUT/decode.log" 2>&1
echo "decode rc=$?"; grep "^decode:" "$OUT/decode.log" | cut -c1-400
