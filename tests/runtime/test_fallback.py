"""A kernel that fails to build or run falls back to aten for its group: one warning, counted."""

from __future__ import annotations

import sys
import warnings

import torch

import flagtree_py
from flagtree_py.runtime.launch import GuardedKernel, counters


def _module_of(record):
    return sys.modules[record["module_path"].rsplit("/", 1)[-1][:-3]]


def test_broken_kernel_falls_back_with_one_warning():
    def f(x):
        return torch.softmax(x * 3, -1) + 1

    x = torch.randn(6, 40)
    cf = torch.compile(f, backend="flagtree")
    cf(x)
    (record,) = flagtree_py.report()
    module = _module_of(record)
    kernels = [k for k in vars(module).values() if isinstance(k, GuardedKernel)]
    assert len(kernels) == 1

    def broken(*args, **kwargs):
        raise RuntimeError("simulated compile error")

    class Broken:
        def __getitem__(self, grid):
            return broken

    kernels[0].kernel = Broken()
    before = counters["kernel_fallbacks"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            x = torch.randn(6, 40)
            assert torch.allclose(cf(x), f(x), atol=1e-6)
    messages = [str(w.message) for w in caught if "flagtree" in str(w.message)]
    assert len(messages) == 1 and "simulated compile error" in messages[0]
    assert counters["kernel_fallbacks"] == before + 1
    assert flagtree_py.report()[0]["kernel_failures"][0]["kernel"] == kernels[0].name


def test_op_without_lowering_stays_aten_and_is_counted():
    def f(x):
        return torch.cumsum(x.exp(), -1) * 2

    x = torch.randn(3, 8)
    cf = torch.compile(f, backend="flagtree")
    assert torch.allclose(cf(x), f(x), rtol=1e-5, atol=1e-5)
    (record,) = flagtree_py.report()
    assert "aten.cumsum.default" in record["extern_ops"]
    assert record["triton_kernels"] == 2  # exp before the scan, *2 after it
    assert record["lowered_fraction"] < 1.0


def test_poisoned_outputs_are_fully_written():
    def f(x, y):
        return torch.cat([x, y], 1)[:, 1:-1].contiguous() * 2, (x.sum(0) + y.amax(0))

    x, y = torch.randn(5, 9), torch.randn(5, 9)
    cf = torch.compile(f, backend="flagtree", options={"poison_outputs": True})
    for got, want in zip(cf(x, y), f(x, y)):
        assert not got.isnan().any()
        assert torch.allclose(got, want, atol=1e-5)
