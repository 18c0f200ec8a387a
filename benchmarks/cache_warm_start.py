"""Cold vs warm compile of one model in two separate processes (the cache's promise).

    python benchmarks/cache_warm_start.py [--preset qwen3] [--device cuda] --out cache.json

Each process compiles the tiny model with a fresh Dynamo, runs it once and reports the flagtree
compile time (capture excluded), whether the cache hit, how many kernels were generated, and the
wall time of the first call (on a GPU this includes Triton's JIT, whose own cache is warm in the
second process too).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

_CHILD = """
import json, sys, time, torch, flagtree_py
from flagtree_py.models import build_tiny_model
preset, device = sys.argv[1], sys.argv[2]
dtype = torch.bfloat16 if device == "cuda" else torch.float32
model = build_tiny_model(preset, dtype=torch.float32).to(device=device, dtype=dtype)
ids = torch.randint(0, 256, (1, 16), device=device)
start = time.perf_counter()
with torch.no_grad():
    torch.compile(model, backend="flagtree", dynamic=True)(ids)
if device == "cuda":
    torch.cuda.synchronize()
first_call = time.perf_counter() - start
r = flagtree_py.report()[-1]
print(json.dumps({"cache": r["cache"], "kernels_generated": r["kernels_generated"], "triton_kernels": r["triton_kernels"],
                  "flagtree_compile_s": r["compile_s"], "first_call_s": round(first_call, 3)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="qwen3")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="cache_warm_start.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache_dir:
        env = {**os.environ, "FLAGTREE_CACHE_DIR": cache_dir}
        runs = []
        for _ in range(2):
            done = subprocess.run([sys.executable, "-c", _CHILD, args.preset, args.device], env=env,
                                  capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {"date": time.strftime("%Y-%m-%d"), "preset": args.preset, "device": args.device, "cold": runs[0], "warm": runs[1],
              "compile_ratio": round(runs[0]["flagtree_compile_s"] / max(runs[1]["flagtree_compile_s"], 1e-9), 2)}
    if args.device == "cuda":
        import torch

        result["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
