"""flagtree's attention kernels (flash attention, flash-decoding) against eager SDPA, fp32, interpreter.

Each case compiles a small function around `F.scaled_dot_product_attention` and asserts that the
result matches eager (conftest's 1e-5 relative bound: the kernels accumulate in fp32 like eager,
in another order), that the attention ran as a flagtree kernel of the expected path and that no
SDPA op stayed extern.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flagtree_py
from tests.codegen.conftest import assert_matches

B, HQ, D = 2, 4, 32


def _compile(fn, dynamic=False, target="interpreter"):
    return torch.compile(fn, backend="flagtree", dynamic=dynamic, options={"target": target, "fallback": False})


def _attention_kernels(record: dict) -> dict:
    return {k["name"]: k for k in record["kernels"] if k["kind"].startswith("attention")}


def _assert_flagtree_attention(record: dict, path: str, count: int = 1) -> None:
    assert record.get("fallback") is None, record.get("error")
    assert record["kernel_failures"] == []
    assert not any("scaled_dot_product" in op for op in record["extern_ops"]), record["extern_ops"]
    assert record["passes"]["fuse_attention"] == count
    kinds = {k["kind"] for k in _attention_kernels(record).values()}
    assert f"attention_{path}" in kinds, kinds


def _qkv(generator, q_len, kv_len, kv_heads, batch=B):
    q = torch.randn(batch, HQ, q_len, D, generator=generator)
    k = torch.randn(batch, kv_heads, kv_len, D, generator=generator)
    v = torch.randn(batch, kv_heads, kv_len, D, generator=generator)
    return q, k, v


def _repeat_kv(x, n):  # transformers' repeat_kv: expand + reshape (a clone in the aten graph)
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


@pytest.mark.parametrize("q_len", [37, 70])  # odd, not a multiple of the 32-row block
def test_prefill_causal_gqa(q_len):
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    generator = torch.Generator().manual_seed(q_len)
    q, k, v = _qkv(generator, q_len, q_len, kv_heads=2)
    with torch.no_grad():
        assert_matches(_compile(fn)(q, k, v), fn(q, k, v))
    (record,) = flagtree_py.report()
    _assert_flagtree_attention(record, "prefill")


@pytest.mark.parametrize("q_len", [37, 1])  # prefill, and one query row: flash-decoding
def test_bf16_is_as_close_to_fp32_as_eager_bf16(q_len):
    """bf16 on the interpreter: its tl.dot cannot multiply bf16, so the operands are widened in the
    kernel; the result must be as close to an fp32 reference as eager's bf16 SDPA is."""
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=q_len > 1, enable_gqa=True)

    generator = torch.Generator().manual_seed(7)
    q, k, v = _qkv(generator, q_len, 45, kv_heads=2)
    reference = fn(q, k, v)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    with torch.no_grad():
        actual, eager = _compile(fn)(q, k, v), fn(q, k, v)
    assert actual.dtype == torch.bfloat16
    eager_error = (eager.float() - reference).abs().max().item()
    error = (actual.float() - reference).abs().max().item()
    assert error <= 2 * eager_error + 1e-3, (error, eager_error)
    (record,) = flagtree_py.report()
    _assert_flagtree_attention(record, "prefill" if q_len > 1 else "decode")


@pytest.mark.parametrize("mask_kind", ["additive", "bool"])
def test_prefill_mask_with_repeat_kv_seen_through(mask_kind):
    def fn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, _repeat_kv(k, 2), _repeat_kv(v, 2), attn_mask=mask, scale=0.3)

    generator = torch.Generator().manual_seed(1)
    q, k, v = _qkv(generator, 45, 45, kv_heads=2)
    keep = torch.rand(B, 1, 45, 45, generator=generator) > 0.3
    keep[..., 0] = True  # every row sees a key (eager gives NaN for a fully masked row)
    mask = keep if mask_kind == "bool" else torch.where(keep, torch.randn(keep.shape, generator=generator), float("-inf"))
    with torch.no_grad():
        assert_matches(_compile(fn)(q, k, v, mask), fn(q, k, v, mask))
    (record,) = flagtree_py.report()
    _assert_flagtree_attention(record, "prefill")
    # the repeated K/V were never materialized: no kernel copies them
    assert record["triton_kernels"] == len(_attention_kernels(record))
    assert record["extern_ops"] == []


def test_prefill_dynamic_length_reuses_one_compile():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    compiled = _compile(fn, dynamic=True)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for length in (33, 70, 3):  # prefill, prefill, then few rows: the decode path, chosen per call
            q, k, v = _qkv(generator, length, length, kv_heads=HQ)
            assert_matches(compiled(q, k, v), fn(q, k, v))
    (record,) = flagtree_py.report()
    assert record["dynamic_symbols"]
    _assert_flagtree_attention(record, "prefill")
    assert {"attention_prefill", "attention_decode"} <= {k["kind"] for k in record["kernels"]}


def _static_cache_step(q, k_new, v_new, cache_k, cache_v, position):
    """One decode step over a static cache, as transformers' StaticCache + SDPA write it: the new
    K/V land at `position` (index_copy_), the mask covers the whole cache length."""
    cache_k.index_copy_(2, position, k_new)
    cache_v.index_copy_(2, position, v_new)
    kv_len = cache_k.shape[2]
    visible = torch.arange(kv_len)[None, :] <= position[:, None]  # [q_len, kv_len]
    mask = torch.where(visible, 0.0, float("-inf"))[None, None]
    return F.scaled_dot_product_attention(q, _repeat_kv(cache_k, 2), _repeat_kv(cache_v, 2), attn_mask=mask)


def test_decode_static_cache_longer_than_position():
    generator = torch.Generator().manual_seed(3)
    cache_len, position = 80, 50  # cache length > current position; 80 keys span 3 blocks of 32
    cache_k = torch.randn(B, 2, cache_len, D, generator=generator)
    cache_v = torch.randn(B, 2, cache_len, D, generator=generator)
    cache_k[:, :, position + 1:] = 0.0  # the not-yet-written part of a static cache
    cache_v[:, :, position + 1:] = 0.0
    q = torch.randn(B, HQ, 1, D, generator=generator)
    k_new, v_new = torch.randn(B, 2, 1, D, generator=generator), torch.randn(B, 2, 1, D, generator=generator)
    eager_k, eager_v = cache_k.clone(), cache_v.clone()
    pos = torch.tensor([position])
    with torch.no_grad():
        actual = _compile(_static_cache_step)(q, k_new, v_new, cache_k, cache_v, pos)
        expected = _static_cache_step(q, k_new, v_new, eager_k, eager_v, pos)
    assert_matches(actual, expected)
    assert torch.equal(cache_k, eager_k) and torch.equal(cache_v, eager_v)  # the cache write happened
    (record,) = flagtree_py.report()
    _assert_flagtree_attention(record, "decode")
    assert "attention_prefill" not in {k["kind"] for k in record["kernels"]}  # q_len 1: decode only
    # the cache writes happen in place: no functional copy of the cache, no copy back into it
    assert record["passes"]["reinplace_cache_writes"] == 2
    assert "aten.copy_.default" not in record["extern_ops"], record["extern_ops"]


def test_decode_split_kv_matches_single_chunk():
    """Flash-decoding merges chunks exactly: many chunks (programs=4 on the interpreter, 4 splits of
    a 128-key cache per K/V head) give eager's result, including a chunk the mask hides entirely."""
    def fn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    generator = torch.Generator().manual_seed(4)
    q, k, v = _qkv(generator, 2, 128, kv_heads=1, batch=1)
    keep = torch.ones(1, 1, 2, 128, dtype=torch.bool)
    keep[..., 32:64] = False  # the second chunk sees nothing: its lse is -inf, its weight 0
    with torch.no_grad():
        assert_matches(_compile(fn)(q, k, v, keep), fn(q, k, v, keep))
    (record,) = flagtree_py.report()
    _assert_flagtree_attention(record, "decode")


def test_aten_level_sdpa_forms_are_fused(tmp_path):
    """A graph that reaches flagtree with the device's SDPA op already chosen (here the CPU flash op,
    after transformers' repeat_kv and a bool mask turned into a bias) is fused at the aten level."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from flagtree_py.options import CompileOptions
    from flagtree_py.pipeline import compile_graph

    def fn(q, k, v, keep):
        return (F.scaled_dot_product_attention(q, _repeat_kv(k, 2), _repeat_kv(v, 2), attn_mask=keep),)

    generator = torch.Generator().manual_seed(5)
    q, k, v = _qkv(generator, 40, 40, kv_heads=2)
    keep = torch.rand(1, 1, 40, 40, generator=generator) > 0.5
    keep[..., 0] = True
    gm = make_fx(fn, tracing_mode="fake")(q, k, v, keep)
    assert any("_scaled_dot_product_flash_attention_for_cpu" in str(n.target) for n in gm.graph.nodes)
    call = compile_graph(gm, [q, k, v, keep], CompileOptions(target="interpreter", fallback=False), "aten_sdpa")
    (actual,) = call([q, k, v, keep])
    assert_matches(actual, fn(q, k, v, keep)[0])
    record = flagtree_py.report()[-1]
    _assert_flagtree_attention(record, "prefill")
    assert record["extern_ops"] == [] and record["triton_kernels"] == 1  # no repeat copy, no mask kernel


def test_value_head_size_other_than_query_stays_torch():
    """The kernels read V with Q's head size: a different V head size is left to torch."""
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    generator = torch.Generator().manual_seed(6)
    q, k, _ = _qkv(generator, 9, 9, kv_heads=HQ)
    v = torch.randn(B, HQ, 9, 16, generator=generator)
    with torch.no_grad():
        assert_matches(_compile(fn)(q, k, v), fn(q, k, v))
    (record,) = flagtree_py.report()
    assert record["passes"]["fuse_attention"] == 0  # torch's own path (here the CPU math decomposition)
    assert not any(k["kind"].startswith("attention") for k in record["kernels"])
