"""The kernels of `flagtree::moe_experts` (passes/fuse_moe_experts.py): fused MoE as vLLM's fused_moe does
it, with no atomics.

    count, scatter    a counting sort of the T * k (token, choice) pairs by expert, each expert's segment
                      padded to BLOCK_M rows (templates/moe_sort.py.jinja)
    gate_up           grouped GEMM over the sorted rows: silu(x @ gate^T) * (x @ up^T), one expert per
                      row block, the tokens' rows of x gathered in place (templates/moe_gemm.py.jinja)
    down              grouped GEMM: (hidden @ down^T) * routing weight, written to the pair's own row
    reduce            the k rows of each token added in a fixed order

Every kernel reads each expert's weights once per row block (decode: once), and the gathered copies of
x and of the weights that the aten forms materialize never exist. The wrapper line calls
`runtime/moe_experts.py` (run_moe_experts), which picks the tile bucket per call from the pair count (decode or prefill);
tiles come from the target's `moe_tiles` table, fitted to its shared memory and checked by check_kernel.
"""

from __future__ import annotations

import torch
import torch.fx

from flagtree_py.codegen.check_kernel import SOURCE_PROBLEMS, KernelCheckFailed, check_kernel
from flagtree_py.codegen.gemm import tile_meta
from flagtree_py.codegen.indexing import LoweringError
from flagtree_py.codegen.moe_routing import TemplateKernel
from flagtree_py.codegen.types import dot_forms, triton_dtype
from flagtree_py.runtime.moe_experts import REDUCE_TILE
from flagtree_py.targets.base import GemmConfig

#: a bucket's tiles serve decode while the pairs average at most this many per expert (one BLOCK_M=16 block)
SMALL_PAIRS_PER_EXPERT = 16
KERNELS = ("count", "scatter", "gate_up", "down", "reduce")
_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})


def lower_moe_experts(node: torch.fx.Node, name: str, templates, target, arg, int64: bool) -> TemplateKernel:
    """`arg(value)` prints a wrapper-side value. Kernel names: `{name}_count` ... `{name}_reduce`."""
    x, gate, up, down, weights, ids = node.args
    xv, gv = x.meta["val"], gate.meta["val"]
    experts, inter, hidden = gv.shape
    top_k = ids.meta["val"].shape[-1]
    if not all(isinstance(v, int) for v in (experts, inter, hidden, top_k)):
        raise LoweringError(f"{node.name}: experts, sizes and k must be static")
    if xv.dtype not in _DTYPES or any(t.meta["val"].dtype != xv.dtype for t in (gate, up, down)):
        raise LoweringError(f"{node.name}: x and the expert weights must share one float dtype")
    rows_dtype = torch.promote_types(xv.dtype, weights.meta["val"].dtype)
    # fp32 operands: full-precision products (Triton would use TF32); a dtype the target cannot multiply
    # (the interpreter's bf16) is widened to fp32 as it is loaded
    operand_cast, dot_options = dot_forms(xv.dtype, target)
    values = {"name": name, "dtype": str(xv.dtype).replace("torch.", ""), "triton_dtype": triton_dtype(xv.dtype),
              "rows_triton_dtype": triton_dtype(rows_dtype), "rounds": xv.dtype != torch.float32,
              "operand_cast": operand_cast, "dot_options": dot_options}
    source = "\n\n".join(templates.get_template(t).render(m=values) for t in ("moe_sort.py.jinja", "moe_gemm.py.jinja"))
    element = xv.element_size()
    e_block = _pow2(experts)
    sort_block = max(1, _floor_pow2(target.moe_tiles["sort_elements"] // e_block))
    plan: dict = {"experts": experts, "e_block": e_block, "sort_block": sort_block,
                  "sort_warps": target.num_warps(128), "small_pairs_per_expert": SMALL_PAIRS_PER_EXPERT,
                  "reduce": REDUCE_TILE | {"num_warps": target.num_warps(128)}}
    problems: list[str] = []
    while True:  # the sort's one-hot tile: fewer pairs per program until it fits the target
        found = check_kernel(source, {"XBLOCK": sort_block, "RBLOCK": e_block, "num_warps": plan["sort_warps"],
                                      "kind": "reduction", "element_bytes": 4}, target)
        if not found:
            break
        problems = problems or [str(p) for p in found]
        if sort_block == 1 or any(p.kind in SOURCE_PROBLEMS for p in found):
            raise KernelCheckFailed(f"{name}_scatter", problems)
        sort_block //= 2
    plan["sort_block"] = sort_block
    problems += _check(source, {"XBLOCK": REDUCE_TILE["BLOCK_T"] * REDUCE_TILE["BLOCK_N"], **plan["reduce"],
                                "kind": "pointwise"}, target, f"{name}_reduce")
    for bucket in ("small", "large"):
        tiles = [t for t in (target.fit_gemm_tile(tile, element, 2) for tile in target.moe_tiles[bucket]) if t is not None]
        found, first = _first_passing(source, tiles, target, element, name)
        problems += first
        plan[bucket] = found
    fallbacks = [f"{name}_{kernel}_fallback = {kernel}_fallback" for kernel in KERNELS]
    section = "\n".join([
        "from flagtree_py.runtime.moe_experts import (count_fallback, down_fallback, gate_up_fallback, reduce_fallback,",
        "                                             run_moe_experts, scatter_fallback)",
        "", "", source, "", "", *fallbacks, f"{name}_plan = {plan!r}"])
    val = node.meta["val"]
    kernels = ", ".join(f"{name}_{kernel}" for kernel in KERNELS)
    allocation = (f"{node.name} = empty_strided({arg(tuple(val.shape))}, {arg(tuple(val.stride()))}, "
                  f"dtype={val.dtype}, device={arg(val.device)})")
    call = [f"# {name}: {node.name} (MoE experts: {experts} experts, top-{top_k}; sort by expert, grouped GEMMs)",
            allocation,
            f"run_moe_experts({kernels}, {', '.join(arg(a) for a in node.args)}, {node.name}, plan={name}_plan)"]
    config = {"experts": experts, "top_k": top_k, "small": plan["small"], "large": plan["large"],
              "sort_block": sort_block, "index_dtype": "int64"}
    return TemplateKernel(name, section, call, config, problems, names=[f"{name}_{kernel}" for kernel in KERNELS])


def _first_passing(source: str, tiles: list[GemmConfig], target, element: int, name: str) -> tuple[dict, list[str]]:
    """{"gate_up": meta, "down": meta} of the first tile that passes check_kernel for both GEMMs (one
    BLOCK_M: the sort's padding), and the problems of the tiles before it; KernelCheckFailed if none does."""
    first: list[str] = []
    for tile in tiles:
        meta = tile_meta(target, tile)
        problems = []
        for accumulators in (2, 1):  # gate_up reads two B tiles per step, down one
            config = {**meta, "kind": "gemm", "element_bytes": element,
                      "shared_bytes": tile.shared_memory_bytes(element, accumulators)}
            problems += check_kernel(source, config, target)
        if not problems:
            return {"gate_up": meta, "down": meta}, first
        first = first or [str(p) for p in problems]
        if any(p.kind in SOURCE_PROBLEMS for p in problems):
            break
    raise KernelCheckFailed(f"{name}_gate_up", first or ["no MoE tile of the target's table fits it"])


def _check(source: str, config: dict, target, kernel: str) -> list[str]:
    problems = check_kernel(source, config, target)
    if problems:  # the sort and reduce tiles are fixed by the experts count: nothing smaller to try
        raise KernelCheckFailed(kernel, [str(p) for p in problems])
    return []


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _floor_pow2(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)
