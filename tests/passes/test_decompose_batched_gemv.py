"""MoE batched_mm: expert GEMVs over gathered weights become reductions that read W[ids] in place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flagtree_py
from flagtree_py.models import build_tiny_model

E, N, K, TOP = 4, 24, 40, 2


class Experts(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_up = torch.nn.Parameter(torch.randn(E, 2 * N, K) / K**0.5, requires_grad=False)
        self.down = torch.nn.Parameter(torch.randn(E, K, N) / N**0.5, requires_grad=False)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        rows = x.repeat_interleave(TOP, 0)  # one row per (token, expert)
        flat = ids.reshape(-1)
        gate_up = torch.bmm(self.gate_up[flat], rows.unsqueeze(-1)).squeeze(-1)
        hidden = F.silu(gate_up[:, :N]) * gate_up[:, N:]
        out = torch.bmm(self.down[flat], hidden.unsqueeze(-1)).squeeze(-1)
        return (out.view(-1, TOP, K) * weights.unsqueeze(-1)).sum(1)


@pytest.mark.parametrize("tokens", [1, 5])
def test_gathered_expert_gemvs_run_in_kernels_and_match_eager(tokens, tmp_path):
    experts = Experts()
    x = torch.randn(tokens, K)
    ids = torch.randint(0, E, (tokens, TOP))
    weights = torch.softmax(torch.randn(tokens, TOP), -1)
    compiled = torch.compile(experts, backend="flagtree", options={"target": "interpreter", "dump_dir": str(tmp_path)})
    with torch.no_grad():
        actual, expected = compiled(x, ids, weights), experts(x, ids, weights)
    # fp32 sums of K=40 and N=24 products in another order: a few ulps of the largest partial sum
    assert (actual - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())
    (record,) = flagtree_py.report()
    assert record["passes"]["decompose_batched_gemv"] == 2
    assert not any("bmm" in op for op in record["extern_ops"]), record["extern_ops"]
    assert record["kernel_failures"] == [] and record["codegen_fallbacks"] == []
    # the gathered weights are indexing inside the reducing kernels, never a stored copy
    stored = {name for kernel in record["kernels"] for name in kernel["stored"]}
    assert not any(name.startswith("index") for name in stored), stored


def test_templates_off_keeps_the_extern_bmm():
    experts = Experts()
    inputs = (torch.randn(3, K), torch.randint(0, E, (3, TOP)), torch.softmax(torch.randn(3, TOP), -1))
    compiled = torch.compile(experts, backend="flagtree", options={"target": "interpreter", "gemm_templates": False})
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), experts(*inputs), rtol=1e-5, atol=1e-5)
    (record,) = flagtree_py.report()
    assert record["passes"].get("decompose_batched_gemv", 0) == 0
    assert "aten.bmm.default" in record["extern_ops"]


@pytest.mark.slow
def test_tiny_qwen3_moe_has_no_extern_bmm():
    model = build_tiny_model("qwen3-30b-a3b")
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        out = torch.compile(model, backend="flagtree", options={"target": "interpreter"})(ids)
        ref = model(ids)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-4
    (record,) = flagtree_py.report()
    assert record["passes"]["decompose_batched_gemv"] == 2 * 2  # gate/up and down, 2 layers
    assert not any("mm" in op for op in record["extern_ops"]), record["extern_ops"]
    assert record["fusions_split"] == [] and record["kernel_failures"] == []
