"""Binaries Triton's JIT built, kept by content with the specialization it chose (runtime/aot.py).

There is no GPU here, so the JIT's build is reproduced on the CPU exactly as `JITFunction.run` makes it
(Triton's own binder, `_pack_args` and `ASTSource`, then `triton.compile` for sm_90), and a launched JIT
is a stand-in that returns that CompiledKernel, as `JITFunction.run` does after a launch on a GPU.
Checked: the specialization rule against Triton's binder, the specialization read back from a real
build, `accepts` on aligned and misaligned arguments, the store/load round trip, the after-launch hook,
a warm launch with no JIT, a store that cannot be written, and `flagtree cache verify` on a tampered binary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import triton
import triton.language as tl

from flagtree_py.cache.binaries import BinaryStore, binary_key, kernel_source
from flagtree_py.runtime import launch
from flagtree_py.runtime.aot import (
    BinaryKernel,
    ContentBinaries,
    compiled_specialization,
    jit_specialization,
    launch_signature,
)
from flagtree_py.runtime.launch import GuardedKernel, counters

META = {"XBLOCK": 32, "num_warps": 2}


@triton.jit(do_not_specialize=["xnumel"])
def scale_kernel(in_ptr0, out_ptr0, stride, xnumel, XBLOCK: tl.constexpr):
    # `stride` is specialized (Triton may compile a 1 in as a constant), `xnumel` is not: as generated
    # kernels mark their sizes, and as flagtree's attention kernels leave their strides
    offsets = tl.program_id(0) * XBLOCK + tl.arange(0, XBLOCK)
    mask = offsets < xnumel
    x = tl.load(in_ptr0 + offsets * stride, mask)
    tl.store(out_ptr0 + offsets, x * 2, mask)


@triton.jit(do_not_specialize_on_alignment=["b_ptr"])
def mixed_kernel(a_ptr, b_ptr, n, m, scale, XBLOCK: tl.constexpr):
    offsets = tl.program_id(0) * XBLOCK + tl.arange(0, XBLOCK)
    mask = offsets < n * m
    tl.store(a_ptr + offsets, tl.load(b_ptr + offsets, mask) * scale, mask)


def _half(aligned: bool = True) -> torch.Tensor:
    """fp16 data whose address is 16-byte aligned, or 2 bytes past (a view one element in)."""
    base = torch.empty(80, dtype=torch.float16)
    assert base.data_ptr() % 16 == 0
    return base[8:72] if aligned else base[1:65]


def _tritons_binder(jit):
    """Triton's own specialization of a launch (its JIT binder), for an sm_90 backend: no GPU needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    return backend, create_function_from_signature(jit.signature, jit.params, backend)


def _as_ours(specialization: list, arity: int) -> tuple:
    return tuple("constexpr:1" if kind == "constexpr" else f"{kind}:D" if attr == "D" else kind
                 for kind, attr in specialization[:arity])


def _jit_build(jit, args: tuple, meta: dict):
    """The CompiledKernel `JITFunction.run` builds for this launch on an H100 (Triton 3.9's code path)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    backend, binder = _tritons_binder(jit)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = jit._pack_args(backend, dict(meta), bound, specialization, options)
    return triton.compile(ASTSource(jit, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=options.__dict__)


@pytest.fixture(scope="module")
def builds():
    """Two real sm_90 builds of one kernel: aligned pointers with stride 1, and a misaligned input."""
    aligned = (_half(), _half(), 1, 37)
    misaligned = (_half(False), _half(), 3, 37)
    return {"aligned": (aligned, _jit_build(scale_kernel, aligned, META)),
            "misaligned": (misaligned, _jit_build(scale_kernel, misaligned, META))}


def test_specialization_rule_is_tritons():
    cases = [
        (scale_kernel, (_half(), _half(), 1, 37)),
        (scale_kernel, (_half(False), _half(), 16, 1)),  # xnumel 1: not specialized (do_not_specialize)
        (scale_kernel, (_half(), _half(False), 17, 2**33)),
        (scale_kernel, (_half(), _half(), 0, 64)),  # 0 is a multiple of 16
        (scale_kernel, (_half(), _half(), 2**35, 5)),  # an i64 stride
        (mixed_kernel, (torch.empty(4), torch.empty(4), 1, 32, 0.5)),  # b_ptr: no alignment specialization
        (mixed_kernel, (torch.empty(4, dtype=torch.bool), torch.empty(8)[1:], 48, 7, 2.0)),
    ]
    seen = set()
    for jit, args in cases:
        _, binder = _tritons_binder(jit)
        _, tritons, _ = binder(*args, XBLOCK=32)
        ours = jit_specialization(jit.params, args)
        assert ours == _as_ours(tritons, len(args)), (jit.fn.__name__, args[2:])
        seen |= {part for spec in ours for part in spec.replace("*", "").split(":")}
    assert {"D", "1", "fp16", "i32", "i64", "fp32"} <= seen  # every kind of specialization was exercised
    assert jit_specialization(scale_kernel.params, (_half(), _half(), 1, 37)) == ("*fp16:D", "*fp16:D", "constexpr:1", "i32")
    assert jit_specialization(scale_kernel.params, (_half(False), _half(), 2, 37))[:3] == ("*fp16", "*fp16:D", "i32")


def test_specialization_read_back_from_a_real_sm90_build(builds):
    for args, compiled in builds.values():
        assert compiled.metadata.target.arch == 90 and compiled.asm["cubin"]
        assert compiled_specialization(compiled, len(args)) == jit_specialization(scale_kernel.params, args)
    (aligned, first), (_, second) = builds["aligned"], builds["misaligned"]
    assert compiled_specialization(first, 4) == ("*fp16:D", "*fp16:D", "constexpr:1", "i32")
    assert compiled_specialization(second, 4) == ("*fp16", "*fp16:D", "i32", "i32")
    # each specialization is its own key, and none is the key of an ahead-of-time build (no specialization)
    source = kernel_source(scale_kernel)
    keys = {binary_key(source, launch_signature(args, META), "sm90", triton.__version__,
                       compiled_specialization(compiled, 4)) for args, compiled in builds.values()}
    keys.add(binary_key(source, launch_signature(aligned, META), "sm90", triton.__version__))
    assert len(keys) == 3


def _stored(tmp_path, name: str, builds) -> tuple[ContentBinaries, dict[str, str]]:
    """Both builds stored through the after-launch hook, as a first process on the GPU would."""
    found = ContentBinaries(tmp_path, "sm90")
    keys = {kind: found.remember(name, scale_kernel, args, META, compiled) for kind, (args, compiled) in builds.items()}
    return found, keys


def test_store_round_trip_and_accepts(tmp_path, builds):
    _, keys = _stored(tmp_path, "k3_scale", builds)
    store = BinaryStore(tmp_path)
    assert all(store.verify(key) is None for key in keys.values())
    signature, files = store.get(keys["aligned"])
    assert signature["specialization"] == ["*fp16:D", "*fp16:D", "constexpr:1", "i32"]
    assert store.meta(keys["aligned"])["kernel"] == "k3_scale" and "scale_kernel" in store.meta(keys["aligned"])["source"]
    aligned_args, compiled = builds["aligned"]
    binary = BinaryKernel(scale_kernel.fn, signature, files)
    assert bytes(binary.compiled.asm["cubin"]) == bytes(compiled.asm["cubin"])
    # the source the launcher is made from is the JIT's: the same argument list in the same order
    assert binary.compiled.src.signature == compiled.src.signature
    assert binary.compiled.src.constants == compiled.src.constants
    assert binary.accepts(aligned_args, META)
    assert binary.accepts((_half(), _half(), 1, 5000), META)  # another size: the same binary
    assert not binary.accepts((_half(False), _half(), 1, 37), META)  # built for an aligned input
    assert not binary.accepts((_half(), _half(False), 1, 37), META)  # ... and an aligned output
    assert not binary.accepts((_half(), _half(), 2, 37), META)  # the stride was compiled in as 1
    assert not binary.accepts((_half(), _half(), 1, 2**31), META)  # xnumel was built as i32
    assert not binary.accepts(aligned_args, {**META, "XBLOCK": 64})
    # the build for a misaligned input assumes less: it takes aligned inputs too, and any stride
    general = BinaryKernel(scale_kernel.fn, *store.get(keys["misaligned"]))
    assert general.accepts((_half(False), _half(), 3, 37), META) and general.accepts((_half(), _half(), 48, 37), META)
    assert not general.accepts((_half(), _half(False), 3, 37), META)  # its output was aligned
    # a stride of 1 is right for it too (an i32 holds 1), though a lookup for 1 asks for the JIT's build for 1
    assert general.accepts((_half(), _half(), 1, 37), META)


class LaunchedJit:
    """A JITFunction after a launch on a GPU: `kernel[grid](*args, **meta)` returns the CompiledKernel it
    ran (Triton 3.6 and 3.9), here one of the sm_90 builds; with `builds=None` a launch must not happen."""

    def __init__(self, builds: dict | None) -> None:
        self.fn, self.params = scale_kernel.fn, scale_kernel.params
        self.builds, self.launched = builds, []

    def __getitem__(self, grid):
        def run(*args, **meta):
            assert self.builds is not None, "Triton's JIT was asked to compile"
            self.launched.append(args)
            aligned = jit_specialization(self.params, args)[0].endswith(":D")
            return self.builds["aligned" if aligned else "misaligned"][1]
        return run


def test_first_launch_stores_and_a_warm_start_launches_with_no_jit(tmp_path, builds, monkeypatch):
    before = dict(counters)
    # first process: Triton's JIT launches, and its builds go into the store once each
    first = GuardedKernel("k3_scale", LaunchedJit(builds), lambda *a: None, interpreted=False,
                          content_binaries=ContentBinaries(tmp_path, "sm90"))
    aligned_args, misaligned_args = builds["aligned"][0], builds["misaligned"][0]
    for args in (aligned_args, aligned_args, misaligned_args):
        launch.run(first, (2,), *args, **META)
    assert len(first.kernel.launched) == 3 and first.failed is None
    assert counters["jit_binaries_stored"] == before.get("jit_binaries_stored", 0) + 2
    stored = [meta for meta, _, problem in BinaryStore(tmp_path).entries() if problem is None]
    assert sorted(meta["signature"]["specialization"][0] for meta in stored) == ["*fp16", "*fp16:D"]
    assert [lookup.get("stored") is not None for lookup in first.content_binaries.lookups.values()] == [True, True]

    # second process: nothing compiled, nothing in Triton's caches; the same launches find the binaries
    launched = []
    monkeypatch.setattr(BinaryKernel, "launch", lambda self, grid, args, meta: launched.append(self.specialization))
    second = GuardedKernel("k3_scale", LaunchedJit(None), lambda *a: None, interpreted=False,
                           content_binaries=ContentBinaries(tmp_path, "sm90"))
    compiles = counters["triton_compiles"]
    launch.run(second, (2,), _half(), _half(), 1, 99, **META)  # other tensors, the same properties
    launch.run(second, (2,), _half(False), _half(), 3, 37, **META)
    assert launched == [("*fp16:D", "*fp16:D", "constexpr:1", "i32"), ("*fp16", "*fp16:D", "i32", "i32")]
    assert counters["triton_compiles"] == compiles and second.compiles == 0 and second.failed is None
    assert counters["content_binary_launches"] == before.get("content_binary_launches", 0) + 2
    assert all(lookup["found"] and lookup["jit_build"] for lookup in second.content_binaries.lookups.values())

    # a launch whose specialization no process built (a misaligned output): Triton's JIT, never a binary
    third = GuardedKernel("k3_scale", LaunchedJit(builds), lambda *a: None, interpreted=False,
                          content_binaries=ContentBinaries(tmp_path, "sm90"))
    unmatched = counters["jit_binaries_unmatched"]
    launch.run(third, (2,), _half(), _half(False), 1, 37, **META)
    assert len(launched) == 2 and len(third.kernel.launched) == 1
    # the stand-in returned the build for an aligned output: a build whose specialization is not the launch's
    # is never stored under the launch's key (counted, so that a GPU run shows a Triton that specializes
    # otherwise than runtime/aot.py)
    assert counters["jit_binaries_unmatched"] == unmatched + 1 and len(list(BinaryStore(tmp_path).entries())) == 2


def test_an_unwritable_store_degrades_to_no_store(tmp_path, builds):
    (tmp_path / "binaries").write_text("a file where the store's directory would be")  # any user, root too
    found = ContentBinaries(tmp_path, "sm90")
    kernel = GuardedKernel("k3_scale", LaunchedJit(builds), lambda *a: pytest.fail("fallback"), interpreted=False,
                           content_binaries=found)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        launch.run(kernel, (2,), *builds["aligned"][0], **META)
        launch.run(kernel, (2,), *builds["misaligned"][0], **META)
    assert kernel.failed is None and len(kernel.kernel.launched) == 2  # both launches ran
    assert not found.writable and kernel.content_binaries is found  # lookups go on; stores stopped
    assert [str(w.message) for w in caught if "cannot store kernel binaries" in str(w.message)] != []
    assert len([w for w in caught if "cannot store" in str(w.message)]) == 1  # one warning, not one per launch
    assert BinaryStore(tmp_path).put("0" * 64, "k", "sm90", "3.9.0", {"arguments": []}, {"cubin": b"x"}) is None


def test_verify_finds_a_tampered_jit_binary(tmp_path, builds):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    _, keys = _stored(cache, "k3_scale", builds)
    cubin = cache / "binaries" / keys["aligned"] / "kernel.cubin"
    data = cubin.read_bytes()
    cubin.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])  # one byte changed
    assert ContentBinaries(cache, "sm90").find("k3_scale", scale_kernel, builds["aligned"][0], META) is None
    done = subprocess.run([sys.executable, "-m", "flagtree_py.cli.main", "cache", "verify", "--json"],
                          env={**os.environ, "FLAGTREE_CACHE_DIR": str(cache)}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 1, done.stderr
    problems = json.loads(done.stdout)["problems"]
    assert problems == [{"key": f"binaries/{keys['aligned']}", "problem": "kernel.cubin does not match its hash"}]


def test_a_binary_built_ahead_of_time_is_still_found_for_any_alignment(tmp_path):
    """`flagtree compile`'s binaries (no specialization, in the same store) serve launches of every
    specialization when no JIT build of the launch's own is there."""
    from flagtree_py.runtime.aot import binary_files, compile_for_nvidia

    args = (_half(), _half(), 1, 37)
    signature = launch_signature(args, META)
    built = compile_for_nvidia(scale_kernel.fn, signature, 90)
    key = binary_key(kernel_source(scale_kernel), signature, "sm90", triton.__version__)
    BinaryStore(tmp_path).put(key, "k3_scale", "sm90", triton.__version__, signature, binary_files(built))
    found = ContentBinaries(tmp_path, "sm90")
    for launch_args in (args, (_half(False), _half(False), 5, 37)):
        binary = found.find("k3_scale", scale_kernel, launch_args, META)
        assert binary is not None and binary.specialization is None and binary.accepts(launch_args, META)
    assert [lookup["key"] for lookup in found.lookups.values()] == [key, key]
    assert not any(lookup["jit_build"] for lookup in found.lookups.values())
    assert found.find("k3_scale", scale_kernel, (_half(), _half(), 1, 2**31), META) is None  # built as i32
