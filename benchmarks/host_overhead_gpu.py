"""Where a compiled layer call spends host time (GPU): per-call CPU time without synchronizing, GPU
time of the replay alone, and a cProfile of the host side, for flagtree (CUDA graphs) and Inductor.

    PYTHONPATH=$PWD python3 benchmarks/host_overhead_gpu.py --out host.json [--case "qwen3-8b decode B=1 ctx=1024"]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import layer


def host_us(fn, calls: int = 300) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return round(host, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--case", default="qwen3-8b decode B=1 ctx=1024")
    args = parser.parse_args()
    case = next(c for c in layer.cases(False) if c.name == args.case)
    step, inputs, _, _ = layer.build_step(case, False, torch.bfloat16, "cuda", "grouped_mm")
    report = {"case": case.name, "device": torch.cuda.get_device_name(), "modes": {}}
    from triton.testing import do_bench

    with torch.no_grad():
        for mode in ("flagtree", "inductor_max_autotune"):
            torch._dynamo.reset()
            fn = layer.make_mode(mode, step, inputs, False)
            for _ in range(5):
                fn()
            entry = {"do_bench_ms": round(do_bench(fn, warmup=25, rep=100, return_mode="median"), 4),
                     "host_us_per_call": host_us(fn)}
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(200):
                fn()
            profiler.disable()
            torch.cuda.synchronize()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
            entry["cprofile_tottime_top25"] = text.getvalue().splitlines()[:60]
            report["modes"][mode] = entry
            print(mode, {k: v for k, v in entry.items() if "cprofile" not in k}, flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
