"""Residual add feeding an RMSNorm: one kernel storing both the sum and the normed output."""

from __future__ import annotations

import torch.fx

from flagtree_py.passes import PassContext
from flagtree_py.passes.patterns import aten, is_op, match_rms_norm, run_matcher


def _match(rsqrt: torch.fx.Node) -> list[torch.fx.Node] | None:
    match = match_rms_norm(rsqrt)
    if match is None or not is_op(match["x"], aten.add.Tensor):
        return None
    if match["x"].meta["val"].shape != match["out"].meta["val"].shape:
        return None  # a broadcasting add is not a residual
    return [match["x"], *match["nodes"]]


def fuse_add_rms_norm(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    run_matcher(graph, ctx, "fuse_add_rms_norm", aten.rsqrt.default, _match)
    return False
