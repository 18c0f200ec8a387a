"""Every kernel generated for the tiny models also builds for Hopper and Ampere, no GPU needed."""

from __future__ import annotations

import sys

import pytest
import torch

import flagtree_py
from flagtree_py.models import build_tiny_model
from flagtree_py.runtime.aot import compile_for_nvidia
from flagtree_py.runtime.launch import GuardedKernel


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["qwen3", "qwen3-30b-a3b", "step3"])
@pytest.mark.parametrize("length", [1, 7])
def test_generated_kernels_compile_for_sm90_and_sm80(preset, length):
    torch._dynamo.reset()
    flagtree_py.clear_report()
    model = build_tiny_model(preset)
    with torch.no_grad():
        torch.compile(model, backend="flagtree", options={"target": "nvidia"}, dynamic=False)(torch.randint(0, 256, (1, length)))
    (record,) = flagtree_py.report()
    module = sys.modules[record["module_path"].rsplit("/", 1)[-1][:-3]]
    kernels = [k for k in vars(module).values() if isinstance(k, GuardedKernel)]
    assert len(kernels) == record["triton_kernels"] > 0
    for kernel in kernels:
        assert kernel.signature is not None, f"{kernel.name} never launched"
        for capability in (90, 80):
            compiled = compile_for_nvidia(kernel.kernel.fn, kernel.signature, capability)
            assert "ptx" in compiled.asm and compiled.asm["cubin"]
