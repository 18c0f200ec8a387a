"""Warm start from JIT-built binaries: a second process compiling the same model runs no Triton compile.

    PYTHONPATH=$PWD python benchmarks/warm_start_gpu.py --out $OUT/warm_start.json                 # tiny Qwen3
    PYTHONPATH=$PWD python benchmarks/warm_start_gpu.py --model qwen3-8b --layers 4 --out $OUT/w8b.json
    PYTHONPATH=$PWD python benchmarks/warm_start_gpu.py --smoke --out /tmp/w.json    # CPU, interpreter

Two child processes run one after the other with the same fresh, empty `FLAGTREE_CACHE_DIR` and each its
own fresh, empty `TRITON_CACHE_DIR` (so Triton's own disk cache cannot serve the second). Each compiles the
model with `torch.compile(backend="flagtree")` and calls it on a prompt (`--length`, default 16), then on one
token (a second graph: Dynamo recompiles with a dynamic length). The first process generates the code and
Triton's JIT compiles every kernel; flagtree keeps each JIT binary by content, with the specialization Triton
chose (runtime/aot.py). The second finds its graphs in the cache and launches those binaries.

Per process: seconds of each first call (compile + run), Triton compiles (flagtree's report, a wrapper around
`triton.compiler.compile` installed before anything imports Triton's JIT, and the cubins in the process's
`TRITON_CACHE_DIR`), binaries loaded (from graph entries and found by content), binaries stored, kernels
generated, kernel and binary launches, and the error against eager PyTorch in the same dtype. The JSON's
`checks` say whether the second process compiled nothing and both matched eager.

`--smoke` runs the same on the CPU (Triton's interpreter: nothing is ever compiled, no binary is stored):
it tests this script, not the claim.
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

#: relative error (max |diff| / max |ref|) against eager in the same dtype: fp32 on the CPU differs only in
#: summation order; bf16 rounds every op's output to 8 bits of mantissa (2^-8 ~ 0.004), compounded over layers
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where the JSON result goes")
    parser.add_argument("--model", choices=["qwen3-tiny", "qwen3-8b"], default="qwen3-tiny",
                        help="the tiny Qwen3, or Qwen3-8B's real shapes with random weights (--layers of them)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    parser.add_argument("--length", type=int, default=16, help="prompt length of the first call (default 16)")
    parser.add_argument("--smoke", action="store_true", help="CPU and the interpreter: checks the script only")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child(args: argparse.Namespace) -> dict:
    """One process: compile, run, compare; everything counted from before Triton's JIT could compile."""
    import triton.compiler
    import triton.compiler.compiler as compiler_module

    calls: list[str] = []
    original = compiler_module.compile

    def counting(src, *rest, **kwargs):
        calls.append(getattr(getattr(src, "fn", None), "__name__", str(src)[:40]))
        return original(src, *rest, **kwargs)

    compiler_module.compile = triton.compiler.compile = counting  # before any JIT binder looks it up

    import torch

    import flagtree_py
    from flagtree_py.models import build_model, real_config, tiny_config
    from flagtree_py.runtime.launch import counters

    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    torch.backends.cuda.matmul.allow_tf32 = False
    config = real_config("qwen3") if args.model == "qwen3-8b" else tiny_config("qwen3")
    model = build_model(config, dtype=dtype, device=device, num_layers=args.layers, seed=0)
    vocab = config.vocab_size
    ids = torch.randint(0, vocab, (1, args.length), generator=torch.Generator().manual_seed(1)).to(device)
    compiled = torch.compile(model, backend="flagtree")

    def timed(x):
        start = time.perf_counter()
        out = compiled(x)
        if device == "cuda":
            torch.cuda.synchronize()
        return out, round(time.perf_counter() - start, 3)

    calls_out = {}
    with torch.no_grad():
        for name, x in (("prompt", ids), ("one_token", ids[:, -1:].clone())):
            out, seconds = timed(x)
            ref = model(x)
            out, ref = out.float(), ref.float()
            calls_out[name] = {"first_call_s": seconds, "max_abs_err": (out - ref).abs().max().item(),
                               "rel_err": ((out - ref).abs().max() / ref.abs().max()).item(),
                               "top1_agree": (out.argmax(-1) == ref.argmax(-1)).float().mean().item()}
    records = [r for r in flagtree_py.report() if r.get("fallback") != "graph"]
    lookups = [lookup for r in records for lookup in r.get("binaries_by_content", {}).values()]
    triton_dir = Path(os.environ["TRITON_CACHE_DIR"])
    cubins = sorted(str(p.relative_to(triton_dir)) for p in triton_dir.rglob("*.cubin"))
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "graphs": len(records),
        "cache": [r.get("cache") for r in records],
        "graph_fallbacks": len(flagtree_py.report()) - len(records),
        "kernels_generated": sum(r.get("kernels_generated", 0) for r in records),
        "triton_kernels": sum(r.get("triton_kernels", 0) for r in records),
        "triton_compiles": sum(r.get("triton_compiles", 0) for r in records),
        "triton_compile_calls_in_process": len(calls), "compiled_functions": calls[:40],
        "triton_cache_cubins": len(cubins),
        "binaries_loaded": sum(len(r.get("binaries_loaded", [])) for r in records)
        + len({(lookup["kernel"], lookup["key"]) for lookup in lookups if lookup["found"]}),
        "binaries_not_found": sorted({lookup["kernel"] for lookup in lookups if not lookup["found"]})[:40],
        "binaries_stored": counters["jit_binaries_stored"],
        # JIT builds not stored because their specialization is not the one runtime/aot.py computes
        "binaries_unmatched": counters["jit_binaries_unmatched"],
        "kernel_launches": counters["kernel_launches"], "binary_launches": counters["binary_launches"],
        "content_binary_launches": counters["content_binary_launches"],
        "kernel_failures": [f for r in records for f in r.get("kernel_failures", [])][:10],
        "parallel_builds": [r.get("parallel_builds") for r in records],
        "calls": calls_out,
    }


def _run_child(args: argparse.Namespace, cache_dir: Path, triton_dir: Path, parallel_builds: str = "0") -> dict:
    """One child with these caches; `parallel_builds` (FLAGTREE_PARALLEL_BUILDS): off by default, since what this
    script checks is the binaries Triton's JIT built (benchmarks/parallel_builds_gpu.py checks the workers')."""
    env = {**os.environ, "FLAGTREE_CACHE_DIR": str(cache_dir), "TRITON_CACHE_DIR": str(triton_dir),
           "FLAGTREE_PARALLEL_BUILDS": parallel_builds}
    env.pop("FLAGTREE_TARGET", None)
    command = [sys.executable, __file__, "--child", "--out", "-", "--model", args.model, "--layers", str(args.layers),
               "--length", str(args.length)] + (["--smoke"] if args.smoke else [])
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3000, check=False)
    if done.returncode != 0:
        return {"error": done.stderr[-4000:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - start, 2)
    return result


def _checks(first: dict, second: dict, smoke: bool) -> dict:
    tolerance = TOLERANCE[second.get("dtype", "float32")]
    matched = all(call["rel_err"] <= tolerance for run in (first, second) for call in run.get("calls", {}).values())
    checks = {
        "both_ran": "error" not in first and "error" not in second,
        "second_generated_no_code": second.get("kernels_generated") == 0 and set(second.get("cache", [])) == {"hit"},
        "second_no_triton_compile": (second.get("triton_compiles") == 0
                                     and second.get("triton_compile_calls_in_process") == 0
                                     and second.get("triton_cache_cubins") == 0),
        "both_match_eager": matched and not first.get("kernel_failures") and not second.get("kernel_failures"),
    }
    if not smoke:  # on the GPU: the first process compiled and stored; the second launched binaries only
        checks["first_compiled_and_stored"] = first.get("triton_compiles", 0) > 0 and first.get("binaries_stored", 0) > 0
        checks["second_all_binary_launches"] = second.get("binary_launches", -1) == second.get("kernel_launches", -2) > 0
    checks["all"] = all(checks.values())
    return checks


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="flagtree-warm-"))
    cache_dir = work / "flagtree-cache"
    cache_dir.mkdir(mode=0o700)
    runs = [_run_child(args, cache_dir, work / f"triton-cache-{i}") for i in (1, 2)]
    from flagtree_py.cache.binaries import BinaryStore

    store = list(BinaryStore(cache_dir).entries())
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model, "layers": args.layers, "length": args.length,
        "smoke": args.smoke, "cold": runs[0], "warm": runs[1],
        "store": {"binaries": len(store), "damaged": sum(problem is not None for _, _, problem in store),
                  "jit_builds": sum("specialization" in (meta.get("signature") or {}) for meta, _, _ in store)},
        "checks": _checks(runs[0], runs[1], args.smoke),
    }
    if "error" not in runs[0] and "error" not in runs[1]:
        result["first_call_ratio"] = round(runs[0]["calls"]["prompt"]["first_call_s"]
                                           / max(runs[1]["calls"]["prompt"]["first_call_s"], 1e-9), 2)
    try:
        import torch
        import triton

        result["versions"] = {"torch": torch.__version__, "triton": triton.__version__}
    except ImportError:
        pass
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["checks"]))
    return 0 if result["checks"]["all"] else 1


if __name__ == "__main__":
    sys.exit(main())
