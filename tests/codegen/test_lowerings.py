"""Every lowering in codegen/lowerings.py, compiled with torch.compile(backend="flagtree").

Each case is a small function, the aten ops it must exercise, and a maker of fresh random
inputs of a size n. `test_static` compiles it for n=5; `test_dynamic` compiles it with symbolic
sizes, runs n=5 then n=7 and asserts one compilation served both. Both compare with eager and
assert that the named ops ran inside Triton kernels (conftest.py says exactly what is checked).
Ops that torch.compile never hands to flagtree (core decompositions rewrite them first) are
compiled from an aten graph traced without decompositions. `test_every_lowering_is_covered`
keeps this file in step with the lowering tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

import flagtree_py
from flagtree_py.codegen.lowerings import POINTWISE, REDUCTIONS, VIEWS

aten = torch.ops.aten
NAN = float("nan")
# longer than the interpreter target's persistent_reduction_limit (16384): reduced in a loop
LONG_ROW = 20_000


# -- inputs: fresh random values from the case's generator; n is the size that varies ----------


def randn(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=g).to(dtype)


def positive(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=g) * 2 + 0.1


def ints(g: torch.Generator, *shape: int, low: int = -9, high: int = 10) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=g)


def nonzero_ints(g: torch.Generator, *shape: int) -> torch.Tensor:
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    return torch.randint(1, 6, shape, generator=g) * sign


def bools(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=g) > 0.5


def with_nans(g: torch.Generator, *shape: int) -> torch.Tensor:
    x = randn(g, *shape)
    x[torch.rand(shape, generator=g) < 0.25] = NAN
    x.view(-1)[0] = NAN  # at least one
    return x


def with_zeros(g: torch.Generator, *shape: int) -> torch.Tensor:
    return randn(g, *shape) * (torch.rand(shape, generator=g) > 0.3)


# -- cases ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    fn: Callable
    inputs: Callable[[torch.Generator, int], tuple]
    ops: tuple[str, ...]  # aten ops ("aten.exp.default") that must run in a kernel
    dynamic: bool = True  # whether a symbolic n makes sense
    exact: bool = False  # bit-exact comparison (casts)
    looped: bool = False  # must produce a looped (non-persistent) reduction
    marks: tuple = field(default=(), compare=False)  # for both variants
    dynamic_marks: tuple = field(default=(), compare=False)


def case(name: str, fn: Callable, inputs: Callable, *ops: str, **options) -> Case:
    return Case(name, fn, inputs, tuple(ops), **options)


def x3(g, n):
    return (randn(g, 3, n),)


UNARY = [
    case("exp", torch.exp, x3, "aten.exp.default"),
    case("exp2", torch.exp2, x3, "aten.exp2.default"),
    case("log", torch.log, lambda g, n: (positive(g, 3, n),), "aten.log.default"),
    case("log2", torch.log2, lambda g, n: (positive(g, 3, n),), "aten.log2.default"),
    case("sqrt", torch.sqrt, lambda g, n: (positive(g, 3, n),), "aten.sqrt.default"),
    case("rsqrt", torch.rsqrt, lambda g, n: (positive(g, 3, n),), "aten.rsqrt.default"),
    case("sin", torch.sin, lambda g, n: (randn(g, 3, n) * 4,), "aten.sin.default"),
    case("cos", torch.cos, lambda g, n: (randn(g, 3, n) * 4,), "aten.cos.default"),
    case("sigmoid", torch.sigmoid, lambda g, n: (randn(g, 3, n) * 4,), "aten.sigmoid.default"),
    case("tanh", torch.tanh, lambda g, n: (randn(g, 3, n) * 3,), "aten.tanh.default"),
    case("erf", torch.erf, x3, "aten.erf.default"),
    case("abs", torch.abs, x3, "aten.abs.default"),
    case("neg", torch.neg, x3, "aten.neg.default"),
    case("relu", torch.relu, x3, "aten.relu.default"),
    case("relu_nan", torch.relu, lambda g, n: (with_nans(g, 3, n),), "aten.relu.default"),
    case("floor", torch.floor, lambda g, n: (randn(g, 3, n) * 4,), "aten.floor.default"),
    case("ceil", torch.ceil, lambda g, n: (randn(g, 3, n) * 4,), "aten.ceil.default"),
    case("trunc", torch.trunc, lambda g, n: (randn(g, 3, n) * 4,), "aten.trunc.default"),
    case("reciprocal", torch.reciprocal, x3, "aten.reciprocal.default"),
    case("sign", torch.sign, lambda g, n: (with_zeros(g, 3, n),), "aten.sign.default"),
    # silu reaches flagtree decomposed; aten.silu itself is checked in ATEN_GRAPH_CASES
    case("silu", F.silu, x3, "aten.sigmoid.default", "aten.mul.Tensor"),
    case("gelu", F.gelu, lambda g, n: (randn(g, 3, n) * 3,), "aten.gelu.default"),
    case("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), lambda g, n: (randn(g, 3, n) * 3,), "aten.gelu.default"),
    case("isnan", torch.isnan, lambda g, n: (with_nans(g, 3, n),), "aten.isnan.default"),
    case("logical_not", torch.logical_not, lambda g, n: (ints(g, 3, n, low=-2, high=3),), "aten.logical_not.default"),
    case("bitwise_not_int", torch.bitwise_not, lambda g, n: (ints(g, 3, n),), "aten.bitwise_not.default"),
    case("bitwise_not_bool", torch.bitwise_not, lambda g, n: (bools(g, 3, n),), "aten.bitwise_not.default"),
    case("exp_of_int", torch.exp, lambda g, n: (ints(g, 3, n),), "aten.exp.default"),
    case("sigmoid_of_int", torch.sigmoid, lambda g, n: (ints(g, 3, n),), "aten.sigmoid.default"),
    case("exp_f16", torch.exp, lambda g, n: (randn(g, 3, n, dtype=torch.float16),), "aten.exp.default"),
    case("tanh_f16", torch.tanh, lambda g, n: (randn(g, 3, n, dtype=torch.float16),), "aten.tanh.default"),
    *[
        case(f"{op.__name__}_of_int", op, lambda g, n: (ints(g, 3, n),), f"aten.{op.__name__}.default")
        for op in (torch.abs, torch.neg, torch.relu, torch.sign, torch.floor, torch.ceil, torch.trunc)
    ],
]

_FLOOR_EDGES = (torch.tensor([1.0, -1.0, 0.3, 7.0, 5.0, -5.0, 0.0]), torch.tensor([0.1, 0.1, 0.1, 0.7, -0.1, 0.3, -2.0]))


def _with_floor_edges(g, n):
    """Random operands plus quotients that round up to a whole number in float32 (1.0 / 0.1)."""
    return torch.cat([_FLOOR_EDGES[0], randn(g, n) * 8]), torch.cat([_FLOOR_EDGES[1], randn(g, n)])


def _pow(exponent, base=positive):
    # under dynamic=True Dynamo traces an int exponent from this closure as a SymInt (except 0
    # and 1): test_dynamic then checks the symbolic-exponent path, test_static the constant one
    return case(f"pow_{exponent}_{base.__name__}", lambda x: x**exponent, lambda g, n: (base(g, 3, n),), "aten.pow.Tensor_Scalar")


BINARY = [
    case("add_broadcast", lambda a, b: a + b, lambda g, n: (randn(g, 3, n), randn(g, n)), "aten.add.Tensor"),
    case("add_alpha", lambda a, b: torch.add(a, b, alpha=2.5), lambda g, n: (randn(g, 3, n), randn(g, n)), "aten.add.Tensor"),
    case("sub_alpha", lambda a, b: torch.sub(a, b, alpha=3), lambda g, n: (randn(g, 3, n), randn(g, 3, 1)), "aten.sub.Tensor"),
    case("add_python_scalar", lambda a: a + 2.5, x3, "aten.add.Tensor"),
    case("rsub", lambda a: 2 - a, x3, "aten.sub.Tensor"),
    case("mul_broadcast", lambda a, b: a * b, lambda g, n: (randn(g, 3, n), randn(g, 3, 1)), "aten.mul.Tensor"),
    case("add_int_int", lambda a, b: a + b, lambda g, n: (ints(g, 3, n), ints(g, n)), "aten.add.Tensor"),
    case("add_int_float", lambda a, b: a + b, lambda g, n: (ints(g, 3, n), randn(g, 3, n)), "aten.add.Tensor"),
    case("mul_int_by_float", lambda a: a * 1.5, lambda g, n: (ints(g, 3, n),), "aten.mul.Tensor"),
    case("mul_bool_by_int", lambda a: a * 2, lambda g, n: (bools(g, 3, n),), "aten.mul.Tensor"),
    case("add_bools", lambda a, b: a + b, lambda g, n: (bools(g, 3, n), bools(g, 3, n)), "aten.add.Tensor"),
    case("add_f16_f32", lambda a, b: a + b, lambda g, n: (randn(g, 3, n, dtype=torch.float16), randn(g, n)), "aten.add.Tensor"),
    # a 0-dim float32 tensor does not promote a float16 tensor: the sum stays float16
    case("add_f16_0dim_f32", lambda a, b: a + b, lambda g, n: (randn(g, 3, n, dtype=torch.float16), randn(g)), "aten.add.Tensor"),
    case("add_Scalar", lambda a: aten.add.Scalar(a, 2.5), x3, "aten.add.Scalar"),
    case("sub_Scalar", lambda a: aten.sub.Scalar(a, 2), x3, "aten.sub.Scalar"),
    case("mul_Scalar", lambda a: aten.mul.Scalar(a, 3), x3, "aten.mul.Scalar"),
    case("div_Scalar", lambda a: aten.div.Scalar(a, 3), x3, "aten.div.Scalar"),
    case("div_broadcast", lambda a, b: a / b, lambda g, n: (randn(g, 3, n), positive(g, n)), "aten.div.Tensor"),
    case("div_python_scalar", lambda a: a / 3, x3, "aten.div.Tensor"),
    case("div_ints", lambda a, b: a / b, lambda g, n: (ints(g, 3, n), nonzero_ints(g, 3, n)), "aten.div.Tensor"),
    case("floor_divide_ints", lambda a, b: torch.div(a, b, rounding_mode="floor"),
         lambda g, n: (ints(g, 3, n), nonzero_ints(g, 3, n)), "aten.div.Tensor_mode"),
    case("trunc_divide_ints", lambda a, b: torch.div(a, b, rounding_mode="trunc"),
         lambda g, n: (ints(g, 3, n), nonzero_ints(g, 3, n)), "aten.div.Tensor_mode"),
    case("floor_divide_int_by_scalar", lambda a: a // -4, lambda g, n: (ints(g, 3, n),), "aten.div.Tensor_mode"),
    case("trunc_divide_int_by_scalar", lambda a: torch.div(a, 3, rounding_mode="trunc"), lambda g, n: (ints(g, 3, n),), "aten.div.Tensor_mode"),
    case("floor_divide_floats", lambda a, b: torch.div(a, b, rounding_mode="floor"), _with_floor_edges, "aten.div.Tensor_mode"),
    case("trunc_divide_floats", lambda a, b: torch.div(a, b, rounding_mode="trunc"), _with_floor_edges, "aten.div.Tensor_mode"),
    case("maximum_nan", torch.maximum, lambda g, n: (with_nans(g, 3, n), with_nans(g, n)), "aten.maximum.default"),
    case("minimum_nan", torch.minimum, lambda g, n: (with_nans(g, 3, n), with_nans(g, n)), "aten.minimum.default"),
    case("maximum_int", torch.maximum, lambda g, n: (ints(g, 3, n), ints(g, 3, n)), "aten.maximum.default"),
    *[_pow(e) for e in (2, 3, -1, 0.5, -0.5, 1.7, 0, 4, -2)],
    _pow(3, base=randn),  # a negative base with an integer exponent keeps its sign
    _pow(1.7, base=randn),  # ... with a fractional one it is NaN, as in eager
    # literal exponents stay constants under dynamic=True (an integer base needs one)
    case("pow_2_ints", lambda x: x**2, lambda g, n: (ints(g, 3, n),), "aten.pow.Tensor_Scalar"),
    case("pow_3_ints", lambda x: x**3, lambda g, n: (ints(g, 3, n),), "aten.pow.Tensor_Scalar"),
    _pow(0, base=with_nans),  # nan ** 0 == 1
    case("pow_even_size", lambda a: a ** (a.shape[-1] - 3), x3, "aten.pow.Tensor_Scalar"),
    case("pow_odd_size", lambda a: a ** (a.shape[-1] - 2), x3, "aten.pow.Tensor_Scalar"),
]

_CMP = {"eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge}


def _small_ints(g, n):
    return ints(g, 3, n, low=-2, high=3), ints(g, n, low=-2, high=3)  # equal elements occur


COMPARE_LOGICAL = [
    *[case(f"{name}_Tensor", op, _small_ints, f"aten.{name}.Tensor") for name, op in _CMP.items()],
    *[case(f"{name}_Scalar", (lambda op: lambda a: op(a, 1))(op), lambda g, n: (ints(g, 3, n, low=-2, high=3),),
           f"aten.{name}.Scalar") for name, op in _CMP.items()],
    case("lt_float_Scalar", lambda a: a < 0.5, x3, "aten.lt.Scalar"),
    case("ge_float_Tensor", lambda a, b: a >= b, lambda g, n: (randn(g, 3, n), randn(g, n)), "aten.ge.Tensor"),
    case("lt_int_vs_float", lambda a: a < 0.5, lambda g, n: (ints(g, 3, n),), "aten.lt.Scalar"),
    case("eq_int_vs_float_tensor", lambda a, b: a == b, lambda g, n: (ints(g, 3, n, low=0, high=2), ints(g, 3, n, low=0, high=2).float()), "aten.eq.Tensor"),
    *[case(f"bitwise_{name}_Tensor_int", op, lambda g, n: (ints(g, 3, n), ints(g, n)), f"aten.bitwise_{name}.Tensor")
      for name, op in (("and", torch.bitwise_and), ("or", torch.bitwise_or), ("xor", torch.bitwise_xor))],
    *[case(f"bitwise_{name}_Tensor_bool", op, lambda g, n: (bools(g, 3, n), bools(g, 3, n)), f"aten.bitwise_{name}.Tensor")
      for name, op in (("and", torch.bitwise_and), ("or", torch.bitwise_or), ("xor", torch.bitwise_xor))],
    case("bitwise_and_Scalar", lambda a: a & 5, lambda g, n: (ints(g, 3, n),), "aten.bitwise_and.Scalar"),
    case("bitwise_or_Scalar", lambda a: a | 4, lambda g, n: (ints(g, 3, n),), "aten.bitwise_or.Scalar"),
    case("bitwise_xor_Scalar", lambda a: a ^ 3, lambda g, n: (ints(g, 3, n),), "aten.bitwise_xor.Scalar"),
    case("bitwise_and_Scalar_bool", lambda a: a & True, lambda g, n: (bools(g, 3, n),), "aten.bitwise_and.Scalar"),
    case("logical_and", torch.logical_and, lambda g, n: (bools(g, 3, n), bools(g, n)), "aten.logical_and.default"),
    case("logical_or_ints", torch.logical_or, lambda g, n: (ints(g, 3, n, low=-1, high=2), ints(g, 3, n, low=-1, high=2)), "aten.logical_or.default"),
    case("logical_xor_mixed", torch.logical_xor, lambda g, n: (with_zeros(g, 3, n), ints(g, 3, n, low=-1, high=2)), "aten.logical_xor.default"),
]

WHERE_CLAMP = [
    case("where", torch.where, lambda g, n: (bools(g, 3, n), randn(g, 3, n), randn(g, n)), "aten.where.self"),
    case("where_scalar", lambda c, a: torch.where(c, a, 0.5), lambda g, n: (bools(g, 3, n), randn(g, 3, n)),
         "aten.where.self", "aten.scalar_tensor.default"),
    case("where_int_float", torch.where, lambda g, n: (bools(g, 3, n), ints(g, 3, n), randn(g, 3, n)), "aten.where.self"),
    case("where_int_scalar", lambda c, a: torch.where(c, a, -1), lambda g, n: (bools(g, 3, n), ints(g, 3, n)), "aten.where.self"),
    case("clamp", lambda a: a.clamp(-0.5, 0.5), x3, "aten.clamp.default"),
    case("clamp_min_only", lambda a: a.clamp(min=-0.5), x3, "aten.clamp.default"),
    case("clamp_max_only", lambda a: torch.clamp_max(a, 0.5), x3, "aten.clamp.default"),
    case("clamp_nan", lambda a: a.clamp(-0.5, 0.5), lambda g, n: (with_nans(g, 3, n),), "aten.clamp.default"),
    case("clamp_int", lambda a: a.clamp(-3, 3), lambda g, n: (ints(g, 3, n),), "aten.clamp.default"),
    case("clamp_int_float_bounds", lambda a: a.clamp(-2.5, 3.5), lambda g, n: (ints(g, 3, n),), "aten.clamp.default"),
    case("clamp_Tensor", torch.clamp, lambda g, n: (randn(g, 3, n), -positive(g, n), positive(g, 3, 1)), "aten.clamp.Tensor"),
]


def _cast(name, dtype, make):
    return case(name, lambda a: a.to(dtype), make, "aten._to_copy.default", exact=True)


CASTS = [
    # scaled so that most values need rounding to float16
    _cast("f32_to_f16", torch.float16, lambda g, n: (randn(g, 3, n) * 3,)),
    _cast("f16_to_f32", torch.float32, lambda g, n: (randn(g, 3, n, dtype=torch.float16),)),
    _cast("f32_to_i64", torch.int64, lambda g, n: (randn(g, 3, n) * 10,)),  # truncates toward zero
    _cast("f32_to_i32", torch.int32, lambda g, n: (randn(g, 3, n) * 10,)),
    _cast("i64_to_f32", torch.float32, lambda g, n: (ints(g, 3, n),)),
    _cast("f32_to_bool", torch.bool, lambda g, n: (with_zeros(g, 3, n),)),
    _cast("bool_to_f32", torch.float32, lambda g, n: (bools(g, 3, n),)),
    _cast("i64_to_bool", torch.bool, lambda g, n: (ints(g, 3, n, low=-1, high=2),)),
    _cast("bool_to_i64", torch.int64, lambda g, n: (bools(g, 3, n),)),
    _cast("f16_to_i64", torch.int64, lambda g, n: (randn(g, 3, n, dtype=torch.float16) * 10,)),
    _cast("i64_to_f16", torch.float16, lambda g, n: (ints(g, 3, n, low=-5000, high=5000),)),  # above 2048: rounds
    _cast("f16_to_bool", torch.bool, lambda g, n: (with_zeros(g, 3, n).half(),)),
    _cast("bool_to_f16", torch.float16, lambda g, n: (bools(g, 3, n),)),
    case("convert_element_type", lambda a: torch.ops.prims.convert_element_type.default(a, torch.float16),
         lambda g, n: (randn(g, 3, n) * 3,), "prims.convert_element_type.default", exact=True),
    # the rounding to float16 must happen inside the kernel, before the arithmetic that follows
    case("f16_round_trip", lambda a: a.half().float() * 2, lambda g, n: (randn(g, 3, n) * 3,),
         "aten._to_copy.default", "aten.mul.Tensor", exact=True),
    case("f16_arithmetic", lambda a: (a * 3).to(torch.float16) + 1, x3, "aten._to_copy.default", "aten.add.Tensor", exact=True),
]

FACTORIES = [
    case("arange", lambda a: a + torch.arange(a.shape[-1], device=a.device), x3, "aten.arange.start_step"),
    case("arange_start_step", lambda a: a * torch.arange(2, 2 * a.shape[-1] + 2, 2, device=a.device), x3, "aten.arange.start_step"),
    case("arange_float", lambda a: a + torch.arange(0.5, 3.0, 0.5, device=a.device), x3, "aten.arange.start_step", dynamic=False),
    case("arange_alone", lambda: torch.arange(7) * 2, lambda g, n: (), "aten.arange.start_step", dynamic=False),
    case("full", lambda a: a + torch.full((a.shape[0], 1), 2.5, device=a.device), x3, "aten.full.default"),
    case("full_alone", lambda: torch.full((2, 3), 1.5), lambda g, n: (), "aten.full.default", dynamic=False),
    case("zeros", lambda a: a + torch.zeros(a.shape[-1], device=a.device), x3, "aten.full.default"),
    case("ones", lambda a: a * torch.ones(a.shape[0], 1, device=a.device), x3, "aten.full.default"),
    case("new_full", lambda a: a.new_full((a.shape[-1],), 3.0) - a, x3, "aten.full.default"),
    case("full_like", lambda a: torch.full_like(a, 7.0) - a, x3, "aten.full_like.default"),
    case("zeros_like", lambda a: torch.zeros_like(a) + a, x3, "aten.full_like.default"),
    case("ones_like_int", lambda a: torch.ones_like(a, dtype=torch.int64) + a, lambda g, n: (ints(g, 3, n),), "aten.full_like.default"),
    # a tensor literal is a constant of fixed size: no symbolic n
    case("lift_fresh_copy", lambda a: a + torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], device=a.device), x3, "aten.lift_fresh_copy.default", dynamic=False),
]

GATHERS = [
    case("embedding", lambda w, i: F.embedding(i, w) * 2, lambda g, n: (randn(g, 10, n), ints(g, 2, 3, low=0, high=10)),
         "aten.embedding.default"),
    case("embedding_alone", lambda w, i: F.embedding(i, w), lambda g, n: (randn(g, n, 4), ints(g, 3, low=0, high=n)),
         "aten.embedding.default"),
    case("index_select_dim1", lambda a, i: a.index_select(1, i) + 1, lambda g, n: (randn(g, 3, n), ints(g, 4, low=0, high=n)),
         "aten.index_select.default"),
    case("index_select_dim0", lambda a, i: a.index_select(0, i), lambda g, n: (randn(g, n, 3), ints(g, 4, low=0, high=n)),
         "aten.index_select.default"),
    case("index_select_0dim_index", lambda a, i: a.index_select(1, i), lambda g, n: (randn(g, 3, n), ints(g, low=0, high=n)),
         "aten.index_select.default"),
    case("index_rows_negative", lambda a, i: a[i] * 2, lambda g, n: (randn(g, n, 3), ints(g, 4, low=-n, high=n)), "aten.index.Tensor"),
    case("index_columns_negative", lambda a, i: a[:, i] * 2, lambda g, n: (randn(g, 3, n), ints(g, 4, low=-n, high=n)),
         "aten.index.Tensor"),
    case("index_2d_indices", lambda a, i: a[i], lambda g, n: (randn(g, n, 3), ints(g, 2, 3, low=-n, high=n)), "aten.index.Tensor"),
    case("index_pair", lambda a, i, j: a[i, j], lambda g, n: (randn(g, 3, n), ints(g, 4, low=-3, high=3), ints(g, 4, low=-n, high=n)),
         "aten.index.Tensor"),
    case("index_not_adjacent", lambda a, i, j: a[i, :, j],
         lambda g, n: (randn(g, 3, n, 4), ints(g, 2, low=-3, high=3), ints(g, 2, low=-4, high=4)), "aten.index.Tensor"),
    case("gather_dim1", lambda a, i: torch.gather(a, 1, i), lambda g, n: (randn(g, 3, n), ints(g, 3, 4, low=0, high=n)),
         "aten.gather.default"),
    case("gather_dim0", lambda a, i: torch.gather(a, 0, i) * 2, lambda g, n: (randn(g, n, 3), ints(g, 2, 3, low=0, high=n)),
         "aten.gather.default"),
    # the index may be smaller than the source in the other dims too
    case("gather_last_dim_3d", lambda a, i: torch.gather(a, -1, i), lambda g, n: (randn(g, 2, 3, n), ints(g, 2, 2, 4, low=0, high=n)),
         "aten.gather.default"),
]


def _setitem(a, b):
    y = a.clone()
    y[:, 1:3] = b
    return y * 2


CAT_PAD_SCATTER = [
    case("cat_three_last_dim", lambda a, b, c: torch.cat([a, b, c], -1),
         lambda g, n: (randn(g, 3, n), randn(g, 3, 2), randn(g, 3, n + 1)), "aten.cat.default"),
    case("cat_dim0", lambda a, b: torch.cat([a, b], 0) * 2, lambda g, n: (randn(g, n, 3), randn(g, 2, 3)), "aten.cat.default"),
    case("cat_int_and_float", lambda a, b: torch.cat([a, b], 1), lambda g, n: (randn(g, 3, n), ints(g, 3, 2)), "aten.cat.default"),
    case("pad_last_dim", lambda a: F.pad(a, (1, 2)), x3, "aten.constant_pad_nd.default"),
    case("pad_two_dims_value", lambda a: F.pad(a, (1, 2, 2, 0), value=3.5), lambda g, n: (randn(g, 2, 3, n),),
         "aten.constant_pad_nd.default"),
    case("pad_negative_crops", lambda a: F.pad(a, (-1, 2)), x3, "aten.constant_pad_nd.default"),
    case("slice_scatter_step", lambda a, b: torch.slice_scatter(a, b, 1, 1, None, 2),
         lambda g, n: (randn(g, 3, n), randn(g, 3, n // 2)), "aten.slice_scatter.default"),
    case("slice_scatter_negative_start", lambda a, b: torch.slice_scatter(a, b, -1, -3),
         lambda g, n: (randn(g, 3, n), randn(g, 3, 3)), "aten.slice_scatter.default"),
    case("slice_scatter_dim0", lambda a, b: torch.slice_scatter(a, b, 0, 1, 3) + 1,
         lambda g, n: (randn(g, n, 3), randn(g, 2, 3)), "aten.slice_scatter.default"),
    case("setitem_on_clone", _setitem, lambda g, n: (randn(g, 3, n), randn(g, 3, 2)),
         "aten.slice_scatter.default", "aten.copy.default", "aten.clone.default"),
    case("clone_of_transpose", lambda a: a.t().contiguous(), x3, "aten.clone.default"),
]


def z3(g, n):
    return (randn(g, 2, n, 4),)


VIEW_CASES = [
    case("view_merge", lambda a: a.reshape(-1, 4) * 2, z3, "aten.view.default"),
    case("view_flatten", lambda a: a.reshape(-1) * 2, z3, "aten.view.default"),
    case("view_split_static_dim", lambda a: a.view(a.shape[0], 2, 4) + 1, lambda g, n: (randn(g, n, 8),), "aten.view.default"),
    case("view_split_symbolic_dim", lambda a: a.view(2, -1, 4) + 1, lambda g, n: (randn(g, 2 * n, 4),), "aten.view.default"),
    case("view_regroup", lambda a: a.view(4, 6) + 1, lambda g, n: (randn(g, 6, 4),), "aten.view.default", dynamic=False),
    case("reshape_after_permute", lambda a: a.permute(2, 0, 1).reshape(a.shape[2], -1) + 1, z3,
         "aten.permute.default", "aten.view.default"),
    case("permute", lambda a: a.permute(2, 0, 1) * 2, z3, "aten.permute.default"),
    case("permute_negative_dims", lambda a: a.permute(-1, 0, 1) * 2, z3, "aten.permute.default"),
    case("transpose", lambda a: a.transpose(0, 2) + 1, z3, "aten.permute.default"),
    case("transpose_negative_dims", lambda a: a.transpose(-1, -2) + 1, z3, "aten.permute.default"),
    case("t", lambda a: a.t() * 2, x3, "aten.permute.default"),
    case("t_plus_tensor", lambda a, b: a.t() + b, lambda g, n: (randn(g, 3, n), randn(g, n, 3)), "aten.permute.default"),
    case("mT", lambda a: a.mT * 2, z3, "aten.permute.default"),
    case("expand", lambda a: a.expand(3, -1) * 2, lambda g, n: (randn(g, n),), "aten.expand.default"),
    case("expand_middle", lambda a: a.unsqueeze(1).expand(-1, 4, -1) + 1, x3, "aten.unsqueeze.default", "aten.expand.default"),
    case("unsqueeze", lambda a: a.unsqueeze(1) * 2, x3, "aten.unsqueeze.default"),
    case("unsqueeze_negative", lambda a: a.unsqueeze(-1) * 2, x3, "aten.unsqueeze.default"),
    case("squeeze_dim", lambda a: a.squeeze(1) * 2, lambda g, n: (randn(g, 3, 1, n),), "aten.squeeze.dims"),
    case("squeeze_all", lambda a: a.squeeze() * 2, lambda g, n: (randn(g, 1, 3, 1, n),), "aten.squeeze.dims"),
    case("squeeze_dims_tuple", lambda a: a.squeeze((0, 2)) * 2, lambda g, n: (randn(g, 1, 3, 1, n),), "aten.squeeze.dims"),
    case("squeeze_not_one", lambda a: a.squeeze(0) * 2, x3, "aten.squeeze.dims"),
    case("slice_step", lambda a: a[:, 1::2] * 2, x3, "aten.slice.Tensor"),
    case("slice_negative_start", lambda a: a[:, -3:] * 2, x3, "aten.slice.Tensor"),
    case("slice_negative_end", lambda a: a[1:-1, :-2] + 1, x3, "aten.slice.Tensor"),
    case("slice_step_negative_start", lambda a: a[::2, -4::3] + 1, x3, "aten.slice.Tensor"),
    case("slice_end_past_size", lambda a: a[:, 2:100] + 1, x3, "aten.slice.Tensor"),
    case("slice_start_before_zero", lambda a: a[:, -100:2] + 1, x3, "aten.slice.Tensor"),
    case("select", lambda a: a[1] * 2, x3, "aten.select.int"),
    case("select_negative", lambda a: a[:, -2] * 2, x3, "aten.select.int"),
    case("select_negative_symbolic_dim", lambda a: a[-1] * 2, lambda g, n: (randn(g, n, 3),), "aten.select.int"),
    case("select_middle", lambda a: a[:, 1, :] + 1, z3, "aten.select.int"),
    # unbind yields one output per row: its length is the size, which Dynamo must specialize
    case("unbind", lambda a: a.unbind(1)[2] * 2, x3, "aten.slice.Tensor", "aten.squeeze.dims", dynamic=False),
]

_SOFTMAX = ("aten.amax.default", "aten.sub.Tensor", "aten.exp.default", "aten.sum.dim_IntList", "aten.div.Tensor")
_LOG_SOFTMAX = ("aten.amax.default", "aten.sub.Tensor", "aten.exp.default", "aten.sum.dim_IntList", "aten.log.default")

REDUCTION_CASES = [
    case("sum_last", lambda a: a.sum(-1), x3, "aten.sum.dim_IntList"),
    case("sum_keepdim", lambda a: a.sum(-1, keepdim=True), x3, "aten.sum.dim_IntList"),
    case("sum_dim0", lambda a: a.sum(0), x3, "aten.sum.dim_IntList"),
    case("sum_middle", lambda a: a.sum(1), z3, "aten.sum.dim_IntList"),
    case("sum_middle_keepdim_then_mul", lambda a: a.sum(1, keepdim=True) * 2, z3, "aten.sum.dim_IntList", "aten.mul.Tensor"),
    case("sum_all", lambda a: a.sum(), z3, "aten.sum.dim_IntList"),
    case("sum_two_dims", lambda a: a.sum((0, 2)), z3, "aten.sum.dim_IntList"),
    case("sum_int", lambda a: a.sum(-1), lambda g, n: (ints(g, 3, n),), "aten.sum.dim_IntList"),
    case("sum_int32_to_int64", lambda a: a.sum(-1), lambda g, n: (ints(g, 3, n).int(),), "aten.sum.dim_IntList"),
    case("sum_bool", lambda a: a.sum(-1), lambda g, n: (bools(g, 3, n),), "aten.sum.dim_IntList"),
    case("sum_f16", lambda a: a.sum(-1), lambda g, n: (randn(g, 3, n, dtype=torch.float16),), "aten.sum.dim_IntList"),
    case("sum_int_as_float", lambda a: a.sum(-1, dtype=torch.float32), lambda g, n: (ints(g, 3, n),), "aten.sum.dim_IntList"),
    case("mean_last", lambda a: a.mean(-1), x3, "aten.mean.dim"),
    case("mean_all", lambda a: a.mean(), z3, "aten.mean.default"),
    case("mean_dim0_keepdim", lambda a: a.mean(0, keepdim=True), z3, "aten.mean.dim"),
    case("amax_last", lambda a: a.amax(-1), x3, "aten.amax.default"),
    case("amin_dim0", lambda a: a.amin(0), x3, "aten.amin.default"),
    case("amax_all", lambda a: a.amax(), z3, "aten.amax.default"),
    case("amax_int", lambda a: a.amax(-1), lambda g, n: (ints(g, 3, n),), "aten.amax.default"),
    case("amin_keepdim", lambda a: a.amin(1, keepdim=True), z3, "aten.amin.default"),
    case("max_all", lambda a: a.max(), z3, "aten.max.default"),
    case("min_all", lambda a: a.min(), z3, "aten.min.default"),
    case("var_correction0", lambda a: a.var(-1, correction=0), x3, "aten.var.correction"),
    case("var_correction1", lambda a: a.var(-1), x3, "aten.var.correction"),
    case("var_dim0", lambda a: a.var(0, correction=0), lambda g, n: (randn(g, n, 3),), "aten.var.correction"),
    case("var_all", lambda a: a.var(), z3, "aten.var.correction"),
    case("var_middle_keepdim", lambda a: a.var(1, keepdim=True, correction=0), z3, "aten.var.correction"),
    case("std", lambda a: a.std(-1), x3, "aten.var.correction", "aten.sqrt.default"),  # correction=1.0, a float
    case("any_last", lambda a: a.any(-1), lambda g, n: (bools(g, 3, n),), "aten.any.dim"),
    case("any_all", lambda a: a.any(), lambda g, n: (torch.rand(3, n, generator=g) > 0.9,), "aten.any.default"),
    case("any_int_dim0", lambda a: a.any(0), lambda g, n: (ints(g, 3, n, low=-1, high=2),), "aten.any.dim"),
    case("any_two_dims", lambda a: (a > 1).any((0, 2)), z3, "aten.any.dims", "aten.gt.Scalar"),
    case("all_last", lambda a: a.all(-1), lambda g, n: (torch.rand(3, n, generator=g) > 0.1,), "aten.any.dim", "aten.logical_not.default"),
    case("softmax_last", lambda a: a.softmax(-1), x3, *_SOFTMAX),
    case("softmax_dim0", lambda a: a.softmax(0), x3, *_SOFTMAX),
    case("softmax_middle", lambda a: a.softmax(1), z3, *_SOFTMAX),
    case("log_softmax_last", lambda a: a.log_softmax(-1), x3, *_LOG_SOFTMAX),
    case("log_softmax_dim0", lambda a: a.log_softmax(0), z3, *_LOG_SOFTMAX),
    case("softmax_f16", lambda a: a.softmax(-1), lambda g, n: (randn(g, 3, n, dtype=torch.float16),), *_SOFTMAX),
    case("rms_norm", lambda a: a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6), x3,
         "aten.pow.Tensor_Scalar", "aten.mean.dim", "aten.add.Tensor", "aten.rsqrt.default", "aten.mul.Tensor"),
    *[
        case(f"{name}_nan", fn, lambda g, n: (with_nans(g, 3, n),), op)
        for name, fn, op in (("amax", lambda a: a.amax(-1), "aten.amax.default"),
                             ("amin", lambda a: a.amin(-1), "aten.amin.default"))
    ],
]


def long_rows(g, n):
    return (randn(g, 2, LONG_ROW + n),)


LOOPED = [
    case("looped_sum", lambda a: a.sum(-1), long_rows, "aten.sum.dim_IntList", looped=True),
    case("looped_softmax", lambda a: a.softmax(-1), long_rows, *_SOFTMAX, looped=True),
    case("looped_log_softmax", lambda a: a.log_softmax(-1), long_rows, *_LOG_SOFTMAX, looped=True),
    case("looped_var", lambda a: a.var(-1), long_rows, "aten.var.correction", looped=True),
    case("looped_amax", lambda a: a.amax(-1), long_rows, "aten.amax.default", looped=True),
    case("looped_mean_centered", lambda a: a - a.mean(-1, keepdim=True), long_rows, "aten.mean.dim", "aten.sub.Tensor", looped=True),
]

CASES = UNARY + BINARY + COMPARE_LOGICAL + WHERE_CLAMP + CASTS + FACTORIES + GATHERS + CAT_PAD_SCATTER + VIEW_CASES
CASES += REDUCTION_CASES + LOOPED


def _params(dynamic: bool) -> list:
    chosen = [c for c in CASES if c.dynamic or not dynamic]
    return [pytest.param(c, id=c.name, marks=c.marks + (c.dynamic_marks if dynamic else ())) for c in chosen]


@pytest.mark.parametrize("case", _params(dynamic=False))
def test_static(case: Case, check_lowered) -> None:
    check_lowered(case.fn, case.inputs, case.ops, exact=case.exact, looped=case.looped, seed=case.name)


@pytest.mark.parametrize("case", _params(dynamic=True))
def test_dynamic(case: Case, check_lowered) -> None:
    check_lowered(case.fn, case.inputs, case.ops, dynamic=True, exact=case.exact, looped=case.looped, seed=case.name)


# -- ops that torch.compile decomposes before flagtree sees them --------------------------------

ATEN_GRAPH_CASES = [
    case("select_scatter", lambda a, b, c: (aten.select_scatter.default(a, b, 0, -1), aten.select_scatter.default(a, c, 1, 2) * 2),
         lambda g, n: (randn(g, 3, n), randn(g, n), randn(g, 3)), "aten.select_scatter.default"),
    case("transpose_int", lambda a: (aten.transpose.int(a, 0, 1) * 2,), x3, "aten.transpose.int"),
    case("t_default", lambda a: (aten.t.default(a) + 1,), x3, "aten.t.default"),
    case("squeeze_dim", lambda a: (aten.squeeze.dim(a, 1) * 2,), lambda g, n: (randn(g, 3, 1, n),), "aten.squeeze.dim"),
    case("squeeze_default", lambda a: (aten.squeeze.default(a) * 2,), lambda g, n: (randn(g, 1, 3, 1, n),), "aten.squeeze.default"),
    case("unsafe_view", lambda a: (aten._unsafe_view.default(a, [3 * a.shape[1]]) + 1,), x3, "aten._unsafe_view.default"),
    case("arange_default", lambda a: (a + aten.arange.default(a.shape[-1]),), x3, "aten.arange.default"),
    case("arange_start", lambda a: (a * aten.arange.start(2, a.shape[-1] + 2),), x3, "aten.arange.start"),
    case("sum_default", lambda a: (aten.sum.default(a),), x3, "aten.sum.default"),
    case("clamp_min", lambda a: (aten.clamp_min.default(a, 0.1),), lambda g, n: (with_nans(g, 3, n),), "aten.clamp_min.default"),
    case("clamp_max", lambda a: (aten.clamp_max.default(a, 0.1),), x3, "aten.clamp_max.default"),
    case("silu", lambda a: (aten.silu.default(a),), x3, "aten.silu.default"),
    case("any_dims", lambda a: (aten.any.dims(a, [0, 1]),), lambda g, n: (bools(g, 3, n),), "aten.any.dims"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in ATEN_GRAPH_CASES])
def test_aten_graph(case: Case, check_aten_graph) -> None:
    check_aten_graph(case.fn, case.inputs, case.ops, seed=case.name)


# table entries no test can reach, and why
UNREACHABLE = {
    "aten.reshape.default": "CompositeImplicitAutograd: every trace records view or _unsafe_view instead",
    "aten.alias.default": "remove_noop_views drops it before partitioning",
}


def _op_name(target) -> str:
    return f"{target.namespace}.{target._overloadpacket.__name__}.{target._overloadname}"


def test_every_lowering_is_covered() -> None:
    table = {_op_name(t) for t in (*POINTWISE, *VIEWS, *REDUCTIONS)}
    covered = {op for c in CASES + ATEN_GRAPH_CASES for op in c.ops}
    assert not covered & set(UNREACHABLE)
    assert table - covered - set(UNREACHABLE) == set(), "lowerings without a test"
    assert set(UNREACHABLE) <= table, "stale UNREACHABLE entries"


# -- report bookkeeping --------------------------------------------------------------------------


def test_folded_views_are_not_counted_as_wrapper_views(check_lowered) -> None:
    record = check_lowered(lambda a: a.view(6, 4) * 2, lambda g, n: (randn(g, 2, 3, 4),), ["aten.view.default"])
    assert (record["views_folded"], record["views_in_wrapper"]) == (1, 0)


def test_report_counts_recompilations() -> None:
    """test_dynamic detects a recompilation by the number of report records: one per graph."""
    compiled = torch.compile(lambda a: a * 2, backend="flagtree", dynamic=False)
    with torch.no_grad():
        compiled(torch.randn(3))
        compiled(torch.randn(4))  # static: a new size is a new graph
    assert len(flagtree_py.report()) == 2
