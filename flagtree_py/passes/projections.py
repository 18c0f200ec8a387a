"""Shared by merge_qkv and merge_gate_up: find projections (x @ W.T [+ b]) and merge several that
read one input into one GEMM over the concatenated weights, the outputs becoming column slices.

    mm(x, permute(Wq, [1, 0]))  ...  mm(x, permute(Wv, [1, 0]))
 -> w = merged_weight(Wq, Wk, Wv); y = mm(x, permute(w, [1, 0])); q = y[:, :Nq]; k = ...; v = ...

`merged_weight` (runtime/merged_weights.py) returns a view when the parameters lie back to back in
one buffer, which the pipeline arranges once at compile time (`ctx.merged_parameters`), and
concatenates otherwise: the merged graph is correct whatever the weights are at run time.

A merge is made only when it is provably the same computation: every weight (and bias) is a
parameter (`ctx.parameters`: the real tensors behind the placeholders), 2-D with static sizes, of
one dtype and device, with one inner size; biases on all or none; and every value downstream of the
projections keeps its shape and dtype (only strides change: the slices are strided views), with no
graph output among them.
"""

from __future__ import annotations

import contextlib
import heapq
from dataclasses import dataclass

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor

from flagtree_py.passes import PassContext
from flagtree_py.passes.patterns import aten, is_op
from flagtree_py.runtime.merged_weights import merged_weight


@dataclass(frozen=True)
class Projection:
    node: torch.fx.Node  # the mm / addmm
    x: torch.fx.Node
    weight: torch.fx.Node  # a placeholder, [out, in]
    bias: torch.fx.Node | None


def find_projections(graph: torch.fx.Graph, ctx: PassContext) -> dict[torch.fx.Node, list[Projection]]:
    """Projections whose weight is a parameter, grouped by the input they read."""
    groups: dict[torch.fx.Node, list[Projection]] = {}
    for node in graph.nodes:
        if is_op(node, aten.mm.default):
            bias, (x, transposed) = None, node.args
        elif is_op(node, aten.addmm.default) and not node.kwargs:
            bias, x, transposed = node.args
        else:
            continue
        if not is_op(transposed, aten.permute.default) or list(transposed.args[1]) != [1, 0]:
            continue
        weight = transposed.args[0]
        if weight in ctx.parameters and (bias is None or bias in ctx.parameters):
            groups.setdefault(x, []).append(Projection(node, x, weight, bias))
    return groups


def merge(graph: torch.fx.Graph, ctx: PassContext, projections: list[Projection]) -> bool:
    """Merge `projections` (in this order) into one GEMM; False (graph untouched) if not provably safe."""
    if not _mergeable(ctx, projections):
        return False
    fake_mode = _fake_mode(projections[0].node)
    with fake_mode:
        merged_val = torch.cat([p.weight.meta["val"] for p in projections])
        transposed_val = merged_val.permute(1, 0)
        bias_val = None
        if projections[0].bias is not None:
            bias_val = torch.cat([p.bias.meta["val"] for p in projections])
            out_val = torch.addmm(bias_val, projections[0].x.meta["val"], transposed_val)
        else:
            out_val = torch.mm(projections[0].x.meta["val"], transposed_val)
        bounds, start = [], 0
        for p in projections:
            rows = p.weight.meta["val"].shape[0]
            bounds.append((start, start + rows))
            start += rows
        slice_vals = [aten.slice.Tensor(out_val, 1, a, b) for a, b in bounds]
    updates = _propagate(graph, {p.node: v for p, v in zip(projections, slice_vals)}, fake_mode)
    if updates is None:
        return False
    first = min((p.node for p in projections), key=list(graph.nodes).index)
    with graph.inserting_before(first):
        weight = _new(graph, merged_weight, tuple(p.weight for p in projections), merged_val)
        transposed = _new(graph, aten.permute.default, (weight, [1, 0]), transposed_val)
        if bias_val is not None:
            bias = _new(graph, merged_weight, tuple(p.bias for p in projections), bias_val)
            out = _new(graph, aten.addmm.default, (bias, projections[0].x, transposed), out_val)
        else:
            out = _new(graph, aten.mm.default, (projections[0].x, transposed), out_val)
        for p, (a, b), val in zip(projections, bounds, slice_vals):
            piece = _new(graph, aten.slice.Tensor, (out, 1, a, b), val)
            p.node.replace_all_uses_with(piece)
    for node, val in updates.items():
        node.meta["val"] = val
    for p in projections:
        old_transposed = p.node.args[-1]
        graph.erase_node(p.node)
        if not old_transposed.users:
            graph.erase_node(old_transposed)
    ctx.merged_parameters.append([p.weight for p in projections])
    if bias_val is not None:
        ctx.merged_parameters.append([p.bias for p in projections])
    return True


def _mergeable(ctx: PassContext, projections: list[Projection]) -> bool:
    weights = [p.weight.meta["val"] for p in projections]
    first = weights[0]
    if len({p.weight for p in projections}) != len(projections) or len({p.x for p in projections}) != 1:
        return False
    if any(w.dim() != 2 or not all(isinstance(s, int) for s in w.shape) for w in weights):
        return False  # a weight with a symbolic size
    if any(w.dtype != first.dtype or w.device != first.device or w.shape[1] != first.shape[1] for w in weights):
        return False
    if not all(ctx.parameters[p.weight].is_contiguous() for p in projections):
        return False
    biases = [p.bias for p in projections]
    if any(b is None for b in biases):
        return all(b is None for b in biases)  # biases on some but not all: not one addmm
    if len(set(biases)) != len(biases):
        return False
    return all(b.meta["val"].dim() == 1 and b.meta["val"].shape[0] == w.shape[0] and b.meta["val"].dtype == first.dtype
               and b.meta["val"].device == first.device and ctx.parameters[b].is_contiguous()
               for b, w in zip(biases, weights))


def _fake_mode(node: torch.fx.Node):
    val = node.meta.get("val")
    return val.fake_mode if isinstance(val, FakeTensor) else contextlib.nullcontext()


def _new(graph: torch.fx.Graph, target, args: tuple, val) -> torch.fx.Node:
    node = graph.call_function(target, args)
    node.meta["val"] = val
    return node


def _propagate(graph: torch.fx.Graph, replaced: dict, fake_mode) -> dict | None:
    """New `meta["val"]`s downstream of `replaced` (node -> its new value), or None if a value would
    change shape or dtype, a view would become impossible, or a graph output would change."""
    changed = dict(replaced)
    updates = {}

    def val_of(n):
        return changed[n] if n in changed else n.meta.get("val")

    # only the users of changed values can change: visit them in graph order (a heap of positions), not
    # the whole graph once per merge
    position = {n: i for i, n in enumerate(graph.nodes)}
    by_position = {position[u]: u for n in replaced for u in n.users}
    heap = sorted(by_position)
    while heap:
        node = by_position[heapq.heappop(heap)]
        if node in replaced:
            continue
        if node.op != "call_function":
            return None  # the output node: a graph output would change its strides
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), val_of)
        try:
            with fake_mode:
                new = node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001  (any failure: e.g. a view the strided slice cannot take)
            return None
        old = node.meta.get("val")
        if not _same_kind(old, new):
            return None
        if not _same_layout(old, new):
            changed[node] = new
            updates[node] = new
            for user in node.users:
                if position[user] not in by_position:
                    by_position[position[user]] = user
                    heapq.heappush(heap, position[user])
    return updates


def _same_kind(old, new) -> bool:
    if isinstance(old, torch.Tensor):
        return isinstance(new, torch.Tensor) and _text(old.shape) == _text(new.shape) and old.dtype == new.dtype
    if isinstance(old, (tuple, list)):
        return isinstance(new, (tuple, list)) and len(old) == len(new) and all(map(_same_kind, old, new))
    return True


def _same_layout(old, new) -> bool:
    if isinstance(old, torch.Tensor):
        return _text(old.stride()) == _text(new.stride()) and str(old.storage_offset()) == str(new.storage_offset())
    if isinstance(old, (tuple, list)):
        return all(map(_same_layout, old, new))
    return True


def _text(sizes) -> tuple[str, ...]:
    # compared as text: `==` on symbolic sizes would add guards to the shape environment
    return tuple(map(str, sizes))
