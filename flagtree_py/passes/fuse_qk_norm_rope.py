"""Qwen3's per-head RMSNorm on q and k followed by rotary embedding: one kernel.

The norm reduces each head's [head_dim] row; the rotary reads the normed row at d and at
d +- head_dim/2: in transformers' form through the [b, s, h, d] -> [b, h, s, d] transpose, in vLLM's
as [tokens, heads, head_dim] (its view back to [tokens, hidden] and again to heads is removed by
remove_noop_views). The partitioner places the norm's reduction row-wise inside the rotary's
iteration space (see partition_fusion_groups).
"""

from __future__ import annotations

import torch.fx

from flagtree_py.passes import PassContext
from flagtree_py.passes.patterns import (
    VIEW_OPS,
    aten,
    is_op,
    match_any_rotary,
    match_rms_norm,
    run_matcher,
    through_views,
)


def _rotary_nodes(normed: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The rotary embedding of `normed` (read through views), or None."""
    for user in through_views(normed):
        if is_op(user, aten.slice.Tensor):
            for cat in _near_users(user, _ROTARY_DEPTH):
                match = match_any_rotary(cat)
                if match is not None and normed in _sources(match["x"]):
                    return match["nodes"]
    return None


#: ops from the normed head's slice to the rotary's cat: neg -> cat (rotate-half), mul -> sub/add -> cat
#: (neox), one more for a partial rotary's halves (slices of the slice x[..., :rotary_dim])
_ROTARY_DEPTH = 4


def _near_users(node: torch.fx.Node, depth: int) -> list[torch.fx.Node]:
    """The cat nodes within `depth` uses of `node`, in graph order."""
    found, frontier = set(), {node}
    for _ in range(depth):
        frontier = {user for n in frontier for user in n.users}
        found |= {n for n in frontier if is_op(n, aten.cat.default)}
    return sorted(found, key=lambda n: n.meta.get("_order", 0) or n.name)


def _sources(node: torch.fx.Node) -> list[torch.fx.Node]:
    """`node` and what it is a view of (through the leading slice x[..., :rotary_dim] of a partial rotary)."""
    chain = [node]
    while is_op(chain[-1], *VIEW_OPS) or _is_leading_slice(chain[-1]):
        chain.append(chain[-1].args[0])
    return chain


def _is_leading_slice(node: torch.fx.Node) -> bool:
    if not is_op(node, aten.slice.Tensor) or len(node.args) < 3 or node.args[2] not in (0, None):
        return False
    return node.args[1] in (-1, node.meta["val"].dim() - 1) and (len(node.args) < 5 or node.args[4] == 1)


def _match(rsqrt: torch.fx.Node) -> list[torch.fx.Node] | None:
    match = match_rms_norm(rsqrt)
    # per-head: [b, s, heads, head_dim] (transformers) or [tokens, heads, head_dim] (vLLM)
    if match is None or match["x"].meta["val"].dim() < 3:
        return None
    rotary = _rotary_nodes(match["out"])
    return None if rotary is None else [*match["nodes"], *rotary]


def fuse_qk_norm_rope(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    run_matcher(graph, ctx, "fuse_qk_norm_rope", aten.rsqrt.default, _match)
    return False
