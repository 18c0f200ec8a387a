"""check_kernel: language level and resources per target; failing kernels re-lowered or left to aten."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import flagtree_py
from flagtree_py.codegen.check_kernel import check_kernel, estimate_shared_memory
from flagtree_py.targets import get_target, registered_targets

_DESCRIPTOR = '''
@triton.jit
def k(in_ptr, out_ptr, n, XBLOCK: tl.constexpr):
    desc = tl.make_tensor_descriptor(in_ptr, shape=[n], strides=[1], block_shape=[XBLOCK])
    for i in tl.range(0, n, XBLOCK, warp_specialize=True):
        tl.store(out_ptr + i, desc.load([i]))
'''
_PLAIN = '''
@triton.jit
def k(in_ptr, out_ptr, n, XBLOCK: tl.constexpr):
    x = tl.arange(0, XBLOCK)
    tl.store(out_ptr + x, tl.load(in_ptr + x, mask=x < n), mask=x < n)
'''


def test_newer_api_is_rejected_on_a_3_1_target_and_accepted_on_sm90():
    metax = check_kernel(_DESCRIPTOR, {"num_warps": 4}, get_target("metax"))
    kinds = sorted((p.kind, p.detail.split(" ")[0]) for p in metax)
    assert kinds == [("language", "tl.make_tensor_descriptor"), ("language", "tl.range(warp_specialize=)")]
    assert check_kernel(_DESCRIPTOR, {"num_warps": 4}, get_target("nvidia-sm90")) == []
    # sm_80 accepts the language (3.6) but has no TMA
    (problem,) = check_kernel(_DESCRIPTOR, {"num_warps": 4}, get_target("nvidia-sm80"))
    assert problem.kind == "feature" and "tma" in problem.detail


def test_threads_counted_in_the_targets_warp_size():
    # 16 warps: 512 threads on NVIDIA, 1024 on a 64-wide target (its limit), 32 warps too many there
    assert check_kernel(_PLAIN, {"num_warps": 16}, get_target("nvidia-sm90")) == []
    assert check_kernel(_PLAIN, {"num_warps": 16}, get_target("iluvatar")) == []
    (problem,) = check_kernel(_PLAIN, {"num_warps": 32}, get_target("iluvatar"))
    assert problem.kind == "threads" and "2048 threads" in problem.detail
    assert check_kernel(_PLAIN, {"num_warps": 32}, get_target("nvidia-sm90")) == []


def test_shared_memory_estimate_counts_tiles_bytes_and_stages():
    dot = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_stages": 4, "element_bytes": 2, "num_warps": 8}
    assert estimate_shared_memory(dot) == (128 * 64 + 64 * 128) * 2 * 4 == 131072
    assert check_kernel(_PLAIN, dot, get_target("nvidia-sm90")) == []  # 128 KiB < 227 KiB
    (problem,) = check_kernel(_PLAIN, dot, get_target("metax"))  # > 64 KiB assumed on MetaX
    assert problem.kind == "shared_memory"
    looped = "@triton.jit\ndef k(XBLOCK: tl.constexpr):\n    for r in tl.range(0, 8, 1, num_stages=2):\n        pass\n"
    assert estimate_shared_memory({"kind": "reduction", "XBLOCK": 4, "RBLOCK": 1024}) == 16384
    (problem,) = check_kernel(looped, {"kind": "reduction", "XBLOCK": 16, "RBLOCK": 1024, "num_warps": 4},
                              get_target("metax"))  # 16 x 1024 x 4 bytes x 2 stages of the loop = 128 KiB
    assert problem.kind == "shared_memory" and "131072" in problem.detail


@pytest.mark.parametrize("dynamic", [False, True])  # persistent reductions and pointwise; looped reductions
def test_every_in_tree_target_passes_its_checks_on_the_generated_kernels(dynamic):
    fn = lambda x, w: torch.nn.functional.rms_norm(x, (x.shape[-1],), w) * torch.sigmoid(x)
    x, w = torch.randn(5, 3000), torch.randn(3000)
    for name in registered_targets():
        torch._dynamo.reset()
        flagtree_py.clear_report()
        out = torch.compile(fn, backend="flagtree", options={"target": name, "cache": False}, dynamic=dynamic)(x, w)
        (record,) = flagtree_py.report()
        assert record["kernel_checks"] == [] and record["triton_kernels"] >= 1, name
        assert {k["config"]["persistent"] for k in record["kernels"] if k["kind"] == "reduction"} == {not dynamic}
        torch.testing.assert_close(out, fn(x, w), rtol=1e-5, atol=1e-5)


def test_reduction_over_the_shared_memory_limit_is_re_lowered_with_fewer_rows(compile_with_target):
    # a 2 KiB chip: the table's XBLOCK for rows of 128 does not fit; halving rows until it does
    small = dataclasses.replace(get_target("metax"), name="tiny-smem", shared_memory_per_block=2048)
    fn = lambda x: x.softmax(-1)
    x = torch.randn(40, 128)
    out, record = compile_with_target(small, fn, x)
    assert record["kernel_checks"], "expected a re-lowered kernel"
    for check in record["kernel_checks"]:
        assert check["action"].startswith("re-lowered") and "shared_memory" in check["problems"][0]
    for kernel in record["kernels"]:
        if kernel["kind"] == "reduction":
            assert kernel["config"]["XBLOCK"] * kernel["config"]["RBLOCK"] * 4 <= 2048
    torch.testing.assert_close(out, fn(x), rtol=1e-5, atol=1e-6)


def test_persistent_reduction_too_wide_for_the_chip_is_re_lowered_as_a_looped_one(compile_with_target):
    # rows of 1024 fp32 need 4 KiB in one block; a 2 KiB chip gets a looped reduction with smaller chunks
    small = dataclasses.replace(get_target("metax"), name="tiny-smem", shared_memory_per_block=2048)
    fn = lambda x: x - x.amax(-1, keepdim=True)
    x = torch.randn(6, 1024)
    out, record = compile_with_target(small, fn, x)
    (check,) = record["kernel_checks"]
    assert check["action"].startswith("re-lowered looped, ") and "shared_memory" in check["problems"][0]
    (kernel,) = record["kernels"]
    assert kernel["config"]["persistent"] is False
    assert kernel["config"]["XBLOCK"] * kernel["config"]["RBLOCK"] * 4 <= 2048
    torch.testing.assert_close(out, fn(x))


def test_kernel_using_an_api_the_target_lacks_falls_back_to_aten(tmp_path, compile_with_target):
    # a vendor variant written for a newer Triton than its target accepts: never built, aten runs it
    (tmp_path / "pointwise.py.jinja").write_text(
        "@triton.jit\ndef {{ k.name }}({{ k.arguments | join(', ') }}, XBLOCK: tl.constexpr):\n"
        "    tl.assume(XBLOCK > 0)\n")
    old = dataclasses.replace(get_target("iluvatar"), name="old-language", template_dir=str(tmp_path))
    fn = lambda x: torch.sigmoid(x) * 3
    x = torch.randn(33)
    out, record = compile_with_target(old, fn, x)
    assert record["triton_kernels"] == 0
    (check,) = record["kernel_checks"]
    assert check["action"] == "aten fallback" and "tl.assume needs Triton 3.3" in check["problems"][0]
    assert record["codegen_fallbacks"][0]["reason"].startswith("check_kernel: language")
    torch.testing.assert_close(out, fn(x))
