"""MoE routing (softmax -> top-k -> renormalise -> cast) as one kernel: against torch.topk, and left
alone where the match is not provably the same computation."""

from __future__ import annotations

import pytest
import torch

import flagtree_py


def _router(renormalize: bool, k: int):
    """The Qwen3-MoE router's form (transformers' Qwen3MoeTopKRouter after the linear)."""

    def route(logits):
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        values, ids = torch.topk(probs, k, dim=-1)
        if renormalize:
            values = values / values.sum(dim=-1, keepdim=True)
        return values.to(logits.dtype), ids

    return route


def _compile(fn, *inputs, dynamic=False):
    torch._dynamo.reset()
    flagtree_py.clear_report()
    out = torch.compile(fn, backend="flagtree", dynamic=dynamic, options={"target": "interpreter"})(*inputs)
    (record,) = flagtree_py.report()
    return out, record


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routing_is_one_kernel_and_matches_topk(renormalize, dtype):
    # continuous random logits: ties have probability zero, so the expert order is unique
    logits = torch.randn(5, 24).to(dtype)
    route = _router(renormalize, k=4)
    (weights, ids), record = _compile(route, logits)
    ref_weights, ref_ids = route(logits)
    assert record["passes"]["fuse_moe_routing"] == 1
    assert record["triton_kernels"] == 1 and set(record["extern_ops"]) == {"operator.getitem"}  # the (weights, ids) pair
    assert ids.dtype == torch.int64 and torch.equal(ids, ref_ids)
    assert weights.dtype == dtype
    # fp32: the same formula, sums reassociated (a few ulp). bf16: the same fp32 value rounded once,
    # but Triton's interpreter truncates fp32 -> bf16 where eager rounds to nearest: one bf16 ulp
    # (2**-7 relative, 8 significant bits) apart at most
    error = (weights.float() - ref_weights.float()).abs()
    bound = torch.full_like(error, 1e-6) if dtype == torch.float32 else ref_weights.float().abs() * 2**-7
    assert (error <= bound).all()
    if renormalize:
        assert torch.allclose(weights.float().sum(-1), torch.ones(5), atol=1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_routing_with_symbolic_token_count():
    """Tokens symbolic, experts static (in the models they come from the router weight's shape;
    with a symbolic expert count the pattern is not matched: the kernel holds one row per block)."""
    route = _router(True, k=2)
    compiled = torch.compile(route, backend="flagtree", options={"target": "interpreter"})
    for tokens in (3, 11):
        logits = torch.randn(tokens, 8)
        torch._dynamo.mark_dynamic(logits, 0)
        weights, ids = compiled(logits)
        ref_weights, ref_ids = route(logits)
        assert torch.equal(ids, ref_ids) and torch.allclose(weights, ref_weights, atol=1e-6)
    (record,) = flagtree_py.report()
    assert record["passes"]["fuse_moe_routing"] == 1 and record["dynamic_symbols"]


def test_ties_go_to_the_lowest_expert_index():
    """Documented tie-breaking (codegen/moe_routing.py): equal probabilities, lowest index first."""
    logits = torch.zeros(3, 8)
    logits[1, 5] = 1.0  # one clear winner, then seven-way tie
    (weights, ids), _ = _compile(_router(False, k=3), logits)
    assert ids.tolist() == [[0, 1, 2], [5, 0, 1], [0, 1, 2]]
    assert torch.allclose(weights[0], torch.full((3,), 1 / 8))


@pytest.mark.parametrize("renormalize", [False, True])
def test_step3_dense_form_is_one_kernel_scatter_included(renormalize):
    """Step3's router: softmax(logits.to(float32)) -> topk -> [renormalise] -> scatter into
    zeros_like(probs) -> cast: one kernel storing the dense [tokens, experts] routing matrix."""

    def route(logits):
        probs = torch.softmax(logits.to(torch.float32), dim=-1)
        values, ids = torch.topk(probs, 3, dim=-1)
        if renormalize:
            values = values / values.sum(dim=-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, ids, values).to(logits.dtype)

    logits = torch.randn(6, 16, dtype=torch.float16)
    out, record = _compile(route, logits)
    assert record["passes"]["fuse_moe_routing"] == 1
    assert record["triton_kernels"] == 1 and record["extern_ops"] == []
    ref = route(logits)
    assert out.dtype == torch.float16 and torch.equal(out != 0, ref != 0)  # the same experts
    # both sides round the same fp32 weights to fp16 once: at most one fp16 ulp (2**-10 relative)
    assert ((out.float() - ref.float()).abs() <= ref.float().abs() * 2**-10).all()


def test_dense_form_is_not_taken_when_the_ids_are_read_elsewhere():
    def route(logits):
        probs = torch.softmax(logits, dim=-1)
        values, ids = torch.topk(probs, 2, dim=-1)
        return torch.zeros_like(probs).scatter(-1, ids, values), ids * 2

    logits = torch.randn(6, 16)
    (dense, ids2), record = _compile(route, logits)
    ref_dense, ref_ids2 = route(logits)
    assert record["passes"]["fuse_moe_routing"] == 1 and "aten.scatter.src" in record["extern_ops"]
    assert torch.equal(ids2, ref_ids2) and torch.allclose(dense, ref_dense, atol=1e-6)


@pytest.mark.parametrize("case", ["smallest", "other_dim", "probs_used", "unsorted", "half_softmax"])
def test_not_the_routing_pattern_is_left_alone(case):
    """half_softmax: the softmax computed in float16 (a dtype mismatch: the fused op computes in
    float32, so it would not round where eager does)."""

    def route(logits):
        if case == "half_softmax":
            logits = logits.half()
        probs = torch.softmax(logits, dim=-1 if case != "other_dim" else 0)
        if case == "smallest":
            return torch.topk(probs, 2, dim=-1, largest=False)
        if case == "unsorted":
            return torch.topk(probs, 2, dim=-1, sorted=False)[0].sum(-1)
        values, ids = torch.topk(probs, 2, dim=-1)
        return (values, ids, probs) if case == "probs_used" else (values, ids)

    logits = torch.randn(4, 8)
    out, record = _compile(route, logits)
    assert record["passes"]["fuse_moe_routing"] == 0
    ref = route(logits)
    for got, want in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        assert torch.allclose(got.float(), want.float(), atol=1e-6 if case != "half_softmax" else 1e-3)
