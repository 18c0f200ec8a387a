"""Kernels built ahead of time with no GPU, then launched on the GPU with no Triton compile.

    PYTHONPATH=$PWD python3 benchmarks/aot_cubin_gpu.py --out $OUT/aot_cubin.json [--carried-cache DIR]

1. **Carried cache** (`--carried-cache DIR`: built on the CPU machine by
   `flagtree compile qwen3 --tiny --target nvidia-sm90 [--dtype bfloat16] --cache-dir DIR` in a venv with
   this GPU machine's Triton). Its graph entries cannot hit here (their key holds the CPU machine's torch and
   Python), but its content-keyed binaries (`DIR/binaries/`, cache/binaries.py: kernel source + launch
   signature + arch + Triton version) can: on the graph miss flagtree generates the module again, and every
   kernel looks its binary up by content before Triton would compile it. For each dtype built there (fp32,
   bf16 if its binaries hold bf16 pointers) a child process with the GPU, a fresh empty `TRITON_CACHE_DIR`
   and a counting wrapper around Triton's `compile` (installed before flagtree is imported) runs the tiny
   model against a private copy, compares with eager, and reports per kernel whether its binary was found by
   content (a kernel whose source differs under this torch is not, and is then JIT-compiled: reported).
2. **Same-machine build with the GPU hidden** (the second proof): a child with `CUDA_VISIBLE_DEVICES=""`
   runs `flagtree compile` here into a fresh cache (fake CUDA tensors, Triton's ahead-of-time compile); a
   GPU child then runs from that cache: the graph entry hits and its binaries launch.
3. **Contrast (JIT)**: the same child against an empty flagtree cache: Triton compiles every kernel, so the
   counters are seen to count (the proofs above are not counters that cannot move).

Proof of "no Triton compile" in each run: flagtree's `triton_compiles` (report) is 0, the wrapper around
`triton.compiler.compile` saw 0 calls in the process, the fresh `TRITON_CACHE_DIR` holds no `.cubin`, and
every kernel launch was a binary launch (`binary_launches == kernel_launches`).
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
#: relative error (max |diff| / max |ref|) against eager in the same dtype: fp32 with TF32 off is exact
#: up to summation order; bf16 rounds each op's output to 8 bits of mantissa (2^-8 ~ 0.004) over 2 layers
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}

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
length, dtype = int(sys.argv[1]), getattr(torch, sys.argv[2])
model = build_tiny_model("qwen3").to(device="cuda", dtype=dtype)
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
lookups = list(record.get("binaries_by_content", {}).values())
import inspect, textwrap
module = sys.modules[Path(record["module_path"]).stem]
missed_sources = {l["kernel"]: textwrap.dedent(inspect.getsource(getattr(module, l["kernel"]).kernel.fn))
                  for l in lookups if not l["found"]}
triton_dir = Path(os.environ["TRITON_CACHE_DIR"])
files = sorted(str(p.relative_to(triton_dir)) for p in triton_dir.rglob("*") if p.is_file())
out, ref = out.float(), ref.float()
print(json.dumps({
    "dtype": sys.argv[2], "cache": record["cache"], "cache_key": record["cache_key"], "target": record["target"],
    "kernels_generated": record["kernels_generated"], "triton_kernels": record["triton_kernels"],
    "triton_compiles_report": record["triton_compiles"], "triton_compile_calls_in_process": len(calls),
    "compiled_functions": calls[:40], "binaries_loaded_from_entry": len(record.get("binaries_loaded", [])),
    "found_by_content": sorted({l["kernel"] for l in lookups if l["found"]}),
    "not_found_by_content": sorted({l["kernel"] for l in lookups if not l["found"]}),
    "content_lookups": lookups, "missed_sources": missed_sources,
    "binary_launches": counters["binary_launches"], "content_binary_launches": counters["content_binary_launches"],
    "kernel_launches": counters["kernel_launches"], "kernel_failures": record["kernel_failures"],
    "rel_err_vs_eager": ((out - ref).abs().max() / ref.abs().max()).item(),
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


def _content_binaries(cache_dir: Path) -> list[dict]:
    rows = []
    for meta_path in sorted(cache_dir.glob("binaries/*/binary.json")):
        meta = json.loads(meta_path.read_text())
        pointers = sorted({value for kind, value in meta["signature"]["arguments"] if kind == "pointer"})
        rows.append({"key": meta["key"], "kernel": meta["kernel"], "arch": meta["arch"], "triton": meta["triton"],
                     "pointers": pointers})
    return rows


def _why_missed(cache_dir: Path, run: dict) -> dict[str, list[str]]:
    """Per kernel not found by content: the diff of its source here against the closest carried binary of
    the same kernel name (a source that differs under this torch), or what else differs (signature, Triton)."""
    import difflib

    carried: dict[str, list[dict]] = {}
    for meta_path in cache_dir.glob("binaries/*/binary.json"):
        meta = json.loads(meta_path.read_text())
        carried.setdefault(meta["kernel"], []).append(meta)
    explained = {}
    for kernel, source in run.pop("missed_sources", {}).items():
        candidates = carried.get(kernel, [])
        if not candidates:
            explained[kernel] = ["no carried binary of this kernel name"]
            continue
        diffs = [list(difflib.unified_diff((c.get("source") or "").splitlines(), source.splitlines(),
                                           "carried", "here", lineterm="")) for c in candidates]
        best = min(diffs, key=len)
        explained[kernel] = best[:40] or [
            "same source: the launch signature differs (dtypes, integer widths, meta) or another Triton built it: "
            + "; ".join(f"{c['triton']} {c['signature']}" for c in candidates)[:1500]]
    return explained


def _run_child(cache_dir: Path, triton_dir: Path, length: int, dtype: str = "float32") -> dict:
    env = {**os.environ, "FLAGTREE_CACHE_DIR": str(cache_dir), "TRITON_CACHE_DIR": str(triton_dir)}
    env.pop("FLAGTREE_TARGET", None)
    done = subprocess.run([sys.executable, "-c", _CHILD, str(length), dtype], env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    if done.returncode != 0:
        return {"error": done.stderr[-4000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _no_compile(run: dict) -> bool:
    return (run.get("triton_compile_calls_in_process") == 0 and run.get("triton_compiles_report") == 0
            and run.get("triton_cache_cubins") == [])


def _matches(run: dict) -> bool:
    return run.get("rel_err_vs_eager", 1.0) <= TOLERANCE[run.get("dtype", "float32")] and run.get("kernel_failures") == []


def _all_from_binaries(run: dict) -> bool:
    return run.get("binary_launches", -1) == run.get("kernel_launches", -2) > 0


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
    checks: dict[str, bool] = {}
    runs = {}

    # 1. the carried cache: binaries found by content, whatever graph entry they were built for
    if args.carried_cache:
        carried = _private_copy(args.carried_cache, work / "carried")
        binaries = _content_binaries(carried)
        result["carried"] = {"entries": _entries(carried), "binaries": len(binaries),
                             "binary_tritons": sorted({b["triton"] for b in binaries})}
        dtypes = ["float32"] + (["bfloat16"] if any("*bf16" in b["pointers"] for b in binaries) else [])
        for dtype in dtypes:
            run = _run_child(carried, work / f"triton-carried-{dtype}", LENGTH, dtype)
            run["graph_key_in_carried_cache"] = run.get("cache_key") in {e["key"] for e in result["carried"]["entries"]}
            run["why_not_found"] = _why_missed(carried, run)
            runs[f"carried_{dtype}"] = run
            checks[f"carried_{dtype}_binaries_for_this_triton"] = triton.__version__ in result["carried"]["binary_tritons"]
            checks[f"carried_{dtype}_every_kernel_found_by_content"] = (
                bool(run.get("found_by_content")) and run.get("not_found_by_content") == [])
            checks[f"carried_{dtype}_every_launch_from_a_binary"] = _all_from_binaries(run)
            checks[f"carried_{dtype}_no_triton_compile"] = _no_compile(run)
            checks[f"carried_{dtype}_matches_eager"] = _matches(run)

    # 2. build here with no GPU visible, this machine's toolchain; run from that cache
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
        runs["built_without_gpu"] = _run_child(built, work / "triton-aot", LENGTH)
        runs["built_without_gpu"].pop("missed_sources", None)
    # 3. contrast: no entry, Triton's JIT compiles every kernel
    runs["jit_contrast"] = _run_child(work / "empty", work / "triton-jit", LENGTH)
    runs["jit_contrast"]["missed_sources"] = sorted(runs["jit_contrast"].get("missed_sources", {}))  # names only
    result["runs"] = runs

    aot = runs.get("built_without_gpu", {})
    jit = runs["jit_contrast"]
    checks.update({
        "aot_entry_hit": aot.get("cache") == "hit",
        "aot_key_equals_build_key": aot.get("cache_key") in {
            e["key"] for e in result.get("build_without_gpu", {}).get("result", {}).get("entries", [])},
        "aot_no_triton_compile": _no_compile(aot),
        "aot_every_launch_from_a_binary": _all_from_binaries(aot),
        "aot_matches_eager": _matches(aot),
        "jit_counts_compiles": jit.get("triton_compiles_report", 0) > 0 and jit.get("triton_cache_cubins") != [],
        "jit_matches_eager": _matches(jit),
    })
    result["checks"] = checks
    result["ok"] = all(checks.values())
    if done.returncode == 0 and not checks["aot_key_equals_build_key"] and "cache_key" in aot:
        result["key_mismatch_graph_diff"] = _graph_diff(built, result["build_without_gpu"]["result"], aot["cache_key"])
    text = json.dumps(result, indent=1)
    print(text)
    Path(args.out).write_text(text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
