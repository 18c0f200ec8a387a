"""MoE routed experts -> one `flagtree::moe_experts` node (x, gate, up, down, weights, ids), which
codegen lowers to a counting sort of the (token, expert) pairs and two grouped GEMMs
(codegen/moe_experts.py).

The graph forms, as they reach this pass (after fuse_moe_routing and decompose_batched_gemv):
  HF grouped_mm (Qwen3-MoE, Qwen3-Omni thinker; `experts_implementation="grouped_mm"`)
      perm = sort(ids.view(-1))[1]; xs = x[perm // k]; ws = weights.view(-1)[perm]
      g = grouped_mm(xs, W13^T, offs) -> silu(g[:, :I]) * g[:, I:] -> grouped_mm(., W2^T, offs) * ws
      -> [inverse perm] -> view(T, k, H).sum(1)     (grouped_mm: aten._grouped_mm in bf16,
                                                     transformers::grouped_mm_fallback otherwise)
  HF batched_mm (decomposed to gather-reductions by decompose_batched_gemv)
      rows = x repeated k times; P1 = sum(W13[ids] * rows, -1); h = silu(P1[:, :I]) * P1[:, I:]
      P2 = sum(W2[ids] * h, -1) * weights.view(-1, 1) -> view(T, k, H).sum(1)
  Step3 (models/step3.py: every expert on every token, zeroed by a dense routing matrix)
      h = silu(bmm(x, Wg^T)) * bmm(x, Wu^T); sum over experts of bmm(h, W2^T) * dense^T
      the dense `flagtree::moe_routing_dense` becomes the sparse `flagtree::moe_routing` (weights, ids):
      the experts a token did not choose had weight 0, so the sum over its k experts is the same sum.
W13 is [E, 2I, H] (gate rows then up rows), W2 [E, H, I]; the op reads gate and up as two views of W13.
The fused op multiplies by the routing weight and sums over k like the forms do (the product rounded to
the dtype of x * weight, the k-sum in float32); the output dtype must be x's.
"""

from __future__ import annotations

import contextlib
import operator

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor

import flagtree_py.ops  # noqa: F401  (registers torch.ops.flagtree.moe_experts)
from flagtree_py.passes import PassContext
from flagtree_py.passes.patterns import CASTS, aten, is_op, other_operand


def _grouped_mm_ops() -> tuple:
    """aten._grouped_mm, and transformers' fallback op once transformers has registered it (importing
    transformers.integrations.moe does; a graph that holds the op was traced after that)."""
    try:
        return aten._grouped_mm.default, torch.ops.transformers.grouped_mm_fallback.default
    except (AttributeError, RuntimeError):
        return (aten._grouped_mm.default,)


def _strip_casts(node):
    while is_op(node, *CASTS):
        node = node.args[0]
    return node


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _silu_mul(node, nodes: list) -> tuple | None:
    """(gate, up) for node = silu(gate) * up, silu decomposed (g * sigmoid(g)), casts around it allowed."""
    if not is_op(node, aten.mul.Tensor):
        return None
    for silu, up in (node.args, reversed(node.args)):
        inner = silu.args[0] if is_op(silu, *CASTS) else silu
        if not is_op(inner, aten.mul.Tensor):
            continue
        sigmoid = next((a for a in inner.args if is_op(a, aten.sigmoid.default)), None)
        if sigmoid is None or other_operand(inner, sigmoid) is not sigmoid.args[0]:
            continue
        nodes += [node, silu, inner, sigmoid, sigmoid.args[0], up]
        return _strip_casts(sigmoid.args[0]), _strip_casts(up)
    return None


def _halves(gate, up, nodes: list) -> tuple | None:
    """(product, I) when gate = product[..., :I] and up = product[..., I:2I] (slices of the last dim)."""
    if not (is_op(gate, aten.slice.Tensor) and is_op(up, aten.slice.Tensor)) or gate.args[0] is not up.args[0]:
        return None
    if any(len(s.args) < 4 or tuple(s.args[4:]) not in ((), (1,)) for s in (gate, up)):  # step 1 only
        return None
    product = gate.args[0]
    last = _val(product).dim() - 1
    (_, gate_dim, gate_lo, gate_hi), (_, up_dim, up_lo, up_hi) = gate.args[:4], up.args[:4]
    width = _val(product).shape[-1]
    if {gate_dim, up_dim} - {-1, last} or gate_lo != 0 or gate_hi != up_lo or not isinstance(width, int):
        return None
    if up_hi not in (width, 2 * gate_hi) or width != 2 * gate_hi:
        return None
    nodes += [gate, up]
    return product, gate_hi


def _transposed_weight(node) -> torch.fx.Node | None:
    """W for node = W.permute(0, 2, 1) (a 3-d weight read transposed)."""
    if is_op(node, aten.permute.default) and list(node.args[1]) == [0, 2, 1]:
        return node.args[0]
    return None


def _flat(node) -> torch.fx.Node | None:
    """t for node = t.view(-1) (t 2-d)."""
    if is_op(node, aten.view.default, aten._unsafe_view.default) and len(node.args[1]) == 1:
        base = node.args[0]
        if _val(base) is not None and _val(base).dim() == 2:
            return base
    return None


def _k_sum(total) -> tuple | None:
    """(rows, k) for total = rows.view(T, k, H).sum(1): the sum over each token's k choices."""
    if not is_op(total, aten.sum.dim_IntList) or list(total.args[1]) != [1] or total.kwargs.get("dtype"):
        return None
    if len(total.args) > 2 and total.args[2]:
        return None
    view = total.args[0]
    if not is_op(view, aten.view.default, aten._unsafe_view.default) or _val(view).dim() != 3:
        return None
    k = _val(view).shape[1]
    return (view.args[0], k) if isinstance(k, int) else None


def _weighted(product) -> tuple | None:
    """(rows, scale) for product = rows * scale.unsqueeze(-1)."""
    if not is_op(product, aten.mul.Tensor):
        return None
    for rows, scale in (product.args, reversed(product.args)):
        if is_op(scale, aten.unsqueeze.default) and scale.args[1] in (-1, _val(scale).dim() - 1):
            return rows, scale.args[0]
    return None


def _match_grouped(total) -> dict | None:
    found = _k_sum(total)
    if found is None:
        return None
    gathered, k = found
    nodes = [total, total.args[0], gathered]
    if not is_op(gathered, aten.index.Tensor) or len(gathered.args[1]) != 1:
        return None
    inverse = gathered.args[1][0]
    if not is_op(inverse, aten.index_put.default) or not is_op(inverse.args[2], aten.arange.start_step):
        return None
    perm = inverse.args[1][0]
    nodes += [inverse, inverse.args[0], inverse.args[2]]
    weighted = _weighted(gathered.args[0])
    if weighted is None:
        return None
    down_out, picked = weighted
    nodes += [gathered.args[0], picked]
    if not is_op(picked, aten.index.Tensor) or picked.args[1][0] is not perm:
        return None
    weights = _flat(picked.args[0])
    nodes.append(picked.args[0])
    if not is_op(down_out, *_grouped_mm_ops()):
        return None
    hidden, down_t, offsets = down_out.args[:3]
    nodes += [down_out, down_t]
    pair = _silu_mul(hidden, nodes)
    halves = _halves(*pair, nodes) if pair else None
    if halves is None:
        return None
    gate_up, inter = halves
    if not is_op(gate_up, *_grouped_mm_ops()) or gate_up.args[2] is not offsets:
        return None
    xs, gate_up_t = gate_up.args[:2]
    nodes += [gate_up, gate_up_t, xs]
    if not (is_op(xs, aten.index.Tensor) and is_op(xs.args[1][0], aten.div.Tensor_mode)):
        return None
    divide = xs.args[1][0]
    if divide.args[0] is not perm or divide.args[1] != k or divide.kwargs.get("rounding_mode") != "floor":
        return None
    nodes.append(divide)
    if not (is_op(perm, operator.getitem) and perm.args[1] == 1 and is_op(perm.args[0], aten.sort.default)):
        return None
    ids = _flat(perm.args[0].args[0])
    nodes += [perm, perm.args[0], *perm.args[0].users, perm.args[0].args[0], offsets]
    return _checked(total, xs.args[0], _transposed_weight(gate_up_t), inter, _transposed_weight(down_t),
                    weights, ids, k, nodes)


def _gemv(node, nodes: list) -> tuple | None:
    """(W, flat ids, v) for node = squeeze(sum(W[ids] * v.unsqueeze(-1).permute(0, 2, 1), 2, keepdim)):
    decompose_batched_gemv's form of bmm(W[ids], v.unsqueeze(-1)).squeeze(-1)."""
    if not is_op(node, aten.squeeze.dims, aten.squeeze.dim) or not is_op(node.args[0], aten.sum.dim_IntList):
        return None
    total = node.args[0]
    product = total.args[0]
    if not is_op(product, aten.mul.Tensor) or list(total.args[1]) != [2]:
        return None
    gathered, row = product.args
    if not is_op(gathered, aten.index.Tensor) or not is_op(row, aten.permute.default):
        return None
    column = row.args[0]
    if not is_op(column, aten.unsqueeze.default):
        return None
    nodes += [node, total, product, gathered, row, column]
    return gathered.args[0], gathered.args[1][0], column.args[0]


def _repeated_rows(rows) -> torch.fx.Node | None:
    """x for rows = x.unsqueeze(1).expand(T, k, H).[clone()].view(T * k, H): x.repeat_interleave(k, 0)."""
    node = rows
    if is_op(node, aten.view.default, aten._unsafe_view.default):
        node = node.args[0]
    if is_op(node, aten.clone.default):
        node = node.args[0]
    if not is_op(node, aten.expand.default) or not is_op(node.args[0], aten.unsqueeze.default):
        return None
    unsqueeze = node.args[0]
    return unsqueeze.args[0] if unsqueeze.args[1] == 1 and _val(unsqueeze.args[0]).dim() == 2 else None


def _match_batched(total) -> dict | None:
    found = _k_sum(total)
    if found is None:
        return None
    product, k = found
    nodes = [total, total.args[0]]
    weighted = _weighted(product)
    if weighted is None:
        return None
    down_out, flat_weights = weighted
    nodes += [product, flat_weights]
    weights = _flat(flat_weights)
    down = _gemv(down_out, nodes)
    if down is None:
        return None
    w2, flat_ids, hidden = down
    pair = _silu_mul(hidden, nodes)
    halves = _halves(*pair, nodes) if pair else None
    gate_up = _gemv(halves[0], nodes) if halves else None
    if gate_up is None or gate_up[1] is not flat_ids:
        return None
    w13, _, rows = gate_up
    x = _repeated_rows(rows)
    nodes += [rows, flat_ids]
    ids = _flat(flat_ids)
    return _checked(total, x, w13, halves[1], w2, weights, ids, k, nodes)


def _match_dense(total) -> dict | None:
    """Step3: sum over experts of bmm(h, W2^T) * dense.t().unsqueeze(-1)."""
    if not is_op(total, aten.sum.dim_IntList) or list(total.args[1]) != [0] or len(total.args) > 2:
        return None
    weighted = _weighted(total.args[0])
    if weighted is None:
        return None
    down_out, dense_t = weighted
    if not is_op(dense_t, aten.permute.default) or list(dense_t.args[1]) != [1, 0]:
        return None
    dense = dense_t.args[0]
    if not is_op(dense, torch.ops.flagtree.moe_routing_dense.default) or len(dense.users) != 1:
        return None
    nodes = [total, total.args[0], total.args[0].args[1], dense_t, dense]
    if not is_op(down_out, aten.bmm.default):
        return None
    hidden, down_t = down_out.args
    nodes += [down_out, down_t]
    pair = _silu_mul(hidden, nodes)
    if pair is None or not all(is_op(p, aten.bmm.default) for p in pair):
        return None
    (xg, gate_t), (xu, up_t) = pair[0].args, pair[1].args
    if xg is not xu or not is_op(xg, aten.expand.default) or not is_op(xg.args[0], aten.unsqueeze.default):
        return None
    unsqueeze = xg.args[0]
    if unsqueeze.args[1] != 0:
        return None
    nodes += [*pair, gate_t, up_t, xg, unsqueeze]
    k = dense.args[1]
    weights = ids = dense  # replaced by the sparse routing's outputs in _rewrite
    m = _checked(total, unsqueeze.args[0], (_transposed_weight(gate_t), _transposed_weight(up_t)), None,
                 _transposed_weight(down_t), weights, ids, k, nodes)
    if m is not None:
        m["dense"] = dense
    return m


def _checked(total, x, gate_up, inter, down, weights, ids, k, nodes) -> dict | None:
    """The match, when every operand was found and their shapes and dtypes agree."""
    separate = isinstance(gate_up, tuple)
    if any(n is None for n in (x, down, weights, ids, *(gate_up if separate else (gate_up,)))):
        return None
    xv, dv, out = _val(x), _val(down), _val(total)
    if xv is None or xv.dim() != 2 or not xv.dtype.is_floating_point or out.dtype != xv.dtype:
        return None
    if separate:
        gv, uv = _val(gate_up[0]), _val(gate_up[1])
        if gv is None or uv is None or tuple(gv.shape) != tuple(uv.shape) or gv.dim() != 3:
            return None
        experts, inter, hidden = gv.shape
    else:
        gv = _val(gate_up)
        if gv is None or gv.dim() != 3 or gv.shape[1] != 2 * inter:
            return None
        experts, _, hidden = gv.shape
    if dv is None or tuple(dv.shape) != (experts, hidden, inter) or not isinstance(experts, int):
        return None
    if any(_val(w).dtype != xv.dtype for w in (down, *(gate_up if separate else (gate_up,)))):
        return None  # one GEMM dtype (a cast of x to the weights' dtype would be a different product)
    if str(xv.shape[1]) != str(hidden) or tuple(map(str, out.shape)) != tuple(map(str, xv.shape)):
        return None
    if weights is not ids:  # the sparse forms: [T, k] weights and ids
        wv, iv = _val(weights), _val(ids)
        if wv.shape[-1] != k or iv.shape[-1] != k or iv.dtype not in (torch.int32, torch.int64):
            return None
    return {"total": total, "x": x, "gate_up": gate_up, "inter": inter, "down": down, "weights": weights,
            "ids": ids, "k": k, "nodes": nodes, "dense": None}


def _fake(node_or_value):
    return node_or_value.meta["val"] if isinstance(node_or_value, torch.fx.Node) else node_or_value


def _call(graph: torch.fx.Graph, op, args: tuple) -> torch.fx.Node:
    """A new node `op(*args)` with its fake value (computed in the fake mode of its inputs)."""
    fakes = [_fake(a) for a in args]
    mode = next((f.fake_mode for f in fakes if isinstance(f, FakeTensor)), None)
    with mode if mode is not None else contextlib.nullcontext():
        val = op(*fakes)
    node = graph.call_function(op, args)
    node.meta["val"] = val
    return node


def _rewrite(graph: torch.fx.Graph, m: dict) -> None:
    total = m["total"]
    with graph.inserting_before(total):
        if m["dense"] is not None:  # Step3: the dense routing matrix -> (weights, ids)
            routing = _call(graph, torch.ops.flagtree.moe_routing.default, m["dense"].args)
            m["weights"] = _call(graph, operator.getitem, (routing, 0))
            m["ids"] = _call(graph, operator.getitem, (routing, 1))
        if isinstance(m["gate_up"], tuple):
            gate, up = m["gate_up"]
        else:
            inter = m["inter"]
            gate = _call(graph, aten.slice.Tensor, (m["gate_up"], 1, 0, inter))
            up = _call(graph, aten.slice.Tensor, (m["gate_up"], 1, inter, 2 * inter))
        experts = _call(graph, torch.ops.flagtree.moe_experts.default,
                        (m["x"], gate, up, m["down"], m["weights"], m["ids"]))
    total.replace_all_uses_with(experts)
    _erase_dead(graph, m["nodes"])


def _erase_dead(graph: torch.fx.Graph, nodes: list) -> None:
    """Erase the matched nodes no one reads any more, and what only they read (pure ops only: a shared
    view or the sort's other output, still read elsewhere, stays)."""
    pending, erased = list(dict.fromkeys(nodes)), set()
    while pending:
        node = pending.pop()
        if (not isinstance(node, torch.fx.Node) or node in erased or node.op != "call_function" or node.users
                or node.is_impure()):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased.add(node)
        pending += inputs


def fuse_moe_experts(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    if not ctx.options.gemm_templates:
        return False  # the experts stay the aten ops the model wrote
    found = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.sum.dim_IntList:
            continue
        m = _match_grouped(node) or _match_batched(node) or _match_dense(node)
        if m is not None:
            _rewrite(graph, m)
            found += 1
    ctx.counters["fuse_moe_experts"] += found
    return found > 0
