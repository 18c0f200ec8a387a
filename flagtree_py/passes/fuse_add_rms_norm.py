"""Residual add feeding an RMSNorm: one kernel storing both the sum and the normed output."""

from __future__ import annotations

import torch.fx

from flagtree_py.passes import PassContext
from flagtree_py.passes.patterns import aten, is_op, match_rms_norm, stamp


def fuse_add_rms_norm(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    found = 0
    for node in graph.nodes:
        if not is_op(node, aten.rsqrt.default) or "fusion" in node.meta:
            continue
        match = match_rms_norm(node)
        if match is None or not is_op(match["x"], aten.add.Tensor):
            continue
        if match["x"].meta["val"].shape != match["out"].meta["val"].shape:
            continue  # a broadcasting add is not a residual
        stamp([match["x"], *match["nodes"]], "fuse_add_rms_norm")
        found += 1
    ctx.counters["fuse_add_rms_norm"] += found
    return False
