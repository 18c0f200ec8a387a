"""flagtree's own generated kernels (pointwise, reduction, attention) through the JIT-binary path: built for
sm_90 as Triton's JIT builds them on a GPU, stored by content with their specialization, loaded back with
the JIT's launcher arguments, and accepted only for launches with the properties they were built for."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import flagtree_py
from flagtree_py.cache.binaries import BinaryStore
from flagtree_py.runtime.aot import (
    BinaryKernel,
    ContentBinaries,
    compiled_specialization,
    jit_specialization,
)
from flagtree_py.runtime.launch import GuardedKernel
from flagtree_py.runtime.loader import load_module
from tests.runtime.test_jit_binaries import _jit_build


def _graph(q, k, v, weight):
    attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = attention.transpose(1, 2).reshape(1, 8, 32)
    return F.silu(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight)


def _arguments(signature: dict) -> tuple:
    """Arguments like the launch's: aligned tensors of its dtypes, its integer and float values."""
    dtypes = {"*fp32": torch.float32, "*fp16": torch.float16, "*bf16": torch.bfloat16, "*i64": torch.int64,
              "*i32": torch.int32, "*i1": torch.bool}
    return tuple(torch.empty(64, dtype=dtypes[value]) if kind == "pointer" else value
                 for kind, value in signature["arguments"])


def test_generated_kernels_round_trip_as_jit_builds(tmp_path):
    torch._dynamo.reset()
    flagtree_py.clear_report()
    inputs = [torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(32)]
    compiled_fn = torch.compile(_graph, backend="flagtree", options={"target": "nvidia", "cache": False})
    torch.testing.assert_close(compiled_fn(*inputs), _graph(*inputs), rtol=1e-5, atol=1e-5)
    (record,) = flagtree_py.report()
    guarded = [k for k in vars(sys.modules[Path(record["module_path"]).stem]).values() if isinstance(k, GuardedKernel)]
    assert len(guarded) == record["triton_kernels"] >= 2
    # the module again, with its @triton.jit kernels as the GPU sees them (bind_kernels replaced the first's)
    fresh, _ = load_module(Path(record["module_path"]).read_text(), tmp_path / "modules", "again")
    found = ContentBinaries(tmp_path / "cache", "sm90")
    constants = 0
    for kernel in guarded:
        jit = getattr(fresh, kernel.name)
        args, meta = _arguments(kernel.signature), kernel.signature["meta"]
        build = _jit_build(jit, args, meta)
        specialization = jit_specialization(jit.params, args)
        assert compiled_specialization(build, len(args)) == specialization, kernel.name
        constants += specialization.count("constexpr:1")
        key = found.remember(kernel.name, jit, args, meta, build)
        assert key is not None and BinaryStore(tmp_path / "cache").verify(key) is None
        binary = ContentBinaries(tmp_path / "cache", "sm90").find(kernel.name, jit, args, meta)
        assert isinstance(binary, BinaryKernel) and binary.specialization == specialization
        assert binary.compiled.src.signature == build.src.signature
        assert binary.compiled.src.constants == build.src.constants
        assert bytes(binary.compiled.asm["cubin"]) == bytes(build.asm["cubin"])
        pointers = [i for i, (kind, _) in enumerate(kernel.signature["arguments"]) if kind == "pointer"]
        misaligned = tuple(a[1:] if i == pointers[0] and a.element_size() < 16 else a for i, a in enumerate(args))
        assert binary.accepts(args, meta) and not binary.accepts(misaligned, meta), kernel.name
    assert constants > 0  # the attention kernel's unit strides: compiled in as constants by the JIT
