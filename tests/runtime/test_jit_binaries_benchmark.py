"""benchmarks/warm_start_gpu.py on the CPU (`--smoke`): two processes, one cache; the second generates no code.

On the CPU Triton's interpreter compiles nothing and no binary is stored: this checks the script the lead
runs on the GPU (its processes, environment, counters and JSON), not the GPU claim itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_warm_start_benchmark_smoke(tmp_path):
    out = tmp_path / "warm.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "warm_start_gpu.py"), "--smoke", "--length", "5",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    cold, warm = result["cold"], result["warm"]
    assert result["checks"]["all"] and result["smoke"]
    assert cold["cache"] == ["miss", "miss"] and warm["cache"] == ["hit", "hit"]  # the prompt and the one token
    assert cold["kernels_generated"] == cold["triton_kernels"] > 0 and warm["kernels_generated"] == 0
    assert warm["kernel_launches"] == cold["kernel_launches"] > 0
    for run in (cold, warm):
        assert run["triton_compile_calls_in_process"] == 0 and run["binaries_stored"] == 0  # the interpreter
        assert all(call["rel_err"] < 1e-5 and call["top1_agree"] == 1.0 for call in run["calls"].values())
