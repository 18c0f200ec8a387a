"""Attention's q, k and v projections, which read one input, become one GEMM over [Wq; Wk; Wv]
(see passes/projections.py for the rewrite and what makes it safe).

Which projection is q, k or v is read from the graph, not from names: following each projection's
value forward (through norms, rotary, GQA repeats: anything but another GEMM), it must enter one
attention op as its query, key or value respectively.
"""

from __future__ import annotations

import torch.fx

from flagtree_py.codegen.lowerings import GEMM_OPS
from flagtree_py.passes import PassContext
from flagtree_py.passes.projections import Projection, find_projections, merge

_SEARCH_LIMIT = 200  # nodes visited per projection: a decoder layer's attention prologue is far smaller


def _attention_role(projection: torch.fx.Node) -> tuple[torch.fx.Node, int] | None:
    """(attention node, argument position: 0 query, 1 key, 2 value) that `projection` feeds."""
    seen, stack, found = {projection}, [projection], set()
    while stack and len(seen) < _SEARCH_LIMIT:
        node = stack.pop()
        for user in node.users:
            if user.op != "call_function" or user.target in GEMM_OPS:
                continue
            if "attention" in str(user.target) or "scaled_dot_product" in str(user.target):
                found |= {(user, i) for i, arg in enumerate(user.args[:3]) if arg is node}
            elif user not in seen:
                seen.add(user)
                stack.append(user)
    return next(iter(found)) if len(found) == 1 else None


def merge_qkv(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    if not ctx.options.merge_projections:
        return False
    merged = 0
    for projections in find_projections(graph, ctx).values():
        roles: dict[torch.fx.Node, dict[int, Projection]] = {}
        for p in projections:
            role = _attention_role(p.node)
            if role is not None:
                roles.setdefault(role[0], {})[role[1]] = p
        for by_position in roles.values():
            if sorted(by_position) == [0, 1, 2] and merge(graph, ctx, [by_position[i] for i in range(3)]):
                merged += 1
    ctx.counters["merge_qkv"] += merged
    return merged > 0
