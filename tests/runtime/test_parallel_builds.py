"""Kernels built in parallel before a graph's first call (runtime/parallel_builds.py).

There is no GPU here: the workers build for sm_90 (Triton compiles for an explicit target), and what a
GPU launch would then look up is checked with real CPU tensors, whose addresses are as aligned as a
GPU's allocations. Checked: the prediction from fake tensors is the specialization Triton's JIT chooses
for the real launch, aligned or not; every binary a launch looks up is in the store, bit for bit the
JIT's own build; a second first call finds them all and starts no worker; a build that fails and a
wrapper that cannot run on fake tensors cost nothing but the JIT compile; the option and its wiring.
"""

from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import flagtree_py
from flagtree_py import pipeline
from flagtree_py.options import CompileOptions
from flagtree_py.runtime import parallel_builds
from flagtree_py.runtime.aot import BinaryKernel, ContentBinaries, jit_specialization
from flagtree_py.runtime.launch import GuardedKernel, counters, dry_run, run
from flagtree_py.runtime.loader import bind_kernels, load_module
from flagtree_py.runtime.parallel_builds import FirstCallBuilds, build_before_first_call, predicted_launches
from tests.runtime.test_jit_binaries import _jit_build
from tests.runtime.test_jit_binaries_generated import _graph

META = {"XBLOCK": 32, "num_warps": 2}


@triton.jit(do_not_specialize=["xnumel"])
def double_kernel(in_ptr0, out_ptr0, stride, xnumel, XBLOCK: tl.constexpr):
    offsets = tl.program_id(0) * XBLOCK + tl.arange(0, XBLOCK)
    mask = offsets < xnumel
    tl.store(out_ptr0 + offsets, tl.load(in_ptr0 + offsets * stride, mask) * 2, mask)


@triton.jit
def broken_kernel(in_ptr0, XBLOCK: tl.constexpr):
    tl.store(in_ptr0 + tl.arange(0, XBLOCK), not_defined_anywhere)  # noqa: F821 -- a build that must fail


def _module(kernels: dict, call) -> types.ModuleType:
    module = types.ModuleType("handwritten_wrapper")
    for name, jit in kernels.items():
        setattr(module, name, GuardedKernel(name, jit, lambda *args: None, interpreted=False))
    module.call = lambda args: call(module, args)
    return module


def _three_launches(module, args):
    """Aligned tensors with a unit stride, a view one element in (not aligned), and another tile."""
    (x,) = args
    args.clear()
    out = torch.empty_like(x)
    run(module.k0_double, (2,), x, out, 1, 64, **META)
    run(module.k0_double, (2,), x[1:], out, 3, 21, **META)
    run(module.k0_double, (1,), x, out, 1, 64, XBLOCK=64, num_warps=2)
    return [out]


def _real_launches(module, args) -> list[tuple]:
    """The launches of `module.call(args)` on real tensors, as a GPU run would make them (nothing runs)."""
    launches = []
    with dry_run(lambda kernel, arguments, meta: launches.append((kernel, arguments, dict(meta)))):
        module.call(list(args))
    return launches


def _assert_found_as_jit_builds(launches: list[tuple], cache_dir: Path) -> int:
    """Every real launch finds its binary by content, and it is the one Triton's JIT builds for it."""
    found = ContentBinaries(cache_dir, "sm90")
    for kernel, arguments, meta in launches:
        binary = found.find(kernel.name, kernel.kernel, arguments, meta)
        assert isinstance(binary, BinaryKernel), kernel.name
        assert binary.specialization == jit_specialization(kernel.kernel.params, arguments)
        assert bytes(binary.compiled.asm["cubin"]) == bytes(_jit_build(kernel.kernel, arguments, meta).asm["cubin"])
    return len(found.lookups)


def test_predicted_launches_are_the_real_ones_and_workers_build_the_jits_binaries(tmp_path):
    module = _module({"k0_double": double_kernel}, _three_launches)
    x = torch.randn(64)
    real = _real_launches(module, [x])
    predicted = predicted_launches(module, [x])
    assert len(predicted) == len(real) == 3
    for (_, fake_args, fake_meta), (kernel, real_args, real_meta) in zip(predicted, real):
        assert fake_meta == real_meta
        assert (jit_specialization(kernel.kernel.params, fake_args, aligned=parallel_builds.predicted_alignment)
                == jit_specialization(kernel.kernel.params, real_args))
    assert jit_specialization(double_kernel.params, real[1][1])[0] == "*fp32"  # the view: not aligned

    launches = counters["kernel_launches"]
    summary, keys = build_before_first_call(module, ContentBinaries(tmp_path, "sm90"), [x], workers=2)
    assert counters["kernel_launches"] == launches  # the dry run launched nothing
    assert summary["launches"] == 3 and summary["binaries"] == 3 and summary["built"] == 3, summary
    assert summary["failed"] == {} and summary["in_store"] == 0 and summary["workers"] == 2
    assert summary["launchers"] == {"generic": 3} or triton.__version__ < "3.7"  # Triton 3.9: nothing to build
    assert len(summary["slowest"]) == 3 and summary["driver"] == ("ready" if torch.cuda.is_available() else "no GPU")
    assert _assert_found_as_jit_builds(real, tmp_path) == 3 == len(set(keys))

    # a second process's first call: everything is in the store, no worker starts
    again, same = build_before_first_call(module, ContentBinaries(tmp_path, "sm90"), [x], workers=2)
    assert again["in_store"] == 3 and again["built"] == 0 and "dry_run_s" in again and sorted(same) == sorted(keys)
    # ... and told the keys its graph's first call needed before (its cache entry keeps them): no dry run
    skipped, known = build_before_first_call(module, ContentBinaries(tmp_path, "sm90"), [x], workers=2, known=keys)
    assert "skipped" in skipped and "launches" not in skipped and known == keys
    # a known binary gone from the store: predicted and built again
    ContentBinaries(tmp_path, "sm90").store.remove(keys[0])
    rebuilt, _ = build_before_first_call(module, ContentBinaries(tmp_path, "sm90"), [x], workers=2, known=keys)
    assert rebuilt["built"] == 1 and rebuilt["in_store"] == 2


def test_generated_kernels_are_built_as_the_jit_builds_them(tmp_path):
    """flagtree's own kernels (pointwise, reduction, attention) for an NVIDIA target, from a compiled graph
    (test_jit_binaries_generated.py's)."""
    torch._dynamo.reset()
    flagtree_py.clear_report()
    inputs = [torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(32)]
    compiled = torch.compile(_graph, backend="flagtree", options={"target": "nvidia", "cache": False})
    torch.testing.assert_close(compiled(*inputs), _graph(*inputs), rtol=1e-5, atol=1e-5)
    (record,) = flagtree_py.report()
    # the module as a GPU loads it: Triton's JIT kernels, not the interpreter's
    source = Path(record["module_path"]).read_text()
    module, _ = load_module(source, tmp_path / "modules", "gpu_view")
    names = [name for name, value in vars(sys.modules[Path(record["module_path"]).stem]).items()
             if isinstance(value, GuardedKernel)]
    bind_kernels(module, names, interpret=False, constants={}, externs={})
    real = _real_launches(module, inputs)
    assert {kernel.name for kernel, _, _ in real} == set(names) and len(names) == record["triton_kernels"] >= 2

    summary, _ = build_before_first_call(module, ContentBinaries(tmp_path, "sm90"), inputs, workers=2)
    assert summary["failed"] == {} and summary["built"] == summary["binaries"] >= len(names), summary
    assert _assert_found_as_jit_builds(real, tmp_path) == summary["binaries"]


def test_builds_started_before_the_first_call_serve_it_when_its_arguments_are_laid_out_alike(tmp_path):
    """`start` (the pipeline: when the compile ends, on Dynamo's example inputs) builds in a background thread;
    the first call waits for it, and predicts again where its arguments are laid out otherwise."""
    module = _module({"k0_double": double_kernel}, _three_launches)
    x = torch.randn(64)
    record, calls = {}, []
    builds = FirstCallBuilds(lambda args: calls.append(list(args)), module, ContentBinaries(tmp_path, "sm90"), 2,
                             record)
    builds.start([x])
    builds([x])
    summary = record["parallel_builds"]
    assert summary["built"] == 3 and summary["failed"] == {} and calls == [[x]], summary
    assert summary["started_before_the_call"]["waited_s"] >= 0 and "not_used" not in summary["started_before_the_call"]
    assert _assert_found_as_jit_builds(_real_launches(module, [x]), tmp_path) == 3

    # the first call's tensor is a view one element in (not aligned): what was predicted does not serve it
    shifted = torch.randn(65)[1:]
    record = {}
    builds = FirstCallBuilds(lambda args: None, module, ContentBinaries(tmp_path, "sm90"), 2, record)
    builds.start([torch.randn(64)])
    builds([shifted])
    summary = record["parallel_builds"]
    assert "not_used" in summary["started_before_the_call"] and summary["built"] >= 1, summary
    assert summary["in_store"] + summary["built"] == summary["binaries"] == 3
    assert _assert_found_as_jit_builds(_real_launches(module, [shifted]), tmp_path) == 3


def test_builds_start_early_only_on_inputs_that_line_up_with_the_placeholders():
    graph = torch.fx.Graph()
    for name, val in (("weight", torch.empty(4, 4)), ("x", torch.empty(2, 4, dtype=torch.float16))):
        graph.placeholder(name).meta["val"] = val
    graph.output(None)
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert pipeline.inputs_line_up(gm, [torch.randn(4, 4), torch.randn(3, 4, dtype=torch.float16)])
    assert not pipeline.inputs_line_up(gm, None)
    assert not pipeline.inputs_line_up(gm, [torch.randn(4, 4)])  # one input fewer
    assert not pipeline.inputs_line_up(gm, [torch.randn(4, 4), torch.randn(2, 4)])  # another dtype
    assert not pipeline.inputs_line_up(gm, [torch.randn(4, 4), torch.randn(8, dtype=torch.float16)])  # rank
    started = []
    builds = FirstCallBuilds(lambda args: None, None, None, 2, {})
    builds.start = started.append
    pipeline._start_builds(builds, [1, 2])
    pipeline._start_builds(builds, None)
    pipeline._start_builds(lambda args: None, [3])  # no parallel builds: nothing to start
    assert started == [[1, 2]]


def test_a_failed_build_or_dry_run_leaves_the_kernel_to_the_jit(tmp_path):
    def launches_both(module, args):
        (x,) = args
        run(module.k1_broken, (1,), x, XBLOCK=32)
        run(module.k0_double, (2,), x, torch.empty_like(x), 1, 64, **META)

    module = _module({"k0_double": double_kernel, "k1_broken": broken_kernel}, launches_both)
    record, calls = {}, []
    builds = FirstCallBuilds(calls.append, module, ContentBinaries(tmp_path, "sm90"), 2, record)
    builds.start([torch.randn(64)])  # in the background: the warning comes at the first call, in its thread
    with pytest.warns(UserWarning, match="1 of 2 parallel kernel builds failed .*k1_broken"):
        builds([torch.randn(64)])
    summary = record["parallel_builds"]
    assert summary["built"] == 1 and list(summary["failed"]) == ["k1_broken"] and len(calls) == 1
    assert "not_defined_anywhere" in summary["failed"]["k1_broken"]

    def reads_data(module, args):
        if args[0].sum().item() > 0:  # data-dependent control flow: no fake tensor can answer
            run(module.k0_double, (2,), args[0], torch.empty_like(args[0]), 1, 64, **META)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other = ContentBinaries(tmp_path / "other", "sm90")
        summary, keys = build_before_first_call(_module({"k0_double": double_kernel}, reads_data), other,
                                                [torch.ones(64)], workers=2)
    assert summary["built"] == 0 and "dry_run_error" in summary and keys is None


def test_the_first_call_builds_once_never_inside_a_dry_run_and_remembers_its_binaries(monkeypatch):
    asked, remembered = [], []
    found = {"keys": ["b", "a"]}
    monkeypatch.setattr(parallel_builds, "build_before_first_call", lambda module, binaries, args, workers, known:
                        asked.append((list(args), known)) or ({"built": 0}, found["keys"]))
    calls = []
    record = {}
    builds = FirstCallBuilds(lambda args: calls.append(list(args)) or args.clear(), None, None, 3, record,
                             known=["a", "b"], remember=remembered.append)
    assert builds._boxed_call
    with dry_run():
        builds([1])
    assert asked == [] and builds.pending
    builds([2])
    builds([3])
    assert asked == [([2], ["a", "b"])] and calls == [[1], [2], [3]] and record["parallel_builds"] == {"built": 0}
    assert remembered == []  # the keys it was told: nothing to keep
    found["keys"] = ["c"]
    FirstCallBuilds(lambda args: None, None, None, 3, {}, known=["a", "b"], remember=remembered.append)([4])
    assert remembered == [["c"]]

    # anything failing on the way (a full disk for the jobs, a store that breaks) fails no call
    def broken(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr(parallel_builds, "build_before_first_call", broken)
    record, calls = {}, []
    with pytest.warns(UserWarning, match="parallel kernel builds failed .*No space left"):
        FirstCallBuilds(calls.append, None, None, 3, record)([5])
    assert calls == [[5]] and record["parallel_builds"] == {"error": "OSError: No space left on device"}
    # ... also when the builds were started before the call
    monkeypatch.setattr(parallel_builds, "plan_builds", broken)
    record, calls = {}, []
    builds = FirstCallBuilds(calls.append, None, None, 3, record)
    builds.start([6])
    with pytest.warns(UserWarning, match="parallel kernel builds failed .*No space left"):
        builds([6])
    assert calls == [[6]] and record["parallel_builds"] == {
        "error": "OSError: No space left on device", "started_before_the_call": {"waited_s": 0.0}}


def test_a_cache_entry_keeps_its_first_calls_binaries(tmp_path, monkeypatch):
    """The pipeline's wiring: the keys a first call needed go into the graph's entry, and a hit is told them."""
    from flagtree_py.cache import KernelCache

    cache = KernelCache(tmp_path)
    key = "ab" + "0" * 62
    assert cache.store(key, "def call(args):\n    pass\n", {"graph": "g", "kernels": []}) is not None
    seen = []
    monkeypatch.setattr(parallel_builds, "build_before_first_call", lambda module, binaries, args, workers, known:
                        seen.append(known) or ({"built": 1}, ["k1", "k2"]))
    binaries = types.SimpleNamespace(arch="sm90")
    module = types.SimpleNamespace(call=lambda args: None)
    pipeline._first_call_builds(module, binaries, CompileOptions(), {}, cache, key)([])
    assert seen == [None] and cache.peek(key).meta[pipeline.FIRST_CALL_BINARIES] == {"sm90": ["k1", "k2"]}


def test_a_dry_run_in_one_thread_never_silences_another_threads_launches():
    """A graph's first call predicts its launches in a dry run: a graph running meanwhile in another thread
    (a server's) must launch its kernels, never skip them."""
    import threading

    launched, noted = [], []

    class Kernel:  # stands in for Triton's JIT: records what runs
        params = double_kernel.params

        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append(args[3])

    kernel = GuardedKernel("k0_double", Kernel(), lambda *args: pytest.fail("fallback"), interpreted=False)
    inside, release = threading.Event(), threading.Event()

    def predicting():
        with dry_run(lambda *launch: noted.append(launch[1][3])):
            inside.set()
            release.wait(10)
            run(kernel, (1,), torch.empty(4), torch.empty(4), 1, 1, **META)

    thread = threading.Thread(target=predicting)
    thread.start()
    assert inside.wait(10)
    launches = counters["kernel_launches"]
    run(kernel, (1,), torch.empty(4), torch.empty(4), 1, 2, **META)  # this thread: a real launch
    release.set()
    thread.join(10)
    assert launched == [2] and noted == [1] and counters["kernel_launches"] == launches + 1


def test_the_option(monkeypatch):
    assert CompileOptions.from_user({}).parallel_builds is None
    assert CompileOptions.from_user({"parallel_builds": 0}).parallel_builds == 0
    for bad in (-1, True, 2.0, "4"):
        with pytest.raises(ValueError, match="parallel_builds"):
            CompileOptions.from_user({"parallel_builds": bad})
    monkeypatch.setenv("FLAGTREE_PARALLEL_BUILDS", "5")
    assert CompileOptions.from_user({}).parallel_builds == 5
    # what changes no generated code is not in the key
    assert CompileOptions.from_user({"parallel_builds": 0}).hash() == CompileOptions().hash()
    # the pipeline wraps a module's call only where binaries are found by content (a GPU with the cache on)
    module = types.SimpleNamespace(call=lambda args: None)
    binaries = object()
    assert isinstance(pipeline._first_call_builds(module, binaries, CompileOptions(), {}), FirstCallBuilds)
    assert pipeline._first_call_builds(module, None, CompileOptions(), {}) is module.call
    assert pipeline._first_call_builds(module, binaries, CompileOptions(parallel_builds=0), {}) is module.call
    assert pipeline._first_call_builds(module, binaries, CompileOptions(check_kernels=True), {}) is module.call
    assert parallel_builds.default_workers() == max(1, min(parallel_builds.MAX_WORKERS, __import__("os").cpu_count()))
