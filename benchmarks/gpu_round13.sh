#!/usr/bin/env bash
# Seventh session: a first call's parallel builds start in the background when the compile ends
# (FirstCallBuilds.start). STEP=tests: the precompile and parallel-builds tests on the GPU machine's torch 2.11
# and Triton 3.6 (pytest from wheels carried in .devcarry/wheels), then the Qwen3-8B decode benchmark for
# MODES (default flagtree). STEP=decode: the benchmark alone. Both first time torch's own trace on this host
# (trace_share.py).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
export PYTHONPATH=$PWD
if [ "${STEP:-tests}" = tests ]; then
  python3 -m pip install --no-deps -q .devcarry/wheels/*.whl 2>&1 | tail -2
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/backend/test_precompile.py \
    tests/runtime/test_parallel_builds.py > "$OUT/pytest_torch211.log" 2>&1
  echo "pytest rc=$?"; tail -n 15 "$OUT/pytest_torch211.log"
fi
# how fast this host traces (torch's share, no backend work): tells a slow host from a slow compile
timeout 120 python3 benchmarks/trace_share.py --device cuda --out "$OUT/trace_share.json" 2>&1 | cut -c1-400
timeout "${DECODE_S:-330}" python3 benchmarks/decode.py --model "${MODEL:-qwen3}" --modes "${MODES:-flagtree}" \
  --budget-s $(( ${DECODE_S:-330} - 30 )) --mode-timeout-s $(( ${DECODE_S:-330} - 30 )) \
  --out "$OUT/decode_${MODEL:-qwen3}.json" > "$OUT/decode.log" 2>&1
echo "decode rc=$?"; grep "^decode:" "$OUT/decode.log" | cut -c1-500
