"""Qwen3's per-head RMSNorm on q and k followed by rotate-half rotary embedding: one kernel.

The norm reduces each head's [head_dim] row; the rotary reads the normed row (through the
[b, s, h, d] -> [b, h, s, d] transpose) at d and at d +- head_dim/2. The partitioner places the
norm's reduction row-wise inside the rotary's iteration space (see partition_fusion_groups).
"""

from __future__ import annotations

import torch.fx

from flagtree_py.passes import PassContext
from flagtree_py.passes.patterns import aten, is_op, match_rms_norm, stamp, through_views


def _rotary_nodes(normed: torch.fx.Node) -> list[torch.fx.Node] | None:
    """x*cos + rotate_half(x)*sin downstream of `normed`, or None."""
    users = through_views(normed)
    muls = [u for u in users if is_op(u, aten.mul.Tensor)]
    slices = [u for u in users if is_op(u, aten.slice.Tensor)]
    if not muls or len(slices) != 2:
        return None
    negated = [n for s in slices for n in s.users if is_op(n, aten.neg.default)]
    cats = {n for s in slices for n in s.users if is_op(n, aten.cat.default)}
    cats |= {n for m in negated for n in m.users if is_op(n, aten.cat.default)}
    if len(negated) != 1 or len(cats) != 1:
        return None
    (cat,) = cats
    rotated = [u for u in cat.users if is_op(u, aten.mul.Tensor)]
    sums = {u for m in muls + rotated for u in m.users if is_op(u, aten.add.Tensor)}
    if len(rotated) != 1 or len(sums) != 1:
        return None
    return [*muls, *slices, *negated, cat, *rotated, *sums]


def fuse_qk_norm_rope(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    found = 0
    for node in graph.nodes:
        if not is_op(node, aten.rsqrt.default) or "fusion" in node.meta:
            continue
        match = match_rms_norm(node)
        if match is None or match["x"].meta["val"].dim() != 4:
            continue
        rotary = _rotary_nodes(match["out"])
        if rotary is None:
            continue
        stamp([*match["nodes"], *rotary], "fuse_qk_norm_rope")
        found += 1
    ctx.counters["fuse_qk_norm_rope"] += found
    return False
