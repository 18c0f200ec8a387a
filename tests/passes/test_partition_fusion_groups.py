"""Fusion groups: vertical fusion, stored outputs, and never a cycle."""

from __future__ import annotations

import networkx as nx
import torch
from torch._functorch.aot_autograd import aot_module_simplified

from flagtree_py.decompositions import flagtree_decompositions
from flagtree_py.passes.partition_fusion_groups import partition_fusion_groups


def _aten_graph(fn, *inputs) -> torch.fx.GraphModule:
    captured = {}

    def backend(gm, example_inputs):
        def compiler(aten_gm, _):
            captured["gm"] = aten_gm
            return aten_gm.forward

        return aot_module_simplified(gm, example_inputs, fw_compiler=compiler, decompositions=flagtree_decompositions())

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend)(*inputs)
    return captured["gm"]


def test_residual_add_and_rms_norm_are_one_group_storing_both():
    def f(x, residual, w):
        h = x + residual
        hf = h.float()
        normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return h, w * normed

    gm = _aten_graph(f, torch.randn(3, 8, 64), torch.randn(3, 8, 64), torch.randn(64))
    partition = partition_fusion_groups(gm.graph, "cpu")
    assert len(partition.groups) == 1
    (group,) = partition.groups
    assert group.rdims == (2,)
    assert sorted(role for _, role in group.stores()) == ["full", "full"]


def test_values_used_by_an_extern_are_stored_and_the_dag_is_acyclic():
    def f(x, w1, w2):
        a = torch.relu(x @ w1)  # extern mm, then a pointwise group
        b = a @ w2  # extern reads a: a must be stored
        return torch.softmax(b + a, -1)  # reads the extern's output and a again

    gm = _aten_graph(f, torch.randn(4, 16), torch.randn(16, 16), torch.randn(16, 16))
    partition = partition_fusion_groups(gm.graph, "cpu", gemm_templates=False)
    assert nx.is_directed_acyclic_graph(partition.dag)
    relu = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.relu.default)
    assert relu in partition.group_of[relu].stored
    assert len(partition.groups) == 2


def test_a_merge_that_would_close_a_cycle_is_refused():
    # p feeds both an extern (mm) and the final group, and the final group reads the mm's
    # output: putting p into the final group would make group -> mm -> group
    def f(x, w):
        p = x.exp()
        q = p @ w
        return (p * 2 + q).sum(-1)

    gm = _aten_graph(f, torch.randn(8, 8), torch.randn(8, 8))
    partition = partition_fusion_groups(gm.graph, "cpu", gemm_templates=False)
    assert nx.is_directed_acyclic_graph(partition.dag)
    exp = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.exp.default)
    total = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.sum.dim_IntList)
    assert partition.group_of[exp] is not partition.group_of[total]


def test_gemm_groups_take_their_pointwise_epilogue_and_never_their_operands():
    def f(x, w1, w2):
        p = x.exp()  # A of the first GEMM: a producer, materialized, never in the GEMM's group
        a = torch.relu(p @ w1)  # GEMM + epilogue; a is read again below: stored by that group
        b = a @ w2  # its only reader is a reduction group: this GEMM stands alone and stores b
        return torch.softmax(b + a, -1)

    gm = _aten_graph(f, torch.randn(4, 16), torch.randn(16, 16), torch.randn(16, 16))
    partition = partition_fusion_groups(gm.graph, "cpu")
    assert nx.is_directed_acyclic_graph(partition.dag)
    node = {n.target: n for n in gm.graph.nodes}
    aten = torch.ops.aten
    mm1, mm2 = (n for n in gm.graph.nodes if n.target == aten.mm.default)
    relu_group = partition.group_of[node[aten.relu.default]]
    assert relu_group.gemm is mm1 and set(relu_group.stored) == {node[aten.relu.default]}
    assert partition.group_of[node[aten.exp.default]] is not relu_group
    assert partition.group_of[mm2].gemm is mm2 and set(partition.group_of[mm2].stored) == {mm2}
    assert len(partition.groups) == 4  # exp, mm1+relu, mm2, softmax


def test_norm_read_through_a_transpose_and_a_broadcast_stays_in_the_consumer_group():
    """Qwen3's per-head k norm, transposed, rotated and repeated for GQA: one kernel."""

    def f(k, w, cos, sin):
        kf = k.float()
        normed = w * (kf * torch.rsqrt(kf.pow(2).mean(-1, keepdim=True) + 1e-6))
        t = normed.transpose(1, 2)  # [b, heads, s, d]
        half = t.shape[-1] // 2
        rotated = torch.cat((-t[..., half:], t[..., :half]), -1)
        roped = t * cos + rotated * sin
        return roped[:, :, None].expand(-1, -1, 2, -1, -1).reshape(1, 4, 7, 32).contiguous()

    inputs = (torch.randn(1, 7, 2, 32), torch.randn(32), torch.randn(7, 32), torch.randn(7, 32))
    gm = _aten_graph(f, *inputs)
    partition = partition_fusion_groups(gm.graph, "cpu")
    assert len(partition.groups) == 1
    assert partition.groups[0].rdims == (len(partition.groups[0].full_shape) - 1,)
    torch._dynamo.reset()
    import flagtree_py

    flagtree_py.clear_report()
    with torch.no_grad():
        got = torch.compile(f, backend="flagtree")(*inputs)
    assert torch.allclose(got, f(*inputs), atol=1e-5)
    (record,) = flagtree_py.report()
    assert record["triton_kernels"] == 1 and record["codegen_fallbacks"] == []
