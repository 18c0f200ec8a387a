"""Kernels built ahead of time with no GPU, then launched on the GPU with no Triton compile.

    PYTHONPATH=$PWD python3 benchmarks/aot_cubin_gpu.py --out $OUT/aot_cubin.json [--carried-cache DIR]

1. **Build without a GPU**: a child process with `CUDA_VISIBLE_DEVICES=""` (torch sees no GPU) runs
   `flagtree compile qwen3 --tiny --target nvidia-sm90` into a fresh cache: fake CUDA tensors, cubins
   from Triton's ahead-of-time compile. With `--carried-cache DIR` (a cache built on the CPU machine and
   copied here) that cache is also tried first; its entry is only hit if its toolchain (torch, Triton,
   Python, flagtree) is this machine's, which the JSON reports either way.
2. **Run from the binaries**: a child process with the GPU, a fresh empty `TRITON_CACHE_DIR` and a
   counting wrapper around Triton's `compile` (installed before anything imports flagtree) compiles the
   tiny model with torch.compile (target auto) against that cache, runs it, compares with eager fp32
   (TF32 off), and reports: the cache outcome, flagtree's `triton_compiles` and `kernels_generated`, the
   count of every `triton.compile` call in the process, binaries loaded and launched, and the files in
   Triton's cache dir (no `.cubin` means Triton built no kernel).
3. **Contrast (JIT)**: the same child against an empty flagtree cache: Triton compiles every kernel, so the
   counters are seen to count (the proof in 2 is not a counter that cannot move). Timings of both runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LENGTH = 7

_CHILD = r"""
import json, os, statistics, sys, time
from pathlib import Path
import triton.compiler, triton.compiler.compiler as cc

calls = []
original = cc.compile
def counting(src, *args, **kwargs):
    calls.append(getattr(getattr(src, "fn", None), "__name__", str(src)[:40]))
    return original(src, *args, **kwargs)
cc.compile = triton.compiler.compile = counting  # before flagtree or any JIT binder exists

import torch, flagtree_py
from flagtree_py.models import build_tiny_model
from flagtree_py.runtime.launch import counters
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
length = int(sys.argv[1])
model = build_tiny_model("qwen3").to("cuda")
ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(1)).to("cuda")
start = time.perf_counter()
with torch.no_grad():
    compiled = torch.compile(model, backend="flagtree")
    out = compiled(ids)
    torch.cuda.synchronize()
    first_call = time.perf_counter() - start
    ref = model(ids)
    times = []
    for _ in range(50):
        torch.cuda.synchronize(); t = time.perf_counter(); compiled(ids); torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
record = flagtree_py.report()[-1]
triton_dir = Path(os.environ["TRITON_CACHE_DIR"])
files = sorted(str(p.relative_to(triton_dir)) for p in triton_dir.rglob("*") if p.is_file())
print(json.dumps({
    "cache": record["cache"], "cache_key": record["cache_key"], "target": record["target"],
    "kernels_generated": record["kernels_generated"], "triton_kernels": record["triton_kernels"],
    "triton_compiles_report": record["triton_compiles"], "triton_compile_calls_in_process": len(calls),
    "compiled_functions": calls[:40], "binaries_loaded": len(record.get("binaries_loaded", [])),
    "binary_launches": counters["binary_launches"], "kernel_launches": counters["kernel_launches"],
    "kernel_failures": record["kernel_failures"],
    "rel_err_vs_eager_fp32": ((out - ref).abs().max() / ref.abs().max()).item(),
    "top1_agree": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    "first_call_s": round(first_call, 3), "median_forward_ms": round(statistics.median(times) * 1e3, 4),
    "triton_cache_files": len(files), "triton_cache_cubins": [f for f in files if f.endswith(".cubin")][:40],
    "triton_cache_other_files": [f for f in files if not f.endswith(".cubin")][:20],
}))
"""


def _private_copy(source: Path, into: Path) -> Path:
    """A copy of a carried cache with the permissions flagtree requires (0700, ours)."""
    shutil.copytree(source, into)
    for path in [into, *into.rglob("*")]:
        path.chmod(0o700 if path.is_dir() else 0o600)
    return into


def _entries(cache_dir: Path) -> list[dict]:
    found = []
    for meta_path in cache_dir.glob("*/*/meta.json"):
        meta = json.loads(meta_path.read_text())
        found.append({"key": meta.get("key"), "target": meta.get("target"), "versions": meta.get("versions"),
                      "binaries": sorted({arch for per in meta.get("binaries", {}).values() for arch in per})})
    return found


def _run_child(cache_dir: Path, triton_dir: Path, length: int) -> dict:
    env = {**os.environ, "FLAGTREE_CACHE_DIR": str(cache_dir), "TRITON_CACHE_DIR": str(triton_dir)}
    env.pop("FLAGTREE_TARGET", None)
    done = subprocess.run([sys.executable, "-c", _CHILD, str(length)], env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    if done.returncode != 0:
        return {"error": done.stderr[-4000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _graph_diff(cache_dir: Path, build: dict, run_key: str) -> list[str]:
    """Why the GPU run missed the entry built without a GPU: a diff of the two entries' aten graphs
    (the run stored its own entry in the same cache on the miss)."""
    import difflib

    def graph(key: str) -> list[str]:
        meta = json.loads((cache_dir / key[:2] / key / "meta.json").read_text())
        return meta.get("aten_graph", "").splitlines()

    built_key = build["entries"][0]["key"]
    try:
        return list(difflib.unified_diff(graph(built_key), graph(run_key), "built without GPU", "GPU run", lineterm=""))[:80]
    except OSError as error:
        return [f"cannot read an entry: {error}"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--carried-cache", type=Path, help="a cache built by `flagtree compile` on another machine")
    args = parser.parse_args()
    import torch
    import triton

    work = Path(tempfile.mkdtemp(prefix="flagtree-aot-"))
    result: dict = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(),
                    "versions": {"torch": torch.__version__, "triton": triton.__version__,
                                 "python": sys.version.split()[0]}}

    # 1. build with no GPU visible, this machine's toolchain
    built = work / "built"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_CACHE_DIR": str(work / "triton-build")}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flagtree_py.cli.main", "compile", "qwen3", "--tiny", "--target",
                           "nvidia-sm90", "--length", str(LENGTH), "--cache-dir", str(built), "--json"],
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    result["build_without_gpu"] = {"returncode": done.returncode, "seconds": round(time.perf_counter() - start, 2),
                                   "stderr_tail": done.stderr[-1500:]}
    if done.returncode == 0:
        result["build_without_gpu"]["result"] = json.loads(done.stdout)

    # 2. run from the binaries: the carried cache first (if given), then the one built here
    runs = {}
    if args.carried_cache:
        carried = _private_copy(args.carried_cache, work / "carried")
        result["carried_entries"] = _entries(carried)
        runs["carried"] = _run_child(carried, work / "triton-carried", LENGTH)
        runs["carried"]["key_found_in_carried_cache"] = runs["carried"].get("cache_key") in {
            e["key"] for e in result["carried_entries"]}
    if done.returncode == 0:
        runs["built_without_gpu"] = _run_child(built, work / "triton-aot", LENGTH)
    # 3. contrast: no entry, Triton's JIT compiles every kernel
    runs["jit_contrast"] = _run_child(work / "empty", work / "triton-jit", LENGTH)
    result["runs"] = runs

    aot = runs.get("built_without_gpu", {})
    jit = runs["jit_contrast"]
    result["checks"] = {
        "aot_entry_hit": aot.get("cache") == "hit",
        "aot_key_equals_build_key": aot.get("cache_key") in {
            e["key"] for e in result.get("build_without_gpu", {}).get("result", {}).get("entries", [])},
        "aot_no_triton_compile": aot.get("triton_compile_calls_in_process") == 0 and aot.get("triton_compiles_report") == 0,
        "aot_no_cubin_in_triton_cache": aot.get("triton_cache_cubins") == [],
        "aot_all_kernels_from_binaries": aot.get("binaries_loaded") == aot.get("triton_kernels", -1) > 0,
        "aot_matches_eager": aot.get("rel_err_vs_eager_fp32", 1.0) <= 1e-4 and aot.get("kernel_failures") == [],
        "jit_counts_compiles": jit.get("triton_compiles_report", 0) > 0 and jit.get("triton_cache_cubins") != [],
        "jit_matches_eager": jit.get("rel_err_vs_eager_fp32", 1.0) <= 1e-4,
    }
    result["ok"] = all(result["checks"].values())
    if done.returncode == 0 and not result["checks"]["aot_key_equals_build_key"] and "cache_key" in aot:
        result["key_mismatch_graph_diff"] = _graph_diff(built, result["build_without_gpu"]["result"], aot["cache_key"])
    text = json.dumps(result, indent=1)
    print(text)
    Path(args.out).write_text(text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
