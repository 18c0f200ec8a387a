"""The tiny models with flagtree's attention kernels: prefill (no cache) and decode over an HF cache.

Interpreter, fp32; the bound is the one tests/targets uses for whole models (1e-4 of the logits'
largest magnitude: two layers of fp32 GEMMs and kernels, summed in another order than eager).
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StaticCache

import flagtree_py
from flagtree_py.models import build_tiny_model


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def _attention_kinds(record: dict) -> set:
    return {k["kind"] for k in record["kernels"] if k["kind"].startswith("attention")}


def _assert_attention_in_kernels(record: dict, layers: int = 2) -> None:
    assert record.get("fallback") is None, record.get("error")
    assert record["kernel_failures"] == [] and record["codegen_fallbacks"] == []
    assert not any("scaled_dot_product" in op for op in record["extern_ops"]), record["extern_ops"]
    assert record["passes"]["fuse_attention"] == layers
    attention_nodes = {n for k in record["kernels"] if k["kind"].startswith("attention") for n in k["nodes"]}
    assert len(attention_nodes) == layers


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["qwen3", "qwen3-30b-a3b", "step3"])
def test_tiny_model_prefill_attention_is_a_flagtree_kernel(preset):
    model = build_tiny_model(preset)
    ids = torch.randint(0, 256, (2, 37))  # 37 rows: two 32-row blocks, the second partial
    with torch.no_grad():
        out = torch.compile(model, backend="flagtree", options={"target": "interpreter", "fallback": False})(ids)
        ref = model(ids)
    assert _rel_err(out, ref) <= 1e-4
    (record,) = flagtree_py.report()
    _assert_attention_in_kernels(record)
    assert "attention_prefill" in _attention_kinds(record)


def _decode_step(causal_lm):
    def step(ids, cache, position):
        return causal_lm(input_ids=ids, past_key_values=cache, cache_position=position, use_cache=True).logits

    return step


@pytest.mark.slow
def test_tiny_qwen3_decode_over_static_cache():
    causal_lm = build_tiny_model("qwen3").causal_lm
    step = _decode_step(causal_lm)
    prompt = torch.randint(0, 256, (1, 5))
    caches = [StaticCache(config=causal_lm.config, max_cache_len=40) for _ in range(2)]  # 40 > position
    compiled = torch.compile(step, backend="flagtree", options={"target": "interpreter", "fallback": False})
    with torch.no_grad():
        for cache in caches:
            step(prompt, cache, torch.arange(5))
        for position in (5, 6):  # two steps: the compiled graph is reused, the cache keeps growing
            token = torch.randint(0, 256, (1, 1))
            out = compiled(token, caches[0], torch.tensor([position]))
            ref = step(token, caches[1], torch.tensor([position]))
            assert _rel_err(out, ref) <= 1e-4
    for flagtree_layer, eager_layer in zip(caches[0].layers, caches[1].layers):
        assert torch.allclose(flagtree_layer.keys, eager_layer.keys, atol=1e-5)
        assert torch.allclose(flagtree_layer.values, eager_layer.values, atol=1e-5)
    (record,) = flagtree_py.report()
    _assert_attention_in_kernels(record)
    assert _attention_kinds(record) == {"attention_decode"}
    assert record["passes"]["reinplace_cache_writes"] == 4  # K and V of both layers, written in place


@pytest.mark.slow
def test_tiny_qwen3_decode_over_dynamic_cache():
    causal_lm = build_tiny_model("qwen3").causal_lm
    step = _decode_step(causal_lm)
    prompt = torch.randint(0, 256, (1, 5))
    caches = [DynamicCache(config=causal_lm.config) for _ in range(2)]
    compiled = torch.compile(step, backend="flagtree", dynamic=True,
                             options={"target": "interpreter", "fallback": False})
    with torch.no_grad():
        for cache in caches:
            step(prompt, cache, torch.arange(5))
        for position in (5, 6, 7):
            token = torch.randint(0, 256, (1, 1))
            out = compiled(token, caches[0], torch.tensor([position]))
            ref = step(token, caches[1], torch.tensor([position]))
            assert _rel_err(out, ref) <= 1e-4
    records = flagtree_py.report()
    assert records
    for record in records:
        _assert_attention_in_kernels(record)
