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


def is_static_one(size) -> bool:
    """A dimension known at compile time to be 1 (not a symbol that happens to be 1 now)."""
    return isinstance(size, int) and size == 1


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
    if is_op(square, aten.pow.Tensor_Scalar) and square.args[1] == 2 or is_op(square, aten.mul.Tensor) and square.args[0] is square.args[1]:
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


def through_views(node: torch.fx.Node, through: tuple = VIEW_OPS) -> list[torch.fx.Node]:
    """The users of `node`, looking through view-like ops (or the ops in `through`)."""
    found, stack = [], list(node.users)
    while stack:
        user = stack.pop()
        if is_op(user, *through):
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


def match_neox_rotary(cat: torch.fx.Node) -> dict | None:
    """vLLM's neox rotary (RotaryEmbedding.forward_static, custom ops off), anchored at its
    cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1), where x1, x2 = the two halves of
    x[..., :rotary_dim]: no rotate-half, the halves are combined before the cat. When the cat is
    then joined to the pass-through part (cat([rotated, x[..., rotary_dim:]], -1)), that is part
    of the instance too (an empty slice where rotary_dim == head_dim, as in Qwen3 and Step3).

    Returns {"x", "nodes", "out"} (x: the tensor the halves are sliced from) or None.
    """
    if not is_op(cat, aten.cat.default) or len(cat.args[0]) != 2 or not _is_last_dim(cat, _cat_dim(cat)):
        return None
    first, second = cat.args[0]
    if not is_op(first, aten.sub.Tensor) or not is_op(second, aten.add.Tensor):
        return None
    if not all(is_op(n, aten.mul.Tensor) for n in (*first.args[:2], *second.args[:2])):
        return None
    x1_cos, x2_sin = first.args[:2]
    halves = next(((a, b) for a in x1_cos.args[:2] for b in x2_sin.args[:2] if _are_halves(a, b)), None)
    if halves is None:
        return None
    x1, x2 = halves
    cos, sin = other_operand(x1_cos, x1), other_operand(x2_sin, x2)
    x, half = x1.args[0], x1.meta["val"].shape[-1]
    # second half: x2 * cos + x1 * sin, in either operand order
    products = {_product_key(m, x1, x2, cos, sin) for m in second.args[:2]}
    if products != {("x2", "cos"), ("x1", "sin")}:
        return None
    nodes = [x1, x2, x1_cos, x2_sin, first, *second.args[:2], second, cat]
    if any(len(n.users) != 1 for n in nodes[2:-1]):
        return None
    out = cat
    outer = single_user(cat, aten.cat.default)
    if outer is not None and len(outer.args[0]) == 2 and outer.args[0][0] is cat and _is_last_dim(outer, _cat_dim(outer)):
        rest = outer.args[0][1]
        # the pass-through part: x[..., 2h:] of the head, where x is the head or x = head[..., :2h]
        head = x.args[0] if is_op(x, aten.slice.Tensor) and _slice_bounds(x) == (0, 2 * half) else x
        if is_op(rest, aten.slice.Tensor) and rest.args[0] in (x, head) and _is_last_dim(rest, rest.args[1]) \
                and _slice_bounds(rest)[0] == 2 * half and len(rest.users) == 1:
            nodes += [rest, outer]
            out = outer
    return {"x": x, "nodes": nodes, "out": out}


def match_any_rotary(cat: torch.fx.Node) -> dict | None:
    """The rotary embedding anchored at `cat`, in transformers' (rotate-half) or vLLM's (neox) form."""
    return match_rotary(cat) or match_neox_rotary(cat)


def _are_halves(x1, x2) -> bool:
    """x1 = x[..., 0:h] and x2 = x[..., h:2h] of one x (slices of its last dimension)."""
    if not (is_op(x1, aten.slice.Tensor) and is_op(x2, aten.slice.Tensor)) or x1.args[0] is not x2.args[0]:
        return False
    if not (_is_last_dim(x1, x1.args[1]) and _is_last_dim(x2, x2.args[1])):
        return False
    half, size = x1.meta["val"].shape[-1], x1.args[0].meta["val"].shape[-1]
    if not isinstance(half, int) or not isinstance(size, int) or half == 0:
        return False
    return _slice_bounds(x1) == (0, half) and _slice_bounds(x2) == (half, 2 * half) and size >= 2 * half


def _cat_dim(cat: torch.fx.Node) -> int:
    return cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)


def _is_last_dim(node: torch.fx.Node, dim: int) -> bool:
    ndim = node.meta["val"].dim()
    return dim in (-1, ndim - 1)


def _slice_bounds(node: torch.fx.Node) -> tuple:
    """(start, end) of a slice with step 1, end clamped to the sliced size; (None, None) otherwise."""
    args = list(node.args) + [None] * (5 - len(node.args))
    start, end, step = args[2] or 0, args[3], args[4] or 1
    size = node.args[0].meta["val"].shape[-1]
    if step != 1 or not all(isinstance(v, int) for v in (start, end, size)):
        return (None, None)
    return (start, min(end, size))


def _product_key(mul: torch.fx.Node, x1, x2, cos, sin) -> tuple | None:
    """("x1" | "x2", "cos" | "sin") for a product of one half with cos or sin."""
    if not is_op(mul, aten.mul.Tensor):
        return None
    a, b = mul.args[:2]
    for half, name in ((x1, "x1"), (x2, "x2")):
        for table, label in ((cos, "cos"), (sin, "sin")):
            if (a is half and b is table) or (b is half and a is table):
                return (name, label)
    return None
