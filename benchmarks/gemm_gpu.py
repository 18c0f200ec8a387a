"""GPU check and timing of flagtree's GEMM template against torch (cuBLAS), Qwen3-8B shapes, bf16.

Shapes (hidden 4096, 32 q heads + 2 x 8 kv heads of 128, intermediate 12288):
    qkv      x[M, 4096] @ W[6144, 4096]^T
    o_proj   x[M, 4096] @ W[4096, 4096]^T
    gate_up  silu(g) * u of x[M, 4096] @ [W_gate; W_up][24576, 4096]^T   (SwiGLU epilogue)
    down     x[M, 12288] @ W[4096, 12288]^T
at M = 1, 16 (decode: the split-K pair), 32 (the m128 bucket) and 2048 (prefill, large bucket),
each with the heuristic tile and with autotuning (winners per M bucket).

One flagtree compile per (shape, autotune) with M symbolic serves every M, as in a model.
Correctness: flagtree's and torch's bf16 results are both compared with an fp32 reference;
flagtree passes when its error is at most 2x torch-bf16's plus 1e-2 of the reference's largest
magnitude (both accumulate in fp32, in different orders). Timing: median of
`triton.testing.do_bench` (CUDA events, includes the Python wrapper's launch cost, which is what
an eager caller pays) and, where capture works, `do_bench_cudagraph` (GPU time alone, what a
CUDA-graph replay pays). Bytes: weights + activations read + output written; FLOPs: 2*M*N*K.

    python benchmarks/gemm_gpu.py --out results.json [--rows 1 16 32 2048] [--shapes qkv down]
    python benchmarks/gemm_gpu.py --out smoke.json --smoke   # CPU interpreter, shapes / 64, no timing
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import traceback

import torch
import torch.nn.functional as F

import flagtree_py
from flagtree_py.runtime.launch import counters

HIDDEN, INTER, Q_HEADS, KV_HEADS, HEAD_DIM = 4096, 12288, 32, 8, 128
SHAPES = {  # name -> (K, N of the GEMM, SwiGLU epilogue)
    "qkv": (HIDDEN, (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, False),
    "o_proj": (HIDDEN, HIDDEN, False),
    "gate_up": (HIDDEN, 2 * INTER, True),
    "down": (INTER, HIDDEN, False),
}


DEVICE = "cuda"  # "cpu" with --smoke: the script's own check, through Triton's interpreter


class Projection(torch.nn.Module):
    def __init__(self, k: int, n: int, swiglu: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n, k, dtype=dtype, device=DEVICE) / k**0.5, requires_grad=False)
        self.swiglu = swiglu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.t()
        if self.swiglu:
            half = y.shape[-1] // 2
            return F.silu(y[..., :half]) * y[..., half:]
        return y


def bench(fn, graph: bool) -> float | None:
    import triton.testing

    try:
        if graph:
            with torch.cuda.stream(torch.cuda.Stream()):
                return float(triton.testing.do_bench_cudagraph(fn, rep=100))
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except Exception as error:  # noqa: BLE001  a capture failure is reported, not fatal
        print(f"  timing ({'graph' if graph else 'events'}) failed: {type(error).__name__}: {error}")
        return None


def figures(ms: float | None, m: int, k: int, n: int, swiglu: bool) -> dict:
    if ms is None:
        return {"ms": None}
    out_cols = n // 2 if swiglu else n
    bytes_moved = 2 * (n * k + m * k + m * out_cols)
    return {"ms": ms, "tflops": 2 * m * n * k / (ms * 1e-3) / 1e12, "gbps": bytes_moved / (ms * 1e-3) / 1e9}


def time_case(compiled, module, x: torch.Tensor, k: int, n: int, swiglu: bool) -> dict:
    m = x.shape[0]
    row = {}
    with torch.no_grad():
        row["flagtree"] = figures(bench(lambda: compiled(x), False), m, k, n, swiglu)
        row["flagtree_graph"] = figures(bench(lambda: compiled(x), True), m, k, n, swiglu)
        row["torch"] = figures(bench(lambda: module(x), False), m, k, n, swiglu)
        row["torch_graph"] = figures(bench(lambda: module(x), True), m, k, n, swiglu)
        if swiglu:  # the GEMM alone (cuBLAS), without eager's separate silu and mul kernels
            row["cublas_mm_only"] = figures(bench(lambda: torch.mm(x, module.weight.t()), False), m, k, n, False)
    return row


def run_shape(name: str, rows: list[int], autotune: bool, dtype: torch.dtype) -> list[dict]:
    k, n, swiglu = SHAPES[name]
    torch.manual_seed(0)
    module = Projection(k, n, swiglu, dtype)
    reference = Projection(k, n, swiglu, torch.float32)
    reference.weight.data.copy_(module.weight.float())
    torch._dynamo.reset()
    flagtree_py.clear_report()
    options = {"autotune": autotune, "autotune_budget_s": 20.0, "cache": False}
    compiled = torch.compile(module, backend="flagtree", dynamic=True, options=options)
    results = []
    for m in rows:
        x = torch.randn(m, k, dtype=dtype, device=DEVICE)
        row = {"shape": name, "M": m, "K": k, "N": n, "swiglu": swiglu, "autotune": autotune}
        try:
            start = time.perf_counter()
            with torch.no_grad():
                out = compiled(x)
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
                row["first_call_s"] = round(time.perf_counter() - start, 3)  # compile and/or tuning
                expected = module(x)
                ref = reference(x.float())
            scale = ref.abs().max().item()
            flag_err = (out.float() - ref).abs().max().item() / scale
            torch_err = (expected.float() - ref).abs().max().item() / scale
            row.update({"flagtree_rel_err_vs_fp32": flag_err, "torch_bf16_rel_err_vs_fp32": torch_err,
                        "passed": bool(torch.isfinite(out).all()) and flag_err <= 2 * torch_err + 1e-2})
            if DEVICE == "cuda":
                row.update(time_case(compiled, module, x, k, n, swiglu))
            for key in ("flagtree", "flagtree_graph") if DEVICE == "cuda" else ():
                base = row["torch" if key == "flagtree" else "torch_graph"]["ms"]
                if row[key]["ms"] and base:
                    row[key]["speedup_vs_torch"] = base / row[key]["ms"]
        except Exception as error:  # noqa: BLE001  one failing case must not hide the others
            row["error"] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
        results.append(row)
        print(json.dumps({key: row.get(key) for key in ("shape", "M", "autotune", "passed", "flagtree", "torch")}))
    records = flagtree_py.report()
    for row in results:
        row["kernel_failures"] = [f for r in records for f in r.get("kernel_failures", [])]
        row["codegen_fallbacks"] = [f for r in records for f in r.get("codegen_fallbacks", [])]
        row["extern_ops"] = sorted({op for r in records for op in r.get("extern_ops", [])})
        row["compiles"] = len(records)
    tuned = _winners(records)
    if tuned:
        for row in results:
            row["winners"] = tuned
    return results


def _winners(records) -> dict:
    import sys
    from pathlib import Path

    from flagtree_py.runtime.launch import GuardedKernel

    found = {}
    for record in records:
        module = sys.modules.get(Path(record.get("module_path", "x")).stem)
        for value in vars(module).values() if module else []:
            if isinstance(value, GuardedKernel) and value.tuner is not None:
                found.update(value.tuner.winners)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="write the JSON results here")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 32, 2048])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--no-autotune", action="store_true", help="only the heuristic tiles")
    parser.add_argument("--smoke", action="store_true", help="CPU interpreter, shapes / 64, fp32, no timing")
    args = parser.parse_args()
    global DEVICE
    dtype = torch.bfloat16
    if args.smoke:
        DEVICE, dtype = "cpu", torch.float32
        for name, (k, n, swiglu) in SHAPES.items():
            SHAPES[name] = (k // 64, n // 64, swiglu)
        args.rows = [1, 20]
    else:
        assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.backends.cuda.matmul.allow_tf32 = False
    import triton

    started = time.time()
    results = []
    for autotune in (False,) if args.no_autotune else (False, True):
        for name in args.shapes:
            results += run_shape(name, args.rows, autotune, dtype)
    document = {
        "benchmark": "gemm_gpu",
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (interpreter smoke run)",
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "flagtree": flagtree_py.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "wall_s": round(time.time() - started, 1),
        "counters": dict(counters),
        "all_passed": all(r.get("passed") for r in results),
        "results": results,
    }
    with open(args.out, "w") as file:
        json.dump(document, file, indent=1)
    print(f"wrote {args.out}: {len(results)} cases, all passed: {document['all_passed']}")


if __name__ == "__main__":
    main()
