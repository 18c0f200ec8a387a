"""Remove nodes whose values nobody reads (mutating ops such as copy_ into inputs stay)."""

from __future__ import annotations

import torch.fx

from flagtree_py.passes import PassContext


def eliminate_dead_code(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    before = len(graph.nodes)
    graph.eliminate_dead_code()
    removed = before - len(graph.nodes)
    ctx.counters["eliminate_dead_code"] += removed
    return removed > 0
