#!/usr/bin/env bash
# Fifth session: what the whole-model tables lacked. MODEL=qwen3-30b-a3b: eager, flagtree (cold, warm,
# precompiled) and Inductor reduce-overhead in one run; MODEL=qwen3 MODES=max-autotune: Inductor max-autotune.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
export PYTHONPATH=$PWD
timeout 585 python3 benchmarks/decode.py --model "${MODEL:-qwen3-30b-a3b}" --modes "${MODES:-eager,flagtree,reduce-overhead}" \
  --budget-s 520 --mode-timeout-s 520 --out "$OUT/decode_${MODEL:-qwen3-30b-a3b}.json" > "$OUT/decode.log" 2>&1
echo "decode rc=$?"; grep "^decode:" "$OUT/decode.log" | cut -c1-500
