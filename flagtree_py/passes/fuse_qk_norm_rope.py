"""Qwen3's per-head RMSNorm on q and k followed by rotate-half rotary embedding: one kernel.

The norm reduces each head's [head_dim] row; the rotary reads the normed row (through the
[b, s, h, d] -> [b, h, s, d] transpose) at d and at d +- head_dim/2. The partitioner places the
norm's reduction row-wise inside the rotary's iteration space (see partition_fusion_groups).
"""

from __future__ import annotations

import torch.fx

from flagtree_py.passes import PassContext
from flagtree_py.passes.patterns import VIEW_OPS, aten, is_op, match_rms_norm, match_rotary, run_matcher, through_views


def _rotary_nodes(normed: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The rotary embedding of `normed` (read through views), or None."""
    for user in through_views(normed):
        if is_op(user, aten.slice.Tensor):
            for cat in {n for s in user.users for n in s.users} | set(user.users):
                match = match_rotary(cat)
                if match is not None and normed in _sources(match["x"]):
                    return match["nodes"]
    return None


def _sources(node: torch.fx.Node) -> list[torch.fx.Node]:
    """`node` and what it is a view of."""
    chain = [node]
    while is_op(chain[-1], *VIEW_OPS):
        chain.append(chain[-1].args[0])
    return chain


def _match(rsqrt: torch.fx.Node) -> list[torch.fx.Node] | None:
    match = match_rms_norm(rsqrt)
    if match is None or match["x"].meta["val"].dim() != 4:
        return None
    rotary = _rotary_nodes(match["out"])
    return None if rotary is None else [*match["nodes"], *rotary]


def fuse_qk_norm_rope(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    run_matcher(graph, ctx, "fuse_qk_norm_rope", aten.rsqrt.default, _match)
    return False
