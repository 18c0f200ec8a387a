"""Every target lowers the tiny models; run under the CPU interpreter they match eager, and the
launch shapes follow each target's own warp size and tile tables."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import flagtree_py
from flagtree_py.models import build_tiny_model
from flagtree_py.targets import get_target


def _compile(preset: str, target: str) -> tuple[dict, str]:
    torch._dynamo.reset()
    flagtree_py.clear_report()
    model = build_tiny_model(preset)
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        out = torch.compile(model, backend="flagtree", options={"target": target})(ids)
        ref = model(ids)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-4
    (record,) = flagtree_py.report()
    assert record["kernel_failures"] == [] and record["codegen_fallbacks"] == []
    return record, Path(record["module_path"]).read_text()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["qwen3", "qwen3-30b-a3b", "step3"])
def test_each_target_lowers_and_matches_eager(preset):
    warps = {}
    for name in ("nvidia", "metax", "iluvatar", "interpreter"):
        record, source = _compile(preset, name)
        target = get_target(name)
        assert record["target"] == target.name and record["triton_kernels"] > 0
        # GEMM template kernels launch through run_gemm, and may have one line per M bucket
        launches = re.findall(r"(?:run|run_gemm|flash_attention|flash_decoding)\((k\w+), .*num_warps=(\d+)", source)
        # one launch line per kernel; a flash-decoding line launches its combine kernel as well
        combines = sum(1 for k in record["kernels"] if k["name"].endswith("_combine"))
        assert len({name for name, _ in launches}) + combines == record["triton_kernels"]
        for _, count in launches:
            assert int(count) * target.warp_size <= target.max_threads_per_block
        warps[name] = [int(count) for _, count in launches]
    # the same threads are fewer warps on a 64-wide target: lowering reads the warp size
    assert warps["metax"] != warps["nvidia"] and warps["iluvatar"] == warps["metax"]
