"""flagtree's GEMM template: each epilogue, operand layout and M bucket against eager PyTorch, on
the CPU interpreter, with the kernels and groups counted; autotuning winners kept in the cache.

Tolerance (fp32): max abs error <= 1e-5 * max(1, max|expected|), as in conftest.assert_matches:
the template sums K products in fp32 in another order than eager (tiles of BLOCK_K, split-K
slices), a few ulps of the largest partial sum for K <= 70.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import flagtree_py
from flagtree_py.runtime.launch import GuardedKernel, counters

K, N = 50, 40  # neither a multiple of any interpreter tile
ROWS = (1, 3, 17, 40, 130)  # decode (split-K), the m128 bucket, the large bucket


def _compile(fn, options=None):
    return torch.compile(fn, backend="flagtree", dynamic=True, options={"target": "interpreter", **(options or {})})


def _check(fn, make, rows=ROWS, options=None, dtype=torch.float32) -> tuple[dict, object]:
    compiled = _compile(fn, options)
    for m in rows:
        inputs = make(m)
        with torch.no_grad():
            actual, expected = compiled(*inputs), fn(*inputs)
        assert actual.shape == expected.shape and actual.dtype == expected.dtype
        scale = max(1.0, expected.abs().max().item())
        error = (actual.double() - expected.double()).abs().max().item()
        bound = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-6}[dtype] * scale  # bf16: the mm rounded in another order, then the epilogue: <= 2 ulps
        assert error <= bound, f"M={m}: max abs error {error:.3g} > {bound:.3g}"
    records = [r for r in flagtree_py.report() if r.get("dynamic_symbols")]
    assert records, "no compile kept M symbolic"
    record = records[-1]
    assert record["kernel_failures"] == [] and record["codegen_fallbacks"] == []
    assert not any("mm" in op for op in record["extern_ops"]), record["extern_ops"]
    module = sys.modules[Path(record["module_path"]).stem]
    return record, module


def _gemm_groups(record) -> dict:
    """group id -> names of its kernels, for the GEMM template's kernels."""
    groups: dict = {}
    for kernel in record["kernels"]:
        if kernel["kind"] == "gemm":
            groups.setdefault(kernel["group_id"], []).append(kernel["name"])
    return groups


def _weights(*shape):
    return torch.randn(*shape) / shape[-1] ** 0.5


class Net(torch.nn.Module):
    """`fn(net, *inputs)` over parameters: Dynamo keeps parameter shapes static (K and N of a
    projection), while dynamic=True makes the inputs' sizes (M) symbolic."""

    def __init__(self, fn, **weights) -> None:
        super().__init__()
        self.fn = fn
        for name, value in weights.items():
            self.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))

    def forward(self, *inputs):
        return self.fn(self, *inputs)


def test_plain_mm_through_a_transposed_weight_every_bucket():
    net = Net(lambda n, x: x @ n.w.t(), w=_weights(N, K))
    record, module = _check(net, lambda m: (torch.randn(m, K),))
    (names,) = _gemm_groups(record).values()
    base = names[0]
    assert names == [base, f"{base}_partial", f"{base}_reduce"]  # M symbolic: tiled and split-K
    # every M bucket ran: the decode pair for M <= 16, the tiled kernel above
    assert all(getattr(module, name).signature is not None for name in names)
    source = Path(record["module_path"]).read_text()
    assert "if s" in source and "<= 16:" in source and "<= 128:" in source  # chosen per call
    assert "permute" not in source.split("def call(args):")[1]  # the transpose is a stride swap


def test_linear_bias_gelu_epilogue_is_one_kernel():
    record, _ = _check(torch.nn.Sequential(torch.nn.Linear(K, N), torch.nn.GELU()), lambda m: (torch.randn(m, K),))
    assert len(_gemm_groups(record)) == 1
    assert record["triton_kernels"] == 3  # one group: tiled + split-K pair, the bias and gelu inside


def test_residual_add_and_activation_epilogue_on_3d_activations():
    def fn(n, x, residual):
        return torch.relu(x @ n.w.t() + residual) * 2.0

    record, _ = _check(Net(fn, w=_weights(N, K)), lambda m: (torch.randn(1, m, K), torch.randn(1, m, N)))
    assert len(_gemm_groups(record)) == 1 and record["triton_kernels"] == 3


def test_merged_gate_up_swiglu_uses_two_accumulators():
    """The form merge_gate_up produces: one mm over [W_gate; W_up], two slices, silu(g) * u."""
    inter = 24
    def fn(n, x):
        gate_up = x @ n.w_gate_up.t()
        return F.silu(gate_up[..., :inter]) * gate_up[..., inter:]

    record, _ = _check(Net(fn, w_gate_up=_weights(2 * inter, K)), lambda m: (torch.randn(1, m, K),))
    assert len(_gemm_groups(record)) == 1 and record["triton_kernels"] == 3
    source = Path(record["module_path"]).read_text()
    assert "acc1 = tl.dot(a, b1, acc1" in source  # the up half: its own accumulator, same A tile
    assert "B columns 0..0+N, 24..24+N" in source
    (kernel,) = [k for k in record["kernels"] if k["kind"] == "gemm" and k["name"].endswith("_reduce")]
    assert len(kernel["stored"]) == 1  # silu(gate) * up only: neither half is written


def test_non_contiguous_operands_are_read_through_strides():
    def fn(n, x):
        return x.t() @ n.w[:, ::2]  # A = x.t(): rows strided by 1, columns by M

    # B = w[:, ::2]: a column stride of 2, no copy
    record, _ = _check(Net(fn, w=_weights(K, 2 * N)), lambda m: (torch.randn(K, m),))
    assert len(_gemm_groups(record)) == 1


def test_gemm_output_also_used_elsewhere_is_stored():
    def fn(n, x):
        y = x @ n.w.t()
        return torch.sigmoid(y) * y.sum(-1, keepdim=True)  # the row sum reads y too: the GEMM stores it

    record, _ = _check(Net(fn, w=_weights(N, K)), lambda m: (torch.randn(m, K),))
    (names,) = _gemm_groups(record).values()
    (kernel,) = [k for k in record["kernels"] if k["name"] == names[0]]
    assert kernel["stored"] == [kernel["nodes"][0]]  # the mm itself


def test_fp16_matches_eager_within_one_rounding():
    net = Net(lambda n, x: F.silu(x @ n.w.t()), w=_weights(N, K).half())
    record, _ = _check(net, lambda m: (torch.randn(m, K).half(),), rows=(3, 40),
                       dtype=torch.float16)
    assert len(_gemm_groups(record)) == 1


def test_bf16_matches_eager_within_one_rounding():
    """Triton's interpreter has no bf16 dot (it multiplies the raw bits): the interpreter target
    widens bf16 operands to fp32 in the kernel, which every bucket must show."""
    net = Net(lambda n, x: F.silu(x @ n.w.t()), w=_weights(N, K).bfloat16())
    record, module = _check(net, lambda m: (torch.randn(m, K).bfloat16(),), dtype=torch.bfloat16)
    assert len(_gemm_groups(record)) == 1
    assert "tl.dot(a.to(tl.float32), b0.to(tl.float32)" in Path(module.__file__).read_text()


def test_split_k_is_deterministic():
    compiled = _compile(Net(lambda n, x: x @ n.w.t(), w=_weights(N, 70)))
    x = torch.randn(5, 70)
    with torch.no_grad():
        first, second = compiled(x), compiled(x)
    assert torch.equal(first, second)


def test_templates_off_keeps_gemms_extern():
    net = Net(lambda n, x: torch.tanh(x @ n.w.t()), w=_weights(N, K))
    compiled = _compile(net, {"gemm_templates": False})
    x = torch.randn(7, K)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-5, atol=1e-5)
    (record,) = flagtree_py.report()
    assert "aten.mm.default" in record["extern_ops"]
    assert not any(k["kind"] == "gemm" for k in record["kernels"])


def test_autotune_winners_are_stored_in_the_cache_entry_and_reused(tmp_path, monkeypatch):
    from flagtree_py.cache import KernelCache
    from flagtree_py.cli.cache import describe_entry

    fn = Net(lambda n, x: torch.tanh(x @ n.w.t()), w=_weights(N, K))
    options = {"autotune": True, "autotune_budget_s": 30.0, "cache_dir": str(tmp_path)}
    before = counters["autotune_tuned"]
    with torch.no_grad():
        for m in (3, 40):
            x = torch.randn(m, K)
            torch.testing.assert_close(_compile(fn, options)(x), fn(x), rtol=1e-5, atol=1e-5)
    assert counters["autotune_tuned"] - before == 2  # the decode and the m128 bucket, once each
    record = flagtree_py.report()[-1]
    cache = KernelCache(tmp_path)
    entry, problem = cache.load(record["cache_key"])
    assert problem is None and entry is not None
    winners = entry.autotune_winners()
    assert sorted(key.split("/")[1] for key in winners) == ["m128", "m16"]
    assert "autotuned GEMM tiles" in describe_entry(entry, 0, None, 0.0)
    assert cache.verify(record["cache_key"]) is None  # the added file is listed with its hash

    torch._dynamo.reset()
    flagtree_py.clear_report()
    tuned = counters["autotune_tuned"]
    with torch.no_grad():
        for m in (3, 40):
            x = torch.randn(m, K)
            torch.testing.assert_close(_compile(fn, options)(x), fn(x), rtol=1e-5, atol=1e-5)
    assert flagtree_py.report()[-1]["cache"] == "hit"
    assert counters["autotune_tuned"] == tuned  # the stored winners were used: nothing re-tuned


@pytest.mark.slow
def test_every_gemm_config_compiles_for_sm90():
    """Every tile of the NVIDIA tables, for each of the three kernels, builds for sm_90 (fp16 and
    bf16 operands) within the chip's shared memory; no GPU needed (runtime/aot.py)."""
    from flagtree_py.runtime.aot import compile_for_nvidia
    from flagtree_py.targets import get_target

    target = get_target("nvidia")
    inter, depth = 24, 512  # K of 4 BLOCK_K steps: decode splits K (a split of 1 is the tiled kernel)
    def fn(n, x):
        gate_up = x @ n.w.t()
        return F.silu(gate_up[..., :inter]) * gate_up[..., inter:]

    compiled = torch.compile(Net(fn, w=_weights(2 * inter, depth).half()), backend="flagtree", dynamic=True, options={"target": "nvidia"})
    with torch.no_grad():
        for m in (3, 40, 200):
            compiled(torch.randn(1, m, depth).half())
    record = [r for r in flagtree_py.report() if r.get("dynamic_symbols")][-1]
    module = sys.modules[Path(record["module_path"]).stem]
    kernels = {name: kernel for name, kernel in vars(module).items() if isinstance(kernel, GuardedKernel)}
    assert len(kernels) == 3
    built = 0
    for name, kernel in kernels.items():
        assert kernel.signature is not None, f"{name} never launched"
        candidates = getattr(module, f"{name}_candidates", None)
        metas = [m for bucket in (candidates or {}).values() for m in bucket] or [kernel.signature["meta"]]
        for meta in metas:
            for pointer in ("*fp16", "*bf16"):
                arguments = [(kind, pointer if value == "*fp16" else value) for kind, value in kernel.signature["arguments"]]
                binary = compile_for_nvidia(kernel.kernel.fn, {"arguments": arguments, "meta": meta}, 90)
                assert binary.asm["cubin"]
                assert binary.metadata.shared <= target.shared_memory_per_block, (name, meta)
                built += 1
    tiles = sum(len(target.gemm_candidates(bucket, 2, 2)) for bucket in ("m16", "m128", "large"))
    assert built == 2 * (tiles + 1) >= 2 * 10  # + the reduce kernel's one tile
