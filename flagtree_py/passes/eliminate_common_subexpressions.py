"""Merge call_function nodes that compute the same op on the same arguments."""

from __future__ import annotations

import torch
import torch.fx

from flagtree_py.passes import PassContext


def _key(node: torch.fx.Node):
    def freeze(a):
        if isinstance(a, (list, tuple)):
            return (type(a).__name__,) + tuple(freeze(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, freeze(v)) for k, v in a.items()))
        if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return ("sym", str(a.node.expr))
        if isinstance(a, float):
            return ("float", repr(a))  # 0.0 and -0.0 differ
        return a

    return (node.target, freeze(node.args), freeze(node.kwargs))


def eliminate_common_subexpressions(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    seen: dict = {}
    merged = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.is_impure():
            continue
        if isinstance(node.target, torch._ops.OpOverload) and (
            node.target.is_view is False and torch.Tag.nondeterministic_seeded in node.target.tags
        ):
            continue  # random ops are not common subexpressions
        try:
            key = _key(node)
            hash(key)
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
            merged += 1
        else:
            seen[key] = node
    ctx.counters["eliminate_common_subexpressions"] += merged
    return merged > 0
