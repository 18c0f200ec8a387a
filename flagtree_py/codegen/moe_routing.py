"""The kernel of `flagtree::moe_routing` and `moe_routing_dense` (passes/fuse_moe_routing.py): one program holds
XBLOCK whole rows of router logits, so the softmax, the k rounds of top-k and the renormalisation
never leave registers. Rendered from templates/moe_routing.py.jinja.

Tie-breaking: each round takes the row's largest remaining probability and, among the experts
holding exactly that value, the lowest index. torch.topk promises no order among ties, so the
kernel and eager may pick different (equally weighted) experts only on exact ties.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch
import torch.fx

from flagtree_py.codegen import indexing
from flagtree_py.codegen.check_kernel import SOURCE_PROBLEMS, KernelCheckFailed, check_kernel
from flagtree_py.codegen.indexing import LoweringError
from flagtree_py.codegen.types import triton_dtype


@dataclass
class TemplateKernel:
    """A kernel rendered from its own template for one graph node (not from a fusion group)."""

    name: str
    source: str  # the @triton.jit kernel and its `*_fallback`
    call: list[str]  # wrapper lines: allocations and the launch
    config: dict
    checks: list[str] = field(default_factory=list)  # check_kernel problems of the target's first tile
    names: list[str] = field(default_factory=list)  # the @triton.jit kernels in `source`, if not just `name`


def lower_moe_routing(node: torch.fx.Node, name: str, templates, target, arg, int64: bool) -> TemplateKernel:
    """`arg(value)` prints a wrapper-side value (sizes may be symbolic)."""
    logits, top_k, renormalize, weight_dtype = node.args
    dense = node.target is torch.ops.flagtree.moe_routing_dense.default
    val = logits.meta["val"]
    experts = val.shape[-1]
    strides = val.stride()
    if val.dim() != 2 or not isinstance(experts, int) or not all(isinstance(s, int) for s in strides):
        raise LoweringError(f"{node.name}: router logits must be [rows, experts] with static experts and strides")
    tile = target.reduction_config(experts, persistent=True)
    if experts > target.persistent_reduction_limit:
        raise LoweringError(f"{node.name}: {experts} experts do not fit one block on {target.name}")
    rows = indexing.as_expr(val.shape[0])
    x, r = sympy.Symbol("xindex"), sympy.Symbol("rindex")
    source = templates.get_template("moe_routing.py.jinja").render(
        name=name, top_k=top_k, experts=experts, renormalize=renormalize, int64=int64,
        weight_dtype=str(weight_dtype).replace("torch.", ""), weight_triton=triton_dtype(weight_dtype),
        load_offset=indexing.pexpr(x * strides[0] + r * strides[1]), xdesc=indexing.pexpr(rows), dense=dense,
        store_offset=indexing.pexpr(x * experts + r),
    )
    outputs = ["out_ptr0"] if dense else ["out_ptr0", "out_ptr1"]
    op = "moe_routing_dense" if dense else "moe_routing"
    fallback = [
        f"def {name}_fallback(in_ptr0, {', '.join(outputs)}, xnumel):",
        f'    """{name} with aten ops: used if the kernel fails to build or run."""',
        f"    result = torch.ops.flagtree.{op}.default(in_ptr0, {top_k}, {renormalize}, {weight_dtype})",
    ]
    fallback += ["    out_ptr0.copy_(result)"] if dense else ["    out_ptr0.copy_(result[0])", "    out_ptr1.copy_(result[1])"]
    weights = node.meta["val"] if dense else node.meta["val"][0]
    shape, stride = arg(tuple(weights.shape)), arg(tuple(weights.stride()))
    if dense and tuple(weights.stride()) != (experts, 1):
        raise LoweringError(f"{node.name}: the dense routing matrix must be contiguous")
    device = arg(weights.device)
    xnumel = arg(val.shape[0])
    meta, problems = _checked_meta(source, tile, target, name)
    buffers = [f"{node.name}"] if dense else [f"{node.name}_weights", f"{node.name}_ids"]
    dtypes = [weight_dtype] if dense else [weight_dtype, torch.int64]
    what = "dense routing weights" if dense else "weights, expert ids"
    call = [f"# {name}: {node.name} (router softmax -> top-{top_k} -> {what})"]
    call += [f"{b} = empty_strided({shape}, {stride}, dtype={d}, device={device})" for b, d in zip(buffers, dtypes)]
    call.append(f"run({name}, (cdiv({xnumel}, {meta['XBLOCK']}),), {logits.name}, {', '.join(buffers)}, "
                f"{xnumel}, {', '.join(f'{k}={v}' for k, v in meta.items())})")
    if not dense:
        call.append(f"{node.name} = ({node.name}_weights, {node.name}_ids)")
    return TemplateKernel(name, source + "\n\n" + "\n".join(fallback), call,
                          {**meta, "persistent": True, "index_dtype": "int64" if int64 else "int32"}, problems)


def _checked_meta(source: str, tile, target, name: str) -> tuple[dict, list[str]]:
    """The launch meta of the first tile, down the target's safer configs (whole rows: the row is never
    split), that passes check_kernel, and the first tile's problems; KernelCheckFailed if none does."""
    first: list[str] = []
    while tile is not None:
        meta = {"XBLOCK": tile.XBLOCK, "RBLOCK": tile.RBLOCK, "num_warps": target.num_warps(tile.threads)}
        problems = check_kernel(source, {**meta, "kind": "reduction"}, target)
        if not problems:
            return meta, first
        first = first or [str(p) for p in problems]
        if any(p.kind in SOURCE_PROBLEMS for p in problems):
            break
        tile = target.safer_config(tile, row_split=False)
    raise KernelCheckFailed(name, first)
