"""Drop views that do nothing: same-shape view/reshape/expand, identity permute, and reshape round trips.

A round trip is a chain of reshapes that ends at the shape and strides of a tensor earlier in the
chain: vLLM's Qwen3 views the normed q heads [T, H, D] back to [T, H*D], and its rotary embedding
views them again as [T, H, D]. Reshapes keep the row-major element order, so the end of the chain is
that earlier tensor; reading it directly keeps the kernel's index math on one row per head (through
[T, H*D] the row would be d1 + d2 // D, which the partitioner cannot prove is one row).
"""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from flagtree_py.passes import PassContext

aten = torch.ops.aten
_SAME_SHAPE = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default, aten.alias.default}
_RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}


def _round_trip_source(node: torch.fx.Node) -> torch.fx.Node | None:
    """The earliest tensor of `node`'s chain of reshapes with `node`'s shape and strides, if any."""
    val, found, current = node.meta["val"], None, node
    while current.op == "call_function" and current.target in _RESHAPES and isinstance(current.args[0], torch.fx.Node):
        current = current.args[0]
        source = current.meta.get("val")
        if isinstance(source, torch.Tensor) and _same_layout(source, val):
            found = current
    return found


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and _provably_equal(a.shape, b.shape) and _provably_equal(a.stride(), b.stride())


def _provably_equal(xs, ys) -> bool:
    """Equal for every value of the dynamic sizes. A plain `==` on SymInts would ask the shape env,
    which answers from this call's sizes and adds a guard: Dynamo would then recompile at the next
    length (a view [s, D] -> [1, D] is a no-op only while s is 1)."""
    return len(xs) == len(ys) and all(statically_known_true(x == y) for x, y in zip(xs, ys))


def remove_noop_views(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        source = node.args[0].meta.get("val")
        val = node.meta.get("val")
        if not isinstance(source, torch.Tensor) or not isinstance(val, torch.Tensor):
            continue
        if any(user.op == "output" for user in node.users):
            continue  # a returned view must stay a distinct tensor object
        noop = False
        if node.target in _RESHAPES and (earlier := _round_trip_source(node)) is not None:
            node.replace_all_uses_with(earlier)
            graph.erase_node(node)
            removed += 1
            continue
        if node.target in _SAME_SHAPE:
            noop = _provably_equal(source.shape, val.shape) and _provably_equal(source.stride(), val.stride())
        elif node.target == aten.permute.default:
            noop = list(node.args[1]) == list(range(len(node.args[1])))
        if noop:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            removed += 1
    ctx.counters["remove_noop_views"] += removed
    return removed > 0
