"""Launching flagtree's attention kernels from a generated wrapper, and their aten fallbacks.

The kernels take every tensor with its strides, read at run time, so one kernel serves any layout
and any (symbolic) sequence length. `flash_attention` runs the prefill kernel; `flash_decoding`
splits the KV length over programs (step 1) and merges the chunks (step 2). Each kernel is a
`GuardedKernel`: if one fails it runs its fallback, which has the same arguments.
"""

from __future__ import annotations

import math

import torch

from flagtree_py.ops import attention_reference
from flagtree_py.runtime.launch import cdiv, run


def _mask_4d(mask: torch.Tensor | None, q: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, tuple]:
    """The mask broadcast to [B, Hq, Sq, Sk] (stride 0 where it broadcasts), or q with zero strides."""
    if mask is None:
        return q, (0, 0, 0, 0)
    full = mask.expand(q.shape[0], q.shape[1], q.shape[2], kv_len)
    return full, tuple(full.stride())


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()]


def flash_attention(kernel, q, k, v, mask, out, *, scale: float, block_m: int, block_n: int,
                    num_warps: int, num_stages: int) -> None:
    """Prefill: grid (batch * q heads, query blocks), the kernel taking the query blocks last first."""
    batch, heads, q_len, head_dim = q.shape
    if batch * heads * q_len == 0:
        return
    kv_len = k.shape[2]
    mask, mask_strides = _mask_4d(mask, q, kv_len)
    args = [q, k, v, mask, out, *_strides(q, k, v), *mask_strides, *_strides(out),
            heads, heads // k.shape[1], q_len, kv_len, float(scale)]
    run(kernel, (batch * heads, cdiv(q_len, block_m)), *args, BLOCK_M=block_m, BLOCK_N=block_n,
        HEAD_DIM=head_dim, BLOCK_D=_pow2(head_dim), num_warps=num_warps, num_stages=num_stages)


def flash_decoding(kernel, combine, q, k, v, mask, out, *, scale: float, block_m: int, block_n: int,
                   num_warps: int, num_stages: int, programs: int) -> None:
    """Decode: grid (KV chunks, batch * K/V heads), then one combine program per query row.

    The KV length is cut into enough chunks that about `programs` programs run (the target's
    figure: a few per multiprocessor), each chunk a whole number of BLOCK_N blocks.
    """
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if batch * heads * q_len == 0:
        return
    # a graph of symbolic length carries the tile of the most decode rows: this call's rows may need fewer
    # (a length-1 step then runs the tile a length-1 graph would have); rows <= BLOCK_M holds either way
    block_m = min(block_m, max(16, _pow2(heads // kv_heads * q_len)))
    splits = max(1, min(cdiv(max(kv_len, 1), block_n), cdiv(programs, batch * kv_heads)))
    chunk = cdiv(cdiv(max(kv_len, 1), splits), block_n) * block_n
    splits = cdiv(max(kv_len, 1), chunk)
    block_d = _pow2(head_dim)
    partial = torch.empty((batch, heads, q_len, splits, block_d), dtype=torch.float32, device=q.device)
    lse = torch.empty((batch, heads, q_len, splits), dtype=torch.float32, device=q.device)
    mask, mask_strides = _mask_4d(mask, q, kv_len)
    args = [q, k, v, mask, partial, lse, *_strides(q, k, v), *mask_strides,
            kv_heads, heads // kv_heads, q_len, kv_len, chunk, splits, float(scale)]
    run(kernel, (splits, batch * kv_heads), *args, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim,
        BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages)
    run(combine, (batch * heads * q_len,), partial, lse, out, *_strides(out), heads, q_len, splits,
        BLOCK_S=_pow2(splits), HEAD_DIM=head_dim, BLOCK_D=block_d, num_warps=num_warps)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# -- fallbacks: same arguments as the kernels ----------------------------------------------------


def _reference(q, k, v, mask, strides, mask_kind: str, causal: bool, sm_scale: float) -> torch.Tensor:
    mask_tensor = None
    if mask_kind != "none":
        sizes = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        mask_tensor = torch.as_strided(mask, sizes, strides)
        if mask_kind == "bool":
            mask_tensor = mask_tensor != 0
    return attention_reference(q, k, v, mask_tensor, sm_scale, causal)


def prefill_fallback(q, k, v, mask, out, *ints_and_scale, mask_kind: str, causal: bool) -> None:
    """The prefill kernel with aten ops."""
    mask_strides = ints_and_scale[12:16]
    out.copy_(_reference(q, k, v, mask, mask_strides, mask_kind, causal, ints_and_scale[-1]))


def decode_fallback(q, k, v, mask, partial, lse, *ints_and_scale, mask_kind: str, causal: bool) -> None:
    """Step 1 with aten ops: the whole result lands in chunk 0, the other chunks weigh nothing."""
    mask_strides = ints_and_scale[12:16]
    result = _reference(q, k, v, mask, mask_strides, mask_kind, causal, ints_and_scale[-1])
    partial.zero_()
    partial[..., 0, : result.shape[-1]] = result.float()
    lse.fill_(float("-inf"))
    lse[..., 0] = 0.0


def combine_fallback(partial, lse, out, stride_ob, stride_oh, stride_om, stride_od, num_heads, q_len, num_splits):
    """Step 2 with aten ops."""
    weight = torch.exp2(lse - lse.amax(-1, keepdim=True).nan_to_num(0.0, neginf=0.0))
    merged = (partial * weight[..., None]).sum(-2) / weight.sum(-1, keepdim=True).clamp_min(math.ulp(0.0))
    out.copy_(merged[..., : out.shape[-1]])


def decode_reference(q, k, v, mask, partial, lse, *ints_and_scale, mask_kind: str, causal: bool) -> torch.Tensor:
    """What flash-decoding's two steps produce together (the attention output), with aten ops."""
    return _reference(q, k, v, mask, ints_and_scale[12:16], mask_kind, causal, ints_and_scale[-1])


# What check_kernels (runtime/check.py) compares. Prefill writes `out`. Flash-decoding is checked as a pair:
# step 1's chunking of the KV length is the kernel's own (its twin puts everything in chunk 0), so its
# scratch is not compared; step 2's output is, against `decode_reference`, found through the shared `partial`.
prefill_fallback.writes = ("out",)
decode_fallback.writes = ()
decode_fallback.pair_reference = decode_reference
decode_fallback.pair_scratch = "partial"
combine_fallback.writes = ("out",)  # step 2 alone, on step 1's scratch, as well
combine_fallback.pair_scratch = "partial"
