"""CUDA graph replay, what a CPU can check: options, the CPU skip and its reason, and the runner's
bookkeeping (warm-up, capture, in-place vs copied inputs, copy-back of mutated inputs, recapture,
buckets, fallbacks) against a simulated graph that re-runs the captured call on the captured
memory, as a CUDA graph replays its kernels. The real capture is checked on the GPU by
benchmarks/attention_gpu_check.py (check_cuda_graphs)."""

from __future__ import annotations

import pytest
import torch

import flagtree_py
from flagtree_py.options import CompileOptions
from flagtree_py.runtime.cuda_graphs import CudaGraphRunner, why_no_cuda_graphs


class SimulatedGraphs:
    """Capture records the call without its effects on inputs (they are restored, as a real capture
    does not execute); replay re-runs it on the captured buffers and writes the captured outputs."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.captures = 0
        self.released = 0

    def capture(self, fn, tensors):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        saved = [t.clone() for t in tensors]
        outputs = fn()
        for tensor, value in zip(tensors, saved):
            tensor.copy_(value)
        self.captured_outputs = outputs
        return fn, outputs

    def release(self, graph):
        self.released += 1

    def replay(self, graph):  # the captured kernels run again and write the captured output memory
        for captured, new in zip(self.captured_outputs, graph()):
            captured.copy_(new)


def generated_call(args):
    """Shaped like a generated wrapper: unpacks and clears args, writes the cache in place."""
    x, weight, cache, position = args
    args.clear()
    cache[position] = x.sum(0)
    return [x * weight + cache.sum(0)]


def _reference(x, weight, cache, position):
    cache[position] = x.sum(0)
    return x * weight + cache.sum(0)


def _runner(**kwargs):
    graphs = kwargs.pop("graphs", SimulatedGraphs())
    runner = CudaGraphRunner(generated_call, frozenset({2}), [(0, 0)], device="cpu", graphs=graphs, **kwargs)
    return runner, graphs


def test_warmup_capture_replay_and_in_place_inputs():
    runner, graphs = _runner(graphs=SimulatedGraphs())
    weight, cache = torch.randn(4, 3), torch.zeros(8, 3)
    eager_cache = cache.clone()
    for step in range(4):
        x = torch.randn(4, 3)  # a new tensor each call: copied into the static buffer
        out = runner([x, weight, cache, 3])
        expected = _reference(x, weight, eager_cache, 3)
        torch.testing.assert_close(out[0], expected, rtol=0, atol=0)
        torch.testing.assert_close(cache, eager_cache, rtol=0, atol=0)  # written once per call, in place
    assert runner.counts["warmup"] == 1
    assert graphs.captures == 1 and runner.counts["replay"] == 3
    # the weight and the cache kept their addresses: read in place, never copied
    (bucket,) = runner.buckets.values()
    assert set(bucket.captured.in_place) == {1, 2} and bucket.captured.copied == [0]


def test_outputs_are_not_overwritten_by_the_next_replay():
    runner, _ = _runner(graphs=SimulatedGraphs())
    weight, cache = torch.randn(4, 3), torch.zeros(8, 3)
    outs = [runner([torch.full((4, 3), float(i)), weight, cache, 1])[0] for i in range(4)]
    assert len({round(o[0, 0].item(), 4) for o in outs}) == 4


def test_moved_cache_is_recaptured_and_a_copied_mutated_input_is_written_back():
    runner, graphs = _runner(graphs=SimulatedGraphs())
    weight = torch.randn(4, 3)
    x = torch.randn(4, 3)
    runner([x, weight, torch.zeros(8, 3), 2])  # warm-up with one cache
    moved = torch.zeros(8, 3)  # another cache at another address: copied, mutated, copied back
    out = runner([x, weight, moved, 2])
    reference_cache = torch.zeros(8, 3)
    torch.testing.assert_close(out[0], _reference(x, weight, reference_cache, 2))
    torch.testing.assert_close(moved, reference_cache)
    assert 2 in next(iter(runner.buckets.values())).captured.copied
    # the cache read in place moves: the graph is captured again instead of writing the old cache
    runner.buckets.clear()
    cache_a, cache_b = torch.zeros(8, 3), torch.zeros(8, 3)
    runner([x, weight, cache_a, 3])
    runner([x, weight, cache_a, 3])  # captured with cache_a in place
    x2, x3 = torch.randn(4, 3), torch.randn(4, 3)
    runner([x2, weight, cache_b, 3])  # warm-up again, for the new addresses
    out = runner([x3, weight, cache_b, 3])  # captured anew: cache_b in place, x copied (it moved)
    assert runner.counts["recapture"] == 1 and graphs.captures == 3 and graphs.released == 1
    torch.testing.assert_close(out[0], x3 * weight + cache_b.sum(0))
    torch.testing.assert_close(cache_a[3], x.sum(0))  # untouched by the calls on cache_b
    torch.testing.assert_close(cache_b[3], x3.sum(0))
    assert next(iter(runner.buckets.values())).captured.copied == [0]


def test_sizes_buckets_and_failed_capture_fall_back_with_reasons():
    record = {}
    runner, _ = _runner(graphs=SimulatedGraphs(), sizes=(4, 6), max_buckets=1, record=record)
    weight, cache = torch.randn(1, 3), torch.zeros(8, 3)
    runner([torch.randn(5, 3), weight, cache, 0])
    assert record["cuda_graph_skips"] == {"dynamic size 5 outside cuda_graph_sizes": 1}
    runner([torch.randn(4, 3), weight, cache, 0])
    runner([torch.randn(6, 3), weight, cache, 0])  # a second size: a second bucket, over the limit
    assert "more than 1 shape buckets" in record["cuda_graph_skips"]

    record = {}
    runner, _ = _runner(graphs=SimulatedGraphs(fail=True), record=record)
    x, weight, cache = torch.randn(4, 3), torch.randn(4, 3), torch.zeros(8, 3)
    eager_cache = cache.clone()
    outs = [runner([x, weight, cache, 1])]  # warm-up
    with pytest.warns(UserWarning, match="capture failed"):
        outs.append(runner([x, weight, cache, 1]))
    outs.append(runner([x, weight, cache, 1]))  # the bucket now runs without a graph, silently
    for out in outs:
        torch.testing.assert_close(out[0], _reference(x, weight, eager_cache, 1))
    assert any(reason.startswith("capture failed") for reason in record["cuda_graph_skips"])


class _FakeCudaGraph:
    """Stands in for torch.cuda.CUDAGraph: records the pool it was captured into."""

    def __init__(self, pools):
        self.pools = pools

    def reset(self):
        self.pools["reset"] += 1


def test_torch_graphs_start_a_new_pool_once_the_last_graph_is_released(monkeypatch):
    """The allocator refuses a capture into a pool whose graphs are all gone: after the last
    release (a recapture) or a failed capture with no graph alive, the next capture gets a new pool."""
    from contextlib import contextmanager

    from flagtree_py.runtime import cuda_graphs

    pools = {"handles": 0, "reset": 0, "used": []}

    def pool_handle():
        pools["handles"] += 1
        return ("pool", pools["handles"])

    @contextmanager
    def graph(g, pool):
        pools["used"].append(pool)
        yield

    monkeypatch.setattr(cuda_graphs.torch.cuda, "graph_pool_handle", pool_handle)
    monkeypatch.setattr(cuda_graphs.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(cuda_graphs.torch.cuda, "CUDAGraph", lambda: _FakeCudaGraph(pools))
    monkeypatch.setattr(cuda_graphs.torch.cuda, "graph", graph)
    graphs = cuda_graphs.TorchGraphs()
    first, _ = graphs.capture(lambda: [1], [])
    second, _ = graphs.capture(lambda: [2], [])
    assert pools["used"] == [("pool", 1), ("pool", 1)]  # buckets share one pool
    graphs.release(first)
    third, _ = graphs.capture(lambda: [3], [])  # the second graph keeps pool 1 alive
    graphs.release(second)
    graphs.release(third)
    graphs.capture(lambda: [4], [])  # none alive: pool 1 is dead, a new one
    assert pools["used"][-1] == ("pool", 2) and pools["reset"] == 3

    def broken():
        raise RuntimeError("operation not permitted when stream is capturing")

    fresh = cuda_graphs.TorchGraphs()
    with pytest.raises(RuntimeError, match="not permitted"):
        fresh.capture(broken, [])
    fresh.capture(lambda: [5], [])
    assert pools["used"][-2] != pools["used"][-1]  # the failed capture's pool is not reused


def test_bucket_key_holds_dynamic_sizes_and_host_scalar_values():
    """The key is what Dynamo does not guard: the dynamic sizes' values and host scalars (baked
    into a capture); shapes, strides and dtypes are the compiled graph's own."""
    runner, _ = _runner()
    weight, cache = torch.randn(4, 3), torch.zeros(8, 3)
    a = runner._key([torch.zeros(4, 3), weight, cache, torch.tensor(1.0)])
    b = runner._key([torch.ones(4, 3), weight, cache, torch.tensor(2.0)])
    assert a != b and a[0] == b[0] == 4
    assert runner._key([torch.zeros(5, 3), weight, cache, torch.tensor(1.0)])[0] == 5


def test_options_validation_and_hash():
    with pytest.raises(TypeError, match="cuda_graphs"):
        CompileOptions.from_user({"cuda_graphs": "yes"})
    with pytest.raises(ValueError, match="cuda_graph_sizes"):
        CompileOptions.from_user({"cuda_graph_sizes": [1, 0]})
    options = CompileOptions.from_user({"cuda_graphs": True, "cuda_graph_sizes": [8, 1, 8]})
    assert options.cuda_graph_sizes == (1, 8)
    assert options.hash() == CompileOptions().hash()  # replay does not change the generated code
    assert why_no_cuda_graphs("cuda", frozenset({"cuda_graphs"}), True) is None
    assert why_no_cuda_graphs("cuda", frozenset(), True).startswith("off: the target")


def test_cpu_compile_ignores_cuda_graphs_with_a_reason():
    fn = torch.compile(lambda x: (x * 2).sin(), backend="flagtree", options={"cuda_graphs": True})
    x = torch.randn(6)
    torch.testing.assert_close(fn(x), (x * 2).sin())
    (record,) = flagtree_py.report()
    assert record["cuda_graphs"] == "off: inputs on cpu (CUDA graphs need CUDA tensors)"
