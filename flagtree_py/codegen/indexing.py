"""Index arithmetic in sympy: view ops as index maps, loop simplification, printing.

Every tensor value a kernel computes is addressed by a tuple of sympy expressions, one per
dimension. A view (permute, expand, reshape, slice...) is a function from the output's index
tuple to the input's; a load turns an index tuple into a flat offset with the buffer's strides.
Sizes may be symbolic (the shape environment's symbols, e.g. ``s50`` for a sequence length), so
everything here works on sympy expressions, never on Python ints alone.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import sympy
from torch.utils._sympy.functions import (
    CeilDiv,
    CleanDiv,
    FloorDiv,
    IntTrueDiv,
    Max,
    Min,
    Mod,
    ModularIndexing,
    PythonMod,
)

Index = tuple[sympy.Expr, ...]


class LoweringError(Exception):
    """This node (or group) cannot be lowered to Triton; the caller falls back to aten."""


def size_text(value) -> str:
    """A size (int or SymInt) as printed text: an int's own digits, without building a sympy expression; a
    symbolic size's expression, printed once per expression (printing sympy is slow, and a graph repeats the
    same few sizes on every node)."""
    return str(value) if type(value) is int else _expression_text(as_expr(value))


_expression_text = functools.lru_cache(maxsize=4096)(str)


def as_expr(value) -> sympy.Expr:
    """An int, SymInt or sympy expression as a sympy expression."""
    if isinstance(value, sympy.Basic):
        return value
    if isinstance(value, bool):
        return sympy.Integer(int(value))
    if isinstance(value, int):
        return sympy.Integer(value)
    node = getattr(value, "node", None)
    if node is not None and hasattr(node, "expr"):
        return sympy.sympify(node.expr)
    raise LoweringError(f"not an integer size: {value!r}")


def shape_of(sizes) -> Index:
    return tuple(as_expr(s) for s in sizes)


def numel(sizes: Sequence[sympy.Expr]) -> sympy.Expr:
    return sympy.Mul(*sizes) if sizes else sympy.Integer(1)


def same(a: sympy.Expr, b: sympy.Expr) -> bool:
    """Symbolic equality that does not call sympy.simplify (too slow for every node)."""
    return a == b or sympy.expand(a - b) == 0


def _same_numel(a: sympy.Expr, b: sympy.Expr) -> bool:
    """Equality of two products of a reshape's sizes (see `_exact`); only valid there."""
    return a == b or sympy.expand(_exact(a) - _exact(b)) == 0


def _exact(e: sympy.Expr) -> sympy.Expr:
    """Sizes as exact quotients: a reshape to (2, s // 2) is only valid (and guarded by
    Dynamo) when 2 divides s, so there 2 * (s // 2) is s."""
    return sympy.sympify(e).replace(FloorDiv, lambda a, b: a / b)


def flat_offset(index: Index, strides: Sequence[sympy.Expr]) -> sympy.Expr:
    return sympy.Add(*(i * s for i, s in zip(index, strides, strict=True)))


# ---------------------------------------------------------------------------------------------
# Views: each maps the output index to the input index.


def broadcast_index(index: Index, in_sizes: Sequence[sympy.Expr]) -> Index:
    """Index into an input that is broadcast (numpy rules) to a larger output."""
    lead = len(index) - len(in_sizes)
    if lead < 0:
        raise LoweringError("broadcast to fewer dimensions")
    return tuple(sympy.Integer(0) if size == 1 else i for i, size in zip(index[lead:], in_sizes))


def permute_index(index: Index, dims: Sequence[int]) -> Index:
    out = [sympy.Integer(0)] * len(dims)
    for position, dim in enumerate(dims):
        out[dim] = index[position]
    return tuple(out)


def reshape_index(index: Index, in_sizes: Index, out_sizes: Index) -> Index:
    """Map an index of the reshaped output back to the input.

    Dimensions are matched in groups whose products agree, so that a reshape that only splits
    or merges some dimensions keeps the others untouched and yields no division where none is
    needed (merging heads back into hidden is a multiply-add, not a div/mod).
    """
    in_dims = [d for d in range(len(in_sizes)) if in_sizes[d] != 1]
    out_dims = [d for d in range(len(out_sizes)) if out_sizes[d] != 1]
    result: list[sympy.Expr] = [sympy.Integer(0)] * len(in_sizes)
    i = j = 0
    while i < len(in_dims) or j < len(out_dims):
        group_in, group_out = [], []
        prod_in, prod_out = sympy.Integer(1), sympy.Integer(1)
        while True:
            if group_in and group_out and _same_numel(prod_in, prod_out):
                break
            grow_in = not group_in or (not _same_numel(prod_in, prod_out) and _smaller(prod_in, prod_out))
            if grow_in and i < len(in_dims):
                group_in.append(in_dims[i])
                prod_in = prod_in * in_sizes[in_dims[i]]
                i += 1
            elif j < len(out_dims):
                group_out.append(out_dims[j])
                prod_out = prod_out * out_sizes[out_dims[j]]
                j += 1
            elif i < len(in_dims):
                group_in.append(in_dims[i])
                prod_in = prod_in * in_sizes[in_dims[i]]
                i += 1
            else:
                raise LoweringError(f"cannot match reshape {tuple(out_sizes)} -> {tuple(in_sizes)}")
        linear = sympy.Integer(0)
        for d in group_out:
            linear = linear * out_sizes[d] + index[d]
        if len(group_in) == 1:
            result[group_in[0]] = linear
            continue
        inner = numel([in_sizes[d] for d in group_in])
        for position, d in enumerate(group_in):
            inner = _div(inner, in_sizes[d])
            if position == 0:
                result[d] = FloorDiv(linear, inner) if inner != 1 else linear
            else:
                result[d] = ModularIndexing(linear, inner, in_sizes[d])
    return tuple(result)


def _div(a: sympy.Expr, b: sympy.Expr) -> sympy.Expr:
    quotient = sympy.cancel(_exact(a) / _exact(b))
    if quotient.is_Integer or quotient.free_symbols and sympy.fraction(quotient)[1] == 1:
        return quotient
    if quotient.is_Rational is False or quotient.free_symbols:
        # e.g. s/2 from a split of s into (2, s // 2): the guarded exact division
        numerator, denominator = sympy.fraction(sympy.factor(quotient))
        if denominator.is_Integer:
            return FloorDiv(numerator, denominator)
    raise LoweringError(f"reshape sizes do not divide: {a} / {b}")


def _smaller(a: sympy.Expr, b: sympy.Expr) -> bool:
    """Whether a product of sizes is (known to be) smaller than another; symbolic: compare hints."""
    a, b = _exact(a), _exact(b)
    difference = sympy.expand(b - a)
    if difference.is_number:
        return bool(difference > 0)
    quotient = sympy.cancel(b / a)
    if sympy.fraction(quotient)[1] == 1:  # a divides b exactly: b is the larger one
        return True
    return False


# ---------------------------------------------------------------------------------------------
# Loop simplification


def merge_loop_dims(
    sizes: list[sympy.Expr],
    variables: list[sympy.Symbol],
    expressions: list[sympy.Expr],
) -> tuple[list[sympy.Expr], list[sympy.Symbol], list[sympy.Expr]]:
    """Collapse adjacent iteration dimensions that every index expression walks contiguously.

    Dimension k (outer) and k+1 merge when each expression is linear in both variables with
    coeff(k) == coeff(k+1) * size(k+1). A pointwise kernel over a contiguous [B, S, H] tensor
    then indexes with one flat variable instead of three div/mod chains.
    """
    sizes, variables = list(sizes), list(variables)
    substitution = {v: sympy.Integer(0) for v, s in zip(variables, sizes) if s == 1}
    if substitution:
        expressions = [e.subs(substitution) for e in expressions]
        kept = [(s, v) for s, v in zip(sizes, variables) if s != 1]
        sizes, variables = [s for s, _ in kept], [v for _, v in kept]
    changed = True
    while changed and len(variables) > 1:
        changed = False
        for k in range(len(variables) - 1):
            outer, inner = variables[k], variables[k + 1]
            coefficients = [_linear_coefficients(e, (outer, inner)) for e in expressions]
            if any(c is None for c in coefficients):
                continue
            if not all(same(c[0], c[1] * sizes[k + 1]) for c in coefficients):
                continue
            merged = inner  # reuse the inner variable's symbol for the merged dimension
            expressions = [
                e.subs({outer: 0, inner: 0}) + c[1] * merged
                for e, c in zip(expressions, coefficients)
            ]
            sizes[k : k + 2] = [sizes[k] * sizes[k + 1]]
            variables[k : k + 2] = [merged]
            changed = True
            break
    return sizes, variables, expressions


def _linear_coefficients(expr: sympy.Expr, variables: tuple[sympy.Symbol, ...]):
    """Coefficients of ``variables`` if ``expr`` is linear in them, else None."""
    expanded = sympy.expand(expr)
    coefficients = []
    for v in variables:
        coefficient = expanded.coeff(v, 1)
        if coefficient.free_symbols & set(variables):
            return None
        coefficients.append(coefficient)
    rest = expanded - sum(c * v for c, v in zip(coefficients, variables))
    if sympy.expand(rest).free_symbols & set(variables):
        return None
    return coefficients


def unflatten(flat: str, sizes: list[sympy.Expr], printer) -> list[str]:
    """Python/Triton expressions recovering each dimension's variable from a flat index."""
    def atom(e):
        text = printer(e)
        return text if e.is_Symbol or e.is_Integer else f"({text})"

    out, inner = [], sympy.Integer(1)
    for position in range(len(sizes) - 1, -1, -1):
        if position == 0:
            out.append(flat if inner == 1 else f"{flat} // {atom(inner)}")
        elif inner == 1:
            out.append(f"{flat} % {atom(sizes[position])}")
        else:
            out.append(f"({flat} // {atom(inner)}) % {atom(sizes[position])}")
        inner = inner * sizes[position]
    return list(reversed(out))


# ---------------------------------------------------------------------------------------------
# Printing


def pexpr(expr) -> str:
    """Print an integer sympy expression as Python (also valid Triton for integer tensors)."""
    return _print(sympy.sympify(expr))


def _print(e: sympy.Expr) -> str:
    if e.is_Integer:
        return str(int(e))
    if e.is_Symbol:
        return e.name
    if isinstance(e, sympy.Add):
        terms = sorted(e.args, key=_term_order)
        text = _print(terms[0])
        for term in terms[1:]:
            coefficient, rest = term.as_coeff_Mul()
            if coefficient.is_Number and coefficient < 0:
                text += " - " + _print(-term)
            else:
                text += " + " + _print(term)
        return text
    if isinstance(e, sympy.Mul):
        coefficient, rest = e.as_coeff_Mul()
        if coefficient == -1:
            return "-" + _paren(rest)
        factors = sorted(sympy.Mul.make_args(rest), key=sympy.default_sort_key)
        text = "*".join(_paren(f) for f in factors)
        return text if coefficient == 1 else f"{_paren(coefficient)}*{text}"
    if isinstance(e, sympy.Pow) and e.exp.is_Integer and e.exp > 0:
        return "*".join([_paren(e.base)] * int(e.exp))
    if isinstance(e, FloorDiv):
        return f"{_paren(e.args[0])} // {_paren(e.args[1])}"
    if isinstance(e, (CleanDiv, IntTrueDiv)):
        return f"{_paren(e.args[0])} // {_paren(e.args[1])}"
    if isinstance(e, CeilDiv):
        return f"-((-{_paren(e.args[0])}) // {_paren(e.args[1])})"
    if isinstance(e, ModularIndexing):
        base, divisor, modulus = e.args
        inner = _paren(base) if divisor == 1 else f"({_paren(base)} // {_paren(divisor)})"
        return f"{inner} % {_paren(modulus)}"
    if isinstance(e, (Mod, PythonMod, sympy.Mod)):
        return f"{_paren(e.args[0])} % {_paren(e.args[1])}"
    if isinstance(e, Max):
        return f"max({', '.join(_print(a) for a in e.args)})"
    if isinstance(e, Min):
        return f"min({', '.join(_print(a) for a in e.args)})"
    if e.is_Rational:
        raise LoweringError(f"non-integer index expression {e}")
    raise LoweringError(f"cannot print index expression {e} ({type(e).__name__})")


def _paren(e: sympy.Expr) -> str:
    text = _print(e)
    if e.is_Symbol or (e.is_Integer and e >= 0) or isinstance(e, (ModularIndexing,)):
        return text if not isinstance(e, ModularIndexing) else f"({text})"
    return f"({text})"


def _term_order(term: sympy.Expr):
    # variables of the innermost dimension first reads naturally: x0 + 64*x1 + 4096*x2
    return (term.is_number, sympy.default_sort_key(term))
