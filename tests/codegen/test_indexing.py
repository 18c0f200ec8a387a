"""Index arithmetic: reshape maps, loop merging, printing."""

from __future__ import annotations

import itertools

import sympy
import torch

from flagtree_py.codegen import indexing

s = sympy.Symbol("s0", integer=True, positive=True)
x0, x1, x2 = sympy.symbols("x0 x1 x2", integer=True, nonnegative=True)


def _check_reshape(in_sizes, out_sizes):
    """Every output position maps to the element torch.reshape puts there."""
    source = torch.arange(int(torch.tensor(in_sizes).prod())).reshape(in_sizes)
    out = source.reshape(out_sizes)
    variables = sympy.symbols(f"v0:{len(out_sizes)}", integer=True, nonnegative=True)
    mapped = indexing.reshape_index(tuple(variables), indexing.shape_of(in_sizes), indexing.shape_of(out_sizes))
    for position in itertools.product(*(range(n) for n in out_sizes)):
        values = dict(zip(variables, position))
        in_position = tuple(int(e.subs(values)) for e in mapped)
        assert source[in_position] == out[position]


def test_reshape_splits_and_merges():
    _check_reshape([6, 4], [24])
    _check_reshape([24], [2, 3, 4])
    _check_reshape([2, 3, 4], [6, 4])
    _check_reshape([2, 3, 4], [2, 12])
    _check_reshape([1, 6, 1, 4], [6, 2, 2])
    _check_reshape([4, 6], [2, 2, 3, 2])


def test_reshape_of_symbolic_sizes_needs_no_division_when_merging():
    merged = indexing.reshape_index((x0,), (s, sympy.Integer(64)), (s * 64,))
    assert merged == (indexing.FloorDiv(x0, 64), indexing.ModularIndexing(x0, 1, 64))
    split = indexing.reshape_index((x0, x1), (s * 64,), (s, sympy.Integer(64)))
    assert split == (64 * x0 + x1,)


def test_merge_loop_dims_collapses_contiguous_dims_only():
    sizes = [s, sympy.Integer(4), sympy.Integer(16)]
    merged_sizes, variables, exprs = indexing.merge_loop_dims(sizes, [x0, x1, x2], [64 * x0 + 16 * x1 + x2])
    assert len(variables) == 1 and sympy.expand(merged_sizes[0] - 64 * s) == 0 and exprs == [variables[0]]
    # a transposed read keeps the dimensions apart
    _, variables, _ = indexing.merge_loop_dims(sizes, [x0, x1, x2], [64 * x0 + 16 * x1 + x2, 16 * s * x1 + 16 * x0 + x2])
    assert len(variables) == 3


def test_printing_keeps_precedence():
    assert indexing.pexpr(indexing.FloorDiv(x0, s * 64)) == "x0 // (64*s0)"
    assert indexing.pexpr(indexing.ModularIndexing(x0 + 1, 16, 4)) == "((x0 + 1) // 16) % 4"
    decode = indexing.unflatten("xindex", [s, sympy.Integer(2), sympy.Integer(32)], indexing.pexpr)
    assert decode == ["xindex // 64", "(xindex // 32) % 2", "xindex % 32"]
    decode = indexing.unflatten("xindex", [sympy.Integer(3), s, sympy.Integer(8)], indexing.pexpr)
    assert decode == ["xindex // (8*s0)", "(xindex // 8) % s0", "xindex % 8"]
