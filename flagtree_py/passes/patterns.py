"""Small helpers to match LLM patterns on the aten graph (used by the fuse_* passes).

A fuse_* pass recognizes a pattern (RMSNorm, SwiGLU, ...), checks it is safe (constant eps,
float dtypes, matching shapes), stamps its nodes with `meta["fusion"] = (pattern, id)` and
counts it. The partitioner places every stamped instance in one fusion group (one kernel);
`fusions_split` in the report lists any instance it could not keep together.
"""

from __future__ import annotations

import itertools

import torch
import torch.fx

aten = torch.ops.aten
prims = torch.ops.prims

_IDS = itertools.count()
VIEW_OPS = {aten.view.default, aten._unsafe_view.default, aten.permute.default, aten.transpose.int,
            aten.unsqueeze.default, aten.expand.default, aten.clone.default}


def is_op(node, *targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def other_operand(node: torch.fx.Node, known) -> object | None:
    """For a binary op with `known` as one operand, the other one."""
    a, b = node.args[:2]
    if a is known:
        return b
    if b is known:
        return a
    return None


def skip_convert(node):
    """The value under an optional dtype conversion."""
    if is_op(node, *CASTS):
        return node.args[0]
    return node


CASTS = (prims.convert_element_type.default, aten._to_copy.default)


def through_cast(node: torch.fx.Node, nodes: list) -> torch.fx.Node:
    """`node`, or its only user when that is a dtype cast (appended to `nodes`)."""
    cast = single_user(node, *CASTS)
    if cast is None:
        return node
    nodes.append(cast)
    return cast


def run_matcher(graph: torch.fx.Graph, ctx, pattern: str, anchor, match) -> None:
    """Stamp and count every instance of `pattern`: `match(node)` is tried on each unstamped
    node whose target is `anchor` and returns the instance's nodes, or None."""
    found = 0
    for node in graph.nodes:
        if not is_op(node, anchor) or "fusion" in node.meta:
            continue
        nodes = match(node)
        if nodes is not None:
            stamp(nodes, pattern)
            found += 1
    ctx.counters[pattern] += found


def single_user(node: torch.fx.Node, *targets):
    users = list(node.users)
    if len(users) == 1 and is_op(users[0], *targets):
        return users[0]
    return None


def stamp(nodes, pattern: str) -> int:
    """Mark `nodes` as one instance of `pattern`; returns the instance id."""
    instance = next(_IDS)
    for node in nodes:
        node.meta["fusion"] = (pattern, instance)
    return instance


def is_float_tensor(node) -> bool:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def match_rms_norm(rsqrt: torch.fx.Node) -> dict | None:
    """x * rsqrt(mean(x^2, -1, keepdim) + eps) [-> cast] [* weight], anchored at the rsqrt.

    Returns {"x", "nodes", "out", "eps"} or None. eps is a Python number or a 0-dim tensor
    (dynamic=True turns float attributes into graph inputs): the kernel reads it at run time, so
    nothing is baked in; any other eps (a per-channel tensor) is not this pattern.
    """
    add = rsqrt.args[0]
    if not is_op(add, aten.add.Tensor, aten.add.Scalar):
        return None
    mean = add.args[0] if is_op(add.args[0], aten.mean.dim) else add.args[1]
    eps = other_operand(add, mean)
    if not is_op(mean, aten.mean.dim) or not _is_scalar(eps) or len(mean.users) != 1:
        return None
    ndim = mean.meta["val"].dim()
    if list(mean.args[1]) not in ([-1], [ndim - 1]) or not (len(mean.args) > 2 and mean.args[2]):
        return None
    square = mean.args[0]
    if is_op(square, aten.pow.Tensor_Scalar) and square.args[1] == 2:
        x = square.args[0]
    elif is_op(square, aten.mul.Tensor) and square.args[0] is square.args[1]:
        x = square.args[0]
    else:
        return None
    if not is_float_tensor(x):
        return None
    scale = next((u for u in rsqrt.users if is_op(u, aten.mul.Tensor) and other_operand(u, rsqrt) is x), None)
    if scale is None or len(rsqrt.users) != 1:
        return None
    nodes = [square, mean, add, rsqrt, scale]
    out = through_cast(scale, nodes)
    weighted = single_user(out, aten.mul.Tensor)
    if weighted is not None:
        weight = other_operand(weighted, out)
        w = weight.meta.get("val") if isinstance(weight, torch.fx.Node) else None
        if isinstance(w, torch.Tensor) and w.dim() == 1 and w.shape[0] == x.meta["val"].shape[-1]:
            nodes.append(weighted)
            out = weighted
    if is_op(x, *CASTS):
        nodes.append(x)
    return {"x": skip_convert(x), "nodes": nodes, "out": out, "eps": eps}


def _is_scalar(value) -> bool:
    """A Python number, or a node computing a 0-dim float tensor (through dtype casts)."""
    if isinstance(value, (int, float)):
        return True
    val = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dim() == 0 and val.dtype.is_floating_point


def through_views(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The users of `node`, looking through view-like ops."""
    found, stack = [], list(node.users)
    while stack:
        user = stack.pop()
        if is_op(user, *VIEW_OPS):
            stack.extend(user.users)
        else:
            found.append(user)
    return found


def match_rotary(cat: torch.fx.Node) -> dict | None:
    """x * cos + rotate_half(x) * sin, anchored at rotate_half's cat([-x2, x1], -1).

    Returns {"x", "nodes"} (x: the rotated tensor, the slices' source) or None.
    """
    if not is_op(cat, aten.cat.default) or len(cat.args[0]) != 2:
        return None
    first, second = cat.args[0]
    if not is_op(first, aten.neg.default):
        return None
    upper, lower = first.args[0], second
    if not (is_op(upper, aten.slice.Tensor) and is_op(lower, aten.slice.Tensor)) or upper.args[0] is not lower.args[0]:
        return None
    x = upper.args[0]
    half = x.meta["val"].shape[-1] // 2
    if lower.args[2] != 0 or lower.args[3] != half or upper.args[2] != half:
        return None
    rotated = single_user(cat, aten.mul.Tensor)
    if rotated is None:
        return None
    total = single_user(rotated, aten.add.Tensor)
    if total is None:
        return None
    direct = other_operand(total, rotated)
    if not is_op(direct, aten.mul.Tensor) or x not in direct.args:
        return None
    return {"x": x, "nodes": [upper, lower, first, cat, rotated, direct, total]}
