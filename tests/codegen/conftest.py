"""Harness for codegen tests: compile with flagtree, compare with eager, prove where ops ran.

`check_lowered(fn, make_inputs, ops)` compiles `fn` with `torch.compile(backend="flagtree")`,
runs it on fresh random inputs and asserts two things: the result matches eager PyTorch, and
each aten op named in `ops` ran inside a Triton kernel (not as an extern aten call, not in a
group that fell back to aten at codegen time, not in a kernel that failed and ran its aten
fallback). `check_aten_graph` does the same for an aten graph traced without decompositions,
for the ops that torch.compile never hands to flagtree.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import flagtree_py
from flagtree_py.codegen.lowerings import VIEWS
from flagtree_py.options import CompileOptions
from flagtree_py.pipeline import compile_graph

MakeInputs = Callable[[torch.Generator, int], tuple]

_NODE = re.compile(r"^\s*%(\w+) : .*?= call_function\[target=torch\.ops\.([\w.]+)\]", re.MULTILINE)


def op_name(target) -> str:
    """`aten.exp.default` for `torch.ops.aten.exp.default` (the spelling of report()['extern_ops'])."""
    return f"{target.namespace}.{target._overloadpacket.__name__}.{target._overloadname}"


_VIEW_NAMES = frozenset(op_name(t) for t in VIEWS)


def assert_matches(actual, expected, exact: bool = False) -> None:
    """Eager agreement: bit-exact for integers, bools and `exact` cases; else

    float32/float64: max abs error <= 1e-5 * max(1, max|expected|). Kernels compute in float32
      like eager, but in another order (reductions, fused expressions) and with Triton's own
      exp/log/erf: a few ulps, far below this bound.
    float16: max abs error <= 2**-10 * max(1, max|expected|). Both sides compute in float32 and
      round once to float16; a last-bit float32 difference can flip that rounding, which is one
      float16 ulp (2**-10 relative). Casts are checked `exact`: they must round as eager does.
    NaNs must sit at the same places; infinities must match exactly.
    """
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_matches(a, e, exact)
        return
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != eager {expected.dtype}"
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != eager {tuple(expected.shape)}"
    if exact or not expected.is_floating_point():
        assert torch.equal(actual, expected) or (
            expected.is_floating_point() and torch.equal(actual.isnan(), expected.isnan())
            and torch.equal(actual.nan_to_num(0.0), expected.nan_to_num(0.0))
        ), f"not bit-exact:\n{actual}\neager:\n{expected}"
        return
    assert torch.equal(actual.isnan(), expected.isnan()), f"NaNs differ:\n{actual}\neager:\n{expected}"
    a, e = actual.double(), expected.double()
    same = (a == e) | (a.isnan() & e.isnan())
    error = torch.where(same, 0.0, (a - e).abs()).max().item() if e.numel() else 0.0
    finite = e[e.isfinite()]
    scale = max(1.0, finite.abs().max().item() if finite.numel() else 0.0)
    relative = 2**-10 if expected.dtype in (torch.float16, torch.bfloat16) else 1e-5
    assert error <= relative * scale, f"max abs error {error:.3g} > {relative * scale:.3g}:\n{actual}\neager:\n{expected}"


def assert_ran_in_kernels(record: dict, ops: Sequence[str], dump_dir: Path, allow_extern: Sequence[str] = ()) -> None:
    """Every node of each op in `ops` ran in a Triton kernel that built and ran."""
    assert record.get("fallback") is None, f"the whole graph fell back to eager: {record.get('error')}"
    assert record["triton_kernels"] >= 1
    assert record["codegen_fallbacks"] == []
    assert record["kernel_failures"] == []
    assert set(record["extern_ops"]) <= set(allow_extern), f"extern ops: {record['extern_ops']}"
    graph_text = (dump_dir / f"{record['graph']}.aten.txt").read_text()
    targets = dict(_NODE.findall(graph_text))  # node name -> op
    in_kernels = {name for kernel in record["kernels"] for name in kernel["nodes"]}
    source = Path(record["module_path"]).read_text()
    call_body = source[source.index("def call(args):"):]
    for op in ops:
        nodes = [name for name, target in targets.items() if target == op]
        assert nodes, f"{op} is not in the captured graph, which has {sorted(set(targets.values()))}"
        assert op not in record["extern_ops"]
        for name in nodes:
            # a view of a kernel input is folded into the kernel's index arithmetic: it is
            # no group member, and the wrapper must not compute it
            folded = op in _VIEW_NAMES and f"    {name} = " not in call_body
            assert name in in_kernels or folded, f"{name} ({op}) ran outside the kernels {record['kernels']}"


@pytest.fixture
def check_lowered(tmp_path: Path):
    """compile `fn` with flagtree, compare with eager on fresh inputs, assert `ops` ran in kernels.

    dynamic=True compiles with symbolic sizes, calls with n=5 then n=7, and asserts that the
    second call reused the first compilation.
    """

    def check(fn: Callable, make_inputs: MakeInputs, ops: Sequence[str], *, dynamic: bool = False,
              exact: bool = False, looped: bool = False, seed: str = "") -> dict:
        generator = torch.Generator().manual_seed(zlib.crc32(seed.encode()))
        compiled = torch.compile(fn, backend="flagtree", dynamic=dynamic, options={"dump_dir": str(tmp_path)})
        for n in (5, 7) if dynamic else (5,):
            inputs = make_inputs(generator, n)
            with torch.no_grad():
                actual = compiled(*inputs)
                expected = fn(*inputs)
            assert_matches(actual, expected, exact)
        records = flagtree_py.report()
        assert len(records) == 1, f"{len(records)} compilations: {[r.get('dynamic_symbols') for r in records]}"
        record = records[-1]
        assert_ran_in_kernels(record, ops, tmp_path)
        if dynamic:
            assert record["dynamic_symbols"], "no size was symbolic"
        if looped:
            assert any(not k["config"]["persistent"] for k in record["kernels"]), "no looped reduction kernel"
        return record

    return check


@pytest.fixture
def check_aten_graph(tmp_path: Path):
    """Like `check_lowered`, for `fn` traced to aten as written (no decompositions, no Dynamo):
    for ops that torch.compile decomposes before flagtree sees them."""

    def check(fn: Callable, make_inputs: MakeInputs, ops: Sequence[str], seed: str = "") -> dict:
        generator = torch.Generator().manual_seed(zlib.crc32(seed.encode()))
        inputs = make_inputs(generator, 5)
        gm = make_fx(fn, tracing_mode="fake")(*inputs)
        call = compile_graph(gm, list(inputs), CompileOptions(dump_dir=str(tmp_path), fallback=False), "aten_graph")
        fresh = make_inputs(generator, 5)
        expected = fn(*fresh)
        assert isinstance(expected, tuple), "return a tuple: a graph's outputs are one"
        assert_matches(tuple(call(list(fresh))), expected)
        record = flagtree_py.report()[-1]
        assert_ran_in_kernels(record, ops, tmp_path)
        return record

    return check


@pytest.fixture
def compile_with_target(monkeypatch: pytest.MonkeyPatch):
    """`compile_with_target(target, fn, *inputs) -> (out, record)`: compile and run `fn` with flagtree for a
    TargetSpec that need not be registered (a variant of a real one, e.g. with less shared memory)."""
    from flagtree_py import targets

    def compile_with(target, fn, *inputs):
        registered = dict(targets.registered_targets())
        registered[target.name] = target
        monkeypatch.setattr(targets, "registered_targets", lambda: registered)
        torch._dynamo.reset()
        flagtree_py.clear_report()
        with torch.no_grad():
            out = torch.compile(fn, backend="flagtree", options={"target": target.name, "cache": False})(*inputs)
        (record,) = flagtree_py.report()
        return out, record

    return compile_with
