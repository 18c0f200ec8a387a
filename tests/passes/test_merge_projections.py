"""merge_qkv / merge_gate_up: parallel projections -> one GEMM over weights laid back to back once;
parameters held once, state_dict intact, a replaced weight still computed right."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flagtree_py
from flagtree_py.models import build_tiny_model
from flagtree_py.runtime.merged_weights import are_colocated

L = 2


def _unique_storage_bytes(module: nn.Module) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in module.state_dict().values()}
    return sum(storages.values())


def _check(model, ids, **options) -> dict:
    compiled = torch.compile(model, backend="flagtree", options={"target": "interpreter", **options})
    with torch.no_grad():
        out = compiled(ids)
        ref = model(ids)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    (record,) = flagtree_py.report()
    assert record["kernel_failures"] == [] and record["codegen_fallbacks"] == [] and record["fusions_split"] == []
    return record


def test_qwen3_projections_merge_and_weights_are_held_once():
    model = build_tiny_model("qwen3", num_layers=L)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bytes_before = _unique_storage_bytes(model)
    record = _check(model, torch.randint(0, 256, (1, 7)))
    assert record["passes"]["merge_qkv"] == L and record["passes"]["merge_gate_up"] == L
    # 7 GEMMs per layer (q, k, v, o, gate, up, down) + lm_head -> 4 per layer + lm_head (GEMM
    # template groups: a split-K pair of kernels each at 7 rows)
    # GEMM groups (layers share kernels: a kernel lists every group that launches it)
    assert len({g for k in record["kernels"] if "_mm" in k["name"] for g in k["groups"]}) == 4 * L + 1
    for layer in model.causal_lm.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert are_colocated([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        assert are_colocated([mlp.gate_proj.weight, mlp.up_proj.weight])
        assert isinstance(attn.q_proj.weight, nn.Parameter)
    # no second copy anywhere; every parameter still has its value and its state_dict key
    assert _unique_storage_bytes(model) == bytes_before
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_load_state_dict_after_compile_writes_the_merged_buffer():
    model = build_tiny_model("qwen3", num_layers=1)
    other = build_tiny_model("qwen3", num_layers=1, seed=1)
    compiled = torch.compile(model, backend="flagtree", options={"target": "interpreter"})
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        compiled(ids)
        model.load_state_dict(other.state_dict())  # in-place copies into the (shared) storages
        attn = model.causal_lm.model.layers[0].self_attn
        assert are_colocated([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the merged view is used: no re-concatenation warning
            out = compiled(ids)
        assert torch.allclose(out, other(ids), rtol=1e-5, atol=1e-5)


def test_a_replaced_weight_is_concatenated_again():
    """The compiled code checks that the weights still alias one buffer; if not, it concatenates."""
    model = build_tiny_model("qwen3", num_layers=1)
    compiled = torch.compile(model, backend="flagtree", options={"target": "interpreter"})
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        compiled(ids)
        attn = model.causal_lm.model.layers[0].self_attn
        attn.k_proj.weight.data = torch.randn_like(attn.k_proj.weight) * 0.02  # a new storage
        assert not are_colocated([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        with pytest.warns(UserWarning, match="concatenating them on every call"):
            out = compiled(ids)
        assert torch.allclose(out, model(ids), rtol=1e-5, atol=1e-5)
    assert len(flagtree_py.report()) == 1  # the same compiled graph served both calls


def test_cache_hit_lays_out_the_new_models_parameters():
    first = build_tiny_model("qwen3", num_layers=1)
    _check(first, torch.randint(0, 256, (1, 5)))
    torch._dynamo.reset()
    flagtree_py.clear_report()
    second = build_tiny_model("qwen3", num_layers=1, seed=3)
    record = _check(second, torch.randint(0, 256, (1, 5)))
    assert record["cache"] == "hit"
    attn = second.causal_lm.model.layers[0].self_attn
    assert are_colocated([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])


@pytest.mark.slow
def test_step3_dense_mlp_and_shared_expert_merge():
    model = build_tiny_model("step3", num_layers=L)
    record = _check(model, torch.randint(0, 256, (1, 7)))
    # Step3's q/k/v is already one qkv_proj; gate/up of layer 0's MLP and of layer 1's shared
    # expert merge; the routed experts are stacked [experts, out, in] weights read by bmm: left alone
    assert record["passes"]["merge_qkv"] == 0 and record["passes"]["merge_gate_up"] == L


class _Attention(nn.Module):
    def __init__(self, bias=(False, False, False), cast_k=False, other_input=False):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(32, n, bias=b) for n, b in zip((32, 16, 16), bias))
        self.cast_k, self.other_input = cast_k, other_input
        if cast_k:
            self.k.half()

    def forward(self, x):
        k_weight = self.k.weight.float() if self.cast_k else self.k.weight
        k = F.linear(x * 2 if self.other_input else x, k_weight, self.k.bias)
        q = self.q(x).view(1, -1, 2, 16).transpose(1, 2)
        k = k.view(1, -1, 1, 16).transpose(1, 2).expand(1, 2, -1, 16)
        v = self.v(x).view(1, -1, 1, 16).transpose(1, 2).expand(1, 2, -1, 16)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(1, -1, 32)


@pytest.mark.parametrize(("module", "merges"), [
    (_Attention(), 1),
    (_Attention(bias=(True, True, True)), 1),  # addmm with one concatenated bias
    (_Attention(bias=(True, False, False)), 0),  # biases on some but not all
    (_Attention(cast_k=True), 0),  # k's weight is another dtype (cast in the graph: not a parameter)
    (_Attention(other_input=True), 0),  # k reads another input
])
def test_merge_only_when_provably_the_same(module, merges):
    module = module.eval().requires_grad_(False)
    x = torch.randn(1, 5, 32)
    record = _check(module, x)
    assert record["passes"]["merge_qkv"] == merges


def test_weights_that_are_inputs_not_parameters_are_left_alone():
    def attention(x, wq, wk, wv):
        q = (x @ wq.t()).view(1, -1, 2, 16).transpose(1, 2)
        k = (x @ wk.t()).view(1, -1, 2, 16).transpose(1, 2)
        v = (x @ wv.t()).view(1, -1, 2, 16).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v)

    inputs = (torch.randn(5, 32), torch.randn(32, 32), torch.randn(32, 32), torch.randn(32, 32))
    out = torch.compile(attention, backend="flagtree", options={"target": "interpreter"})(*inputs)
    ref = attention(*inputs)
    # fp32 with reassociated sums (GEMM and flash-attention kernels): relative to the largest value,
    # as everywhere else (eager itself is ~2e-5 absolute from an fp64 reference on these values)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    (record,) = flagtree_py.report()
    assert record["passes"]["merge_qkv"] == 0


def test_option_turns_the_merges_off():
    model = build_tiny_model("qwen3", num_layers=1)
    record = _check(model, torch.randint(0, 256, (1, 5)), merge_projections=False)
    assert record["passes"].get("merge_qkv", 0) == 0 and record["passes"].get("merge_gate_up", 0) == 0
    attn = model.causal_lm.model.layers[0].self_attn
    assert not are_colocated([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
