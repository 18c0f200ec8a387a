"""Option check_kernels: every launch is recomputed by the kernel's aten fallback; the error per kernel is
recorded, a wrong kernel is caught and named, and with the option off nothing changes."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import flagtree_py
from flagtree_py.codegen import group_kernels
from flagtree_py.runtime.check import CheckedKernel, compare_outputs
from flagtree_py.runtime.launch import GuardedKernel

aten = torch.ops.aten


def _kernels(record) -> list[GuardedKernel]:
    module = sys.modules[record["module_path"].rsplit("/", 1)[-1][:-3]]
    return [k for k in vars(module).values() if isinstance(k, GuardedKernel)]


#: the GEMM stays aten here, so that the two kernels are plain ones (GEMM templates: tests/codegen/test_gemm.py)
OPTIONS = {"check_kernels": True, "gemm_templates": False}


def f(x, w):
    # two kernels: softmax (a reduction), then a pointwise exp/mul chain after the extern GEMM
    h = torch.softmax(x * 2, -1) @ w
    return torch.exp(h) * 0.5 + 1


def test_every_launch_is_checked_and_agrees_with_aten():
    x, w = torch.randn(5, 24), torch.randn(24, 7)
    cf = torch.compile(f, backend="flagtree", options=OPTIONS)
    for _ in range(2):
        assert torch.allclose(cf(x, w), f(x, w), rtol=1e-5, atol=1e-5)
    (record,) = flagtree_py.report()
    kernels = _kernels(record)
    assert len(kernels) == record["triton_kernels"] == 2
    assert all(isinstance(k, CheckedKernel) for k in kernels)
    assert set(record["kernel_errors"]) == {k.name for k in kernels}
    for entry in record["kernel_errors"].values():
        assert entry["launches"] == 2
        # the same fp32 arithmetic in another order: a few ulps of values of size ~1-10
        assert entry["max_rel_error"] < 1e-6 and entry["max_abs_error"] < 1e-5


def test_off_by_default_binds_plain_kernels():
    cf = torch.compile(f, backend="flagtree")
    cf(torch.randn(5, 24), torch.randn(24, 7))
    (record,) = flagtree_py.report()
    assert "kernel_errors" not in record
    assert {type(k) for k in _kernels(record)} == {GuardedKernel}


def test_a_wrong_kernel_is_caught_and_named(monkeypatch: pytest.MonkeyPatch):
    exp = group_kernels._LOWERINGS[aten.exp.default]

    def wrong_exp(k, node, index, mask):  # exp off by 3%: a plausible bug in one lowering
        value = exp(k, node, index, mask)
        return k.emit(f"{value.name} * 1.03", value.dtype)

    monkeypatch.setitem(group_kernels._LOWERINGS, aten.exp.default, wrong_exp)
    cf = torch.compile(f, backend="flagtree", options=OPTIONS)
    cf(torch.randn(5, 24), torch.randn(24, 7))
    (record,) = flagtree_py.report()
    errors = record["kernel_errors"]
    worst = max(errors, key=lambda name: errors[name]["max_rel_error"])
    sources = {k["name"]: k["nodes"] for k in record["kernels"]}
    # the epilogue kernel (exp, mul, add): softmax's kernel has an exp too, but its normalisation divides
    # the 3% away, so it still agrees with aten
    assert "add" in sources[worst] and any(name.startswith("exp") for name in sources[worst])
    assert 0.005 < errors[worst]["max_rel_error"] < 0.05
    others = [e["max_rel_error"] for name, e in errors.items() if name != worst]
    assert all(error < 1e-6 for error in others)


def attend(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def _qkv(q_len: int, kv_len: int = 70) -> tuple[torch.Tensor, ...]:
    # 4 query heads share 2 K/V heads; 70 keys: flash-decoding cuts them into 2 chunks of 64 in the interpreter
    return torch.randn(1, 4, q_len, 32), torch.randn(1, 2, kv_len, 32), torch.randn(1, 2, kv_len, 32)


@pytest.mark.parametrize(("q_len", "path"), [(37, "prefill"), (1, "decode")])
def test_attention_kernels_are_checked(q_len, path):
    """Prefill's output is compared directly; flash-decoding as a pair (step 2's output against the aten
    attention, under step 1's name: its scratch splits the keys over chunks, the twin's does not) and step 2
    alone (against its twin on the same scratch)."""
    q, k, v = _qkv(q_len)
    with torch.no_grad():
        got = torch.compile(attend, backend="flagtree", options={"check_kernels": True})(q, k, v)
        assert torch.allclose(got, attend(q, k, v), rtol=1e-5, atol=1e-5)
    (record,) = flagtree_py.report()
    names = {k["name"] for k in record["kernels"] if k["kind"] == f"attention_{path}"}
    expected = {"k_attention0_prefill"} if path == "prefill" else {"k_attention0_decode", "k_attention0_decode_combine"}
    assert names == expected and set(record["kernel_errors"]) == expected
    for entry in record["kernel_errors"].values():
        # fp32 softmax and sums in another order (and, decoding, over two chunks merged): a few ulps of values ~1
        assert entry["launches"] == 1 and entry["max_rel_error"] < 1e-5


def test_a_wrong_decoding_kernel_is_caught_and_named(monkeypatch: pytest.MonkeyPatch):
    """Step 1 of flash-decoding scales its chunks' outputs by 1.03: the combine merges them faithfully (its own
    check passes) and the pair's output is 3% off the aten attention, recorded under step 1's name."""
    render = group_kernels.render_template
    exact = "out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]"

    def wrong_decode(name, target, **values):
        source = render(name, target, **values)
        if name == "attention_decode.py.jinja":
            assert exact in source
            source = source.replace(exact, exact + " * 1.03")
        return source

    monkeypatch.setattr(group_kernels, "render_template", wrong_decode)
    q, k, v = _qkv(1)
    with torch.no_grad():
        got = torch.compile(attend, backend="flagtree", options={"check_kernels": True})(q, k, v)
    assert not torch.allclose(got, attend(q, k, v), rtol=1e-3, atol=1e-3)  # the plant took effect
    (record,) = flagtree_py.report()
    errors = record["kernel_errors"]
    worst = max(errors, key=lambda name: errors[name]["max_rel_error"])
    assert worst == "k_attention0_decode" and 0.01 < errors[worst]["max_rel_error"] < 0.05
    assert errors["k_attention0_decode_combine"]["max_rel_error"] < 1e-5


def test_compare_outputs_treats_matching_non_finite_values_as_agreement():
    want = torch.tensor([1.0, float("-inf"), float("nan"), 4.0])
    assert compare_outputs(want.clone(), want) == (0.0, 4.0)
    got = want.clone()
    got[3] = 4.5
    assert compare_outputs(got, want) == (0.5, 4.0)
    got = want.clone()
    got[1] = 0.0
    assert compare_outputs(got, want)[0] == float("inf")
    assert compare_outputs(torch.tensor([1, 2]), torch.tensor([1, 3]))[0] == float("inf")
