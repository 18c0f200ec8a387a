"""Every target lowers the tiny models; run under the CPU interpreter they match eager, and the
launch shapes follow each target's own warp size and tile tables."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

import flagtree_py
from flagtree_py.codegen.check_kernel import check_language, check_resources
from flagtree_py.models import build_tiny_model
from flagtree_py.targets import get_target, registered_targets


def _compile(preset: str, target: str, length: int = 7) -> tuple[dict, str]:
    torch._dynamo.reset()
    flagtree_py.clear_report()
    model = build_tiny_model(preset)
    ids = torch.randint(0, 256, (1, length))
    with torch.no_grad():
        out = torch.compile(model, backend="flagtree", options={"target": target})(ids)
        ref = model(ids)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-4
    (record,) = flagtree_py.report()
    assert record["kernel_failures"] == [] and record["codegen_fallbacks"] == []
    return record, Path(record["module_path"]).read_text()


#: the template kinds each tiny model's graph must exercise (7 query rows per K/V head: the decode path,
#: flash-decoding and its combine kernel)
_MOE_EXPERTS = {"moe_experts_count", "moe_experts_scatter", "moe_experts_gate_up", "moe_experts_down",
                "moe_experts_reduce"}
_TEMPLATES = {"qwen3": {"gemm", "attention_decode", "pointwise", "reduction"},
              "qwen3-30b-a3b": {"gemm", "attention_decode", "moe_routing", "pointwise", "reduction", *_MOE_EXPERTS},
              # Step3's dense routing matrix becomes the sparse routing that feeds the fused experts
              "step3": {"gemm", "attention_decode", "moe_routing", "pointwise", "reduction", *_MOE_EXPERTS}}


def _assert_passes_checks(record: dict, source: str, target) -> None:
    """Every kernel of every template passed check_kernel on its first config (kernel_checks is empty:
    nothing re-lowered, nothing left to aten), and checking the module again agrees."""
    assert record["kernel_checks"] == [], record["kernel_checks"]
    assert check_language(ast.parse(source), target) == []
    for kernel in record["kernels"]:
        config = {**kernel["config"], "kind": kernel["kind"]}
        if "num_warps" in config:  # GEMM tiles (BLOCK_M/N/K), reductions, pointwise, routing
            assert check_resources(config, target) == [], (kernel["name"], config)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["qwen3", "qwen3-30b-a3b", "step3"])
def test_each_target_lowers_and_matches_eager(preset):
    warps = {}
    for name in registered_targets():
        record, source = _compile(preset, name)
        target = get_target(name)
        assert record["target"] == target.name and record["triton_kernels"] > 0
        kinds = {k["kind"] for k in record["kernels"]}
        assert _TEMPLATES[preset] <= kinds, (name, kinds)
        _assert_passes_checks(record, source, target)
        # GEMM template kernels launch through run_gemm, and may have one line per M bucket
        launches = re.findall(r"(?:run|run_gemm|flash_attention|flash_decoding)\((k\w+), .*num_warps=(\d+)", source)
        # one launch line per kernel; a flash-decoding line launches its combine kernel as well
        combines = sum(1 for k in record["kernels"] if k["name"].endswith("_combine"))
        # a fused MoE experts line launches its five kernels (their warps: the plan, tests/codegen/test_moe_experts.py)
        moe_experts = len(set(re.findall(r"run_moe_experts\((k\w+)_count, ", source))) * len(_MOE_EXPERTS)  # shared by layers
        assert len({name for name, _ in launches}) + combines + moe_experts == record["triton_kernels"]
        for _, count in launches:
            assert int(count) * target.warp_size <= target.max_threads_per_block
        warps[name] = [int(count) for _, count in launches]
    # the same threads are fewer warps on a 64-wide target: lowering reads the warp size
    assert warps["metax-c500"] != warps["nvidia-sm90"] and warps["iluvatar-bi150"] == warps["metax-c500"]


@pytest.mark.slow
def test_each_target_prefill_attention_passes_its_checks_and_matches_eager():
    # 70 query positions: more rows per K/V head than the decode path takes, flash attention's prefill kernel
    for name in registered_targets():
        record, source = _compile("qwen3", name, length=70)
        assert "attention_prefill" in {k["kind"] for k in record["kernels"]}, name
        _assert_passes_checks(record, source, get_target(name))
