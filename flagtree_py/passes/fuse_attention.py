"""Every scaled-dot-product attention form becomes one `flagtree::attention` node.

Which aten op a graph holds depends on the device and the mask (the CPU flash kernel, CUDA flash,
memory-efficient or cuDNN attention, or `scaled_dot_product_attention` kept whole); the pass reads
them all into one op: (q, k, v, mask, scale, causal). It also looks through the K/V head repeat that
transformers' `repeat_kv` puts before SDPA when a mask is present (unsqueeze -> expand -> clone ->
view) and through Step3's broadcast of its single K/V head (expand): the op then reads the K/V heads
as stored, and the repeated copy becomes dead code. `enable_gqa=True` needs no looking through.

A form that is not supported (dropout, a mask of another rank, a used logsumexp output...) keeps its
aten op; the reason is counted under `attention_kept_extern: <why>` in the pass counters.

`route_sdpa_calls` does the same one floor up, on Dynamo's graph, before AOTAutograd lets the device
choose an SDPA backend: on a GPU the choice depends on dtype, mask and GQA, and its math backend would
decompose attention into matmuls and a softmax that no pass could recognize reliably. Routed calls
reach this pass as `flagtree::attention` already; it still looks through their K/V repeat and mask.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.fx.operator_schemas import normalize_function

import flagtree_py.ops  # noqa: F401  (registers torch.ops.flagtree.attention)
from flagtree_py.passes import PassContext

aten = torch.ops.aten

# op -> (argument name of the mask, True if the op returns a tuple whose [0] is the output)
_FORMS = {
    aten.scaled_dot_product_attention.default: ("attn_mask", False),
    aten._scaled_dot_product_flash_attention_for_cpu.default: ("attn_mask", True),
    aten._scaled_dot_product_flash_attention.default: (None, True),
    aten._scaled_dot_product_efficient_attention.default: ("attn_bias", True),
    aten._scaled_dot_product_cudnn_attention.default: ("attn_bias", True),
}
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def sdpa_form_taken(query, value, dropout_p, scale) -> bool:
    """Whether an SDPA call on these (real or example) tensors is a form `flagtree::attention` takes:
    4D, no dropout, a Python float scale or none, V with Q's static head size (the kernels read V so)."""
    return (query is not None and value is not None and query.dim() == 4 and dropout_p == 0.0
            and (scale is None or isinstance(scale, float)) and isinstance(query.shape[-1], int)
            and value.shape[-1] == query.shape[-1])


def route_sdpa_calls(gm: torch.fx.GraphModule) -> int:
    """Dynamo's graph: every plain `F.scaled_dot_product_attention` call -> `flagtree::attention`."""
    routed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch._C._nn.scaled_dot_product_attention:
            continue
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        bound = dict(zip(names, node.args)) | dict(node.kwargs)
        q, k, v = bound.get("query"), bound.get("key"), bound.get("value")
        mask, causal, scale = bound.get("attn_mask"), bound.get("is_causal", False), bound.get("scale")
        example = q.meta.get("example_value") if isinstance(q, torch.fx.Node) else None
        v_example = v.meta.get("example_value") if isinstance(v, torch.fx.Node) else None
        if (not sdpa_form_taken(example, v_example, bound.get("dropout_p", 0.0), scale)
                or not isinstance(causal, bool) or not isinstance(bound.get("enable_gqa", False), bool)):
            continue  # left to torch's SDPA; the aten-level pass may still take the backend op
        if scale is None:
            scale = float(example.shape[-1]) ** -0.5
        node.target = torch.ops.flagtree.attention.default
        node.args, node.kwargs = (q, k, v, mask, scale, causal), {}
        routed += 1
    if routed:
        gm.recompile()
    return routed


def fuse_attention(graph: torch.fx.Graph, ctx: PassContext) -> bool:
    fused = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.flagtree.attention.default:
            q, k, v, mask, scale, causal = node.args
            k_heads, k_group = _through_head_repeat(k)
            v_heads, v_group = _through_head_repeat(v)
            if k_group != v_group:
                k_heads, v_heads = k, v
            node.args = (q, k_heads, v_heads, _through_bool_to_additive(mask), scale, causal)
            fused += 1
            continue
        if node.op != "call_function" or node.target not in _FORMS:
            continue
        form, why = _read_form(node)
        if form is None:
            ctx.counters[f"attention_kept_extern: {why}"] += 1
            continue
        output, q, k, v, mask, scale, causal = form
        mask = _through_bool_to_additive(mask)
        k_heads, k_group = _through_head_repeat(k)
        v_heads, v_group = _through_head_repeat(v)
        if k_group != v_group:  # K and V repeated differently: read them repeated
            k_heads, v_heads = k, v
        with graph.inserting_before(node):
            fused_node = graph.call_function(torch.ops.flagtree.attention.default,
                                             (q, k_heads, v_heads, mask, scale, causal))
        fused_node.meta["val"] = output.meta["val"]  # same layout as the op it replaces
        output.replace_all_uses_with(fused_node)
        for dead in [u for u in node.users if u is not output and not u.users]:
            graph.erase_node(dead)  # unused getitems of the other outputs
        for dead in ([output] if output is not node else []) + [node]:
            graph.erase_node(dead)
        fused += 1
    ctx.counters["fuse_attention"] += fused
    return fused > 0


def _read_form(node: torch.fx.Node):
    """(output node, q, k, v, mask, scale, causal), or (None, why not)."""
    mask_name, returns_tuple = _FORMS[node.target]
    normalized = normalize_function(node.target, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True)
    if normalized is None:
        return None, "arguments not understood"
    kwargs = normalized.kwargs
    q, k, v = kwargs["query"], kwargs["key"], kwargs["value"]
    if kwargs.get("dropout_p", 0.0) != 0.0:
        return None, "dropout"
    mask = kwargs.get(mask_name) if mask_name else None
    causal = kwargs.get("is_causal", False)
    scale = kwargs.get("scale")
    if not all(isinstance(x, torch.fx.Node) for x in (q, k, v)) or not isinstance(causal, bool):
        return None, "symbolic arguments"
    qv, kv, vv = (x.meta["val"] for x in (q, k, v))
    if qv.dim() != 4 or kv.dim() != 4 or vv.dim() != 4:
        return None, "not [batch, heads, seq, dim]"
    if qv.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not (qv.dtype == kv.dtype == vv.dtype):
        return None, f"dtype {qv.dtype}"
    if not _same(qv.shape[1] % kv.shape[1], 0) or not _same(kv.shape[1], vv.shape[1]):
        return None, "heads not a multiple of K/V heads"
    if not (_same(qv.shape[-1], kv.shape[-1]) and _same(qv.shape[-1], vv.shape[-1])):
        return None, "q, k and v head sizes differ"
    if mask is not None:
        mv = mask.meta.get("val") if isinstance(mask, torch.fx.Node) else None
        if mv is None or mv.dim() > 4 or (mv.dtype != torch.bool and mv.dtype != qv.dtype and mv.dtype != torch.float32):
            return None, "mask form"
    if scale is None:
        scale = float(qv.shape[-1]) ** -0.5
    if not isinstance(scale, float):
        return None, "symbolic scale"
    if returns_tuple:
        getters = [u for u in node.users if u.users or u.target is not operator.getitem]  # dead getitems aside
        if not all(u.target is operator.getitem for u in getters) or any(u.args[1] != 0 for u in getters):
            return None, "an output besides the attention result is used (logsumexp)"
        if len(getters) != 1:
            return None, "no single use of the attention result"
        output = getters[0]
    else:
        output = node
    return (output, q, k, v, mask, scale, causal), None


def _through_head_repeat(node: torch.fx.Node) -> tuple[torch.fx.Node, int]:
    """The un-repeated K/V heads under a repeat_kv chain (and the repeat factor), else (node, 1)."""
    val = node.meta["val"]
    if node.target == aten.expand.default:  # [B, 1, S, D] broadcast to every head (Step3's single K/V head)
        source = node.args[0]
        sval = source.meta["val"]
        if sval.dim() == 4 and _same(sval.shape[1], 1) and tuple(sval.shape[2:]) == tuple(val.shape[2:]):
            return source, int(val.shape[1])
        return node, 1
    if node.target not in _VIEWS:
        return node, 1
    inner = node.args[0]
    if inner.target == aten.clone.default:
        inner = inner.args[0]
    if inner.target != aten.expand.default:
        return node, 1
    repeated = inner.args[0]
    while repeated.target == aten.slice.Tensor and repeated.args[2:] in ((0, 2**63 - 1), ()):
        repeated = repeated.args[0]
    if repeated.target != aten.unsqueeze.default or repeated.args[1] != 2:
        return node, 1
    source = repeated.args[0]
    sval, eval_ = source.meta["val"], inner.meta["val"]
    if sval.dim() != 4 or eval_.dim() != 5 or not isinstance(eval_.shape[2], int):
        return node, 1
    # [B, Hkv, S, D] -> [B, Hkv, n, S, D] -> [B, Hkv * n, S, D]: head h reads K/V head h // n
    if tuple(eval_.shape[:2]) != tuple(sval.shape[:2]) or tuple(eval_.shape[3:]) != tuple(sval.shape[2:]):
        return node, 1
    if not _same(val.shape[1], sval.shape[1] * eval_.shape[2]):
        return node, 1
    return source, int(eval_.shape[2])


def _through_bool_to_additive(mask):
    """The boolean mask under `where(keep, 0.0, -inf)` (how SDPA turns a boolean mask into a bias, and
    how transformers builds its mask): reading 1 byte per element instead of 4, and no kernel to fill it."""
    if not isinstance(mask, torch.fx.Node) or mask.target != aten.where.self:
        return mask
    keep, zero, minus_inf = mask.args
    if keep.meta["val"].dtype != torch.bool or _scalar(zero) != 0.0 or _scalar(minus_inf) != float("-inf"):
        return mask
    if tuple(keep.meta["val"].shape) != tuple(mask.meta["val"].shape):
        return mask
    return keep


def _scalar(node):
    if isinstance(node, (int, float)):
        return float(node)
    if isinstance(node, torch.fx.Node) and node.target == aten.scalar_tensor.default:
        return float(node.args[0])
    return None


def _same(a, b) -> bool:
    """a == b for every value of the size symbols (never adds a guard)."""
    return statically_known_true(a == b)
