"""A target's own template directory is searched first: NVIDIA's looped reductions are pipelined."""

from __future__ import annotations

import pytest
import torch

import flagtree_py
from flagtree_py.codegen.check_kernel import check_kernel
from flagtree_py.targets import get_target


def _looped_reduction(target: str):
    torch._dynamo.reset()
    flagtree_py.clear_report()
    fn = lambda x: (x * x).sum(-1) + x.amax(-1)
    x = torch.randn(3, 5000)  # dynamic rows: a looped reduction
    out = torch.compile(fn, backend="flagtree", options={"target": target, "cache": False}, dynamic=True)(x)
    (record,) = flagtree_py.report()
    torch.testing.assert_close(out, fn(x), rtol=1e-5, atol=1e-3)  # fp32 sums of 5000 squares ~ 5e3
    assert record["kernel_failures"] == [] and record["triton_kernels"] == 1
    return record, open(record["module_path"]).read()


@pytest.mark.parametrize("target", ["nvidia-sm90", "nvidia-sm80"])
def test_nvidia_gets_its_pipelined_variant(target):
    record, source = _looped_reduction(target)
    assert record["kernels"][0]["config"]["persistent"] is False
    assert source.count("tl.range(0, rnumel, RBLOCK, num_stages=2)") >= 1 and " in range(0, rnumel" not in source


@pytest.mark.parametrize("target", ["metax", "iluvatar", "interpreter"])
def test_other_targets_keep_the_generic_template(target):
    _, source = _looped_reduction(target)
    assert "tl.range(" not in source and "for roffset in range(0, rnumel, RBLOCK):" in source


def test_variant_builds_for_sm90_and_passes_the_checks():
    import sys

    from flagtree_py.runtime.aot import compile_for_nvidia
    from flagtree_py.runtime.launch import GuardedKernel

    record, source = _looped_reduction("nvidia-sm90")
    module = sys.modules[record["module_path"].rsplit("/", 1)[-1][:-3]]
    (kernel,) = [k for k in vars(module).values() if isinstance(k, GuardedKernel)]
    assert check_kernel(source, {**kernel.signature["meta"], "kind": "reduction"}, get_target("nvidia-sm90")) == []
    compiled = compile_for_nvidia(kernel.kernel.fn, kernel.signature, 90)
    assert compiled.asm["cubin"]


def test_template_directory_contents_are_in_the_target_hash(tmp_path):
    import dataclasses

    first, moved = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    moved.mkdir()
    base = dataclasses.replace(get_target("metax"), template_dir=str(first))
    empty = base.hash()
    (first / "pointwise.py.jinja").write_text("# variant\n")
    assert base.hash() != empty
    (moved / "pointwise.py.jinja").write_text("# variant\n")
    assert dataclasses.replace(base, template_dir=str(moved)).hash() == base.hash()  # contents, not the path
