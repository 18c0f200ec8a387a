"""The GEMM template's TMA form (Hopper: operands through tensor descriptors, persistent programs)
against eager PyTorch, on the CPU interpreter given a target that declares TMA.

The interpreter runs tensor descriptors (rows and columns past the edges read as zeros, as TMA does)
and ignores warp specialization, so it proves the form's indexing, tiling and persistence; speed and
the real hardware path are measured on the H100 (benchmarks/gemm_hopper_probe.py, benchmarks/layer.py).
Tolerance as in test_gemm.py (fp32: 1e-5 relative to the largest output).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import flagtree_py
from flagtree_py.runtime.autotune import GemmGrid, run_gemm
from flagtree_py.runtime.launch import counters
from flagtree_py.targets import get_target, registered_targets
from flagtree_py.targets.base import GemmConfig
from tests.codegen.test_gemm import Net

K, N = 48, 40  # K a multiple of 16 (TMA's 16-byte rows in fp32), neither a multiple of the tiles
ROWS = (1, 3, 17, 40, 130)


@pytest.fixture
def tma_target(monkeypatch):
    """The interpreter with TMA declared, 2 "multiprocessors" (so persistent programs walk several tiles)
    and a persistent tile first in the large bucket."""
    base = get_target("interpreter")
    spec = replace(base, name="interpreter-tma", features=base.features | {"tma"}, multiprocessors=2,
                   triton_language=(3, 6),
                   gemm_tiles={**base.gemm_tiles,
                               "large": (GemmConfig(32, 16, 16, 128, 1, persistent=True, warp_specialize=True),
                                         GemmConfig(32, 32, 16, 128, 1))})
    monkeypatch.setitem(registered_targets(), spec.name, spec)
    return spec.name


def _check(net, make, target: str):
    compiled = torch.compile(net, backend="flagtree", dynamic=True, options={"target": target})
    for m in ROWS:
        inputs = make(m)
        with torch.no_grad():
            actual, expected = compiled(*inputs), net(*inputs)
        bound = 1e-5 * max(1.0, expected.abs().max().item())
        error = (actual - expected).abs().max().item()
        assert error <= bound, f"M={m}: max abs error {error:.3g} > {bound:.3g}"
    record = [r for r in flagtree_py.report() if r.get("dynamic_symbols")][-1]
    assert record["kernel_failures"] == [] and record["codegen_fallbacks"] == []
    return record, sys.modules[Path(record["module_path"]).stem]


def _source(kernel) -> str:
    return inspect.getsource(kernel.kernel.fn)


def _weights(*shape):
    return torch.randn(*shape) / shape[-1] ** 0.5


def test_plain_mm_loads_through_descriptors_and_runs_persistent(tma_target):
    record, module = _check(Net(lambda n, x: x @ n.w.t(), w=_weights(N, K)), lambda m: (torch.randn(m, K),),
                            tma_target)
    names = {k["name"] for k in record["kernels"] if k["kind"] == "gemm"}
    (tma,) = [name for name in names if name.endswith("_tma")]
    base = tma.removesuffix("_tma")
    source = _source(module.__dict__[tma])
    assert source.count("tl.make_tensor_descriptor(") == 2 and "tl.range(" in source and "NUM_SMS" in source
    large = getattr(module, f"{tma}_candidates")
    assert set(large) == {"large"}  # fewer rows keep pointer loads
    assert large["large"][0]["NUM_SMS"] == 2 and large["large"][0]["WARP_SPECIALIZE"] is True
    assert large["large"][1]["NUM_SMS"] == 0
    # one row block of 40 columns would leave a multiprocessor idle: up to 128 rows split K as decode does
    split = getattr(module, f"{base}_partial_candidates")
    assert set(split) == {"m16", "m128"} and split["m128"][0]["SPLIT_K"] > 1
    assert names == {tma, f"{base}_partial", f"{base}_reduce"}  # no bucket left for the pointer-tiled kernel
    assert getattr(module, f"{tma}_fallback") is getattr(module, f"{base}_fallback")  # one aten twin


def test_swiglu_and_residual_epilogues_through_descriptors(tma_target):
    inter = 24

    def fn(n, x, residual):
        gate_up = x @ n.w.t()
        return residual + F.silu(gate_up[..., :inter]) * gate_up[..., inter:]

    record, module = _check(Net(fn, w=_weights(2 * inter, K)),
                            lambda m: (torch.randn(1, m, K), torch.randn(1, m, inter)), tma_target)
    sources = [_source(module.__dict__[k["name"]]) for k in record["kernels"] if k["kind"] == "gemm"]
    assert any("b_desc.load([24 + pid_n * BLOCK_N, k]).T" in s for s in sources)


def test_interpreter_without_tma_keeps_pointer_loads():
    record, module = _check(Net(lambda n, x: x @ n.w.t(), w=_weights(N, K)), lambda m: (torch.randn(m, K),),
                            "interpreter")
    for kernel in record["kernels"]:
        if kernel["kind"] == "gemm":
            assert "make_tensor_descriptor" not in _source(module.__dict__[kernel["name"]])


def test_strides_tma_cannot_take_keep_pointer_loads(tma_target):
    # K = 50 fp32: a row is 200 bytes, not a multiple of 16, so neither operand can be a descriptor
    record, module = _check(Net(lambda n, x: x @ n.w.t(), w=_weights(N, 50)), lambda m: (torch.randn(m, 50),),
                            tma_target)
    for kernel in record["kernels"]:
        if kernel["kind"] == "gemm":
            assert "make_tensor_descriptor" not in _source(module.__dict__[kernel["name"]])


def test_unaligned_operand_runs_the_fallback_with_one_warning():
    class Kernel:
        name = "k0_mm"

        def fallback(self, a, b, out):
            torch.mm(a, b.t(), out=out)

    kernel = Kernel()
    storage = torch.randn(4 * K + 1)
    a = storage[1:].view(4, K)  # 4 bytes past an aligned address
    b, out = torch.randn(N, K), torch.empty(4, N)
    before = counters["gemm_unaligned_calls"]
    with pytest.warns(UserWarning, match="not 16-byte aligned"):
        run_gemm(kernel, "m16", GemmGrid(4, N), a, b, out, tma=(a, b), BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    torch.testing.assert_close(out, a @ b.t())
    run_gemm(kernel, "m16", GemmGrid(4, N), a, b, out, tma=(a, b), BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    assert counters["gemm_unaligned_calls"] == before + 2


def test_persistent_grid_is_at_most_one_program_per_multiprocessor():
    grid = GemmGrid(1000, 1024)
    assert grid({"BLOCK_M": 128, "BLOCK_N": 256}) == (32,)
    assert grid({"BLOCK_M": 128, "BLOCK_N": 256, "NUM_SMS": 132}) == (32,)  # fewer tiles than programs
    assert grid({"BLOCK_M": 64, "BLOCK_N": 64, "NUM_SMS": 132}) == (132,)
    assert grid({"BLOCK_M": 64, "BLOCK_N": 64, "NUM_SMS": 0}) == (256,)  # 0: one program per tile
