"""Reductions: sum, mean, amax/amin, any, var; the builder places them in loops or rows."""

from __future__ import annotations

import torch
import torch.fx

from flagtree_py.codegen.lowerings.common import aten, out_dtype, register

TABLE: dict = {}


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


def _reduction(kind: str, finish=None):
    def lower(k, node, index, mask):
        out = out_dtype(node)
        source = node.args[0]
        source_index = k.row_source_index(node, index, reduction_dims(node))

        def body():
            value = k.value(source, source_index)
            if node.target in (aten.any.dim, aten.any.dims, aten.any.default):
                return k.emit(f"({value.name} != 0).to(tl.int32)", torch.int32)
            return k.to_compute(value, out) if out.is_floating_point else value

        result = k.reduce((node, kind, source_index), kind, body)
        if finish is not None:
            result = finish(k, node, result)
        return k.to_compute(result, out)

    return lower


def _mean_finish(k, node, total):
    # parenthesized: a symbolic count prints as a product (s0*s1), and a / s0*s1 is (a / s0) * s1
    return k.emit(f"{total.name} / ({k.index_token(k.rnumel)})", total.dtype)


def _any_finish(k, node, total):
    return k.emit(f"{total.name} > 0", torch.bool)


TABLE[aten.sum.dim_IntList] = _reduction("sum")
TABLE[aten.sum.default] = _reduction("sum")
TABLE[aten.mean.dim] = _reduction("sum", _mean_finish)
TABLE[aten.mean.default] = _reduction("sum", _mean_finish)
TABLE[aten.amax.default] = _reduction("max")
TABLE[aten.amin.default] = _reduction("min")
TABLE[aten.max.default] = _reduction("max")  # x.max(): over all dims, no indices
TABLE[aten.min.default] = _reduction("min")
TABLE[aten.any.dim] = _reduction("max", _any_finish)
TABLE[aten.any.dims] = _reduction("max", _any_finish)
TABLE[aten.any.default] = _reduction("max", _any_finish)


@register(TABLE, aten.var.correction)
def _var(k, node, index, mask):
    """Two passes (mean, then squared deviations): exact where one-pass sum-of-squares is not."""
    out = out_dtype(node)
    source_index = k.row_source_index(node, index, reduction_dims(node))
    correction = node.kwargs.get("correction", 1)
    correction = 1 if correction is None else correction
    source = node.args[0]
    total = k.reduce((node, "mean", source_index), "sum", lambda: k.to_compute(k.value(source, source_index), out))

    def squared():
        x = k.to_compute(k.value(source, source_index), out)
        # emitted in the scope that reads it: a looped kernel computes it inside its own loop
        mean = k.emit(f"{total.name} / ({k.index_token(k.rnumel)})", total.dtype)
        d = k.emit(f"{x.name} - {mean.name}", x.dtype)
        return k.emit(f"{d.name} * {d.name}", x.dtype)

    spread = k.reduce((node, "var", source_index), "sum", squared)
    if float(correction).is_integer():
        divisor = k.index_token(k.rnumel - int(correction))  # std passes correction=1.0
    else:
        divisor = f"({k.index_token(k.rnumel)} - {float(correction)!r})"
    return k.to_compute(k.emit(f"{spread.name} / tl.maximum({divisor}, 0)", spread.dtype), out)
