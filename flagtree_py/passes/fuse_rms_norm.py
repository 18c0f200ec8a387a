"""RMSNorm (x * rsqrt(mean(x^2) + eps) * weight, in float32 with casts) as one kernel."""

from __future__ import annotations

import torch.fx

from flagtree_py.passes import PassContext
from flagtree_py.passes.patterns import aten, is_op, match_rms_norm, run_matcher


def _match(rsqrt: torch.fx.Node) -> list[torch.fx.Node] | None:
    """Norms whose input is not a residual add (fuse_add_rms_norm's) nor a q/k head (stamped first)."""
    match = match_rms_norm(rsqrt)
    if match is None or is_op(match["x"], aten.add.Tensor):
        return None
    return match["nodes"]


def fuse_rms_norm(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    run_matcher(graph, ctx, "fuse_rms_norm", aten.rsqrt.default, _match)
    return False  # stamps only: the partitioner keeps each instance in one kernel
