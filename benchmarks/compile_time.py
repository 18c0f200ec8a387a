"""Cold compile time of a Qwen3 at real shapes, per phase, for several layer counts (issue 9: <= 20 s).

    python benchmarks/compile_time.py --layers 1 4 36 --target nvidia-sm90 --out compile_time.json
    python benchmarks/compile_time.py --device cuda --layers 36 --out compile_time_h100.json   (on a GPU)

Runs on any machine, no GPU needed: the model is built on the meta device and traced on fake CUDA tensors
(`flagtree compile`'s path, flagtree_py/ahead_of_time.py), so no weight is ever materialized. Each layer
count compiles in a fresh process with an empty flagtree cache and an empty Triton cache (a cold compile), then
(unless --no-warm) in a second process that finds the caches the first left (a warm start: `cache_path`
"dynamo_graph" when the entry was found from the Dynamo graph, without AOTAutograd; flagtree_py/dynamo_link.py).
Phases, in order:

    build_and_dry_run   the model built on the meta device and made fake, plus one dry run of the generated
                        wrapper on fake tensors (the first call less Dynamo's `_compile.compile_inner`)
    dynamo              Dynamo's bytecode trace and guards (compile_inner less `call_user_compiler`)
    backend_unaccounted what of `call_user_compiler` the phases below do not cover
    aot_capture         AOTAutograd's functional aten graph and decompositions (backend.py)
    cache_lookup .. cache_write
                        flagtree's own phases (pipeline.py: the compile record's `phases_s`); `codegen` is
                        broken down in `codegen_s` (lowering, template rendering, check_kernel...)
    triton_aot          Triton AST -> cubin for every kernel to build (runtime/aot.py compile_for_nvidia)
    store_binaries      the rest of storing binaries into the entry and the content store

With targets that have no ahead-of-time compiler here (metax, iluvatar) no binary is built (`triton_aot` is 0).

`--device cuda` (a GPU machine) measures what a user waits for instead: the model at real shapes with random
weights on the GPU, `torch.compile(..., backend="flagtree")` and one call, in which Triton's JIT builds each
kernel at its first launch (`first_call_s`, `triton_compiles`); then the same in a second process that finds
both caches warm (issue 9: cold <= 20 s, warm <= 2 s). `--dynamic` (the default) compiles with symbolic
sizes, as one compile serving every length; `--no-dynamic` traces the static length.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import json, sys, time
from pathlib import Path
import torch
import flagtree_py
import flagtree_py.ahead_of_time as ahead
import flagtree_py.runtime.aot as aot
from flagtree_py.models import build_model, real_config

layers, target, dtype, length, dynamic, cache_dir = (int(sys.argv[1]), sys.argv[2], getattr(torch, sys.argv[3]),
                                                      int(sys.argv[4]), sys.argv[5] == "1", Path(sys.argv[6]))
if sys.argv[7] == "0":  # --no-share: every group lowered to a kernel of its own, as before share_kernels.py
    import functools
    import flagtree_py.pipeline as pipeline
    pipeline.ModuleWriter = functools.partial(pipeline.ModuleWriter, share_kernels=False)
config = real_config("qwen3")
clock = {"start": None, "first_call_end": None, "triton_aot": 0.0, "triton_builds": 0}

original_store, original_compile = ahead._store_builds, aot.compile_for_nvidia

def store_builds(*args, **kwargs):
    clock["first_call_end"] = clock["first_call_end"] or time.perf_counter()
    return original_store(*args, **kwargs)

def compile_for_nvidia(*args, **kwargs):
    began = time.perf_counter()
    try:
        return original_compile(*args, **kwargs)
    finally:
        clock["triton_aot"] += time.perf_counter() - began
        clock["triton_builds"] += 1

ahead._store_builds, aot.compile_for_nvidia = store_builds, compile_for_nvidia
build = lambda: build_model(config, dtype=dtype, device="meta", num_layers=layers)
clock["start"] = time.perf_counter()
summaries = ahead.compile_ahead(build, config.vocab_size, length, target, cache_dir, dynamic=True if dynamic else None,
                                note=lambda line: None)
end = time.perf_counter()
records = [r for r in flagtree_py.report() if r.get("cache_key")]
first_call = clock["first_call_end"] - clock["start"]
in_flagtree = sum(sum(r.get("phases_s", {}).values()) for r in records)
try:  # Dynamo's own timers: its trace and guards, apart from the backend it calls
    from torch._dynamo.utils import compile_times
    dynamo = dict(zip(*compile_times(repr="csv", aggregate=True)))
    inner, backend = float(dynamo["_compile.compile_inner"]), float(dynamo["OutputGraph.call_user_compiler"])
    phases = {"build_and_dry_run": first_call - inner, "dynamo": inner - backend,
              "backend_unaccounted": backend - in_flagtree}
    attempts = sum(1 for k in dynamo if k.startswith("compile_attempt_")) or 1
except (ImportError, KeyError, TypeError, ValueError):
    phases = {"dynamo_and_dry_run": first_call - in_flagtree}
    attempts = None
for record in records:
    for name, seconds in record.get("phases_s", {}).items():
        phases[name] = phases.get(name, 0.0) + seconds
phases["triton_aot"] = clock["triton_aot"]
phases["store_binaries"] = (end - clock["first_call_end"]) - clock["triton_aot"]
codegen = {}
for record in records:
    for name, seconds in record.get("codegen_s", {}).items():
        codegen[name] = codegen.get(name, 0.0) + seconds
print(json.dumps({
    "layers": layers, "total_s": round(end - clock["start"], 3), "first_call_s": round(first_call, 3),
    "dynamo_attempts": attempts, "cache": [r["cache"] for r in records],
    "cache_path": [r.get("cache_path", "aten_graph") for r in records], "link": [r.get("link") for r in records],
    "phases_s": {k: round(v, 3) for k, v in phases.items()},
    "codegen_s": {k: round(v, 3) for k, v in codegen.items()},
    "graphs": len(records),
    "kernels_generated": sum(r.get("kernels_generated", 0) for r in records),
    "kernels_distinct": sum(r.get("kernels_distinct", r.get("kernels_generated", 0)) for r in records),
    "fusion_groups": sum(r.get("passes", {}).get("partition_fusion_groups", 0) for r in records),
    "kernels_launched": sum(s["launched"] for s in summaries),
    "triton_builds": clock["triton_builds"],
}))
"""


#: --device cuda: the model at real shapes with random weights on the GPU, compiled and run once; Triton's JIT
#: builds each kernel at its first launch, inside `first_call_s`
_GPU_CHILD = r"""
import json, sys, time
import torch
import flagtree_py
from flagtree_py.models import build_model, real_config
from flagtree_py.runtime.launch import counters

layers, dtype, length, dynamic = int(sys.argv[1]), getattr(torch, sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
config = real_config("qwen3")
model = build_model(config, dtype=dtype, device="cuda", num_layers=layers)
torch.manual_seed(0)  # the cold and the warm process score the same tokens
ids = torch.randint(0, config.vocab_size, (1, length), device="cuda")
torch.cuda.synchronize()
start = time.perf_counter()
with torch.no_grad():
    logits = torch.compile(model, backend="flagtree", dynamic=True if dynamic else None)(ids)
torch.cuda.synchronize()
first_call = time.perf_counter() - start
with torch.no_grad():  # the compiled result against eager (warm: the hit found from the Dynamo graph)
    reference = model(ids)
error = ((logits.float() - reference.float()).abs().max() / reference.float().abs().max()).item()
agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
records = [r for r in flagtree_py.report() if r.get("cache_key")]
phases = {}
for record in records:
    for name, seconds in record.get("phases_s", {}).items():
        phases[name] = round(phases.get(name, 0.0) + seconds, 3)
dynamo = {}
try:  # Dynamo's trace (both attempts, when it restarts) and the backend it calls; the rest of the first call
    from torch._dynamo.utils import compile_times  # runs the model, Triton's JIT building each kernel at launch
    times = {k: float(v) for k, v in zip(*compile_times(repr="csv", aggregate=True))}
    dynamo = {"compile_inner": times["_compile.compile_inner"], "call_user_compiler": times["OutputGraph.call_user_compiler"],
              "attempts": sum(1 for k in times if k.startswith("compile_attempt_")),
              "first_run_with_jit": round(first_call - times["_compile.compile_inner"], 3)}
except (ImportError, KeyError, TypeError, ValueError):
    pass
print(json.dumps({
    "layers": layers, "first_call_s": round(first_call, 3), "dynamo_s": dynamo, "cache": [r["cache"] for r in records],
    "cache_path": [r.get("cache_path", "aten_graph") for r in records], "link": [r.get("link") for r in records],
    "phases_s": phases, "codegen_s": [r.get("codegen_s") for r in records],
    "kernels_distinct": sum(r.get("kernels_distinct", r.get("triton_kernels", 0)) for r in records),
    "kernels_without_sharing": sum(r.get("kernels_without_sharing", 0) for r in records),
    "triton_compiles": sum(r.get("triton_compiles", 0) for r in records),
    "binary_launches": counters["binary_launches"], "kernel_failures": sum(len(r["kernel_failures"]) for r in records),
    "gpu": torch.cuda.get_device_name(), "max_rel_err_vs_eager": round(error, 6), "top1_agreement": agree,
}))
"""


def measure(layers: int, args: argparse.Namespace) -> dict:
    """A cold compile in a fresh process (empty flagtree cache, empty Triton cache); on a GPU, then a warm one
    in another process with both caches as the cold one left them."""
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "TRITON_CACHE_DIR": str(Path(scratch) / "triton"),
               "FLAGTREE_CACHE_DIR": str(Path(scratch) / "flagtree")}
        env.pop("FLAGTREE_TARGET", None)
        arguments = [str(layers), args.target, args.dtype, str(args.length), "1" if args.dynamic else "0",
                     str(Path(scratch) / "flagtree"), "1" if args.share else "0"]
        if args.device == "cpu":
            cold = _child(_CHILD, arguments, env, args.timeout, layers)
            if not args.warm:
                return cold
            return {"layers": layers, "cold": cold, "warm": _child(_CHILD, arguments, env, args.timeout, layers)}
        cold = _child(_GPU_CHILD, arguments, env, args.timeout, layers)
        warm = _child(_GPU_CHILD, arguments, env, args.timeout, layers)
        return {"layers": layers, "cold": cold, "warm": warm}


def _child(code: str, arguments: list[str], env: dict, timeout: float, layers: int) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *arguments], check=False, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{layers} layers: exit {done.returncode}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 4, 36])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: trace on fake CUDA tensors and build cubins ahead of time (no GPU); cuda: build "
                             "the model on the GPU, compile and run it once, cold then warm (--target unused)")
    parser.add_argument("--target", default="nvidia-sm90")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--length", type=int, default=7, help="prompt length traced (default 7)")
    parser.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--share", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-share: one kernel per fusion group (the compile before codegen/share_kernels.py; "
                             "CPU only), for a before/after on one machine under the same load")
    parser.add_argument("--warm", action=argparse.BooleanOptionalAction, default=True,
                        help="--device cpu: after the cold process, a warm one with the caches it left (a GPU run "
                             "always measures both)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per layer count")
    parser.add_argument("--label", default="", help="a note kept in the JSON (e.g. the commit measured)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import platform

    import torch
    import triton

    runs = []
    for layers in args.layers:
        runs.append(measure(layers, args))
        print(json.dumps(runs[-1]), file=sys.stderr)
    result = {"date": time.strftime("%Y-%m-%d"), "label": args.label, "model": "qwen3 (Qwen3-8B shapes)",
              "device": args.device, "share_kernels": args.share, "target": args.target if args.device == "cpu" else "auto", "dtype": args.dtype, "length": args.length, "dynamic": args.dynamic,
              "machine": f"{platform.machine()} {os.cpu_count()} cpus", "torch": torch.__version__,
              "triton": triton.__version__, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
