"""MoE routing: router softmax -> top-k -> (renormalise) -> cast, as one `flagtree::moe_routing` node,
which codegen lowers to one kernel (codegen/moe_routing.py).

The graph forms (all with the softmax decomposed to amax/sub/exp/sum/div, see decompositions.py):
  Qwen3-MoE / Qwen3-Omni thinker  softmax(logits, dtype=float32) -> topk -> values / values.sum(-1)
                                  -> .to(logits.dtype)   (renormalised when norm_topk_prob)
  Step3 (models/step3.py)         softmax(logits.to(float32)) -> topk -> [values / values.sum(-1)]
                                  -> scatter into zeros_like(probs) -> .to(dtype): the dense routing
                                  matrix, one `flagtree::moe_routing_dense` node (scatter included)
  vLLM's CPU router (fused_moe/router/cpu_router.py `_softmax_topk`, float32 logits)
                                  topk(logits, sorted=False) first, then softmax(values) (renormalize,
                                  Qwen3-MoE) or exp(values - logsumexp(logits)) (not, Step3): the same
                                  weights as softmax -> top-k -> [renormalise] (see _match_vllm)
Unlike the other fusions this one rewrites the graph instead of stamping it: top-k does not fit
the row/element model of the generic kernels (it has k outputs per row of E inputs).
"""

from __future__ import annotations

import contextlib
import operator

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor

import flagtree_py.ops  # noqa: F401  (registers torch.ops.flagtree.moe_routing)
from flagtree_py.passes import PassContext
from flagtree_py.passes.patterns import CASTS, aten, is_op, other_operand, single_user

_LIKE_OPS = (aten.full_like.default, aten.zeros_like.default, aten.empty_like.default)


def _softmax_input(probs: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """x for probs = exp(x - amax(x)) / sum(exp(x - amax(x))) over the last dim, and the nodes."""
    if not is_op(probs, aten.div.Tensor):
        return None
    exp, total = probs.args
    if not (is_op(exp, aten.exp.default) and is_op(total, aten.sum.dim_IntList) and total.args[0] is exp):
        return None
    sub = exp.args[0]
    if not is_op(sub, aten.sub.Tensor) or not is_op(sub.args[1], aten.amax.default):
        return None
    x, amax = sub.args
    if amax.args[0] is not x or not _last_dim(amax, 1) or not _last_dim(total, 1):
        return None
    if len(exp.users) != 2 or len(sub.users) != 1 or len(amax.users) != 1 or len(total.users) != 1:
        return None
    return x, [amax, sub, exp, total, probs]


def _last_dim(reduction: torch.fx.Node, dims_at: int) -> bool:
    """A keepdim reduction over exactly the last dimension."""
    ndim = reduction.args[0].meta["val"].dim()
    dims = list(reduction.args[dims_at]) if len(reduction.args) > dims_at else []
    keepdim = len(reduction.args) > dims_at + 1 and reduction.args[dims_at + 1]
    return dims in ([-1], [ndim - 1]) and bool(keepdim)


def _renormalised(values: torch.fx.Node) -> torch.fx.Node | None:
    """values / values.sum(-1, keepdim=True), when that is all `values` is used for."""
    users = list(values.users)
    total = next((u for u in users if is_op(u, aten.sum.dim_IntList) and u.args[0] is values), None)
    if total is None or len(users) != 2 or not _last_dim(total, 1) or len(total.users) != 1:
        return None
    div = next(iter(total.users))
    if not is_op(div, aten.div.Tensor) or div.args[0] is not values or div.args[1] is not total or div not in users:
        return None
    return div


def _match(topk: torch.fx.Node) -> dict | None:
    probs, k = topk.args[0], topk.args[1]
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    largest = topk.args[3] if len(topk.args) > 3 else topk.kwargs.get("largest", True)
    ordered = topk.args[4] if len(topk.args) > 4 else topk.kwargs.get("sorted", True)
    if not (isinstance(k, int) and largest and ordered):
        return None
    found = _softmax_input(probs)
    if found is None:
        return None
    x, softmax_nodes = found
    val = x.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 2 or not val.dtype.is_floating_point:
        return None
    experts = val.shape[-1]
    if not isinstance(experts, int) or not 0 < k <= experts or dim not in (-1, 1):
        return None  # the kernel holds one row of experts: a static count
    if probs.meta["val"].dtype != torch.float32:
        return None  # the fused op computes the softmax in float32, as the models do
    raw = x  # the router's own dtype, under an upcast to float32: the kernel upcasts while loading
    if is_op(x, *CASTS) and len(x.users) == 2 and _is_float_on(x.args[0], val.device):
        raw = x.args[0]
    like_users = [u for u in probs.users if u is not topk]
    if not all(is_op(u, *_LIKE_OPS) and u.args[0] is probs for u in like_users):
        return None  # the probabilities are read elsewhere: they must stay
    if like_users and _metadata(raw) != _metadata(probs):
        return None  # they are re-pointed at the router logits below: same shape, strides, device
    getitems = {u.args[1]: u for u in topk.users if u.target is operator.getitem}
    if len(getitems) != len(topk.users):
        return None
    values, ids = getitems.get(0), getitems.get(1)
    renorm = _renormalised(values) if values is not None else None
    weights = renorm if renorm is not None else values
    replaced = [x] if raw is not x else []
    replaced += [*softmax_nodes, topk, *getitems.values()]
    if renorm is not None:
        replaced += [renorm.args[1], renorm]
    scatter = _dense_scatter(weights, ids, like_users)
    if scatter is not None:
        replaced += [*like_users, scatter]
        like_users, weights, ids = [], scatter, None
    cast = single_user(weights, *CASTS) if weights is not None else None
    if cast is not None and _is_float_on(cast, val.device):
        replaced.append(cast)
        weights = cast
    return {"topk": topk, "raw": raw, "k": k, "renorm": renorm is not None, "weights": weights, "ids": ids,
            "probs": probs, "like_users": like_users, "replaced": replaced, "dense": scatter is not None}


def _match_vllm(topk: torch.fx.Node) -> dict | None:
    """vLLM's CPU router: top-k of the raw float32 logits, then the softmax of the k values
    (= the renormalised top-k of the softmax) or exp(values - logsumexp(logits)) (= the top-k of the
    softmax). The order of the k pairs is free (sorted=False): vLLM's experts read (weight, id) pairs."""
    logits, k = topk.args[0], topk.args[1]
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    largest = topk.args[3] if len(topk.args) > 3 else topk.kwargs.get("largest", True)
    val = logits.meta.get("val") if isinstance(logits, torch.fx.Node) else None
    if not (isinstance(k, int) and largest and isinstance(val, torch.Tensor) and val.dim() == 2):
        return None
    if val.dtype != torch.float32 or not isinstance(val.shape[-1], int) or not 0 < k <= val.shape[-1]:
        return None  # softmax in the logits' own dtype: the fused op's float32 softmax is another result
    if dim not in (-1, 1):
        return None
    getitems = {u.args[1]: u for u in topk.users if u.target is operator.getitem}
    values, ids = getitems.get(0), getitems.get(1)
    if len(getitems) != len(topk.users) or values is None:
        return None
    renormalised = _softmax_of(values)
    if renormalised is not None:
        weights, nodes = renormalised
    else:
        found = _exp_minus_logsumexp(values, logits)
        if found is None:
            return None
        weights, nodes = found
    replaced = [*nodes, topk, *getitems.values()]
    cast = single_user(weights, *CASTS)
    if cast is not None and _is_float_on(cast, val.device):
        replaced.append(cast)
        weights = cast
    return {"topk": topk, "raw": logits, "k": k, "renorm": renormalised is not None, "weights": weights,
            "ids": ids, "probs": logits, "like_users": [], "replaced": replaced, "dense": False}


def _softmax_of(values: torch.fx.Node) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """(probs, nodes) when `values` is used only by probs = softmax(values) over the last dim."""
    for sub in values.users:
        exp = single_user(sub, aten.exp.default) if is_op(sub, aten.sub.Tensor) else None
        probs = next((u for u in exp.users if is_op(u, aten.div.Tensor)), None) if exp is not None else None
        found = _softmax_input(probs) if probs is not None else None
        if found is not None and found[0] is values and set(values.users) <= set(found[1]):
            return probs, found[1]
    return None


def _exp_minus_logsumexp(values: torch.fx.Node, logits: torch.fx.Node) -> tuple | None:
    """(weights, nodes) for weights = exp(values - logsumexp(logits, -1, keepdim)), logsumexp in its
    decomposed form: log(sum(exp(logits - m))) + m, m = amax(logits) with +-inf replaced by 0."""
    sub = single_user(values, aten.sub.Tensor)
    exp = single_user(sub, aten.exp.default) if sub is not None and sub.args[0] is values else None
    lse = sub.args[1] if exp is not None else None
    if not is_op(lse, aten.add.Tensor) or len(lse.users) != 1:
        return None
    log = next((a for a in lse.args if is_op(a, aten.log.default)), None)
    shift = other_operand(lse, log) if log is not None else None
    total = log.args[0] if log is not None else None
    if not is_op(total, aten.sum.dim_IntList) or not _last_dim(total, 1) or not is_op(shift, aten.where.self):
        return None
    inner_exp = total.args[0]
    inner_sub = inner_exp.args[0] if is_op(inner_exp, aten.exp.default) else None
    if not is_op(inner_sub, aten.sub.Tensor) or inner_sub.args[0] is not logits or inner_sub.args[1] is not shift:
        return None
    is_inf, zero, amax = shift.args
    if not (is_op(amax, aten.amax.default) and amax.args[0] is logits and _last_dim(amax, 1)):
        return None
    absolute = is_inf.args[0] if is_op(is_inf, aten.eq.Scalar) and is_inf.args[1] == float("inf") else None
    if not is_op(absolute, aten.abs.default) or absolute.args[0] is not amax:
        return None
    if not (is_op(zero, aten.scalar_tensor.default) and zero.args[0] == 0 and len(zero.users) == 1):
        return None
    nodes = [amax, absolute, is_inf, zero, shift, inner_sub, inner_exp, total, log, lse, sub, exp]
    inside = set(nodes)
    if any(not set(n.users) <= inside for n in nodes[:-1]):
        return None  # an intermediate is read elsewhere: it must stay
    return exp, nodes


def _dense_scatter(weights, ids, like_users) -> torch.fx.Node | None:
    """zeros_like(probs).scatter(-1, ids, weights), when the top-k results are used for nothing else."""
    if weights is None or ids is None or len(like_users) != 1 or len(weights.users) != 1 or len(ids.users) != 1:
        return None
    zeros, scatter = like_users[0], next(iter(weights.users))
    if not (is_op(zeros, aten.full_like.default) and zeros.args[1] == 0 and len(zeros.users) == 1):
        return None
    if not is_op(scatter, aten.scatter.src) or scatter.args[0] is not zeros or scatter.args[2] is not ids:
        return None
    if scatter.args[1] not in (-1, 1) or scatter.args[3] is not weights or scatter.kwargs:
        return None
    val = scatter.meta["val"]
    return scatter if tuple(val.stride()) == (val.shape[1], 1) else None  # the kernel stores it contiguous


def _metadata(node: torch.fx.Node) -> tuple:
    val = node.meta["val"]  # compared as text: `==` on symbolic sizes would add shape guards
    return tuple(map(str, val.shape)), tuple(map(str, val.stride())), val.device


def _is_float_on(node, device: torch.device) -> bool:
    """A float tensor on `device` (a cast that also moves data is not a dtype cast)."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point and val.device == device


def _rewrite(graph: torch.fx.Graph, m: dict, order: dict) -> None:
    topk, raw, probs = m["topk"], m["raw"], m["probs"]
    weight_dtype = m["weights"].meta["val"].dtype if m["weights"] is not None else torch.float32
    args = (raw, m["k"], m["renorm"], weight_dtype)
    op = torch.ops.flagtree.moe_routing_dense.default if m["dense"] else torch.ops.flagtree.moe_routing.default
    fake = raw.meta["val"]
    with fake.fake_mode if isinstance(fake, FakeTensor) else contextlib.nullcontext():
        val = op(fake, *args[1:])
    with graph.inserting_before(topk):
        routing = graph.call_function(op, args)
        routing.meta["val"] = val
        if m["dense"]:
            m["weights"].replace_all_uses_with(routing)
        for position, old in enumerate(() if m["dense"] else (m["weights"], m["ids"])):
            new = graph.call_function(operator.getitem, (routing, position))
            new.meta["val"] = val[position]
            if old is not None:
                old.replace_all_uses_with(new)
    for like in m["like_users"]:
        # full_like / zeros_like read only metadata: the (float32) probabilities' shape and dtype
        like.replace_input_with(probs, raw)
        like.update_kwarg("dtype", probs.meta["val"].dtype)
    for node in sorted(m["replaced"], key=order.__getitem__, reverse=True):
        graph.erase_node(node)


def fuse_moe_routing(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    order = {node: position for position, node in enumerate(graph.nodes)}  # erase users first
    matches = [m for node in list(graph.nodes) if is_op(node, aten.topk.default)
               for m in [_match(node) or _match_vllm(node)] if m]
    for m in matches:
        _rewrite(graph, m, order)
    ctx.counters["fuse_moe_routing"] += len(matches)
    return bool(matches)

