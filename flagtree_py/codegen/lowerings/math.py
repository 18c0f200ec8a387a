"""Pointwise math: arithmetic, comparisons, unary functions, casts, constants and iotas."""

from __future__ import annotations

import torch
import torch.fx

from flagtree_py.codegen import indexing
from flagtree_py.codegen.indexing import LoweringError
from flagtree_py.codegen.lowerings.common import (
    aten,
    out_dtype,
    prims,
    promoted,
    register,
)
from flagtree_py.codegen.types import Value, compute_dtype, triton_dtype

TABLE: dict = {}

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
    aten.eq.Tensor: "==",
    aten.eq.Scalar: "==",
    aten.ne.Tensor: "!=",
    aten.ne.Scalar: "!=",
    aten.lt.Tensor: "<",
    aten.lt.Scalar: "<",
    aten.le.Tensor: "<=",
    aten.le.Scalar: "<=",
    aten.gt.Tensor: ">",
    aten.gt.Scalar: ">",
    aten.ge.Tensor: ">=",
    aten.ge.Scalar: ">=",
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
        (x, y), dtype = promoted(k, node, index, mask, [a, b])
        alpha = node.kwargs.get("alpha", rest[0] if rest else 1)
        if alpha != 1:
            y = k.emit(f"{y.name} * {k.to_compute(k.operand(alpha, index), dtype).name}", compute_dtype(dtype))
        out = out_dtype(node)
        text = fmt.format(x.name, y.name)
        if dtype == torch.bool and fmt == "{0} + {1}":
            text = f"{x.name} | {y.name}"  # True + True is True; a 1-bit add would wrap to False
        result = k.emit(text, compute_dtype(dtype))
        return k.to_compute(result, out)

    return lower


def _compare(op: str):
    def lower(k, node, index, mask):
        (x, y), _ = promoted(k, node, index, mask, node.args[:2])
        return k.emit(f"{x.name} {op} {y.name}", torch.bool)

    return lower


def _unary(fmt: str, float_only: bool, identity_on_integers: bool = False):
    def lower(k, node, index, mask):
        out = out_dtype(node)
        x = k.to_compute(k.operand(node.args[0], index, mask), out if float_only else node.args[0].meta["val"].dtype)
        if identity_on_integers and not x.dtype.is_floating_point:
            return k.to_compute(x, out)
        return k.to_compute(k.emit(fmt.format(x.name), x.dtype), out)

    return lower


for _target, _fmt in _BINARY.items():
    TABLE[_target] = _binary(_fmt)
for _target, _op in _COMPARE.items():
    TABLE[_target] = _compare(_op)
for _target, _fmt in _UNARY_FLOAT.items():
    TABLE[_target] = _unary(_fmt, float_only=True)
for _target, _fmt in _UNARY_SAME.items():
    TABLE[_target] = _unary(_fmt, float_only=False)
for _target, _fmt in _ROUNDING.items():
    TABLE[_target] = _unary(_fmt, float_only=False, identity_on_integers=True)


@register(TABLE, aten.div.Tensor, aten.div.Scalar)
def _div(k, node, index, mask):
    out = out_dtype(node)
    x, y = (k.to_compute(k.operand(a, index, mask), out) for a in node.args[:2])
    return k.emit(f"{x.name} / {y.name}", compute_dtype(out))


@register(TABLE, aten.div.Tensor_mode)
def _div_mode(k, node, index, mask):
    mode = node.kwargs.get("rounding_mode")
    (x, y), dtype = promoted(k, node, index, mask, node.args[:2])
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
        return k.emit(
            f"tl.where(({x.name} % {y.name} != 0) & (({x.name} < 0) != ({y.name} < 0)), {q.name} - 1, {q.name})", dtype
        )
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


@register(TABLE, aten.pow.Tensor_Scalar)
def _pow_scalar(k, node, index, mask):
    out = out_dtype(node)
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


@register(TABLE, aten.where.self)
def _where(k, node, index, mask):
    condition, a, b = node.args
    cond = k.to_compute(k.operand(condition, index, mask), torch.bool)
    out = out_dtype(node)
    x, y = (k.to_compute(k.operand(v, index, mask), out) for v in (a, b))
    return k.emit(f"tl.where({cond.name}, {x.name}, {y.name})", compute_dtype(out))


@register(TABLE, aten.clamp.default, aten.clamp.Tensor, aten.clamp_min.default, aten.clamp_max.default)
def _clamp(k, node, index, mask):
    out = out_dtype(node)
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


@register(TABLE, aten.gelu.default)
def _gelu(k, node, index, mask):
    out = out_dtype(node)
    x = k.to_compute(k.operand(node.args[0], index, mask), out).name
    approximate = node.args[1] if len(node.args) > 1 else node.kwargs.get("approximate", "none")
    if approximate == "tanh":
        # 0.5 * (1 + tanh(u)) == sigmoid(2u), u = sqrt(2/pi) * (x + 0.044715 x^3); libdevice's
        # tanh is missing under the interpreter
        return k.emit(f"{x} * tl.sigmoid(1.5957691216057308 * ({x} + 0.044715 * {x} * {x} * {x}))", compute_dtype(out))
    return k.emit(f"0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476))", compute_dtype(out))


@register(TABLE, aten.logical_not.default)
def _logical_not(k, node, index, mask):
    x = k.operand(node.args[0], index, mask)
    return k.emit(f"{x.name} == 0", torch.bool)


@register(TABLE, aten.isnan.default)
def _isnan(k, node, index, mask):
    x = k.operand(node.args[0], index, mask)
    return k.emit(f"{x.name} != {x.name}", torch.bool)


@register(TABLE, aten.sign.default)
def _sign(k, node, index, mask):
    x = k.operand(node.args[0], index, mask)
    return k.emit(f"({x.name} > 0).to({triton_dtype(x.dtype)}) - ({x.name} < 0).to({triton_dtype(x.dtype)})", x.dtype)


@register(TABLE, prims.convert_element_type.default, aten._to_copy.default)
def _convert(k, node, index, mask):
    source = node.args[0].meta["val"]
    out = out_dtype(node)
    if node.target == aten._to_copy.default and node.kwargs.get("device") not in (None, source.device):
        raise LoweringError("device copy")
    return k.convert(k.operand(node.args[0], index, mask), out)


@register(TABLE, aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default)
def _identity(k, node, index, mask):
    return k.operand(node.args[0], index, mask)


@register(TABLE, aten.copy.default)
def _copy(k, node, index, mask):
    return k.convert(k.operand(node.args[1], index, mask), out_dtype(node))


@register(TABLE, aten.full.default, aten.full_like.default, aten.scalar_tensor.default)
def _full(k, node, index, mask):
    fill = node.args[0] if node.target == aten.scalar_tensor.default else node.args[1]
    return k.constant(fill, out_dtype(node))


@register(TABLE, aten.arange.start_step, aten.arange.start, aten.arange.default)
def _arange(k, node, index, mask):
    args = list(node.args)
    if node.target == aten.arange.default:
        args = [0, args[0], 1]
    elif node.target == aten.arange.start:
        args = args + [1]
    start, _, step = args[0], args[1], args[2] if len(args) > 2 else 1
    out = out_dtype(node)
    if all(isinstance(v, (int, torch.SymInt)) for v in (start, step)):
        expr = indexing.as_expr(start) + indexing.as_expr(step) * index[0]
        return k.to_compute(k.symbolic(expr), out)
    position = k.symbolic(index[0])
    s, st = (k.to_compute(k.operand(v, index), out) for v in (start, step))
    return k.emit(f"{s.name} + {position.name}.to({triton_dtype(compute_dtype(out))}) * {st.name}", compute_dtype(out))
