"""Rotary embedding as one kernel, where no per-head norm precedes it (that case is
fuse_qk_norm_rope's), in both forms the models produce: transformers' rotate-half
(x * cos + rotate_half(x) * sin) and vLLM's neox form (cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)),
see patterns.match_any_rotary."""

from __future__ import annotations

import torch.fx

from flagtree_py.passes import PassContext
from flagtree_py.passes.patterns import aten, match_any_rotary, run_matcher


def _match(cat: torch.fx.Node) -> list[torch.fx.Node] | None:
    match = match_any_rotary(cat)
    if match is None or any("fusion" in n.meta for n in match["nodes"]):
        return None
    return match["nodes"]


def fuse_rope(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    run_matcher(graph, ctx, "fuse_rope", aten.cat.default, _match)
    return False
