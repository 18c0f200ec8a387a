"""LLM pattern passes: counted on the tiny models, and every instance kept in one kernel."""

from __future__ import annotations

import pytest
import torch

import flagtree_py
from flagtree_py.models import build_tiny_model

L = 2  # layers of the tiny models


def _compile(preset: str, dtype=torch.float32) -> dict:
    torch._dynamo.reset()
    flagtree_py.clear_report()
    model = build_tiny_model(preset, dtype=dtype)
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        out = torch.compile(model, backend="flagtree")(ids).float()
        ref = model(ids).float()
    # fp32: reassociated sums only; fp16: both sides compute in fp32 and round at casts
    tolerance = 1e-4 if dtype == torch.float32 else 4e-3
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= tolerance
    (record,) = flagtree_py.report()
    assert record["fusions_split"] == [], "every matched pattern must be one kernel"
    assert record["kernel_failures"] == [] and record["codegen_fallbacks"] == []
    return record["passes"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["qwen3", "qwen3-30b-a3b", "qwen3-omni"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qwen3_family_patterns(preset, dtype):
    passes = _compile(preset, dtype)
    # 2L+1 norms: the input and post-attention norm of each layer, and the final norm; the first
    # reads the embedding, the others a residual sum
    assert passes["fuse_rms_norm"] + passes["fuse_add_rms_norm"] == 2 * L + 1
    assert passes["fuse_add_rms_norm"] == 2 * L
    assert passes["fuse_silu_mul"] == L
    assert passes["fuse_qk_norm_rope"] == 2 * L  # q and k of each layer, one kernel each
    assert passes["fuse_rope"] == 0  # every rotary follows a q/k norm
    assert passes["fuse_moe_routing"] == (0 if preset == "qwen3" else L)  # every MoE layer's router
    assert passes["merge_qkv"] == L
    # the MoE experts' gate/up is one stacked parameter already (transformers' gate_up_proj)
    assert passes["merge_gate_up"] == (L if preset == "qwen3" else 0)


@pytest.mark.slow
def test_step3_patterns():
    passes = _compile("step3")
    # 2L+1 block norms plus the low-rank query norm (inter_norm) of each layer
    assert passes["fuse_rms_norm"] + passes["fuse_add_rms_norm"] == 2 * L + 1 + L
    # the dense MLP of layer 0, the MoE experts and the shared expert of layer 1
    assert passes["fuse_silu_mul"] == 3
    assert passes["fuse_qk_norm_rope"] == 0  # Step3 has no per-head q/k norm
    assert passes["fuse_rope"] == 2 * L  # rotary on q and on the shared k head
    assert passes["fuse_moe_routing"] == 1  # the router of the MoE layer (layer 1)
    assert passes["merge_qkv"] == 0  # Step3's q/k/v is one qkv_proj already
    assert passes["merge_gate_up"] == 2  # layer 0's MLP and layer 1's shared expert


def test_norm_eps_may_be_a_runtime_scalar_but_not_a_vector():
    """dynamic=True makes float attributes graph inputs: a 0-dim eps is read by the kernel at
    run time and still matches; a per-channel "eps" is another computation and does not."""

    def norm(x, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    for eps, matches in ((torch.tensor(1e-6), 1), (torch.full((3, 1), 1e-6), 0)):
        torch._dynamo.reset()
        flagtree_py.clear_report()
        x = torch.randn(3, 16)
        assert torch.allclose(torch.compile(norm, backend="flagtree")(x, eps), norm(x, eps), atol=1e-5)
        (record,) = flagtree_py.report()
        assert record["passes"]["fuse_rms_norm"] == matches
        assert record["fusions_split"] == []


@pytest.mark.slow
def test_counts_hold_with_dynamic_true():
    torch._dynamo.reset()
    flagtree_py.clear_report()
    model = build_tiny_model("qwen3")
    with torch.no_grad():
        torch.compile(model, backend="flagtree", dynamic=True)(torch.randint(0, 256, (1, 7)))
    (record,) = flagtree_py.report()
    passes = record["passes"]
    assert passes["fuse_rms_norm"] + passes["fuse_add_rms_norm"] == 2 * L + 1
    assert passes["fuse_qk_norm_rope"] == 2 * L and passes["fuse_silu_mul"] == L
    assert record["fusions_split"] == []
