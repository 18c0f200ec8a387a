"""Prefill GEMM forms on Hopper, measured against cuBLAS (GPU machine).

Qwen3-8B's four prefill projections at M=2048 (bf16), each in several kernel forms that differ only in
how operand tiles reach shared memory and how programs walk the tiles:

- ``pointer``: flagtree's current template form (pointer tensors, masked K loop);
- ``pointer_even``: pointer tensors with no masks in the K loop (K a multiple of BLOCK_K, rows wrapped);
- ``tma``: tiles loaded with device-side tensor descriptors (TMA), one program per output tile;
- ``tma_persistent``: TMA, one program per SM walking the tiles (flattened loop);
- ``tma_persistent_ws``: the same with Triton's automatic warp specialization.

SwiGLU (gate/up merged, two accumulators) is measured in the same forms. Each result carries its
relative error against torch. Writes JSON to --out. Usage:
    python benchmarks/gemm_hopper_probe.py --out $OUT/gemm_hopper_probe.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_of(tile, grid_m, grid_n, GROUP_M: tl.constexpr):
    # grouped order: GROUP_M row blocks in a row read the same B tiles while those sit in L2
    width = GROUP_M * grid_n
    first_m = (tile // width) * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % width) % group_size
    pid_n = (tile % width) // group_size
    return pid_m, pid_n


@triton.jit
def _epilogue_store(c_ptr, acc0, acc1, pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    SWIGLU: tl.constexpr):
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if SWIGLU:
        out = acc0 / (1.0 + tl.exp(-acc0)) * acc1
    else:
        out = acc0
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], out.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def gemm_pointer(a_ptr, w_ptr, c_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SWIGLU: tl.constexpr, EVEN: tl.constexpr):
    # A [M, K] row-major; W [N (x2 for SwiGLU), K] row-major (nn.Linear); C [M, N]
    pid_m, pid_n = _tile_of(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if EVEN:
        rm = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)
        rn = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
    a_ptrs = a_ptr + rm[:, None] * K + rk[None, :]
    b_ptrs0 = w_ptr + rn[None, :] * K + rk[:, None]
    b_ptrs1 = w_ptr + (rn[None, :] + N) * K + rk[:, None]
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN:
            a = tl.load(a_ptrs)
            b0 = tl.load(b_ptrs0)
        else:
            kmask = rk < K - k
            a = tl.load(a_ptrs, mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
            b0 = tl.load(b_ptrs0, mask=kmask[:, None] & (rn[None, :] < N), other=0.0)
        acc0 = tl.dot(a, b0, acc0)
        if SWIGLU:
            if EVEN:
                b1 = tl.load(b_ptrs1)
            else:
                b1 = tl.load(b_ptrs1, mask=kmask[:, None] & (rn[None, :] < N), other=0.0)
            acc1 = tl.dot(a, b1, acc1)
        a_ptrs += BLOCK_K
        b_ptrs0 += BLOCK_K
        b_ptrs1 += BLOCK_K
    _epilogue_store(c_ptr, acc0, acc1, pid_m, pid_n, M, N, BLOCK_M, BLOCK_N, SWIGLU)


@triton.jit
def gemm_tma(a_ptr, w_ptr, c_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             GROUP_M: tl.constexpr, SWIGLU: tl.constexpr, NUM_PROGRAMS: tl.constexpr, PERSISTENT: tl.constexpr,
             WARP_SPECIALIZE: tl.constexpr):
    rows_w = 2 * N if SWIGLU else N
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[rows_w, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), grid_m * grid_n, NUM_PROGRAMS, flatten=True,
                             warp_specialize=WARP_SPECIALIZE):
            _tma_tile(a_desc, w_desc, c_ptr, tile, grid_m, grid_n, k_tiles, M, N, BLOCK_M, BLOCK_N, BLOCK_K,
                      GROUP_M, SWIGLU)
    else:
        _tma_tile(a_desc, w_desc, c_ptr, tl.program_id(0), grid_m, grid_n, k_tiles, M, N, BLOCK_M, BLOCK_N,
                  BLOCK_K, GROUP_M, SWIGLU)


@triton.jit
def _tma_tile(a_desc, w_desc, c_ptr, tile, grid_m, grid_n, k_tiles, M, N, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SWIGLU: tl.constexpr):
    # one output tile (Triton inlines this: the same code as written out in each branch)
    pid_m, pid_n = _tile_of(tile, grid_m, grid_n, GROUP_M)
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(k_tiles):
        a = a_desc.load([pid_m * BLOCK_M, kt * BLOCK_K])
        acc0 = tl.dot(a, w_desc.load([pid_n * BLOCK_N, kt * BLOCK_K]).T, acc0)
        if SWIGLU:
            acc1 = tl.dot(a, w_desc.load([N + pid_n * BLOCK_N, kt * BLOCK_K]).T, acc1)
    _epilogue_store(c_ptr, acc0, acc1, pid_m, pid_n, M, N, BLOCK_M, BLOCK_N, SWIGLU)


SHAPES = {  # name: (K, N, swiglu) at M=2048, Qwen3-8B
    "qkv": (4096, 6144, False),
    "o_proj": (4096, 4096, False),
    "gate_up": (4096, 12288, True),
    "down": (12288, 4096, False),
}

TILES = [  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
    (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
    (128, 128, 128, 8, 3), (256, 128, 64, 8, 3), (128, 64, 64, 4, 4),
]
FORMS = ("pointer", "pointer_even", "tma", "tma_persistent", "tma_persistent_ws")


def bench(fn, rep_ms: int) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median") * 1000.0


def launcher(form: str, a, w, c, n: int, k: int, swiglu: bool, tile, sms: int):
    bm, bn, bk, warps, stages = tile
    m = a.shape[0]
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if form.startswith("pointer"):
        even = form == "pointer_even"
        return lambda: gemm_pointer[(tiles,)](a, w, c, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                                              SWIGLU=swiglu, EVEN=even, num_warps=warps, num_stages=stages)
    persistent = form.startswith("tma_persistent")
    programs = min(sms, tiles) if persistent else tiles
    return lambda: gemm_tma[(programs,)](a, w, c, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                                         SWIGLU=swiglu, NUM_PROGRAMS=programs, PERSISTENT=persistent,
                                         WARP_SPECIALIZE=form.endswith("_ws"), num_warps=warps, num_stages=stages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--m", type=int, default=2048)
    parser.add_argument("--rep", type=int, default=100, help="ms of timed repetitions per measurement")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument("--tiles", default="", help="BLOCK_M,BLOCK_N,BLOCK_K,num_warps,num_stages;... "
                        "(default: the built-in list)")
    args = parser.parse_args()
    tiles = [tuple(int(x) for x in t.split(",")) for t in args.tiles.split(";")] if args.tiles else TILES

    # device-side tensor descriptors need a global scratch allocation from the launcher
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M"), "m": args.m, "dtype": "bfloat16", "shapes": []}
    for name in args.shapes.split(","):
        k, n, swiglu = SHAPES[name]
        a = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(2 * n if swiglu else n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        if swiglu:
            def reference(a=a, w=w):
                gate, up = torch.mm(a, w.t()).float().chunk(2, dim=1)
                return (torch.nn.functional.silu(gate) * up).to(torch.bfloat16)

            def cublas(a=a, w=w):  # the GEMM alone; the epilogue is extra
                return torch.mm(a, w.t())
        else:
            def reference(a=a, w=w):
                return torch.mm(a, w.t())
            cublas = reference
        expected = reference().float()
        flop = 2.0 * args.m * k * w.shape[0]
        entry = {"shape": name, "k": k, "n": n, "swiglu": swiglu, "cublas_us": round(bench(cublas, args.rep), 2),
                 "cublas_with_epilogue_us": round(bench(reference, args.rep), 2), "forms": {}}
        entry["cublas_tflops"] = round(flop / entry["cublas_us"] / 1e6, 1)
        for form in args.forms.split(","):
            rows = []
            for tile in tiles:
                c = torch.empty(args.m, n, device="cuda", dtype=torch.bfloat16)
                row = {"tile": list(tile)}
                try:
                    run = launcher(form, a, w, c, n, k, swiglu, tile, sms)
                    run()
                    torch.cuda.synchronize()
                    row["rel_err"] = float((c.float() - expected).norm() / expected.norm())
                    row["us"] = round(bench(run, args.rep), 2)
                    row["tflops"] = round(flop / row["us"] / 1e6, 1)
                except Exception as error:  # noqa: BLE001  a form a tile can't take (shared memory, registers)
                    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
                rows.append(row)
                print(name, form, row, flush=True)
            timed = [r for r in rows if "us" in r and r["rel_err"] < 2e-2]
            best = min(timed, key=lambda r: r["us"]) if timed else None
            entry["forms"][form] = {"tiles": rows, "best": best}
        result["shapes"].append(entry)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    summary = {e["shape"]: {"cublas_us": e["cublas_us"],
                            **{f: (v["best"] or {}).get("us") for f, v in e["forms"].items()}}
               for e in result["shapes"]}
    result["summary_us"] = summary
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
