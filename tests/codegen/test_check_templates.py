"""check_kernel on the template kernels (GEMM, attention, MoE routing): a config that fails is re-lowered
from the target's table, a source that fails leaves the computation to aten, both in `kernel_checks`."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from flagtree_py.targets import get_target


def _gemm(x, w):
    return torch.relu(x @ w)


def test_gemm_with_no_tile_that_fits_the_chip_is_left_to_aten(compile_with_target):
    # 2 KiB of shared memory: even the smallest tile (16x32x32 fp32, A and B: 6 KiB) does not fit
    small = dataclasses.replace(get_target("metax"), name="tiny-smem-gemm", shared_memory_per_block=2048)
    x, w = torch.randn(5, 64), torch.randn(64, 48)
    out, record = compile_with_target(small, _gemm, x, w)
    assert not [k for k in record["kernels"] if k["kind"] == "gemm"]
    (check,) = [c for c in record["kernel_checks"] if c["action"] == "aten fallback"]
    assert "shared_memory" in check["problems"][0]
    assert any(f["reason"].startswith("check_kernel: shared_memory") for f in record["codegen_fallbacks"])
    torch.testing.assert_close(out, _gemm(x, w), rtol=1e-5, atol=1e-5)


def test_gemm_template_variant_using_a_newer_api_is_left_to_aten(tmp_path, compile_with_target):
    # a vendor's GEMM variant that uses tl.assume (Triton 3.3) on a 3.1-level target: never built
    (tmp_path / "gemm.py.jinja").write_text(
        "@triton.jit\ndef {{ k.name }}(a, BLOCK_M: tl.constexpr):\n    tl.assume(BLOCK_M > 0)\n")
    old = dataclasses.replace(get_target("iluvatar"), name="old-gemm", template_dir=str(tmp_path))
    x, w = torch.randn(5, 64), torch.randn(64, 48)
    out, record = compile_with_target(old, _gemm, x, w)
    assert not [k for k in record["kernels"] if k["kind"] == "gemm"]
    (check,) = [c for c in record["kernel_checks"] if c["action"] == "aten fallback"]
    assert "tl.assume needs Triton 3.3" in check["problems"][0]
    torch.testing.assert_close(out, _gemm(x, w), rtol=1e-5, atol=1e-5)


def test_attention_template_using_a_newer_api_runs_as_aten(tmp_path, compile_with_target):
    (tmp_path / "attention_prefill.py.jinja").write_text(
        "@triton.jit\ndef {{ a.name }}(q, BLOCK_M: tl.constexpr):\n    tl.assume(BLOCK_M > 0)\n")
    old = dataclasses.replace(get_target("iluvatar"), name="old-attention", template_dir=str(tmp_path))

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = (torch.randn(1, 2, 70, 16) for _ in range(3))
    out, record = compile_with_target(old, fn, q, k, v)
    assert not [k for k in record["kernels"] if k["kind"].startswith("attention")]
    (check,) = record["kernel_checks"]
    assert check["action"] == "aten fallback" and "tl.assume needs Triton 3.3" in check["problems"][0]
    torch.testing.assert_close(out, fn(q, k, v), rtol=1e-5, atol=1e-5)


def test_attention_whose_smallest_tile_does_not_fit_runs_as_aten(compile_with_target):
    # head size 16 fp32: the smallest tile (16 x 16, Q, one K and V stage, the scores) needs 4 KiB; a 2 KiB
    # chip has no tile for it, and the attention node runs as its aten op
    small = dataclasses.replace(get_target("metax"), name="tiny-smem-attention", shared_memory_per_block=2048)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = (torch.randn(1, 2, 70, 16) for _ in range(3))
    out, record = compile_with_target(small, fn, q, k, v)
    assert not [k for k in record["kernels"] if k["kind"].startswith("attention")]
    (check,) = [c for c in record["kernel_checks"] if "(prefill)" in c["kernel"]]
    assert check["action"] == "aten fallback" and check["problems"][0].startswith("shared_memory")
    torch.testing.assert_close(out, fn(q, k, v), rtol=1e-5, atol=1e-5)


def test_moe_routing_over_the_shared_memory_limit_is_re_lowered_with_fewer_rows(compile_with_target):
    # 64 experts: the table's 64 rows x 64 experts x 4 bytes (16 KiB) exceed a 4 KiB chip; 16 rows fit
    small = dataclasses.replace(get_target("metax"), name="tiny-smem-moe", shared_memory_per_block=4096)

    def route(logits):
        probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        values, ids = torch.topk(probs, 4, dim=-1)
        return (values / values.sum(dim=-1, keepdim=True)).to(logits.dtype), ids

    logits = torch.randn(37, 64)
    (weights, ids), record = compile_with_target(small, route, logits)
    assert record["passes"]["fuse_moe_routing"] == 1
    (kernel,) = [k for k in record["kernels"] if k["kind"] == "moe_routing"]
    assert kernel["config"]["XBLOCK"] * kernel["config"]["RBLOCK"] * 4 <= 4096
    (check,) = record["kernel_checks"]
    assert check["action"].startswith("re-lowered") and "shared_memory" in check["problems"][0]
    ref_weights, ref_ids = route(logits)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
