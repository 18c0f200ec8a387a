"""torch.compile(model, backend="flagtree"): entry point, options, report, the four tiny models."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import flagtree_py
from flagtree_py.models import build_tiny_model

PRESETS = ["qwen3", "qwen3-30b-a3b", "qwen3-omni", "step3"]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def test_backend_is_found_without_importing_flagtree():
    code = (
        "import sys, torch\n"
        "f = torch.compile(lambda x: (x * 2).sin(), backend='flagtree')\n"
        "x = torch.randn(5)\n"
        "assert torch.allclose(f(x), (x * 2).sin(), atol=1e-6)\n"
        "assert 'flagtree_py' in sys.modules\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


def test_unknown_option_and_bad_target_are_errors():
    f = torch.compile(lambda x: x + 1, backend="flagtree", options={"no_such_option": 1})
    with pytest.raises(Exception, match="unknown flagtree option"):
        f(torch.randn(3))
    torch._dynamo.reset()
    g = torch.compile(lambda x: x + 1, backend="flagtree", options={"target": "tpu"})
    with pytest.raises(Exception, match="unknown flagtree target"):
        g(torch.randn(3))


def test_report_fields_and_dump_dir(tmp_path):
    def f(x, w):
        h = x.float()
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)), torch.softmax(x, -1)

    x, w = torch.randn(4, 7, 32), torch.randn(32)
    cf = torch.compile(f, backend="flagtree", options={"target": "interpreter", "dump_dir": str(tmp_path)})
    with torch.no_grad():
        for got, want in zip(cf(x, w), f(x, w)):
            assert _rel_err(got, want) <= 1e-5
    (record,) = flagtree_py.report()
    for key in ("target", "triton_kernels", "lowered_nodes", "extern_ops", "passes", "compile_s", "target_reason"):
        assert key in record
    assert record["target"] == "interpreter"
    assert record["triton_kernels"] == 2  # the norm and the softmax, one kernel each
    assert record["extern_ops"] == []
    assert record["lowered_fraction"] == 1.0
    assert record["kernel_failures"] == [] and record["codegen_fallbacks"] == []
    assert record["passes"]["partition_fusion_groups"] == 2
    assert any(p.suffix == ".py" for p in tmp_path.iterdir())
    assert (tmp_path / f"{record['graph']}.partition.txt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_tiny_model_matches_eager_and_serves_every_length(preset):
    """One dynamic compile serves every sequence length: no recompile after the second call."""
    model = build_tiny_model(preset)
    explanation = torch._dynamo.explain(model)(torch.randint(0, 256, (1, 5)))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="flagtree", options={"poison_outputs": True})
    with torch.no_grad():
        for length in (6, 9, 17):
            ids = torch.randint(0, 256, (1, length))
            # fp32 on both sides; kernels reassociate sums, so allow 1e-4 of the largest logit
            assert _rel_err(compiled(ids), model(ids)) <= 1e-4
    records = flagtree_py.report()
    assert len(records) == 2, "static first compile, then one dynamic compile for every length"
    dynamic = records[-1]
    assert dynamic["dynamic_symbols"], "the sequence length must stay symbolic"
    assert dynamic["kernel_failures"] == [] and dynamic["codegen_fallbacks"] == []
    assert dynamic["triton_kernels"] > 10
    # what stays extern is GEMMs, attention, the merged projections' weight view and the few ops
    # with no lowering yet
    allowed = ("mm", "bmm", "scaled_dot_product", "getitem", "cumsum", "topk", "split_with_sizes", "scatter", "slice_scatter",
               "merged_weight")
    assert all(any(a in op for a in allowed) for op in dynamic["extern_ops"]), dynamic["extern_ops"]
    assert dynamic["lowered_fraction"] >= 0.9


@pytest.mark.parametrize("gemm_templates", [False, True])
def test_tiny_qwen3_kernels_per_layer(gemm_templates):
    """2 layers, 7 tokens: 6 kernels of masks and rotary tables, the attention kernel pair
    (flash-decoding and its combine, one source shared by both layers), then per layer 5 kernels
    (q norm+rope, k norm+rope, residual add+norm, SwiGLU, residual add+next norm); K/V heads are
    no longer repeated (fuse_attention), and q/k/v and gate/up are one GEMM each (merge_qkv,
    merge_gate_up).

    With GEMM templates the 4 GEMMs of a layer (qkv, o, gate_up, down) and the LM head are kernels
    too, SwiGLU is the gate_up GEMM's epilogue (4 other kernels per layer), and 7 tokens are
    decode-sized (M <= 16): each GEMM group is a split-K pair of kernels.

    The second layer's groups have the first's structure: they launch its kernels (codegen/share_kernels.py),
    so the module holds one layer's kernels; `kernels_without_sharing` counts one kernel per group."""
    model = build_tiny_model("qwen3")
    with torch.no_grad():
        torch.compile(model, backend="flagtree", dynamic=False,
                      options={"gemm_templates": gemm_templates})(torch.randint(0, 256, (1, 7)))
    (record,) = flagtree_py.report()
    if not gemm_templates:
        assert record["kernels_without_sharing"] == 6 + 2 + 5 * 2
        assert record["triton_kernels"] == record["kernels_distinct"] == 6 + 2 + 5
        return
    assert record["kernels_without_sharing"] == 6 + 2 + (4 + 4 * 2) * 2 + 2
    assert record["triton_kernels"] == record["kernels_distinct"] == 6 + 2 + (4 + 4 * 2) + 2
    assert not any("mm" in op for op in record["extern_ops"])
    assert record["fusions_split"] == [] and record["codegen_fallbacks"] == []
