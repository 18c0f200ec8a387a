"""SwiGLU's gate and up projections, which read one input, become one GEMM over [W_gate; W_up]
(see passes/projections.py for the rewrite and what makes it safe)."""

from __future__ import annotations

import torch.fx

from flagtree_py.passes import PassContext
from flagtree_py.passes.patterns import CASTS, VIEW_OPS, aten, is_op, other_operand, single_user, through_views
from flagtree_py.passes.projections import find_projections, merge

_THROUGH = (*VIEW_OPS, *CASTS, aten.slice.Tensor)


def readers(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The users of `node` looking through views, casts and slices: the ops that compute with it."""
    return through_views(node, _THROUGH)


def _swiglu_product(gate: torch.fx.Node) -> torch.fx.Node | None:
    """silu(gate) * up: the product, when `gate` feeds the sigmoid of a silu."""
    for sigmoid in readers(gate):
        if not is_op(sigmoid, aten.sigmoid.default):
            continue
        silu = single_user(sigmoid, aten.mul.Tensor)
        if silu is None:
            continue
        out = single_user(silu, *CASTS) or silu
        product = single_user(out, aten.mul.Tensor)
        if product is not None and other_operand(product, out) is not None:
            return product
    return None


def merge_gate_up(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    if not ctx.options.merge_projections:
        return False
    merged = 0
    for projections in find_projections(graph, ctx).values():
        for gate in projections:
            product = _swiglu_product(gate.node)
            up = next((p for p in projections if p is not gate and product in readers(p.node)), None)
            if product is not None and up is not None and merge(graph, ctx, [gate, up]):
                merged += 1
                break  # the group's other projections are stale now; one SwiGLU per input
    ctx.counters["merge_gate_up"] += merged
    return merged > 0
