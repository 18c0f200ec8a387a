"""Views as index maps: each turns the output's index into its input's, no data moves."""

from __future__ import annotations

import sympy
import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from flagtree_py.codegen import indexing
from flagtree_py.codegen.indexing import LoweringError
from flagtree_py.codegen.lowerings.common import (
    aten,
    input_shape,
    output_shape,
    register,
)

TABLE: dict = {}


@register(TABLE, aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(k, node, index, mask):
    in_index = indexing.reshape_index(index, input_shape(node), output_shape(node))
    return k.value(node.args[0], in_index, mask)


@register(TABLE, aten.permute.default)
def _permute(k, node, index, mask):
    dims = [d % len(index) for d in node.args[1]]
    return k.value(node.args[0], indexing.permute_index(index, dims), mask)


@register(TABLE, aten.transpose.int)
def _transpose(k, node, index, mask):
    ndim = len(index)
    a, b = node.args[1] % ndim, node.args[2] % ndim
    swapped = list(index)
    swapped[a], swapped[b] = index[b], index[a]
    return k.value(node.args[0], tuple(swapped), mask)


@register(TABLE, aten.t.default)
def _t(k, node, index, mask):
    return k.value(node.args[0], tuple(reversed(index)), mask)


@register(TABLE, aten.expand.default)
def _expand(k, node, index, mask):
    return k.value(node.args[0], indexing.broadcast_index(index, input_shape(node)), mask)


@register(TABLE, aten.unsqueeze.default)
def _unsqueeze(k, node, index, mask):
    dim = node.args[1] % len(index)
    return k.value(node.args[0], index[:dim] + index[dim + 1 :], mask)


@register(TABLE, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(k, node, index, mask):
    in_shape = input_shape(node)
    if node.target == aten.squeeze.default:
        dims = [d for d, s in enumerate(in_shape) if s == 1]
    else:
        raw = node.args[1]
        dims = [d % max(1, len(in_shape)) for d in (raw if isinstance(raw, (list, tuple)) else [raw])]
        dims = [d for d in dims if in_shape[d] == 1]
    it = iter(index)
    return k.value(node.args[0], tuple(sympy.Integer(0) if d in dims else next(it) for d in range(len(in_shape))), mask)


@register(TABLE, aten.slice.Tensor)
def _slice(k, node, index, mask):
    in_shape = input_shape(node)
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(in_shape)
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    length = indexing.as_expr(node.meta["val"].shape[dim])
    start = slice_start(start, end, step, node.args[0].meta["val"].shape[dim], length)
    moved = list(index)
    moved[dim] = start + indexing.as_expr(step) * index[dim]
    return k.value(node.args[0], tuple(moved), mask)


def slice_start(start, end, step, size, length) -> sympy.Expr:
    """Where a slice of `length` elements starts, as eager computes it: a negative start counts
    from the end, and a start is clamped to [0, size]. With a symbolic size the clamp must be
    decided by what the shape environment knows (an undecided Max cannot be printed), or by the
    length: a unit-step slice that runs to the end starts `length` elements before it."""
    if start is None:
        return sympy.Integer(0)
    if statically_known_true(start < 0):
        start = start + size
        if statically_known_true(start <= 0):
            return sympy.Integer(0)
        if not statically_known_true(start >= 0):
            if step == 1 and (end is None or statically_known_true(end >= size)):
                return indexing.as_expr(size) - indexing.as_expr(length)
            raise LoweringError(f"slice start {start} may be negative")
    elif statically_known_true(start > size):
        return indexing.as_expr(size)
    return indexing.as_expr(start)


def selected(node: torch.fx.Node, dim_arg: int) -> tuple[int, sympy.Expr]:
    """(dim, position) of a select or select_scatter, a negative position counted from the end."""
    in_shape = input_shape(node)
    dim = node.args[dim_arg] % len(in_shape)
    position = indexing.as_expr(node.args[dim_arg + 1])
    if position.is_number and position < 0:
        position = position + in_shape[dim]
    return dim, position


@register(TABLE, aten.select.int)
def _select(k, node, index, mask):
    dim, position = selected(node, 1)
    return k.value(node.args[0], index[:dim] + (position,) + index[dim:], mask)
