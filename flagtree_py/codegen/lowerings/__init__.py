"""How each core aten op becomes Triton: pointwise math, data movement, views, reductions.

A lowering is `fn(builder, node, index, extra_mask) -> Value`: the node's value at `index`.
The tables below are assembled explicitly from one module per kind of op. An op missing from
them stays an extern aten call in the wrapper; `classify` also keeps extern the forms of a
listed op that its lowering does not handle.
"""

from __future__ import annotations

import torch
import torch.fx

from flagtree_py.codegen.lowerings import gather, math, reductions, views
from flagtree_py.codegen.lowerings.common import Lowering, aten
from flagtree_py.codegen.lowerings.reductions import reduction_dims
from flagtree_py.codegen.types import SUPPORTED_DTYPES

POINTWISE: dict[object, Lowering] = {**math.TABLE, **gather.TABLE}
VIEWS: dict[object, Lowering] = dict(views.TABLE)
REDUCTIONS: dict[object, Lowering] = dict(reductions.TABLE)

__all__ = ["POINTWISE", "REDUCTIONS", "VIEWS", "classify", "is_gemm_or_attention", "is_host_scalar", "reduction_dims"]


def is_host_scalar(val) -> bool:
    """A 0-dim CPU tensor (a lifted Python number): a GPU kernel takes its value as an argument."""
    return isinstance(val, torch.Tensor) and val.dim() == 0 and val.device.type == "cpu"


def classify(node: torch.fx.Node) -> str:
    """'pointwise' | 'view' | 'reduction' | 'extern' | 'symbolic' for a call_function node."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return (
            "symbolic" if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)) else "extern"
        )
    if val.dtype not in SUPPORTED_DTYPES or val.is_sparse or val.layout != torch.strided:
        return "extern"
    for arg in node.all_input_nodes:
        a = arg.meta.get("val")
        if isinstance(a, torch.Tensor) and (
            a.dtype not in SUPPORTED_DTYPES or (a.device != val.device and not is_host_scalar(a))
        ):
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
