"""Data movement as pointwise values: gathers (embedding, index, gather), cat, pad, scatters.

Each reads another tensor at a computed (possibly data-dependent) index, under a mask where
the element comes from only some of its inputs.
"""

from __future__ import annotations

import sympy
import torch
import torch.fx
from torch.utils._sympy.functions import FloorDiv

from flagtree_py.codegen import indexing
from flagtree_py.codegen.indexing import LoweringError
from flagtree_py.codegen.lowerings.common import aten, input_shape, out_dtype, register
from flagtree_py.codegen.lowerings.views import selected, slice_start
from flagtree_py.codegen.types import Value, compute_dtype

TABLE: dict = {}


@register(TABLE, aten.embedding.default)
def _embedding(k, node, index, mask):
    weight, indices = node.args[:2]
    idx_ndim = indices.meta["val"].dim()
    row = k.value(indices, index[:idx_ndim], mask)
    return _gather_rows(k, weight, row, (index[idx_ndim],), 0, mask)


@register(TABLE, aten.index_select.default)
def _index_select(k, node, index, mask):
    source, dim, indices = node.args
    dim = dim % max(1, source.meta["val"].dim())
    row = k.value(indices, (index[dim],) if indices.meta["val"].dim() else (), mask)  # a 0-dim index keeps the dim
    return _gather_rows(k, source, row, index[:dim] + index[dim + 1 :], dim, mask)


@register(TABLE, aten.gather.default)
def _gather(k, node, index, mask):
    source, dim, indices = node.args[:3]
    if source.meta["val"].dim() == 0:
        raise LoweringError("gather from a 0-dim tensor")
    dim = dim % source.meta["val"].dim()
    # out[..., i, ...] = source[..., indices[..., i, ...], ...]: the index has the output's shape
    row = k.value(indices, index, mask)
    return _gather_rows(k, source, row, index[:dim] + index[dim + 1 :], dim, mask)


def _gather_rows(k, source, row: Value, rest, dim: int, mask):
    """Load `source` with the (data-dependent) index `row` in dimension `dim`."""
    size = indexing.as_expr(source.meta["val"].shape[dim])
    # negative indices count from the end, as in eager
    wrapped = k.emit(f"tl.where({row.name} < 0, {row.name} + {k.index_token(size)}, {row.name})", torch.int64)
    symbol = k.indirect_symbol(wrapped)
    full = tuple(rest[:dim]) + (symbol,) + tuple(rest[dim:])
    return k.value(source, full, mask)


@register(TABLE, aten.index.Tensor)
def _index(k, node, index, mask):
    source, indices = node.args
    src = source.meta["val"]
    positions = [d for d, i in enumerate(indices) if i is not None]
    if not positions:
        raise LoweringError("index without indices")
    contiguous = positions == list(range(positions[0], positions[-1] + 1))
    broadcast = torch.broadcast_shapes(*(indices[d].meta["val"].shape for d in positions))
    nb = len(broadcast)
    first = positions[0] if contiguous else 0
    idx_index = index[first : first + nb]
    source_index: list = []
    rest = [i for d, i in enumerate(index) if not (first <= d < first + nb)]
    rest_iter = iter(rest)
    for d in range(src.dim()):
        if d in positions:
            i_node = indices[d]
            i_shape = indexing.shape_of(i_node.meta["val"].shape)
            row = k.value(i_node, indexing.broadcast_index(tuple(idx_index), i_shape), mask)
            if i_node.meta["val"].dtype == torch.bool:
                raise LoweringError("boolean mask indexing")
            size = indexing.as_expr(src.shape[d])
            wrapped = k.emit(f"tl.where({row.name} < 0, {row.name} + {k.index_token(size)}, {row.name})", torch.int64)
            source_index.append(k.indirect_symbol(wrapped))
        else:
            source_index.append(next(rest_iter))
    return k.value(source, tuple(source_index), mask)


@register(TABLE, aten.cat.default)
def _cat(k, node, index, mask):
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else 0
    out = out_dtype(node)
    dim = dim % len(index)
    pieces, start = [], sympy.Integer(0)
    for t in tensors:
        size = indexing.as_expr(t.meta["val"].shape[dim]) if t.meta["val"].dim() else sympy.Integer(0)
        if t.meta["val"].dim() == 1 and size == 0:
            continue  # torch allows empty 1-d tensors in cat
        end = start + size
        inside = k.emit(
            f"({k.index_token(index[dim])} >= {k.index_token(start)}) & ({k.index_token(index[dim])} < {k.index_token(end)})",
            torch.bool,
        )
        shifted = index[:dim] + (index[dim] - start,) + index[dim + 1 :]
        piece_mask = inside.name if mask is None else f"{mask} & {inside.name}"
        pieces.append((inside, k.to_compute(k.value(t, shifted, piece_mask), out)))
        start = end
    result = pieces[-1][1]
    for inside, value in reversed(pieces[:-1]):
        result = k.emit(f"tl.where({inside.name}, {value.name}, {result.name})", compute_dtype(out))
    return result


@register(TABLE, aten.constant_pad_nd.default)
def _pad(k, node, index, mask):
    source, pad = node.args[:2]
    fill = node.args[2] if len(node.args) > 2 else 0
    src_shape = indexing.shape_of(source.meta["val"].shape)
    out = out_dtype(node)
    source_index = list(index)
    conditions = []
    for j in range(len(pad) // 2):
        d = len(index) - 1 - j
        before = indexing.as_expr(pad[2 * j])
        source_index[d] = index[d] - before
        t = k.index_token(source_index[d])
        conditions.append(f"({t} >= 0) & ({t} < {k.index_token(src_shape[d])})")
    inside = k.emit(" & ".join(conditions), torch.bool)
    inner_mask = inside.name if mask is None else f"{mask} & {inside.name}"
    value = k.to_compute(k.value(source, tuple(source_index), inner_mask), out)
    filler = k.to_compute(k.constant(fill, out), out)
    return k.emit(f"tl.where({inside.name}, {value.name}, {filler.name})", compute_dtype(out))


@register(TABLE, aten.slice_scatter.default)
def _slice_scatter(k, node, index, mask):
    """`self` with `src` written into `self[start::step]` along `dim`."""
    src = node.args[1]
    in_shape = input_shape(node)
    dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % len(in_shape)
    start = node.args[3] if len(node.args) > 3 else node.kwargs.get("start")
    end = node.args[4] if len(node.args) > 4 else node.kwargs.get("end")
    step = indexing.as_expr(node.args[5] if len(node.args) > 5 else node.kwargs.get("step", 1))
    # where the slice ends follows from src's length (eager checks that they agree)
    length = indexing.as_expr(src.meta["val"].shape[dim])
    start = slice_start(start, end, step, node.args[0].meta["val"].shape[dim], length)
    offset = k.index_token(index[dim] - start)
    condition = f"({offset} >= 0) & ({offset} < {k.index_token(length * step)})"
    if step != 1:
        condition += f" & (({offset}) % ({k.index_token(step)}) == 0)"
    position = index[dim] - start if step == 1 else FloorDiv(index[dim] - start, step)
    return _scatter_where(k, node, index, mask, condition, index[:dim] + (position,) + index[dim + 1 :])


@register(TABLE, aten.select_scatter.default)
def _select_scatter(k, node, index, mask):
    """`self` with `src` written into `self.select(dim, position)`."""
    dim, position = selected(node, 2)
    condition = f"{k.index_token(index[dim])} == {k.index_token(position)}"
    return _scatter_where(k, node, index, mask, condition, index[:dim] + index[dim + 1 :])


def _scatter_where(k, node, index, mask, condition: str, src_index) -> Value:
    """`src` at `src_index` where `condition` holds, else `self` at `index`."""
    base, src = node.args[:2]
    out = out_dtype(node)
    inside = k.emit(condition, torch.bool)
    inner_mask = inside.name if mask is None else f"{mask} & {inside.name}"
    written = k.to_compute(k.value(src, tuple(src_index), inner_mask), out)
    kept = k.to_compute(k.value(base, index, mask), out)
    return k.emit(f"tl.where({inside.name}, {written.name}, {kept.name})", compute_dtype(out))
