"""flagtree::moe_experts kernels (codegen/moe_experts.py) under the CPU interpreter, fp32: the counting sort
on edge cases, both tile buckets, every target's checks, and an ahead-of-time build for sm_90."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F

import flagtree_py
from flagtree_py.runtime.aot import compile_for_nvidia
from flagtree_py.runtime.launch import GuardedKernel
from flagtree_py.runtime.moe_experts import scatter_fallback, sort_pairs
from flagtree_py.targets import get_target, registered_targets

E, H, I = 8, 40, 24  # experts, hidden, intermediate: odd sizes cross the interpreter's 16/32 tiles


def _experts(x, gate, up, down, weights, ids):
    return torch.ops.flagtree.moe_experts(x, gate, up, down, weights, ids)


def _naive(x, gate, up, down, weights, ids):
    """Per token and choice, in float64: the definition."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    x, gate, up, down, weights = (t.double() for t in (x, gate, up, down, weights))
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            out[t] += weights[t, j] * (down[e] @ (F.silu(gate[e] @ x[t]) * (up[e] @ x[t])))
    return out


def _inputs(tokens: int, ids: torch.Tensor | None = None, top_k: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=g)
    gate_up = torch.randn(E, 2 * I, H, generator=g) / H**0.5  # HF's merged layout: gate and up are its halves
    down = torch.randn(E, H, I, generator=g) / I**0.5
    if ids is None:
        ids = torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, ids.shape[1], generator=g), -1)
    return x, gate_up[:, :I], gate_up[:, I:], down, weights, ids


def _bound(expected: torch.Tensor) -> float:
    # fp32 products of H=40 and I=24 terms and a k-sum, in another order than float64: a few ulps of the
    # largest value (the same 1e-5 relative bound as the other kernel tests)
    return 1e-5 * max(1.0, expected.abs().max().item())


def _compile(target: str = "interpreter"):
    return torch.compile(_experts, backend="flagtree", options={"target": target, "cache": False})


def _module(record: dict):
    return sys.modules[record["module_path"].rsplit("/", 1)[-1][:-3]]


@pytest.mark.parametrize("case", ["random", "one_expert", "two_experts_of_eight", "ties", "large_bucket"])
def test_moe_experts_kernels_match_the_definition(case):
    tokens, ids = {"random": (7, None), "one_expert": (9, torch.zeros(9, 1, dtype=torch.long)),
                   "two_experts_of_eight": (6, torch.tensor([[3, 6], [6, 3]] * 3)),
                   "ties": (5, None), "large_bucket": (70, None)}[case]
    inputs = _inputs(tokens, ids)
    if case == "ties":  # equal routing weights: only the expert ids order the pairs
        inputs = (*inputs[:4], torch.full_like(inputs[4], 0.5), inputs[5])
    with torch.no_grad():
        out = _compile()(*inputs)
    expected = _naive(*inputs)
    assert (out.double() - expected).abs().max().item() <= _bound(expected)
    (record,) = flagtree_py.report()
    kinds = sorted(k["kind"] for k in record["kernels"])
    assert kinds == ["moe_experts_count", "moe_experts_down", "moe_experts_gate_up", "moe_experts_reduce",
                     "moe_experts_scatter"]
    assert record["kernel_failures"] == [] and record["codegen_fallbacks"] == [] and record["extern_ops"] == []


def test_one_dynamic_compile_serves_decode_and_prefill_buckets():
    compiled = _compile()
    for tokens in (3, 5, 70):  # 6, 10 pairs: "small" (BLOCK_M 16); 140 pairs > 16 per expert: "large" (32)
        inputs = _inputs(tokens, seed=tokens)
        for tensor in (inputs[0], inputs[4], inputs[5]):  # the token count is dynamic; the weights are not
            torch._dynamo.mark_dynamic(tensor, 0)
        with torch.no_grad():
            out = compiled(*inputs)
        expected = _naive(*inputs)
        assert (out.double() - expected).abs().max().item() <= _bound(expected)
    (record,) = flagtree_py.report()
    assert record["dynamic_symbols"]  # the token counts (one symbol per marked input)
    assert record["kernel_failures"] == [] and record["codegen_fallbacks"] == []
    config = next(k["config"] for k in record["kernels"] if k["kind"] == "moe_experts_gate_up")
    assert config["small"]["gate_up"]["BLOCK_M"] == 16 and config["large"]["gate_up"]["BLOCK_M"] == 32


def _sorted_reference(flat_ids: torch.Tensor, experts: int, block_m: int) -> tuple[list, list, list]:
    """Segments of pair indices per expert in ascending order (stable), padded to block_m."""
    pairs, block_expert, block_rows = [], [], []
    for e in range(experts):
        mine = [i for i, v in enumerate(flat_ids.tolist()) if v == e]
        for start in range(0, len(mine), block_m):
            chunk = mine[start:start + block_m]
            pairs.append(chunk)
            block_expert.append(e)
            block_rows.append(len(chunk))
    return pairs, block_expert, block_rows


@pytest.mark.parametrize("ids", [
    [5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5],  # all pairs to one expert (crosses a block)
    [7, 0, 7, 0, 2, 2, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],  # experts 3..6 empty; several programs
    [3],  # one pair
], ids=["one_expert", "empty_experts", "one_pair"])
def test_counting_sort_is_stable_padded_and_matches_its_fallback(ids):
    inputs = _inputs(4)
    with torch.no_grad():
        _compile()(*inputs)
    (record,) = flagtree_py.report()
    module = _module(record)
    name = next(k["name"] for k in record["kernels"] if k["kind"] == "moe_experts_count")[:-len("_count")]
    plan = getattr(module, f"{name}_plan")
    count, scatter = getattr(module, f"{name}_count"), getattr(module, f"{name}_scatter")
    assert plan["sort_block"] == 8  # the interpreter's 64-element one-hot tile over 8 experts: 3 programs here
    flat = torch.tensor(ids, dtype=torch.long)
    block_m = 16
    sorted_pairs, block_expert, block_rows = sort_pairs(count, scatter, flat, plan, block_m)
    assert isinstance(count, GuardedKernel) and count.failed is None and scatter.failed is None
    pairs, experts_of, rows_of = _sorted_reference(flat, E, block_m)
    used = len(pairs)
    assert block_rows.tolist() == rows_of + [0] * (block_rows.numel() - used)  # spare blocks: no rows
    assert block_expert[:used].tolist() == experts_of
    for b, chunk in enumerate(pairs):
        assert sorted_pairs[b * block_m:b * block_m + len(chunk)].tolist() == chunk
    # the aten twin computes the same table (any mix of kernels and fallbacks agrees)
    twin = [torch.full_like(t, -1) for t in (sorted_pairs, block_expert, block_rows)]
    counts = torch.zeros(1, plan["e_block"], dtype=torch.int32)
    scatter_fallback(flat, counts, *twin, flat.numel(), 1, block_rows.numel())
    assert twin[2].tolist() == block_rows.tolist() and twin[1][:used].tolist() == experts_of
    for b, chunk in enumerate(pairs):
        assert twin[0][b * block_m:b * block_m + len(chunk)].tolist() == chunk


@pytest.mark.slow
def test_every_target_lowers_moe_experts_within_its_checks():
    inputs = _inputs(7)
    expected = _naive(*inputs)
    for name in registered_targets():
        torch._dynamo.reset()
        flagtree_py.clear_report()
        with torch.no_grad():
            out = _compile(name)(*inputs)
        assert (out.double() - expected).abs().max().item() <= _bound(expected), name
        (record,) = flagtree_py.report()
        assert record["kernel_checks"] == [] and record["codegen_fallbacks"] == [], (name, record["kernel_checks"])
        gate_up = next(k for k in record["kernels"] if k["kind"] == "moe_experts_gate_up")
        target = get_target(name)
        for bucket in ("small", "large"):
            warps = gate_up["config"][bucket]["gate_up"]["num_warps"]
            assert warps * target.warp_size <= target.max_threads_per_block


def test_moe_experts_with_no_tile_that_fits_the_chip_runs_its_aten_reference(compile_with_target):
    # 2 KiB of shared memory: no grouped-GEMM tile (A and two B tiles of 16 x 16 fp32: 3 KiB) fits
    small = dataclasses.replace(get_target("metax"), name="tiny-smem-moe-experts", shared_memory_per_block=2048)
    inputs = _inputs(5)
    out, record = compile_with_target(small, _experts, *inputs)
    assert not [k for k in record["kernels"] if k["kind"].startswith("moe_experts")]
    (check,) = [c for c in record["kernel_checks"] if c["action"] == "aten fallback"]
    assert "moe_experts" in check["kernel"]
    expected = _naive(*inputs)
    assert (out.double() - expected).abs().max().item() <= _bound(expected)


@pytest.mark.slow
@pytest.mark.parametrize("tokens", [1, 70])
def test_moe_experts_kernels_compile_for_sm90(tokens):
    inputs = _inputs(tokens)
    with torch.no_grad():
        _compile("nvidia")(*inputs)  # lowered for the H100's tables, run by the interpreter here
    (record,) = flagtree_py.report()
    module = _module(record)
    kernels = [k for k in vars(module).values() if isinstance(k, GuardedKernel) and "moe_experts" in k.name]
    assert len(kernels) == 5
    for kernel in kernels:
        assert kernel.signature is not None and kernel.failed is None, kernel.name
        compiled = compile_for_nvidia(kernel.kernel.fn, kernel.signature, 90)
        assert compiled.asm["cubin"], kernel.name


def test_check_kernels_compares_the_whole_buffers_with_the_aten_twins():
    inputs = _inputs(9)
    compiled = torch.compile(_experts, backend="flagtree",
                             options={"target": "interpreter", "cache": False, "check_kernels": True})
    with torch.no_grad():
        compiled(*inputs)
    (record,) = flagtree_py.report()
    errors = {name.split("_moe_experts_")[1]: entry for name, entry in record["kernel_errors"].items()}
    assert sorted(errors) == ["count", "down", "reduce"]  # the rows each writes whole
    assert errors["count"]["max_abs_error"] == 0 and errors["reduce"]["max_rel_error"] <= 1e-6
    assert errors["down"]["max_rel_error"] <= 1e-5  # fp32 products of I=24 terms, another order


def test_bf16_runs_in_the_kernels_within_bf16_roundings():
    inputs = [t.to(torch.bfloat16) if t.is_floating_point() else t for t in _inputs(70)]
    with torch.no_grad():
        out = _compile()(*inputs)
    (record,) = flagtree_py.report()
    assert record["kernel_failures"] == [] and record["codegen_fallbacks"] == []
    expected = _naive(*inputs)
    # four bf16 roundings on the way (gate/up, hidden, expert output, weighted row), and Triton's interpreter
    # truncates fp32 -> bf16 instead of rounding to nearest (a GPU rounds): within 4 bf16 epsilons (2**-7)
    # of the largest value (measured: about 2). An unwidened bf16 tl.dot in the interpreter is off by 1e10.
    assert (out.double() - expected).abs().max().item() <= 4 * 2**-7 * expected.abs().max().item()
