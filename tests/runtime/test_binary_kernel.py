"""Binaries from a cache entry as launchable kernels; the dry run of `flagtree compile`; compile counting."""

from __future__ import annotations

import sys

import torch

import flagtree_py
from flagtree_py.runtime import launch
from flagtree_py.runtime.aot import BinaryKernel, binary_files, compile_for_nvidia
from flagtree_py.runtime.launch import GuardedKernel, counters, dry_run


def _compiled_kernel():
    f = torch.compile(lambda x: x.sin() * 2 + 1, backend="flagtree", options={"target": "nvidia", "cache": False})
    x = torch.randn(37)
    torch.testing.assert_close(f(x), x.sin() * 2 + 1)
    (record,) = flagtree_py.report()
    assert record["executor"] == "interpreter" and record["triton_compiles"] == 0  # the interpreter compiles nothing
    module = sys.modules[record["module_path"].rsplit("/", 1)[-1][:-3]]
    (kernel,) = [k for k in vars(module).values() if isinstance(k, GuardedKernel)]
    return kernel


def test_binary_kernel_loads_an_entrys_files_as_tritons_compiled_kernel(tmp_path):
    kernel = _compiled_kernel()
    before = counters["triton_compiles"]
    compiled = compile_for_nvidia(kernel.kernel.fn, kernel.signature, 90)
    assert counters["triton_compiles"] == before + 1  # ahead-of-time builds count too
    files = {}
    for kind, data in binary_files(compiled).items():
        files[kind] = tmp_path / f"{kernel.name}.sm90.{kind}"
        files[kind].write_bytes(data)
    binary = BinaryKernel(kernel.kernel.fn, kernel.signature, files)
    assert binary.compiled.metadata.num_warps == kernel.signature["meta"]["num_warps"]
    assert binary.compiled.metadata.target.arch == 90
    assert bytes(binary.compiled.asm["cubin"]) == bytes(compiled.asm["cubin"])
    assert binary.constexprs == ["XBLOCK"]
    args = tuple(torch.empty(1) if kind == "pointer" else 5 for kind in binary.kinds)
    assert binary.accepts(args)
    if "int" in binary.kinds:  # an i32 size that grew past 2**31 needs another build
        assert not binary.accepts(tuple(2**31 if kind == "int" else a for kind, a in zip(binary.kinds, args)))


def test_dry_run_records_signatures_and_launches_nothing():
    def explode(*args, **kwargs):
        raise AssertionError("launched")

    class Exploding:
        def __getitem__(self, grid):
            return explode

    kernel = GuardedKernel("k", Exploding(), explode, interpreted=True)
    launched = counters["kernel_launches"]
    with dry_run():
        launch.run(kernel, (3,), torch.empty(4, dtype=torch.bfloat16), 4, XBLOCK=16, num_warps=2)
    assert kernel.signature == {"arguments": [("pointer", "*bf16"), ("int", 4)], "meta": {"XBLOCK": 16, "num_warps": 2}}
    assert counters["kernel_launches"] == launched and kernel.failed is None  # a dry run's launches are not launches
