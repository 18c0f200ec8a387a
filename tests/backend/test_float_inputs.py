"""dynamic=True: Python floats (RMSNorm eps, SDPA scale) are specialized before AOTAutograd, so Dynamo
traces the frame once (no TensorifyScalarRestartAnalysis), and a changed float still recompiles."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._dynamo.utils import compile_times

import flagtree_py
from flagtree_py.backend import flagtree_backend

_OPTIONS = {"target": "interpreter", "cache": False}


class _NormAttention(torch.nn.Module):
    """The float attributes of a Qwen3 layer: an eps added to a variance, a scale given to SDPA."""

    def __init__(self) -> None:
        super().__init__()
        self.eps = 1e-6
        self.scale = 0.125
        self.weight = torch.nn.Parameter(torch.randn(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        q = h.view(1, x.shape[0], 2, 8).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, scale=self.scale, is_causal=True).transpose(1, 2).reshape(x.shape)


def _attempts() -> int:
    names = compile_times(repr="csv", aggregate=True)[0]
    return sum(1 for name in names if name.startswith("compile_attempt_"))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def test_one_trace_and_a_changed_float_recompiles():
    model = _NormAttention().eval()
    calls = []

    def counting_backend(gm, example_inputs):
        calls.append(len(gm.graph.nodes))
        return flagtree_backend(gm, example_inputs, options=_OPTIONS)

    torch._dynamo.utils.compile_times(repr="csv", aggregate=True)  # the timers are per process: read deltas
    before = _attempts()
    compiled = torch.compile(model, backend=counting_backend, dynamic=True)
    with torch.no_grad():
        x = torch.randn(6, 16)
        assert _rel_err(compiled(x), model(x)) <= 1e-5
        # the restart Dynamo made without the specialization called the backend twice (two AOT captures)
        assert len(calls) == 1
        assert _attempts() - before <= 1  # compile_attempt_0 only (no compile_attempt_1)
        (record,) = flagtree_py.report()
        assert record["triton_kernels"] >= 1 and record["kernel_failures"] == []
        # another length: the same compile (the floats' guards hold, the size stays symbolic)
        x = torch.randn(9, 16)
        assert _rel_err(compiled(x), model(x)) <= 1e-5
        assert len(calls) == 1
        # a changed float must not be served by the graph that baked the old one in: its guard fails
        model.eps, model.scale = 0.5, 0.3
        ref = model(x)
        assert _rel_err(compiled(x), ref) <= 1e-5
        assert len(calls) == 2


def test_tiny_qwen3_dynamic_matches_eager_in_one_attempt():
    from flagtree_py.models import build_tiny_model

    model = build_tiny_model("qwen3")
    calls = []

    def counting_backend(gm, example_inputs):
        calls.append(1)
        return flagtree_backend(gm, example_inputs, options=_OPTIONS)

    compiled = torch.compile(model, backend=counting_backend, dynamic=True)
    with torch.no_grad():
        for length in (5, 11):
            ids = torch.randint(0, 256, (1, length))
            # fp32 both sides; kernels reassociate sums (the tolerance of tests/test_backend.py's tiny models)
            assert _rel_err(compiled(ids), model(ids)) <= 1e-4
    assert len(calls) == 1
    (record,) = flagtree_py.report()
    assert record["kernel_failures"] == [] and record["passes"].get("fuse_rms_norm", 0) + record["passes"].get("fuse_add_rms_norm", 0) > 0


def test_a_float_argument_keeps_dynamos_handling():
    """A float passed to the compiled function (a temperature) is not specialized: a new value is no
    recompile (Dynamo tensorifies it), and the result follows it."""
    calls = []

    def counting_backend(gm, example_inputs):
        calls.append(1)
        return flagtree_backend(gm, example_inputs, options=_OPTIONS)

    def scaled_softmax(x: torch.Tensor, temperature: float) -> torch.Tensor:
        return torch.softmax(x / temperature, dim=-1)

    compiled = torch.compile(scaled_softmax, backend=counting_backend, dynamic=True)
    x = torch.randn(4, 8)
    for temperature in (0.5, 0.7, 1.3):
        assert _rel_err(compiled(x, temperature), scaled_softmax(x, temperature)) <= 1e-5
    assert len(calls) == 1
