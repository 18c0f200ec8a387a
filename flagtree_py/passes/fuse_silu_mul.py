"""SwiGLU: silu(gate) * up, as one kernel (silu arrives decomposed: gate * sigmoid(gate))."""

from __future__ import annotations

import torch.fx

from flagtree_py.passes import PassContext
from flagtree_py.passes.patterns import CASTS, aten, is_op, other_operand, run_matcher, single_user, through_cast


def _match(sigmoid: torch.fx.Node) -> list[torch.fx.Node] | None:
    gate = sigmoid.args[0]
    silu = single_user(sigmoid, aten.mul.Tensor)
    if silu is None or other_operand(silu, sigmoid) is not gate:
        return None
    nodes = [sigmoid, silu]
    out = through_cast(silu, nodes)
    product = single_user(out, aten.mul.Tensor)
    if product is None or product.meta["val"].shape != out.meta["val"].shape:
        return None
    if is_op(gate, *CASTS):
        nodes.append(gate)
    return [*nodes, product]


def fuse_silu_mul(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    run_matcher(graph, ctx, "fuse_silu_mul", aten.sigmoid.default, _match)
    return False  # stamps only: the partitioner keeps each instance in one kernel
