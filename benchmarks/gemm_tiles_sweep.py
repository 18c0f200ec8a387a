"""Sweep the GEMM template's decode tiles on a GPU: which tile each M bucket should try first.

For Qwen3-8B's four projections (qkv, o_proj, gate_up with SwiGLU, down; bf16) and a grid of tiles per
bucket, the target's table is replaced by that one tile, the projection is compiled by flagtree
(`dynamic=True`: one compile serves every M of the bucket) and timed at the bucket's decode rows with
`triton.testing.do_bench_cudagraph` (GPU time alone, what a CUDA-graph replay pays). Every result is
checked against an fp32 reference first; a tile that fails to compile or is wrong is recorded, not
timed. cuBLAS (torch.mm in a CUDA graph) is timed at the same rows. The output lists, per (shape,
bucket), every tile's time and the best; `flagtree_py/targets/base.py` takes the tiles that win
across shapes.

    python benchmarks/gemm_tiles_sweep.py --out sweep.json [--buckets m16 m128] [--shapes qkv down]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gemm_gpu import SHAPES, Projection

import flagtree_py
from flagtree_py.targets import registered_targets
from flagtree_py.targets.base import GemmConfig

ROWS = {"m16": (1, 16), "m128": (32, 64), "large": (2048,)}


def grid(bucket: str) -> list[GemmConfig]:
    if bucket == "m16":
        return [GemmConfig(16, n, k, 128, 4, split)
                for n, k, split in itertools.product((32, 64, 128), (64, 128, 256), (1, 4, 8, 16))
                if not (n == 128 and k == 256)]
    if bucket == "m128":
        return [GemmConfig(m, n, k, 128 if m * n <= 2048 else 256, stages, 1)
                for m, n, k, stages in itertools.product((16, 32, 64), (64, 128), (64, 128), (3, 4))]
    return [GemmConfig(m, n, k, threads, stages, 1)
            for m, n, k, threads, stages in itertools.product((128,), (128, 256), (64, 128), (256, 512), (3, 4))
            if not (n == 256 and k == 128)] + [GemmConfig(256, 128, 64, 512, 3), GemmConfig(64, 256, 64, 256, 4)]


def time_tile(shape: str, bucket: str, tile: GemmConfig, target: str) -> dict:
    import triton.testing

    k, n, swiglu = SHAPES[shape]
    targets = registered_targets()
    original = targets[target]
    targets[target] = replace(original, gemm_tiles={**original.gemm_tiles, bucket: (tile,)})
    try:
        torch.manual_seed(0)
        module = Projection(k, n, swiglu, torch.bfloat16)
        reference = Projection(k, n, swiglu, torch.float32)
        reference.weight.data.copy_(module.weight.float())
        torch._dynamo.reset()
        compiled = torch.compile(module, backend="flagtree", dynamic=True,
                                 options={"target": target, "cache": False, "autotune": False})
        row = {"tile": [tile.BLOCK_M, tile.BLOCK_N, tile.BLOCK_K, tile.threads, tile.num_stages, tile.SPLIT_K]}
        start = time.perf_counter()
        with torch.no_grad():
            for m in ROWS[bucket]:
                x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
                out = compiled(x)
                ref = reference(x.float())
                error = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                if not error <= 2e-2:
                    row[f"M{m}"] = {"error": f"wrong result: rel err {error:.3g}"}
                    continue
                with torch.cuda.stream(torch.cuda.Stream()):
                    ms = triton.testing.do_bench_cudagraph(lambda x=x: compiled(x), rep=30)
                row[f"M{m}"] = {"us": round(1000 * ms, 2), "rel_err": error}
        row["s"] = round(time.perf_counter() - start, 2)
        records = flagtree_py.report()
        row["fallbacks"] = [f for r in records for f in r.get("kernel_failures", [])][:2]
        flagtree_py.clear_report()
        return row
    finally:
        targets[target] = original


def cublas(shape: str, bucket: str) -> dict:
    import triton.testing

    k, n, _ = SHAPES[shape]
    weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
    found = {}
    for m in ROWS[bucket]:
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        with torch.cuda.stream(torch.cuda.Stream()):
            found[f"M{m}"] = round(1000 * triton.testing.do_bench_cudagraph(lambda x=x: torch.mm(x, weight.t()), rep=30), 2)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--buckets", nargs="+", default=["m16", "m128", "large"], choices=list(ROWS))
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--target", default="nvidia-sm90")
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop starting new tiles after this")
    args = parser.parse_args()
    began = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "sweeps": []}
    import triton

    report["triton"] = triton.__version__
    for bucket in args.buckets:
        for shape in args.shapes:
            sweep = {"shape": shape, "bucket": bucket, "cublas_us": cublas(shape, bucket), "tiles": []}
            for tile in grid(bucket):
                if time.perf_counter() - began > args.budget_s:
                    sweep["stopped"] = "budget"
                    break
                try:
                    sweep["tiles"].append(time_tile(shape, bucket, tile, args.target))
                except Exception as error:  # noqa: BLE001  a tile that breaks is a result too
                    sweep["tiles"].append({"tile": list(vars(tile).values()), "error": f"{type(error).__name__}: {error}"[:300]})
            timed = [t for t in sweep["tiles"] if all("us" in t.get(f"M{m}", {}) for m in ROWS[bucket])]
            if timed:
                best = min(timed, key=lambda t: sum(t[f"M{m}"]["us"] for m in ROWS[bucket]))
                sweep["best"] = best
            print(json.dumps({k: sweep.get(k) for k in ("shape", "bucket", "cublas_us", "best")}), flush=True)
            report["sweeps"].append(sweep)
            Path(args.out).write_text(json.dumps(report, indent=1))
    report["wall_s"] = round(time.perf_counter() - began, 1)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
