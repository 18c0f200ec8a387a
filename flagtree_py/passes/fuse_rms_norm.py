"""RMSNorm (x * rsqrt(mean(x^2) + eps) * weight, in float32 with casts) as one kernel."""

from __future__ import annotations

import torch.fx

from flagtree_py.passes import PassContext
from flagtree_py.passes.patterns import aten, is_op, match_rms_norm, stamp


def fuse_rms_norm(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    """Norms whose input is not a residual add (those are fuse_add_rms_norm's) nor a q/k head."""
    found = 0
    for node in graph.nodes:
        if not is_op(node, aten.rsqrt.default) or "fusion" in node.meta:
            continue
        match = match_rms_norm(node)
        if match is None or is_op(match["x"], aten.add.Tensor):
            continue
        stamp(match["nodes"], "fuse_rms_norm")
        found += 1
    ctx.counters["fuse_rms_norm"] += found
    return False  # stamps only: the partitioner keeps each instance in one kernel
