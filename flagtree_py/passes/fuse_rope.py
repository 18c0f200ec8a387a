"""Rotate-half rotary embedding (x * cos + rotate_half(x) * sin) as one kernel, where no
per-head norm precedes it (that case is fuse_qk_norm_rope's). The cos/sin gather by position
ids is part of the same kernel when the model indexes its tables."""

from __future__ import annotations

import torch.fx

from flagtree_py.passes import PassContext
from flagtree_py.passes.patterns import aten, is_op, match_rotary, stamp


def fuse_rope(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    found = 0
    for node in graph.nodes:
        if not is_op(node, aten.cat.default) or "fusion" in node.meta:
            continue
        match = match_rotary(node)
        if match is None or any("fusion" in n.meta for n in match["nodes"]):
            continue
        stamp(match["nodes"], "fuse_rope")
        found += 1
    ctx.counters["fuse_rope"] += found
    return False
