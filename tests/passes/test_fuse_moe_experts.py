"""fuse_moe_experts: the routed experts of the tiny MoE models (HF grouped_mm and batched_mm, Step3's dense
form) become one flagtree::moe_experts node whose kernels run, and the models still match eager."""

from __future__ import annotations

import pytest
import torch
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

import flagtree_py
from flagtree_py.decompositions import flagtree_decompositions
from flagtree_py.models import build_model, tiny_config
from flagtree_py.options import CompileOptions
from flagtree_py.passes import PassContext
from flagtree_py.pipeline import CANONICALIZE, FUSE

#: what the experts were before the pass, in any of the three forms: none may stay an extern op
_EXPERT_EXTERNS = ("sort", "histc", "grouped_mm", "bmm", "index_put", "moe_routing_dense")
_KERNELS = {"moe_experts_count", "moe_experts_scatter", "moe_experts_gate_up", "moe_experts_down",
            "moe_experts_reduce"}


def _run(preset: str, experts: str, lengths=(5, 7), **options) -> dict:
    model = build_model(tiny_config(preset), num_layers=2, experts_implementation=experts)
    compiled = torch.compile(model, backend="flagtree", dynamic=True,
                             options={"target": "interpreter", "cache": False, **options})
    for length in lengths:
        ids = torch.randint(0, 512, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            out, ref = compiled(ids), model(ids)
        # fp32 logits through 2 layers of GEMMs, attention and the experts, summed in other orders: the
        # bound of the other tiny-model tests (1e-4 of the largest logit)
        assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-4
    (record,) = flagtree_py.report()  # one dynamic compile for both lengths
    assert record["kernel_failures"] == [] and record["codegen_fallbacks"] == []
    return record


@pytest.mark.slow
@pytest.mark.parametrize("experts", ["grouped_mm", "batched_mm"])
def test_qwen3_moe_experts_become_one_fused_op_per_layer(experts):
    record = _run("qwen3-30b-a3b", experts)
    assert record["passes"]["fuse_moe_experts"] == 2  # one per layer
    assert record["passes"]["fuse_moe_routing"] == 2
    assert not [op for op in record["extern_ops"] if any(word in op for word in _EXPERT_EXTERNS)], record["extern_ops"]
    kinds = [k["kind"] for k in record["kernels"]]
    # both layers launch one set of kernels (codegen/share_kernels.py): each kernel serves 2 nodes
    assert {kind: kinds.count(kind) for kind in _KERNELS} == dict.fromkeys(_KERNELS, 1)
    assert all(len(k["groups"]) == 2 for k in record["kernels"] if k["kind"] in _KERNELS)
    assert record["fusions_split"] == []


@pytest.mark.slow
def test_step3_dense_experts_become_sparse():
    record = _run("step3", "batched_mm")  # Step3's own module: experts_implementation does not apply
    assert record["passes"]["fuse_moe_experts"] == 1  # layer 1 is the MoE layer
    kinds = [k["kind"] for k in record["kernels"]]
    # the dense routing matrix is gone: the sparse routing kernel feeds the experts
    assert "moe_routing" in kinds and "moe_routing_dense" not in kinds
    assert {kind: kinds.count(kind) for kind in _KERNELS} == dict.fromkeys(_KERNELS, 1)
    assert not [op for op in record["extern_ops"] if any(word in op for word in _EXPERT_EXTERNS)], record["extern_ops"]


def test_gemm_templates_off_keeps_the_model_experts():
    model = build_model(tiny_config("qwen3-30b-a3b"), num_layers=1, experts_implementation="grouped_mm")
    ids = torch.randint(0, 512, (1, 3))
    compiled = torch.compile(model, backend="flagtree", options={"target": "interpreter", "gemm_templates": False})
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-4, atol=1e-5)
    (record,) = flagtree_py.report()
    assert record["passes"].get("fuse_moe_experts", 0) == 0
    assert any("grouped_mm" in op for op in record["extern_ops"])


def _passes_then_eager(counters: dict):
    """A torch.compile backend: flagtree's capture and its canonicalize + fuse passes, then the aten graph
    run eagerly (flagtree ops by their references). It checks a rewrite's meaning where the interpreter
    cannot run kernels (bf16: Triton's interpreter computes tl.dot on bf16 operands wrongly)."""
    def backend(gm, example_inputs):
        def forward(aten_gm, inputs):
            ctx = PassContext(CompileOptions())
            for fn in CANONICALIZE + FUSE:
                fn(aten_gm.graph, ctx)
            aten_gm.recompile()
            counters.update(ctx.counters)
            return make_boxed_func(aten_gm.forward)

        return aot_module_simplified(gm, example_inputs, fw_compiler=forward, decompositions=flagtree_decompositions())

    return backend


def test_bf16_grouped_mm_form_keeps_its_meaning():
    # bf16 weights: HF calls aten._grouped_mm (fp32 goes to transformers' fallback op), silu runs in fp32
    model = build_model(tiny_config("qwen3-30b-a3b"), num_layers=1, experts_implementation="grouped_mm",
                        dtype=torch.bfloat16)
    counters: dict = {}
    compiled = torch.compile(model, backend=_passes_then_eager(counters))
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        out, ref = compiled(ids).float(), model(ids).float()
    assert counters["fuse_moe_experts"] == 1 and counters["fuse_moe_routing"] == 1
    # bf16 roundings in another order (the fused op rounds each expert product once, HF each step): within
    # two bf16 epsilons (2**-7) of the largest logit (measured: about 0.6 of one)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 2 * 2**-7
