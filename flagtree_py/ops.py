"""flagtree's own graph ops (`torch.ops.flagtree.*`): what a fusion pass puts in place of a pattern
that the generic pointwise/reduction lowering cannot keep in one kernel.

Each op has an eager implementation in aten ops (the reference, and the kernel's fallback) and a
fake implementation (shapes only), so a pass can give the new node a correct `meta["val"]`.
Generated modules import this module, which registers the ops.

`flagtree::attention` is what `passes/fuse_attention.py` turns every supported scaled-dot-product
attention form into: one op, whatever aten variant the device chose (`_scaled_dot_product_flash_attention`,
`..._efficient_attention`, `..._flash_attention_for_cpu`, ...), with K/V heads *not* repeated for
grouped-query attention (the op shares each K/V head between `q_heads // kv_heads` query heads). The
wrapper lowers it to Triton kernels (codegen/attention.py); the eager implementation below is the
reference the kernels are tested against and the aten fallback they run if they fail.
"""

from __future__ import annotations

import torch

__all__ = ["attention", "attention_reference", "moe_experts", "moe_experts_reference", "moe_routing",
           "moe_routing_dense"]


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        scale: float, causal: bool) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, k/v heads shared by groups of q heads: [B, H, Sq, Dv].

    Causal is top-left aligned (query i sees keys j <= i), as in torch's SDPA. A row that sees no key
    gives zeros (torch's `_safe_softmax` convention) rather than NaN.
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        rows, cols = scores.shape[-2:]
        keep = torch.ones(rows, cols, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    probabilities = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all -inf rows: NaN -> 0
    out = torch.matmul(probabilities, v.float()).to(q.dtype)
    return out.transpose(1, 2).contiguous().transpose(1, 2)  # the layout of _register_fake below


@torch.library.custom_op("flagtree::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
              causal: bool) -> torch.Tensor:
    return attention_reference(q, k, v, mask, scale, causal)


@attention.register_fake
def _(q, k, v, mask, scale, causal):
    # [B, H, Sq, Dv] stored as [B, Sq, H, Dv], as flash kernels write it: the usual transpose(1, 2)
    # and reshape to [B, Sq, H * Dv] that follow attention are then views, not copies
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[-1]).transpose(1, 2)

@torch.library.custom_op("flagtree::moe_routing", mutates_args=())
def moe_routing(logits: torch.Tensor, top_k: int, renormalize: bool, weight_dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE router: softmax over the experts (last dim, in float32) -> top-k -> optionally divide
    the k weights by their sum -> weights cast to `weight_dtype`. Returns (weights, expert ids int64),
    both [..., top_k]. Ties among equal probabilities: as torch.topk (the Triton kernel takes the
    lowest expert index; see codegen/moe_routing.py)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(weight_dtype), ids


@moe_routing.register_fake
def _(logits, top_k, renormalize, weight_dtype):
    shape = (*logits.shape[:-1], top_k)
    return logits.new_empty(shape, dtype=weight_dtype), logits.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("flagtree::moe_routing_dense", mutates_args=())
def moe_routing_dense(logits: torch.Tensor, top_k: int, renormalize: bool, weight_dtype: torch.dtype) -> torch.Tensor:
    """`moe_routing` scattered into a dense [..., experts] matrix: the top-k weights in place, zeros
    elsewhere (Step3's `zeros_like(probs).scatter(-1, ids, weights)`), cast to `weight_dtype`."""
    weights, ids = moe_routing(logits, top_k, renormalize, torch.float32)
    return torch.zeros(logits.shape, dtype=torch.float32, device=logits.device).scatter(-1, ids, weights).to(weight_dtype)


@moe_routing_dense.register_fake
def _(logits, top_k, renormalize, weight_dtype):
    return logits.new_empty(logits.shape, dtype=weight_dtype)


def moe_experts_reference(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                          weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The routed experts of a MoE block, in eager aten ops: for each token t and each of its k
    choices (expert e = ids[t, j], weight w = weights[t, j]):

        y[t, j] = (down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t]))) * w    (rounded to the dtype of x * w)
        out[t]  = sum over j of y[t, j]                                        (in float32, then x's dtype)

    x [T, H]; gate, up [E, I, H]; down [E, H, I]; weights [T, k]; ids [T, k] (int). Each expert's tokens
    go through one matrix product per projection, in the order of the (token, choice) pairs, so
    the result does not depend on how pairs are grouped; the k-sum runs in a fixed order."""
    tokens, top_k = ids.shape
    flat = ids.reshape(-1)
    out_dtype = torch.promote_types(x.dtype, weights.dtype)
    rows = torch.zeros(tokens * top_k, x.shape[1], dtype=out_dtype, device=x.device)
    for expert in torch.unique(flat).tolist():
        pairs = (flat == expert).nonzero().squeeze(1)
        xs = x[pairs // top_k]
        hidden = torch.nn.functional.silu(xs @ gate[expert].t()) * (xs @ up[expert].t())
        product = (hidden @ down[expert].t()) * weights.reshape(-1)[pairs, None]
        rows[pairs] = product.to(out_dtype)
    return rows.view(tokens, top_k, -1).float().sum(1).to(x.dtype)


@torch.library.custom_op("flagtree::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                ids: torch.Tensor) -> torch.Tensor:
    """What `passes/fuse_moe_experts.py` puts in place of a MoE block's routed experts (HF grouped_mm and
    batched_mm, Step3's dense form): see `moe_experts_reference`. Lowered by codegen/moe_experts.py to
    a counting sort of the (token, expert) pairs by expert and two grouped GEMMs."""
    return moe_experts_reference(x, gate, up, down, weights, ids)


@moe_experts.register_fake
def _(x, gate, up, down, weights, ids):
    return x.new_empty(x.shape[0], x.shape[1])
