#!/usr/bin/env bash
# Fourth session: the whole Qwen3-8B decode (eager, Inductor reduce-overhead, flagtree cold and warm),
# after the Hopper GEMMs, the one-graph recipe and the warm start through the Dynamo-graph link.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
export PYTHONPATH=$PWD
timeout 590 python3 benchmarks/decode.py --budget-s 560 --out "$OUT/decode_qwen3.json" > "$OUT/decode.log" 2>&1
echo "decode rc=$?"; grep -v "^\s*$" "$OUT/decode.log" | grep -v Warn | tail -14 | cut -c1-300
