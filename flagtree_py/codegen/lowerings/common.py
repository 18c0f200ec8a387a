"""What every lowering table shares: registration, dtypes of nodes, type promotion, shapes."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx
from torch._prims_common import ELEMENTWISE_TYPE_PROMOTION_KIND, elementwise_dtypes

from flagtree_py.codegen import indexing
from flagtree_py.codegen.types import Value

aten = torch.ops.aten
prims = torch.ops.prims

#: a lowering: fn(builder, node, index, extra_mask) -> the node's Value at `index`
Lowering = Callable[..., Value]


def register(table: dict, *targets):
    """Decorator: `fn` lowers each of `targets`, in this module's own `table`."""

    def wrap(fn):
        for target in targets:
            table[target] = fn
        return fn

    return wrap


def out_dtype(node: torch.fx.Node) -> torch.dtype:
    return node.meta["val"].dtype


def promoted(k, node, index, mask, args) -> tuple[list[Value], torch.dtype]:
    """Operands converted to the op's compute dtype (torch's type promotion of the inputs)."""
    values = [k.operand(a, index, mask) for a in args]
    dtype = result_type(args)
    return [k.to_compute(v, dtype) for v in values], dtype


def result_type(args) -> torch.dtype:
    """torch's type promotion: by category, tensors with dimensions over 0-dim tensors over
    Python numbers (a bool tensor times 2 is int64, a float16 tensor plus a float32 0-dim
    tensor stays float16)."""
    examples = []
    for a in args:
        value = a.meta.get("val") if isinstance(a, torch.fx.Node) else a
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            value = {torch.SymInt: 1, torch.SymFloat: 1.0, torch.SymBool: True}[type(value)]
        examples.append(value)
    _, dtype = elementwise_dtypes(*examples, type_promotion_kind=ELEMENTWISE_TYPE_PROMOTION_KIND.DEFAULT)
    return dtype


def input_shape(node: torch.fx.Node) -> indexing.Index:
    return indexing.shape_of(node.args[0].meta["val"].shape)


def output_shape(node: torch.fx.Node) -> indexing.Index:
    return indexing.shape_of(node.meta["val"].shape)
