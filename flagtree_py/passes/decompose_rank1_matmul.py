"""mm/bmm whose contraction has length 1 -> a broadcast multiply (an outer product).

transformers' rotary embedding computes its angles as `inv_freq[:, None] @ positions[None, :]`:
a bmm with K = 1. As an extern that is a cuBLAS launch (a few microseconds per decode step) and a
materialized [B, D/2, S] tensor; as a multiply it is index arithmetic inside the cos/sin kernel that
reads it. The result is the same: one product per element, rounded once, with no sum. (Newer
transformers write the multiply themselves; this makes the graphs of both versions alike.)
"""

from __future__ import annotations

import torch
import torch.fx

from flagtree_py.passes import PassContext
from flagtree_py.passes.patterns import is_static_one

aten = torch.ops.aten


def decompose_rank1_matmul(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.mm.default, aten.bmm.default) or node.kwargs:
            continue
        a, b = node.args
        a_val, b_val = a.meta.get("val"), b.meta.get("val")
        if not isinstance(a_val, torch.Tensor) or not isinstance(b_val, torch.Tensor):
            continue
        if not (is_static_one(a_val.shape[-1]) and is_static_one(b_val.shape[-2])) or a_val.dtype != b_val.dtype:
            continue
        with graph.inserting_before(node):
            product = graph.call_function(aten.mul.Tensor, (a, b))  # [.., M, 1] * [.., 1, N] = [.., M, N]
        product.meta["val"] = a_val * b_val
        node.replace_all_uses_with(product)
        graph.erase_node(node)
        changed += 1
    ctx.counters["decompose_rank1_matmul"] += changed
    return changed > 0

