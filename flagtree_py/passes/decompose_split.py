"""split_with_sizes + getitem -> one slice per piece, so each piece is a view kernels can fold.

Left as a multi-output extern, a split forces its input to be stored and hands kernels opaque
buffers; as slices, the gate/up halves of a merged projection read straight from it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from flagtree_py.passes import PassContext

aten = torch.ops.aten


def decompose_split(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.split_with_sizes.default:
            continue
        if not all(u.op == "call_function" and u.target is operator.getitem for u in node.users):
            continue
        source, sizes = node.args[0], node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        starts = [0]
        for size in sizes[:-1]:
            starts.append(starts[-1] + size)
        for user in list(node.users):
            piece = user.args[1]
            with graph.inserting_before(user):
                sliced = graph.call_function(aten.slice.Tensor, (source, dim, starts[piece], starts[piece] + sizes[piece]))
            sliced.meta = dict(user.meta)
            user.replace_all_uses_with(sliced)
            graph.erase_node(user)
        graph.erase_node(node)
        changed += 1
    ctx.counters["decompose_split"] += changed
    return changed > 0
