"""Launching the kernels of `flagtree::moe_experts` (codegen/moe_experts.py) from a generated wrapper,
and their aten fallbacks.

Per call, from the token count T (symbolic at compile time) and k: the pairs T * k choose the tile
bucket ("small" while the pairs average at most `small_pairs_per_expert` per expert: decode; else
"large"), whose BLOCK_M the sort pads every expert's segment to. The grids are sized from T alone
(an upper bound of the row blocks: no count is read back to the host, so a CUDA graph can hold them);
blocks past the last segment exit at once.

Each kernel is a `GuardedKernel` whose fallback (below) has the same arguments and computes the same
buffer, so any mix of kernels and fallbacks gives the same result.
"""

from __future__ import annotations

import torch

from flagtree_py.runtime.launch import cdiv, run

#: programs' counts the scatter kernel adds per step
Q_BLOCK = 16
#: the k-sum kernel's tile
REDUCE_TILE = {"BLOCK_T": 16, "BLOCK_N": 64}


def row_blocks(pairs: int, experts: int, block_m: int) -> int:
    """Most BLOCK_M row blocks the sorted pairs can fill: each non-empty expert pads its segment by
    fewer than BLOCK_M rows, and at most min(experts, pairs) experts are non-empty."""
    return cdiv(pairs + min(experts, pairs) * (block_m - 1), block_m)


def run_moe_experts(count, scatter, gate_up, down, reduce, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                down_weight: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, out: torch.Tensor, *,
                plan: dict) -> None:
    """out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) with the five kernels of one moe_experts node.

    `plan`: experts, e_block, sort_block and sort_warps (the sort), small_pairs_per_expert, the launch meta
    of each bucket's GEMMs (`small`/`large`: {"gate_up": meta, "down": meta}) and of the reduce kernel.
    """
    tokens, top_k = ids.shape
    pairs = tokens * top_k
    if pairs == 0:
        return
    experts = plan["experts"]
    bucket = plan["small"] if pairs <= plan["small_pairs_per_expert"] * experts else plan["large"]
    device = x.device
    weights = weights.contiguous()
    sorted_pairs, block_expert, block_rows = sort_pairs(count, scatter, ids.reshape(-1), plan,
                                                        bucket["gate_up"]["BLOCK_M"])
    blocks = block_rows.numel()
    inter, hidden_size = gate.shape[1], x.shape[1]
    hidden = torch.empty((sorted_pairs.numel(), inter), dtype=x.dtype, device=device)
    rows = torch.empty((pairs, hidden_size), dtype=torch.promote_types(x.dtype, weights.dtype), device=device)
    meta = bucket["gate_up"]
    run(gate_up, (blocks, cdiv(inter, meta["BLOCK_N"])), x, gate, up, sorted_pairs, block_expert, block_rows, hidden,
        *x.stride(), *gate.stride(), *up.stride(), TOP_K=top_k, N=inter, K=hidden_size, **meta)
    meta = bucket["down"]
    run(down, (blocks, cdiv(hidden_size, meta["BLOCK_N"])), hidden, down_weight, sorted_pairs, block_expert,
        block_rows, weights, rows, *down_weight.stride(), N=hidden_size, K=inter, **meta)
    meta = plan["reduce"]
    run(reduce, (cdiv(tokens, meta["BLOCK_T"]), cdiv(hidden_size, meta["BLOCK_N"])), rows, out, tokens, *out.stride(),
        TOP_K=top_k, N=hidden_size, **meta)


def sort_pairs(count, scatter, flat_ids: torch.Tensor, plan: dict, block_m: int) -> tuple:
    """The pairs (token * k + choice) sorted by expert, stably, each expert's segment padded to `block_m`
    rows: (sorted pairs [blocks * block_m] int32, expert of each row block, valid rows of each row block).
    Rows past a segment's valid ones are left unwritten: the block table says which rows to read."""
    pairs = flat_ids.numel()
    experts, e_block, sort_block = plan["experts"], plan["e_block"], plan["sort_block"]
    programs = cdiv(pairs, sort_block)
    blocks = row_blocks(pairs, experts, block_m)
    device = flat_ids.device
    counts = torch.empty((programs, e_block), dtype=torch.int32, device=device)
    sorted_pairs = torch.empty((blocks * block_m,), dtype=torch.int32, device=device)
    block_expert = torch.empty((blocks,), dtype=torch.int32, device=device)
    block_rows = torch.empty((blocks,), dtype=torch.int32, device=device)
    sort_meta = {"EXPERTS": experts, "E_BLOCK": e_block, "SORT_BLOCK": sort_block, "num_warps": plan["sort_warps"]}
    run(count, (programs,), flat_ids, counts, pairs, **sort_meta)
    run(scatter, (programs,), flat_ids, counts, sorted_pairs, block_expert, block_rows, pairs, programs, blocks,
        Q_BLOCK=Q_BLOCK, BLOCK_M=block_m, **sort_meta)
    return sorted_pairs, block_expert, block_rows


# -- fallbacks: the same arguments as their kernels, aten inside -----------------------------------------


def count_fallback(ids, counts, pairs) -> None:
    sort_block = cdiv(pairs, counts.shape[0])
    sort_block = 1 << max(0, sort_block - 1).bit_length()  # a power of two, as the kernel's
    chunk = torch.arange(pairs, device=ids.device) // sort_block
    counts.zero_()
    flat = counts.view(-1)
    flat.index_add_(0, chunk * counts.shape[1] + ids[:pairs].long(), torch.ones_like(chunk, dtype=counts.dtype))


def scatter_fallback(ids, counts, sorted_pairs, block_expert, block_rows, pairs, programs, blocks) -> None:
    """The stable counting sort's result, from the ids alone (counts only give the expert width)."""
    block_m = sorted_pairs.numel() // blocks
    # the expert count is a constexpr of the kernel: E_BLOCK (the counts' width, a power of two at least
    # as large) stands in; it changes only the expert of blocks with no valid row, which nothing reads
    experts = counts.shape[1]
    flat = ids[:pairs].long()
    total = torch.bincount(flat, minlength=counts.shape[1])[:counts.shape[1]]
    padded = (total + block_m - 1) // block_m * block_m
    start = torch.cumsum(padded, 0) - padded
    order = torch.sort(flat, stable=True).indices
    rank = torch.arange(pairs, device=ids.device) - (torch.cumsum(total, 0) - total)[flat[order]]
    sorted_pairs[start[flat[order]] + rank] = order.to(torch.int32)
    first_row = torch.arange(blocks, device=ids.device) * block_m
    owner = (start + padded)[None, :].le(first_row[:, None]).sum(1)
    inside = owner < experts
    safe = owner.clamp(max=experts - 1)
    rows = (start[safe] + total[safe] - first_row).clamp(0, block_m)
    block_expert.copy_(safe.to(torch.int32))
    block_rows.copy_(torch.where(inside, rows, 0).to(torch.int32))


def gate_up_fallback(x, gate, up, sorted_pairs, block_expert, block_rows, hidden, *strides) -> None:
    top_k = _top_k(x, sorted_pairs, block_rows)
    block_m = sorted_pairs.numel() // block_rows.numel()
    for block, (expert, rows) in enumerate(zip(block_expert.tolist(), block_rows.tolist())):
        if rows:
            span = slice(block * block_m, block * block_m + rows)
            xs = x[sorted_pairs[span].long() // top_k]
            hidden[span] = (torch.nn.functional.silu(xs @ gate[expert].t()) * (xs @ up[expert].t())).to(hidden.dtype)


def _top_k(x, sorted_pairs, block_rows) -> int:
    """k = pairs / tokens: the number of valid sorted rows over the token count."""
    return max(1, int(block_rows.sum().item()) // max(1, x.shape[0]))


def down_fallback(hidden, down, sorted_pairs, block_expert, block_rows, weights, rows, *strides) -> None:
    block_m = sorted_pairs.numel() // block_rows.numel()
    flat_weights = weights.reshape(-1)
    for block, (expert, count) in enumerate(zip(block_expert.tolist(), block_rows.tolist())):
        if count:
            span = slice(block * block_m, block * block_m + count)
            pairs = sorted_pairs[span].long()
            rows[pairs] = ((hidden[span] @ down[expert].t()) * flat_weights[pairs, None]).to(rows.dtype)


def reduce_fallback(rows, out, tokens, *strides) -> None:
    top_k = rows.shape[0] // max(1, tokens)
    out.copy_(rows.view(tokens, top_k, -1).float().sum(1).to(out.dtype))


# what `check_kernels` compares (runtime/check.py): buffers the kernel writes whole. The sorted pairs and the
# hidden rows past each segment's valid rows are never written (by kernel or fallback), so the scatter and
# gate_up kernels are checked through what reads them: the down kernel's per-pair rows and the k-sum.
count_fallback.writes = ("counts",)
down_fallback.writes = ("rows",)
reduce_fallback.writes = ("out",)
