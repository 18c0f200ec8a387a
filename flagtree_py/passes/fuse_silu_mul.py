"""SwiGLU: silu(gate) * up, as one kernel (silu arrives decomposed: gate * sigmoid(gate))."""

from __future__ import annotations

import torch.fx

from flagtree_py.passes import PassContext
from flagtree_py.passes.patterns import aten, is_op, other_operand, prims, single_user, stamp


def fuse_silu_mul(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    found = 0
    for sigmoid in graph.nodes:
        if not is_op(sigmoid, aten.sigmoid.default) or "fusion" in sigmoid.meta:
            continue
        gate = sigmoid.args[0]
        silu = single_user(sigmoid, aten.mul.Tensor)
        if silu is None or other_operand(silu, sigmoid) is not gate:
            continue
        nodes = [sigmoid, silu]
        out = silu
        cast = single_user(out, prims.convert_element_type.default, aten._to_copy.default)
        if cast is not None:
            nodes.append(cast)
            out = cast
        product = single_user(out, aten.mul.Tensor)
        if product is None or product.meta["val"].shape != out.meta["val"].shape:
            continue
        source = gate.args[0] if is_op(gate, prims.convert_element_type.default, aten._to_copy.default) else None
        if source is not None:
            nodes.append(gate)
        stamp([*nodes, product], "fuse_silu_mul")
        found += 1
    ctx.counters["fuse_silu_mul"] += found
    return False
