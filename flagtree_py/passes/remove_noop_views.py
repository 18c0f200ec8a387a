"""Drop views that do nothing: same-shape view/reshape/expand, identity permute."""

from __future__ import annotations

import torch
import torch.fx

from flagtree_py.passes import PassContext

aten = torch.ops.aten
_SAME_SHAPE = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default, aten.alias.default}


def remove_noop_views(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        source = node.args[0].meta.get("val")
        val = node.meta.get("val")
        if not isinstance(source, torch.Tensor) or not isinstance(val, torch.Tensor):
            continue
        if any(user.op == "output" for user in node.users):
            continue  # a returned view must stay a distinct tensor object
        noop = False
        if node.target in _SAME_SHAPE:
            noop = tuple(source.shape) == tuple(val.shape) and source.stride() == val.stride()
        elif node.target == aten.permute.default:
            noop = list(node.args[1]) == list(range(len(node.args[1])))
        if noop:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            removed += 1
    ctx.counters["remove_noop_views"] += removed
    return removed > 0
