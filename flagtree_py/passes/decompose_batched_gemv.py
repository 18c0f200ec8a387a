"""bmm(A [B, N, K], x [B, K, 1]) -> sum(A * x^T, -1): a batched matrix-vector product as a row
reduction, so the partitioner fuses what produces A into the kernel that reduces it.

This is the MoE form of HF's `experts_implementation="batched_mm"`: A is `W[expert_ids]`, the
experts' weights gathered once per (token, expert) pair. As an extern bmm that gather is a
materialized copy of T*top_k expert matrices; as a reduction the gather becomes indexing inside
the kernel, which reads each routed expert's rows straight from W (fused MoE for decode, no sort).
The silu(gate) * up and routing-weight epilogues then fuse as for any reduction.
"""

from __future__ import annotations

import torch
import torch.fx

from flagtree_py.passes import PassContext
from flagtree_py.passes.patterns import is_static_one

aten = torch.ops.aten


def decompose_batched_gemv(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.bmm.default or not ctx.options.gemm_templates:
            continue
        a, x = node.args
        val, a_val, x_val = node.meta.get("val"), a.meta.get("val"), x.meta.get("val")
        if not all(isinstance(v, torch.Tensor) for v in (val, a_val, x_val)) or not is_static_one(val.shape[-1]):
            continue
        if not _is_gather(a):
            continue  # a plain batched GEMV gains nothing: it stays cuBLAS's
        with graph.inserting_before(node):
            row = graph.call_function(aten.permute.default, (x, [0, 2, 1]))
            product = graph.call_function(aten.mul.Tensor, (a, row))
            total = graph.call_function(aten.sum.dim_IntList, (product, [2], True))
        row.meta["val"] = x_val.permute(0, 2, 1)
        product.meta["val"] = a_val * row.meta["val"]
        total.meta["val"] = product.meta["val"].sum(2, keepdim=True)
        node.replace_all_uses_with(total)
        graph.erase_node(node)
        changed += 1
    ctx.counters["decompose_batched_gemv"] += changed
    return changed > 0



def _is_gather(node: torch.fx.Node) -> bool:
    """A is rows of a weight picked by an index tensor (through views)."""
    while node.op == "call_function" and node.target in (aten.view.default, aten.unsqueeze.default,
                                                         aten.expand.default, aten.permute.default):
        node = node.args[0]
    return node.op == "call_function" and node.target == aten.index.Tensor
