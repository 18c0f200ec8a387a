"""How each core aten op becomes Triton: pointwise math, views as index maps, reductions.

A lowering is `fn(builder, node, index, extra_mask) -> Value`: the node's value at `index`.
An op missing from these tables stays an extern aten call in the wrapper; `can_lower` rejects
the forms of a listed op that a lowering does not handle (so they stay extern too).
"""

from __future__ import annotations

from collections.abc import Callable

import sympy
import torch
import torch.fx
from torch._prims_common import ELEMENTWISE_TYPE_PROMOTION_KIND, elementwise_dtypes
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils._sympy.functions import FloorDiv

from flagtree_py.codegen import indexing
from flagtree_py.codegen.indexing import LoweringError
from flagtree_py.codegen.types import SUPPORTED_DTYPES, Value, compute_dtype, triton_dtype

aten = torch.ops.aten
prims = torch.ops.prims

Lowering = Callable[..., Value]
POINTWISE: dict[object, Lowering] = {}
VIEWS: dict[object, Lowering] = {}
REDUCTIONS: dict[object, Lowering] = {}


def _register(table: dict, *targets):
    def wrap(fn):
        for target in targets:
            table[target] = fn
        return fn

    return wrap


def _out_dtype(node: torch.fx.Node) -> torch.dtype:
    return node.meta["val"].dtype


def _promoted(k, node, index, mask, args) -> tuple[list[Value], torch.dtype]:
    """Operands converted to the op's compute dtype (torch's type promotion of the inputs)."""
    values = [k.operand(a, index, mask) for a in args]
    dtype = _result_type(args)
    return [k.to_compute(v, dtype) for v in values], dtype


def _result_type(args) -> torch.dtype:
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


# -- pointwise math ----------------------------------------------------------------------------

_BINARY = {
    aten.add.Tensor: "{0} + {1}",
    aten.add.Scalar: "{0} + {1}",
    aten.sub.Tensor: "{0} - {1}",
    aten.sub.Scalar: "{0} - {1}",
    aten.mul.Tensor: "{0} * {1}",
    aten.mul.Scalar: "{0} * {1}",
    # NaN wins, as in eager (Triton's default keeps the other operand)
    aten.maximum.default: "tl.maximum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)",
    aten.minimum.default: "tl.minimum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)",
    aten.bitwise_and.Tensor: "{0} & {1}",
    aten.bitwise_and.Scalar: "{0} & {1}",
    aten.bitwise_or.Tensor: "{0} | {1}",
    aten.bitwise_or.Scalar: "{0} | {1}",
    aten.bitwise_xor.Tensor: "{0} ^ {1}",
    aten.bitwise_xor.Scalar: "{0} ^ {1}",
    aten.logical_and.default: "({0} != 0) & ({1} != 0)",
    aten.logical_or.default: "({0} != 0) | ({1} != 0)",
    aten.logical_xor.default: "({0} != 0) ^ ({1} != 0)",
}

_COMPARE = {
    aten.eq.Tensor: "==", aten.eq.Scalar: "==",
    aten.ne.Tensor: "!=", aten.ne.Scalar: "!=",
    aten.lt.Tensor: "<", aten.lt.Scalar: "<",
    aten.le.Tensor: "<=", aten.le.Scalar: "<=",
    aten.gt.Tensor: ">", aten.gt.Scalar: ">",
    aten.ge.Tensor: ">=", aten.ge.Scalar: ">=",
}

# unary float functions; integer inputs are promoted to float first (torch does the same)
_UNARY_FLOAT = {
    aten.exp.default: "tl.exp({0})",
    aten.exp2.default: "tl.exp2({0})",
    aten.log.default: "tl.log({0})",
    aten.log2.default: "tl.log2({0})",
    aten.sqrt.default: "tl.sqrt({0})",
    aten.rsqrt.default: "tl.rsqrt({0})",
    aten.sin.default: "tl.sin({0})",
    aten.cos.default: "tl.cos({0})",
    aten.sigmoid.default: "tl.sigmoid({0})",
    aten.erf.default: "tl.erf({0})",
    aten.reciprocal.default: "1.0 / {0}",
    # no libdevice: its functions do not exist under Triton's interpreter, where tests run
    aten.tanh.default: "2.0 * tl.sigmoid(2.0 * {0}) - 1.0",
    aten.silu.default: "{0} * tl.sigmoid({0})",
}

_UNARY_SAME = {
    aten.neg.default: "-{0}",
    aten.abs.default: "tl.abs({0})",
    aten.relu.default: "tl.maximum({0}, 0, propagate_nan=tl.PropagateNan.ALL)",
    aten.bitwise_not.default: "~{0}",
}

# rounding: the identity on integers (tl.floor and friends accept only floats)
_ROUNDING = {
    aten.floor.default: "tl.floor({0})",
    aten.ceil.default: "tl.ceil({0})",
    aten.trunc.default: "tl.where({0} < 0, tl.ceil({0}), tl.floor({0}))",
}


def _binary(fmt: str):
    def lower(k, node, index, mask):
        a, b, *rest = node.args
        (x, y), dtype = _promoted(k, node, index, mask, [a, b])
        alpha = node.kwargs.get("alpha", rest[0] if rest else 1)
        if alpha != 1:
            y = k.emit(f"{y.name} * {k.to_compute(k.operand(alpha, index), dtype).name}", compute_dtype(dtype))
        out = _out_dtype(node)
        text = fmt.format(x.name, y.name)
        if dtype == torch.bool and fmt == "{0} + {1}":
            text = f"{x.name} | {y.name}"  # True + True is True; a 1-bit add would wrap to False
        result = k.emit(text, compute_dtype(dtype))
        return k.to_compute(result, out)

    return lower


def _compare(op: str):
    def lower(k, node, index, mask):
        (x, y), _ = _promoted(k, node, index, mask, node.args[:2])
        return k.emit(f"{x.name} {op} {y.name}", torch.bool)

    return lower


def _unary(fmt: str, float_only: bool, identity_on_integers: bool = False):
    def lower(k, node, index, mask):
        out = _out_dtype(node)
        x = k.to_compute(k.operand(node.args[0], index, mask), out if float_only else node.args[0].meta["val"].dtype)
        if identity_on_integers and not x.dtype.is_floating_point:
            return k.to_compute(x, out)
        return k.to_compute(k.emit(fmt.format(x.name), x.dtype), out)

    return lower


for _target, _fmt in _BINARY.items():
    POINTWISE[_target] = _binary(_fmt)
for _target, _op in _COMPARE.items():
    POINTWISE[_target] = _compare(_op)
for _target, _fmt in _UNARY_FLOAT.items():
    POINTWISE[_target] = _unary(_fmt, float_only=True)
for _target, _fmt in _UNARY_SAME.items():
    POINTWISE[_target] = _unary(_fmt, float_only=False)
for _target, _fmt in _ROUNDING.items():
    POINTWISE[_target] = _unary(_fmt, float_only=False, identity_on_integers=True)


@_register(POINTWISE, aten.div.Tensor, aten.div.Scalar)
def _div(k, node, index, mask):
    out = _out_dtype(node)
    x, y = (k.to_compute(k.operand(a, index, mask), out) for a in node.args[:2])
    return k.emit(f"{x.name} / {y.name}", compute_dtype(out))


@_register(POINTWISE, aten.div.Tensor_mode)
def _div_mode(k, node, index, mask):
    mode = node.kwargs.get("rounding_mode")
    (x, y), dtype = _promoted(k, node, index, mask, node.args[:2])
    if dtype.is_floating_point:
        quotient = k.emit(f"{x.name} / {y.name}", x.dtype)
        q = quotient.name
        if mode == "floor":
            return _floor_divide_float(k, x, y, quotient)
        if mode == "trunc":
            return k.emit(f"tl.where({q} < 0, tl.ceil({q}), tl.floor({q}))", x.dtype)
        return quotient
    if mode == "floor":
        # Python-style floor division on integers: Triton's // truncates toward zero
        q = k.emit(f"{x.name} // {y.name}", dtype)
        return k.emit(f"tl.where(({x.name} % {y.name} != 0) & (({x.name} < 0) != ({y.name} < 0)), {q.name} - 1, {q.name})", dtype)
    if mode == "trunc":
        return k.emit(f"{x.name} // {y.name}", dtype)
    raise LoweringError("integer true division")


def _floor_divide_float(k, x: Value, y: Value, quotient: Value) -> Value:
    """Eager's floor division of floats (Python's `//`): from the exact remainder, not from
    the rounded quotient, so that 1.0 // 0.1 is 9 (floor(1.0 / 0.1) would be 10)."""
    a, b, q, t = x.name, y.name, quotient.name, x.dtype
    mod = k.emit(f"{a} % {b}", t)  # Triton's float % is C's fmod (sign of the dividend)
    div = k.emit(f"({a} - {mod.name}) / {b}", t)
    div = k.emit(f"tl.where(({mod.name} != 0) & (({b} < 0) != ({mod.name} < 0)), {div.name} - 1.0, {div.name})", t)
    floor = k.emit(f"tl.floor({div.name})", t)
    floor = k.emit(f"tl.where({div.name} - {floor.name} > 0.5, {floor.name} + 1.0, {floor.name})", t)
    # a zero quotient keeps the sign of a / b; division by zero gives a / b (inf or nan)
    result = k.emit(f"tl.where({div.name} == 0, {q} * 0.0, {floor.name})", t)
    return k.emit(f"tl.where({b} == 0, {q}, {result.name})", t)


@_register(POINTWISE, aten.pow.Tensor_Scalar)
def _pow_scalar(k, node, index, mask):
    out = _out_dtype(node)
    base, exponent = node.args
    x = k.to_compute(k.operand(base, index, mask), out)
    if isinstance(exponent, (torch.fx.Node, torch.SymInt, torch.SymFloat)):
        return _pow_symbolic(k, node, x, exponent, index)
    if exponent == 0:
        return k.constant(1, out)  # also for a NaN or zero base, as in eager
    if exponent == 2:
        return k.emit(f"{x.name} * {x.name}", x.dtype)
    if exponent == 1:
        return x
    if exponent == 0.5:
        return k.emit(f"tl.sqrt({x.name})", x.dtype)
    if exponent == -0.5:
        return k.emit(f"tl.rsqrt({x.name})", x.dtype)
    if exponent == -1:
        return k.emit(f"1.0 / {x.name}", x.dtype)
    if float(exponent).is_integer() and 2 <= abs(exponent) <= 8:
        product = " * ".join([x.name] * int(abs(exponent)))
        return k.emit(product if exponent > 0 else f"1.0 / ({product})", x.dtype)
    if not x.dtype.is_floating_point or not isinstance(exponent, float):
        raise LoweringError(f"pow with exponent {exponent!r}")
    # a non-integer power of a negative base is NaN here as in eager
    return k.emit(f"tl.exp2({float(exponent)!r} * tl.log2({x.name}))", x.dtype)


def _pow_symbolic(k, node, x: Value, exponent, index) -> Value:
    """x ** e for an integer e known only at run time (a size, or an int Dynamo made dynamic)."""
    value = exponent.meta.get("val") if isinstance(exponent, torch.fx.Node) else exponent
    if not isinstance(value, torch.SymInt) or not x.dtype.is_floating_point:
        raise LoweringError(f"pow with a symbolic exponent {value!r} of a {x.dtype} base")
    e = k.to_compute(k.operand(exponent, index), x.dtype).name
    magnitude = k.emit(f"tl.exp2({e} * tl.log2(tl.abs({x.name})))", x.dtype)
    # an odd power keeps the base's sign; x ** 0 is 1 even for x = 0 (where 0 * log2(0) is NaN)
    sign = k.emit(f"1.0 - 4.0 * ({e} * 0.5 - tl.floor({e} * 0.5))", x.dtype)  # -1.0 for an odd e
    signed = k.emit(f"tl.where({x.name} < 0, {sign.name} * {magnitude.name}, {magnitude.name})", x.dtype)
    return k.emit(f"tl.where({e} == 0, 1.0, {signed.name})", x.dtype)


@_register(POINTWISE, aten.where.self)
def _where(k, node, index, mask):
    condition, a, b = node.args
    cond = k.to_compute(k.operand(condition, index, mask), torch.bool)
    out = _out_dtype(node)
    x, y = (k.to_compute(k.operand(v, index, mask), out) for v in (a, b))
    return k.emit(f"tl.where({cond.name}, {x.name}, {y.name})", compute_dtype(out))


@_register(POINTWISE, aten.clamp.default, aten.clamp.Tensor, aten.clamp_min.default, aten.clamp_max.default)
def _clamp(k, node, index, mask):
    out = _out_dtype(node)
    x = k.to_compute(k.operand(node.args[0], index, mask), out)
    if node.target == aten.clamp_min.default:
        low, high = node.args[1], None
    elif node.target == aten.clamp_max.default:
        low, high = None, node.args[1]
    else:
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
        high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    text = x.name
    # a NaN input stays NaN, as in eager (Triton's default would return the bound)
    if low is not None:
        text = f"tl.maximum({text}, {k.to_compute(k.operand(low, index, mask), out).name}, propagate_nan=tl.PropagateNan.ALL)"
    if high is not None:
        text = f"tl.minimum({text}, {k.to_compute(k.operand(high, index, mask), out).name}, propagate_nan=tl.PropagateNan.ALL)"
    return k.emit(text, x.dtype)


@_register(POINTWISE, aten.gelu.default)
def _gelu(k, node, index, mask):
    out = _out_dtype(node)
    x = k.to_compute(k.operand(node.args[0], index, mask), out).name
    approximate = node.args[1] if len(node.args) > 1 else node.kwargs.get("approximate", "none")
    if approximate == "tanh":
        # 0.5 * (1 + tanh(u)) == sigmoid(2u), u = sqrt(2/pi) * (x + 0.044715 x^3); libdevice's
        # tanh is missing under the interpreter
        return k.emit(f"{x} * tl.sigmoid(1.5957691216057308 * ({x} + 0.044715 * {x} * {x} * {x}))", compute_dtype(out))
    return k.emit(f"0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476))", compute_dtype(out))


@_register(POINTWISE, aten.logical_not.default)
def _logical_not(k, node, index, mask):
    x = k.operand(node.args[0], index, mask)
    return k.emit(f"{x.name} == 0", torch.bool)


@_register(POINTWISE, aten.isnan.default)
def _isnan(k, node, index, mask):
    x = k.operand(node.args[0], index, mask)
    return k.emit(f"{x.name} != {x.name}", torch.bool)


@_register(POINTWISE, aten.sign.default)
def _sign(k, node, index, mask):
    x = k.operand(node.args[0], index, mask)
    return k.emit(f"({x.name} > 0).to({triton_dtype(x.dtype)}) - ({x.name} < 0).to({triton_dtype(x.dtype)})", x.dtype)


@_register(POINTWISE, prims.convert_element_type.default, aten._to_copy.default)
def _convert(k, node, index, mask):
    source = node.args[0].meta["val"]
    out = _out_dtype(node)
    if node.target == aten._to_copy.default and node.kwargs.get("device") not in (None, source.device):
        raise LoweringError("device copy")
    return k.convert(k.operand(node.args[0], index, mask), out)


@_register(POINTWISE, aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default)
def _identity(k, node, index, mask):
    return k.operand(node.args[0], index, mask)


@_register(POINTWISE, aten.copy.default)
def _copy(k, node, index, mask):
    return k.convert(k.operand(node.args[1], index, mask), _out_dtype(node))


@_register(POINTWISE, aten.full.default, aten.full_like.default, aten.scalar_tensor.default)
def _full(k, node, index, mask):
    fill = node.args[0] if node.target == aten.scalar_tensor.default else node.args[1]
    return k.constant(fill, _out_dtype(node))


@_register(POINTWISE, aten.arange.start_step, aten.arange.start, aten.arange.default)
def _arange(k, node, index, mask):
    args = list(node.args)
    if node.target == aten.arange.default:
        args = [0, args[0], 1]
    elif node.target == aten.arange.start:
        args = args + [1]
    start, _, step = args[0], args[1], args[2] if len(args) > 2 else 1
    out = _out_dtype(node)
    if all(isinstance(v, (int, torch.SymInt)) for v in (start, step)):
        expr = indexing.as_expr(start) + indexing.as_expr(step) * index[0]
        return k.to_compute(k.symbolic(expr), out)
    position = k.symbolic(index[0])
    s, st = (k.to_compute(k.operand(v, index), out) for v in (start, step))
    return k.emit(f"{s.name} + {position.name}.to({triton_dtype(compute_dtype(out))}) * {st.name}", compute_dtype(out))


@_register(POINTWISE, aten.embedding.default)
def _embedding(k, node, index, mask):
    weight, indices = node.args[:2]
    idx_ndim = indices.meta["val"].dim()
    row = k.value(indices, index[:idx_ndim], mask)
    return _gather_rows(k, weight, row, (index[idx_ndim],), 0, mask)


@_register(POINTWISE, aten.index_select.default)
def _index_select(k, node, index, mask):
    source, dim, indices = node.args
    dim = dim % max(1, source.meta["val"].dim())
    row = k.value(indices, (index[dim],) if indices.meta["val"].dim() else (), mask)  # a 0-dim index keeps the dim
    return _gather_rows(k, source, row, index[:dim] + index[dim + 1 :], dim, mask)


@_register(POINTWISE, aten.gather.default)
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


@_register(POINTWISE, aten.index.Tensor)
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


@_register(POINTWISE, aten.cat.default)
def _cat(k, node, index, mask):
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else 0
    out = _out_dtype(node)
    dim = dim % len(index)
    pieces, start = [], sympy.Integer(0)
    for t in tensors:
        size = indexing.as_expr(t.meta["val"].shape[dim]) if t.meta["val"].dim() else sympy.Integer(0)
        if t.meta["val"].dim() == 1 and size == 0:
            continue  # torch allows empty 1-d tensors in cat
        end = start + size
        inside = k.emit(f"({k.index_token(index[dim])} >= {k.index_token(start)}) & ({k.index_token(index[dim])} < {k.index_token(end)})", torch.bool)
        shifted = index[:dim] + (index[dim] - start,) + index[dim + 1 :]
        piece_mask = inside.name if mask is None else f"{mask} & {inside.name}"
        pieces.append((inside, k.to_compute(k.value(t, shifted, piece_mask), out)))
        start = end
    result = pieces[-1][1]
    for inside, value in reversed(pieces[:-1]):
        result = k.emit(f"tl.where({inside.name}, {value.name}, {result.name})", compute_dtype(out))
    return result


@_register(POINTWISE, aten.constant_pad_nd.default)
def _pad(k, node, index, mask):
    source, pad = node.args[:2]
    fill = node.args[2] if len(node.args) > 2 else 0
    src_shape = indexing.shape_of(source.meta["val"].shape)
    out = _out_dtype(node)
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


@_register(POINTWISE, aten.slice_scatter.default)
def _slice_scatter(k, node, index, mask):
    """`self` with `src` written into `self[start::step]` along `dim`."""
    src = node.args[1]
    in_shape = _in_shape(node)
    dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % len(in_shape)
    start = node.args[3] if len(node.args) > 3 else node.kwargs.get("start")
    end = node.args[4] if len(node.args) > 4 else node.kwargs.get("end")
    step = indexing.as_expr(node.args[5] if len(node.args) > 5 else node.kwargs.get("step", 1))
    # where the slice ends follows from src's length (eager checks that they agree)
    length = indexing.as_expr(src.meta["val"].shape[dim])
    start = _slice_start(start, end, step, node.args[0].meta["val"].shape[dim], length)
    offset = k.index_token(index[dim] - start)
    condition = f"({offset} >= 0) & ({offset} < {k.index_token(length * step)})"
    if step != 1:
        condition += f" & (({offset}) % ({k.index_token(step)}) == 0)"
    position = index[dim] - start if step == 1 else FloorDiv(index[dim] - start, step)
    return _scatter_where(k, node, index, mask, condition, index[:dim] + (position,) + index[dim + 1 :])


@_register(POINTWISE, aten.select_scatter.default)
def _select_scatter(k, node, index, mask):
    """`self` with `src` written into `self.select(dim, position)`."""
    dim, position = _selected(node, 2)
    condition = f"{k.index_token(index[dim])} == {k.index_token(position)}"
    return _scatter_where(k, node, index, mask, condition, index[:dim] + index[dim + 1 :])


def _scatter_where(k, node, index, mask, condition: str, src_index) -> Value:
    """`src` at `src_index` where `condition` holds, else `self` at `index`."""
    base, src = node.args[:2]
    out = _out_dtype(node)
    inside = k.emit(condition, torch.bool)
    inner_mask = inside.name if mask is None else f"{mask} & {inside.name}"
    written = k.to_compute(k.value(src, tuple(src_index), inner_mask), out)
    kept = k.to_compute(k.value(base, index, mask), out)
    return k.emit(f"tl.where({inside.name}, {written.name}, {kept.name})", compute_dtype(out))


# -- views: index maps -------------------------------------------------------------------------


def _in_shape(node: torch.fx.Node) -> indexing.Index:
    return indexing.shape_of(node.args[0].meta["val"].shape)


def _out_shape(node: torch.fx.Node) -> indexing.Index:
    return indexing.shape_of(node.meta["val"].shape)


@_register(VIEWS, aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(k, node, index, mask):
    in_index = indexing.reshape_index(index, _in_shape(node), _out_shape(node))
    return k.value(node.args[0], in_index, mask)


@_register(VIEWS, aten.permute.default)
def _permute(k, node, index, mask):
    dims = [d % len(index) for d in node.args[1]]
    return k.value(node.args[0], indexing.permute_index(index, dims), mask)


@_register(VIEWS, aten.transpose.int)
def _transpose(k, node, index, mask):
    ndim = len(index)
    a, b = node.args[1] % ndim, node.args[2] % ndim
    swapped = list(index)
    swapped[a], swapped[b] = index[b], index[a]
    return k.value(node.args[0], tuple(swapped), mask)


@_register(VIEWS, aten.t.default)
def _t(k, node, index, mask):
    return k.value(node.args[0], tuple(reversed(index)), mask)


@_register(VIEWS, aten.expand.default)
def _expand(k, node, index, mask):
    return k.value(node.args[0], indexing.broadcast_index(index, _in_shape(node)), mask)


@_register(VIEWS, aten.unsqueeze.default)
def _unsqueeze(k, node, index, mask):
    dim = node.args[1] % len(index)
    return k.value(node.args[0], index[:dim] + index[dim + 1 :], mask)


@_register(VIEWS, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(k, node, index, mask):
    in_shape = _in_shape(node)
    if node.target == aten.squeeze.default:
        dims = [d for d, s in enumerate(in_shape) if s == 1]
    else:
        raw = node.args[1]
        dims = [d % max(1, len(in_shape)) for d in (raw if isinstance(raw, (list, tuple)) else [raw])]
        dims = [d for d in dims if in_shape[d] == 1]
    it = iter(index)
    return k.value(node.args[0], tuple(sympy.Integer(0) if d in dims else next(it) for d in range(len(in_shape))), mask)


@_register(VIEWS, aten.slice.Tensor)
def _slice(k, node, index, mask):
    in_shape = _in_shape(node)
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(in_shape)
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    length = indexing.as_expr(node.meta["val"].shape[dim])
    start = _slice_start(start, end, step, node.args[0].meta["val"].shape[dim], length)
    moved = list(index)
    moved[dim] = start + indexing.as_expr(step) * index[dim]
    return k.value(node.args[0], tuple(moved), mask)


def _slice_start(start, end, step, size, length) -> sympy.Expr:
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


def _selected(node: torch.fx.Node, dim_arg: int) -> tuple[int, sympy.Expr]:
    """(dim, position) of a select or select_scatter, a negative position counted from the end."""
    in_shape = _in_shape(node)
    dim = node.args[dim_arg] % len(in_shape)
    position = indexing.as_expr(node.args[dim_arg + 1])
    if position.is_number and position < 0:
        position = position + in_shape[dim]
    return dim, position


@_register(VIEWS, aten.select.int)
def _select(k, node, index, mask):
    dim, position = _selected(node, 1)
    return k.value(node.args[0], index[:dim] + (position,) + index[dim:], mask)


# -- reductions --------------------------------------------------------------------------------


def reduction_dims(node: torch.fx.Node) -> tuple[int, ...]:
    """The dimensions of its input that a reduction node reduces."""
    ndim = node.args[0].meta["val"].dim()
    if node.target in (aten.sum.default, aten.mean.default, aten.any.default):
        return tuple(range(ndim))
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None or dims == []:
        return tuple(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return tuple(sorted({d % max(1, ndim) for d in dims}))


def _keepdim(node: torch.fx.Node) -> bool:
    return node.meta["val"].dim() == node.args[0].meta["val"].dim() and node.meta["val"].dim() > 0


def _reduction(kind: str, finish=None):
    def lower(k, node, index, mask):
        k.check_outer_index(node, index, _keepdim(node))
        out = _out_dtype(node)
        source = node.args[0]

        def body():
            value = k.value(source, k.full_index())
            if node.target in (aten.any.dim, aten.any.dims, aten.any.default):
                return k.emit(f"({value.name} != 0).to(tl.int32)", torch.int32)
            return k.to_compute(value, out) if out.is_floating_point else value

        result = k.reduce((node, kind), kind, body)
        if finish is not None:
            result = finish(k, node, result)
        return k.to_compute(result, out)

    return lower


def _mean_finish(k, node, total):
    # parenthesized: a symbolic count prints as a product (s0*s1), and a / s0*s1 is (a / s0) * s1
    return k.emit(f"{total.name} / ({k.index_token(k.rnumel)})", total.dtype)


def _any_finish(k, node, total):
    return k.emit(f"{total.name} > 0", torch.bool)


REDUCTIONS[aten.sum.dim_IntList] = _reduction("sum")
REDUCTIONS[aten.sum.default] = _reduction("sum")
REDUCTIONS[aten.mean.dim] = _reduction("sum", _mean_finish)
REDUCTIONS[aten.mean.default] = _reduction("sum", _mean_finish)
REDUCTIONS[aten.amax.default] = _reduction("max")
REDUCTIONS[aten.amin.default] = _reduction("min")
REDUCTIONS[aten.max.default] = _reduction("max")  # x.max(): over all dims, no indices
REDUCTIONS[aten.min.default] = _reduction("min")
REDUCTIONS[aten.any.dim] = _reduction("max", _any_finish)
REDUCTIONS[aten.any.dims] = _reduction("max", _any_finish)
REDUCTIONS[aten.any.default] = _reduction("max", _any_finish)


@_register(REDUCTIONS, aten.var.correction)
def _var(k, node, index, mask):
    """Two passes (mean, then squared deviations): exact where one-pass sum-of-squares is not."""
    k.check_outer_index(node, index, _keepdim(node))
    out = _out_dtype(node)
    correction = node.kwargs.get("correction", 1)
    correction = 1 if correction is None else correction
    source = node.args[0]
    total = k.reduce((node, "mean"), "sum", lambda: k.to_compute(k.value(source, k.full_index()), out))

    def squared():
        x = k.to_compute(k.value(source, k.full_index()), out)
        # emitted in the scope that reads it: a looped kernel computes it inside its own loop
        mean = k.emit(f"{total.name} / ({k.index_token(k.rnumel)})", total.dtype)
        d = k.emit(f"{x.name} - {mean.name}", x.dtype)
        return k.emit(f"{d.name} * {d.name}", x.dtype)

    spread = k.reduce((node, "var"), "sum", squared)
    if float(correction).is_integer():
        divisor = k.index_token(k.rnumel - int(correction))  # std passes correction=1.0
    else:
        divisor = f"({k.index_token(k.rnumel)} - {float(correction)!r})"
    return k.to_compute(k.emit(f"{spread.name} / tl.maximum({divisor}, 0)", spread.dtype), out)


# -- what may be lowered -----------------------------------------------------------------------


def is_host_scalar(val) -> bool:
    """A 0-dim CPU tensor (a lifted Python number): a GPU kernel takes its value as an argument."""
    return isinstance(val, torch.Tensor) and val.dim() == 0 and val.device.type == "cpu"


def classify(node: torch.fx.Node) -> str:
    """'pointwise' | 'view' | 'reduction' | 'extern' | 'symbolic' for a call_function node."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return "symbolic" if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)) else "extern"
    if val.dtype not in SUPPORTED_DTYPES or val.is_sparse or val.layout != torch.strided:
        return "extern"
    for arg in node.all_input_nodes:
        a = arg.meta.get("val")
        if isinstance(a, torch.Tensor) and (a.dtype not in SUPPORTED_DTYPES or (a.device != val.device and not is_host_scalar(a))):
            return "extern"
    if node.target in VIEWS:
        return "view"
    if node.target in REDUCTIONS:
        return "reduction"
    if node.target in POINTWISE and _pointwise_form_ok(node):
        return "pointwise"
    return "extern"


def _pointwise_form_ok(node: torch.fx.Node) -> bool:
    if node.target == aten.cat.default:
        return len(node.args[0]) <= 16  # a where-chain over many inputs reads worse than a copy
    if node.target == aten.index.Tensor:
        return all(i is None or i.meta["val"].dtype in (torch.int64, torch.int32) for i in node.args[1])
    if node.target == aten.copy.default:
        return node.args[0].meta["val"].shape == node.meta["val"].shape
    return True


GEMM_OPS = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default})


def is_gemm_or_attention(node: torch.fx.Node) -> bool:
    name = str(node.target)
    return node.target in GEMM_OPS or "scaled_dot_product" in name or "attention" in name

