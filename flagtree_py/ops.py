"""flagtree's own graph ops (`torch.ops.flagtree.*`): what a fusion pass puts in place of a pattern
that the generic pointwise/reduction lowering cannot keep in one kernel.

Each op has an eager implementation in aten ops (the reference, and the kernel's fallback) and a
fake implementation (shapes only), so a pass can give the new node a correct `meta["val"]`.
Generated modules import this module, which registers the ops.
"""

from __future__ import annotations

import torch


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
