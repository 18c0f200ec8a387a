"""One Dynamo graph for every prompt length, decode (length 1) included, with transformers' causal LMs.

`torch.compile(model, backend="flagtree")` compiles twice over lengths 1..N with a static KV cache: Dynamo
specializes a size-1 dimension at the first call (length 1: a static graph), and transformers' Python
branches on the query length (`create_causal_mask`: `... and q_length == 1` with a compileable cache;
`sdpa_attention_forward`: `is_causal = q_length > 1 and ...`), so a graph traced at one side of
`length == 1` holds a guard that the other side fails. Its own comment says so: "prefill and decode are
2 separate graphs anyway". flagtree's compiled graph itself serves any length (sizes stay symbolic; GEMMs
and attention pick their decode or prefill kernels per call), so three changes on the caller's side
remove both causes:

    from flagtree_py.models import dynamic_length

    dynamic_length.use_flagtree_attention(model)   # SDPA with no branch on the query length
    step = torch.compile(forward, backend="flagtree")
    def forward(ids, positions):                    # a 4D mask: transformers' mask code is skipped
        mask = dynamic_length.static_cache_mask(positions, cache_length)
        return model(input_ids=ids, position_ids=positions, attention_mask=mask, past_key_values=cache).logits
    with dynamic_length.any_length(ids, positions):  # first call only: the length dim dynamic, even at 1
        step(ids, positions)

A third cause is the device's: Dynamo traces SDPA through the backend the device picks, and the math one
(which a CUDA device can pick for a masked call) guards on a length of 1; `flagtree_attention` hands Dynamo
`flagtree::attention` instead (see there).

`any_length` marks the length dimension dynamic and turns on `backed_size_oblivious` while Dynamo traces,
so a first call at length 1 gives a symbol rather than the constant 1. Without the mask the model is
still correct (transformers builds its own), but recompiles once between length 1 and 2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: the name the attention (and its mask) is registered under in transformers' interfaces
ATTENTION = "flagtree"


def flagtree_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, minus its `q_length > 1` test when a mask is given (then it is not
    causal either way): that test is a Python branch Dynamo guards on, splitting length 1 from the rest.

    While Dynamo traces, a masked call is `flagtree::attention` itself (what flagtree's `route_sdpa_calls`
    makes of SDPA anyway), not `F.scaled_dot_product_attention`: Dynamo runs SDPA's device-chosen backend
    on fake tensors, and where that is the math backend (a CUDA device with this mask; the CPU with flash SDP
    disabled) its matmul decomposition reshapes the transposed query with a `size == 1` test that
    specializes a length-1 first call (`positions.size()[1] == 1`, torch 2.11 and 2.13 alike; issue 9:
    length 2 compiled again). The op's fake implementation computes a shape and tests no size."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if attention_mask is None or kwargs.get("position_bias") is not None:
        # no mask: causality comes from `is_causal`, which does depend on the query length
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if _traced_as_flagtree_op(query, key, value, attention_mask, dropout):
        import flagtree_py.ops  # noqa: F401  (registers torch.ops.flagtree.attention)

        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        # K/V heads as stored: the op shares each between its group of query heads (no repeat_kv copy)
        out = torch.ops.flagtree.attention(query, key, value, attention_mask, scale, False)
        return out.transpose(1, 2).contiguous(), None
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # as transformers does with a mask: flagtree's fuse_attention reads through the repeat
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, is_causal=False)
    return out.transpose(1, 2).contiguous(), None


def _traced_as_flagtree_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                           dropout: float) -> bool:
    """Whether this call is under Dynamo and of a form `flagtree::attention` takes (`route_sdpa_calls`'s
    `sdpa_form_taken`, and K/V heads dividing Q's, a 4D mask). Eager calls keep torch's SDPA (its fused
    CPU/GPU kernels)."""
    from flagtree_py.passes.fuse_attention import sdpa_form_taken

    if not torch.compiler.is_compiling():
        return False
    return (sdpa_form_taken(query, value, dropout, None) and key.dim() == value.dim() == mask.dim() == 4
            and isinstance(query.shape[1], int) and isinstance(key.shape[1], int)
            and query.shape[1] % key.shape[1] == 0)


def register_attention() -> None:
    """Register `flagtree_attention` with transformers (idempotent). Its mask function is transformers'
    SDPA one, so a call with no 4D mask still gets a correct mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, flagtree_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def use_flagtree_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Switch an HF model (eager and compiled alike) to `flagtree_attention`; returns the model."""
    register_attention()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTENTION)
    else:  # older transformers: the config field the attention lookup reads
        model.config._attn_implementation = ATTENTION
    return model


def static_cache_mask(positions: torch.Tensor, cache_length: int) -> torch.Tensor:
    """[batch, 1, length, cache_length] bool: query at position p sees cache slots 0..p.

    Right for transformers' StaticCache when slot i holds position i, as in plain generation: the prompt
    starts at position 0 after `cache.reset()` and each step follows on (transformers >= 5.19 writes at the
    cache's running length, not at `position_ids`), with no padding. Passed as `attention_mask`, it makes
    transformers skip its own mask code and the length tests in it.
    """
    slots = torch.arange(cache_length, device=positions.device)
    return slots[None, None, None, :] <= positions[:, None, :, None]


def size_oblivious_supported() -> bool:
    """Whether this torch has `backed_size_oblivious` (without it a length-1 first call is specialized)."""
    config = getattr(torch.fx.experimental, "_config", None)
    return config is not None and hasattr(config, "backed_size_oblivious")


@contextlib.contextmanager
def any_length(*tensors: torch.Tensor, dim: int = 1) -> Iterator[None]:
    """For the first call of a compiled function: `dim` of each tensor is dynamic, size 1 included.

    Dynamo reads both when it traces; later calls need neither (the graph's guards accept any length).
    """
    for tensor in tensors:
        torch._dynamo.mark_dynamic(tensor, dim)
    if not size_oblivious_supported():
        yield
        return
    from torch.fx.experimental import _config

    with _config.patch(backed_size_oblivious=True):
        yield
