"""After every pass has run, each node's `meta["val"]` is what the node computes: recomputed from
its inputs' values with fake tensors, shape, dtype, strides and offset agree."""

from __future__ import annotations

import pytest
import torch
import torch.fx

import flagtree_py
from flagtree_py import pipeline
from flagtree_py.models import build_tiny_model
from flagtree_py.runtime.merged_weights import merged_weight


def _layout(value) -> object:
    if isinstance(value, torch.Tensor):
        return (tuple(map(str, value.shape)), value.dtype, tuple(map(str, value.stride())), str(value.storage_offset()))
    if isinstance(value, (tuple, list)):
        return tuple(_layout(v) for v in value)
    return None


def _recompute_all(graph: torch.fx.Graph) -> list[str]:
    """Nodes whose stored value differs from a fresh evaluation on their inputs' stored values."""
    fake_mode = next(n.meta["val"].fake_mode for n in graph.nodes
                     if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor))
    wrong = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta.get("val"))
        with fake_mode:
            if node.target is merged_weight:  # at run time a view or a copy: the same layout
                fresh = torch.cat(args)
            else:
                fresh = node.target(*args, **kwargs)
        if _layout(fresh) != _layout(node.meta.get("val")):
            wrong.append(f"{node.name}: {_layout(node.meta.get('val'))} != {_layout(fresh)}")
    return wrong


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "rewrites"), [
    ("qwen3", {"merge_qkv": 1, "merge_gate_up": 1, "fuse_qk_norm_rope": 2}),
    ("qwen3-30b-a3b", {"merge_qkv": 1, "fuse_moe_routing": 1, "fuse_qk_norm_rope": 2}),
    ("step3", {"merge_gate_up": 2, "fuse_moe_routing": 1}),  # 2 layers: dense, then MoE
])
def test_passes_keep_node_values_right(preset, rewrites, monkeypatch):
    checked = []
    partition = pipeline.partition_fusion_groups

    def check_then_partition(graph, *args):
        checked.append(_recompute_all(graph))
        return partition(graph, *args)

    monkeypatch.setattr(pipeline, "partition_fusion_groups", check_then_partition)
    model = build_tiny_model(preset, num_layers=2 if preset == "step3" else 1)
    with torch.no_grad():
        torch.compile(model, backend="flagtree", options={"target": "interpreter", "cache": False})(
            torch.randint(0, 256, (1, 5)))
    (record,) = flagtree_py.report()
    # the rewriting passes did run on this graph
    assert {k: record["passes"][k] for k in rewrites} == rewrites
    assert checked == [[]]
