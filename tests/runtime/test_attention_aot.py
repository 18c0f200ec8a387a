"""Every attention kernel configuration the real models need builds ahead of time for sm_90, on this
CPU machine: prefill and decode paths, bf16 and fp32, head sizes 128 (Qwen3, Qwen3-MoE) and 256
(Step3), GQA groups 4, 8 and 64, each mask kind, and within the H100's shared memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flagtree_py.runtime.attention as attention_runtime
from flagtree_py.runtime.aot import compile_for_nvidia, launch_signature
from flagtree_py.targets import get_target

# (q heads, K/V heads, head dim): Qwen3-8B, Qwen3-30B-A3B, Step3
SHAPES = {"qwen3": (32, 8, 128), "qwen3-moe": (32, 4, 128), "step3": (64, 1, 256)}
CASES = [
    ("qwen3", torch.bfloat16, "causal"),
    ("qwen3", torch.bfloat16, "bool"),
    ("qwen3-moe", torch.bfloat16, "additive"),
    ("step3", torch.bfloat16, "causal"),
    ("step3", torch.bfloat16, "bool"),
    ("qwen3", torch.float32, "additive"),
]


def _fn(mask_kind: str):
    def fn(q, k, v, mask):
        if mask_kind == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    return fn


@pytest.mark.slow
@pytest.mark.parametrize("q_len", [1, 64], ids=["decode", "prefill"])
@pytest.mark.parametrize(("model", "dtype", "mask_kind"), CASES)
def test_attention_kernels_compile_for_sm90(model, dtype, mask_kind, q_len, monkeypatch):
    heads, kv_heads, head_dim = SHAPES[model]
    kv_len = 64
    launches = []
    # record the launches instead of running them: the signature is all an ahead-of-time build needs
    monkeypatch.setattr(attention_runtime, "run", lambda kernel, grid, *args, **meta: launches.append((kernel, args, meta)))
    q = torch.zeros(1, heads, q_len, head_dim, dtype=dtype)
    k = torch.zeros(1, kv_heads, kv_len, head_dim, dtype=dtype)
    v = torch.zeros(1, kv_heads, kv_len, head_dim, dtype=dtype)
    mask = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool)
    if mask_kind == "additive":
        mask = torch.zeros(1, 1, q_len, kv_len, dtype=dtype)
    compiled = torch.compile(_fn(mask_kind), backend="flagtree", options={"target": "nvidia", "fallback": False})
    with torch.no_grad():
        compiled(q, k, v, mask)
    kinds = {kernel.name.split("_", 2)[-1] for kernel, _, _ in launches}
    expected_path = "decode" if q_len * heads // kv_heads <= 64 else "prefill"
    assert any(kind.startswith(expected_path) for kind in kinds), kinds
    limit = get_target("nvidia").shared_memory_per_block
    for kernel, args, meta in launches:
        compiled_kernel = compile_for_nvidia(kernel.kernel.fn, launch_signature(args, meta), 90)
        assert "ptx" in compiled_kernel.asm and compiled_kernel.asm["cubin"]
        assert compiled_kernel.metadata.shared <= limit, (kernel.name, compiled_kernel.metadata.shared)
