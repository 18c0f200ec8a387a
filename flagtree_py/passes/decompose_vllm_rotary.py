"""vLLM's in-place rotary kernel (`torch.ops._C.rotary_embedding`, neox) -> the aten ops of its PyTorch form.

With vLLM's custom ops on (`custom_ops` "all" or "+rotary_embedding"), `RotaryEmbedding.forward_cuda` calls
`_C.rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)`, which rotates q and k in
place; functionalized, it reaches flagtree as `auto_functionalized_v2(_C.rotary_embedding, ...)` whose
outputs are the rotated bases of q and k. As an extern it would cut the q/k norm from its rotary and cost
its own launches. This pass writes it as `RotaryEmbedding.forward_static`'s ops (the form vLLM hands over
with custom ops off, see patterns.match_neox_rotary), so fuse_qk_norm_rope / fuse_rope take it like that.

Only what can be proven the same is rewritten: neox style, no offset, not inverse, a 1-D positions tensor,
cos_sin_cache in q's dtype, and q and k each their whole contiguous base (or a reshape of it). Anything
else stays vLLM's kernel. The op is recognized by its schema name: nothing here imports vLLM.
"""

from __future__ import annotations

import contextlib
import operator

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor

from flagtree_py.passes import PassContext

aten = torch.ops.aten
_SCHEMA_NAME = "_C::rotary_embedding"


def _rotary_call(node: torch.fx.Node) -> torch._ops.OpOverload | None:
    """The vLLM rotary op under `node`, when `node` is auto_functionalized(_v2) of it."""
    if node.op != "call_function" or node.target not in _FUNCTIONALIZED or not node.args:
        return None
    op = node.args[0]
    schema = getattr(op, "_schema", None)
    return op if schema is not None and schema.name == _SCHEMA_NAME else None


_FUNCTIONALIZED = (torch.ops.higher_order.auto_functionalized, torch.ops.higher_order.auto_functionalized_v2)


def _operands(node: torch.fx.Node) -> dict | None:
    """{"query": base, "key": base or None, "outputs": {getitem index: "query" | "key"}} or None."""
    kwargs = node.kwargs
    found, outputs = {}, {}
    v2 = node.target is torch.ops.higher_order.auto_functionalized_v2
    for position, name in enumerate(("query", "key")):
        if v2:
            index = kwargs.get(f"_{name}_base_index")
            if index is None:
                if name == "query":
                    return None
                found[name] = None
                continue
            base = kwargs["_all_bases"][index]
            if 1 + index in outputs or not _whole_base(kwargs, name, base):
                return None  # q and k slices of one base (e.g. of the qkv GEMM's output): stays vLLM's kernel
            outputs[1 + index] = name
        else:
            base = kwargs.get(name)
            if base is None and name == "key":
                found[name] = None
                continue
            outputs[1 + position] = name
        if not isinstance(base, torch.fx.Node) or not isinstance(base.meta.get("val"), torch.Tensor):
            return None
        found[name] = base
    return {**found, "outputs": outputs}


def _whole_base(kwargs: dict, name: str, base) -> bool:
    """The mutated argument is all of its contiguous base, viewed as is or reshaped (no offset, no gaps)."""
    val = base.meta.get("val") if isinstance(base, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor) or not val.is_contiguous():
        return False
    view_keys = {key for key in kwargs if key.startswith(f"_{name}_")} - {f"_{name}_base_index"}
    if not view_keys <= {f"_{name}_size", f"_{name}_stride", f"_{name}_storage_offset"}:
        return False  # another way to regenerate the view (a slice of the base, an alias...)
    size = kwargs.get(f"_{name}_size")
    if size is None:
        return True  # the argument is the base itself
    if kwargs.get(f"_{name}_storage_offset") not in (0, None):
        return False
    sizes = [s.meta.get("val") if isinstance(s, torch.fx.Node) else s for s in size]
    expected = torch._prims_common.make_contiguous_strides_for(sizes) if sizes else ()
    strides = [s.meta.get("val") if isinstance(s, torch.fx.Node) else s for s in kwargs[f"_{name}_stride"]]
    same = str(tuple(strides)) == str(tuple(expected))
    # the same elements: sizes and base shape agree on the leading (token) size and the rest's product
    return same and str(sizes[0]) == str(val.shape[0]) and _product(sizes[1:]) == _product(val.shape[1:])


def _product(sizes) -> int | None:
    total = 1
    for size in sizes:
        if not isinstance(size, int):
            return None
        total *= size
    return total


class _Emitter:
    """Adds aten nodes before `anchor`, each with its meta["val"] computed on the fake values."""

    def __init__(self, graph: torch.fx.Graph, anchor: torch.fx.Node, fake_mode) -> None:
        self.graph, self.anchor, self.fake_mode = graph, anchor, fake_mode

    def __call__(self, op, *args) -> torch.fx.Node:
        values = [a.meta["val"] if isinstance(a, torch.fx.Node) else
                  [x.meta["val"] if isinstance(x, torch.fx.Node) else x for x in a] if isinstance(a, list) else a
                  for a in args]
        with self.fake_mode if self.fake_mode is not None else contextlib.nullcontext():
            val = op(*values)
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(op, tuple(args))
        node.meta["val"] = val
        return node


def _rotate(emit: _Emitter, base: torch.fx.Node, cos, sin, head_size: int, rotary_dim: int) -> torch.fx.Node | None:
    """forward_static on one base: [T, ...] viewed as [T, heads, head_size], the neox halves, the pass part."""
    val = base.meta["val"]
    per_token = _product(val.shape[1:])
    if per_token is None or per_token % head_size or rotary_dim > head_size:
        return None
    half = rotary_dim // 2
    x = emit(aten.view.default, base, [-1, per_token // head_size, head_size])
    x1 = emit(aten.slice.Tensor, x, -1, 0, half)
    x2 = emit(aten.slice.Tensor, x, -1, half, rotary_dim)
    first = emit(aten.sub.Tensor, emit(aten.mul.Tensor, x1, cos), emit(aten.mul.Tensor, x2, sin))
    second = emit(aten.add.Tensor, emit(aten.mul.Tensor, x2, cos), emit(aten.mul.Tensor, x1, sin))
    rotated = emit(aten.cat.default, [first, second], -1)
    rotated = emit(aten.cat.default, [rotated, emit(aten.slice.Tensor, x, -1, rotary_dim, head_size)], -1)
    return emit(aten.view.default, rotated, [-1, *val.shape[1:]])


def _decompose(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    kwargs = node.kwargs
    if not kwargs.get("is_neox") or kwargs.get("rope_dim_offset", 0) != 0 or kwargs.get("inverse", False):
        return False
    operands = _operands(node)
    positions, cache, head_size = kwargs.get("positions"), kwargs.get("cos_sin_cache"), kwargs.get("head_size")
    if operands is None or not isinstance(positions, torch.fx.Node) or not isinstance(cache, torch.fx.Node):
        return False
    query, cache_val = operands["query"].meta["val"], cache.meta.get("val")
    if positions.meta["val"].dim() != 1 or not isinstance(cache_val, torch.Tensor) or cache_val.dim() != 2:
        return False
    rotary_dim = cache_val.shape[-1]
    if cache_val.dtype != query.dtype or not isinstance(rotary_dim, int) or rotary_dim % 2 or not isinstance(head_size, int):
        return False
    if any(u.target is not operator.getitem for u in node.users):
        return False
    fake = query if isinstance(query, FakeTensor) else None
    emit = _Emitter(graph, node, fake.fake_mode if fake is not None else None)
    table = emit(aten.index_select.default, cache, 0, positions)
    cos = emit(aten.unsqueeze.default, emit(aten.slice.Tensor, table, -1, 0, rotary_dim // 2), -2)
    sin = emit(aten.unsqueeze.default, emit(aten.slice.Tensor, table, -1, rotary_dim // 2, rotary_dim), -2)
    rotated = {}
    for name in ("query", "key"):
        if operands[name] is not None:
            rotated[name] = _rotate(emit, operands[name], cos, sin, head_size, rotary_dim)
            if rotated[name] is None:
                return False  # the nodes emitted so far are dead: eliminate_dead_code removes them
    for user in list(node.users):
        name = operands["outputs"].get(user.args[1])
        if name is not None:
            user.replace_all_uses_with(rotated[name])
        if not user.users:
            graph.erase_node(user)
    if not node.users:
        graph.erase_node(node)
    return True


def decompose_vllm_rotary(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    done = 0
    for node in list(graph.nodes):
        if _rotary_call(node) is not None and _decompose(graph, node):
            done += 1
    ctx.counters["decompose_vllm_rotary"] += done
    return done > 0
