"""Kernels built in parallel before a graph's first call, on the GPU (runtime/parallel_builds.py).

    PYTHONPATH=$PWD python benchmarks/parallel_builds_gpu.py --model qwen3-8b --layers 2 --out $OUT/pb.json
    PYTHONPATH=$PWD python benchmarks/parallel_builds_gpu.py --smoke --out /tmp/pb.json   # CPU: the script only

Two cold child processes (warm_start_gpu.py's child: a prompt, then one token, each a graph), each with its
own fresh, empty flagtree and Triton caches:
  - `jit`: parallel builds off; Triton's JIT compiles each kernel at its first launch, and flagtree stores
    each build by content with the specialization the JIT chose;
  - `parallel`: parallel builds on (one worker per core, at most 16).
Checks: the parallel process's JIT compiled nothing (each launch found a worker's binary), its store holds
every binary the JIT process stored, under the same keys and with the same cubin bytes, and both match eager
PyTorch. The first-call seconds of both processes are the figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from warm_start_gpu import TOLERANCE, _run_child


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where the JSON result goes")
    parser.add_argument("--model", choices=["qwen3-tiny", "qwen3-8b"], default="qwen3-tiny")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    parser.add_argument("--length", type=int, default=16, help="prompt length of the first call (default 16)")
    parser.add_argument("--smoke", action="store_true", help="CPU and the interpreter: checks the script only")
    return parser.parse_args(argv)


def _jit_binaries(cache_dir: Path) -> dict[str, bytes]:
    """The store's JIT-specialized binaries: key -> cubin bytes."""
    from flagtree_py.cache.binaries import BinaryStore

    store = BinaryStore(cache_dir)
    found = {}
    for meta, _, problem in store.entries():
        if problem is None and "specialization" in (meta.get("signature") or {}):
            found[meta["key"]] = store.files(meta["key"]).get("kernel.cubin", b"")
    return found


def _checks(jit: dict, parallel: dict, jit_store: dict, parallel_store: dict, smoke: bool) -> dict:
    tolerance = TOLERANCE[parallel.get("dtype", "float32")]
    runs = (jit, parallel)
    checks = {
        "both_ran": "error" not in jit and "error" not in parallel,
        "both_match_eager": all(call["rel_err"] <= tolerance for run in runs for call in run.get("calls", {}).values())
        and not any(run.get("kernel_failures") for run in runs),
    }
    if not smoke:
        summaries = [s for s in parallel.get("parallel_builds", []) if s]
        checks["workers_built_and_nothing_failed"] = (bool(summaries) and sum(s.get("built", 0) for s in summaries) > 0
                                                      and not any(s.get("failed") or "dry_run_error" in s
                                                                  for s in summaries))
        checks["parallel_jit_compiled_nothing"] = parallel.get("triton_compile_calls_in_process") == 0
        checks["every_jit_binary_built_by_workers"] = bool(jit_store) and set(jit_store) <= set(parallel_store)
        checks["same_cubin_bytes"] = all(parallel_store.get(key) == cubin for key, cubin in jit_store.items())
    checks["all"] = all(checks.values())
    return checks


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="flagtree-parallel-"))
    caches = {name: work / f"{name}-flagtree" for name in ("jit", "parallel")}
    runs = {name: _run_child(args, caches[name], work / f"{name}-triton", "0" if name == "jit" else "")
            for name in ("jit", "parallel")}
    stores = {name: _jit_binaries(caches[name]) for name in caches}
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model, "layers": args.layers,
              "length": args.length, "smoke": args.smoke, **runs,
              "store": {name: len(store) for name, store in stores.items()},
              "checks": _checks(runs["jit"], runs["parallel"], stores["jit"], stores["parallel"], args.smoke)}
    if result["checks"]["both_ran"]:
        result["first_call_s"] = {name: {call: runs[name]["calls"][call]["first_call_s"] for call in runs[name]["calls"]}
                                  for name in runs}
    import torch
    import triton

    result["versions"] = {"torch": torch.__version__, "triton": triton.__version__}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({"checks": result["checks"], "first_call_s": result.get("first_call_s")}))
    return 0 if result["checks"]["all"] else 1


if __name__ == "__main__":
    sys.exit(main())
