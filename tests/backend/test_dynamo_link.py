"""A warm start found from the Dynamo graph (flagtree_py/dynamo_link.py): no AOTAutograd on a hit, and
results that match eager where AOTAutograd's runtime wrappers would have mattered: a KV-cache write kept in
the graph, an output that aliases an input, inputs that share storage with a mutated one."""

from __future__ import annotations

import torch

import flagtree_py
from flagtree_py.dynamo_link import inputs_alias


def _options(tmp_path) -> dict:
    return {"target": "interpreter", "cache_dir": str(tmp_path)}


def _record(graph_count: int = 1) -> dict:
    records = flagtree_py.report()
    assert len(records) == graph_count
    return records[-1]


def _fresh_process_state() -> None:
    """What a second process starts with: no Dynamo cache, no record (the flagtree cache stays)."""
    torch._dynamo.reset()
    flagtree_py.clear_report()


class _CacheWriter(torch.nn.Module):
    """A decode step's shape: write this step's key into a cache buffer in place, then read the cache."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cache", torch.zeros(8, 16))
        self.weight = torch.nn.Parameter(torch.randn(16, 16))

    def forward(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        self.cache.index_copy_(0, position, torch.tanh(x @ self.weight))
        return (self.cache * 2.0).sum(-1) + x.sum()


def test_kv_cache_write_hits_without_aot_and_matches_eager(tmp_path):
    compiled_model, eager_model = _CacheWriter().eval(), _CacheWriter().eval()
    eager_model.load_state_dict(compiled_model.state_dict())
    step = [(torch.randn(1, 16), torch.tensor([i])) for i in range(3)]
    with torch.no_grad():
        cold = torch.compile(compiled_model, backend="flagtree", options=_options(tmp_path))
        version = compiled_model.cache._version
        out = cold(*step[0])
        bumps = compiled_model.cache._version - version  # the full path's: AOTAutograd's wrapper, the kernel
        ref = eager_model(*step[0])
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        record = _record()
        assert record["cache"] == "miss" and record["link"] == "written" and "cache_path" not in record

        _fresh_process_state()
        warm = torch.compile(compiled_model, backend="flagtree", options=_options(tmp_path))
        for x, position in step[1:]:
            version = compiled_model.cache._version
            out, ref = warm(x, position), eager_model(x, position)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            # autograd's version counter sees the write as on the full path (AOTAutograd's wrapper bumps it)
            assert compiled_model.cache._version - version == bumps
        torch.testing.assert_close(compiled_model.cache, eager_model.cache, rtol=1e-5, atol=1e-5)
    record = _record()
    assert record["cache"] == "hit" and record["cache_path"] == "dynamo_graph"
    assert "aot_capture" not in record["phases_s"] and record["kernels_generated"] == 0
    assert record["triton_kernels"] >= 1 and record["kernel_failures"] == []


def test_output_aliasing_an_input_is_never_linked(tmp_path):
    def f(x):
        return x.view(4, 4)[1:], (x * 3).sum()

    x = torch.randn(16)
    for _ in range(2):  # cold, then warm: both take the full path (AOTAutograd regenerates the view)
        _fresh_process_state()
        out = torch.compile(f, backend="flagtree", options=_options(tmp_path))(x)
        ref = f(x)
        torch.testing.assert_close(out[0], ref[0]) and torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-5)
        assert out[0]._base is x  # the view AOTAutograd's wrapper replays: an alias of the input, as in eager
        record = _record()
        assert record["link"].startswith("output 0: alias_of_input") and "cache_path" not in record
    assert record["cache"] == "hit"  # the aten-graph key still hits


def _mutate_then_read(x, y):
    x.add_(1.0)
    return y * 2.0


def test_inputs_sharing_storage_with_a_mutated_one_take_the_full_path(tmp_path):
    # cold: separate tensors, the link is written
    a, b = torch.randn(4), torch.randn(4)
    torch.compile(_mutate_then_read, backend="flagtree", options=_options(tmp_path))(a, b)
    assert _record()["link"] == "written"
    # warm, with y the same memory as x: the graph (its write kept as a copy at the end) would read the old
    # y; AOTAutograd's synthetic base orders it right, so the hit must not be taken
    _fresh_process_state()
    base, reference_base = torch.randn(8), None
    reference_base = base.clone()
    x, y = base[:4], base.view(2, 4)[0]
    out = torch.compile(_mutate_then_read, backend="flagtree", options=_options(tmp_path))(x, y)
    ref = _mutate_then_read(reference_base[:4], reference_base.view(2, 4)[0])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(base, reference_base)
    assert "cache_path" not in _record(len(flagtree_py.report()))


def test_inputs_alias_sees_duplicates_and_shared_storage():
    a, b = torch.randn(4), torch.randn(4)
    assert inputs_alias([a, a], mutated=[])  # AOTAutograd would deduplicate: one placeholder fewer
    assert not inputs_alias([a, b, 3], mutated=[0])
    base = torch.randn(8)
    assert inputs_alias([base[:4], base[4:]], mutated=[1])  # a synthetic base: one of them is written
    assert not inputs_alias([base[:4], base[4:]], mutated=[])  # read-only aliases need no wrapper


def test_a_stale_link_compiles_in_full(tmp_path):
    """A link whose entry is gone (evicted) costs a full compile, not an error."""
    from flagtree_py.cache import KernelCache

    f = lambda x: torch.sin(x) * 2.0
    x = torch.randn(8)
    torch.compile(f, backend="flagtree", options=_options(tmp_path))(x)
    record = _record()
    assert record["link"] == "written"
    assert KernelCache(tmp_path).remove(record["cache_key"])
    _fresh_process_state()
    out = torch.compile(f, backend="flagtree", options=_options(tmp_path))(x)
    torch.testing.assert_close(out, f(x), rtol=1e-5, atol=1e-5)
    record = _record()
    assert record["cache"] == "miss" and "cache_path" not in record and record["link"] == "written"


def test_one_tensor_passed_twice_matches_eager(tmp_path):
    """Cold with two tensors, warm with one tensor passed for both: Dynamo traces a graph of one input
    (another key, no link) or the link's alias check refuses; either way the write is seen by the read."""
    a, b = torch.randn(4), torch.randn(4)
    torch.compile(_mutate_then_read, backend="flagtree", options=_options(tmp_path))(a, b)
    assert _record()["link"] == "written"
    _fresh_process_state()
    x = torch.randn(4)
    reference = x.clone()
    out = torch.compile(_mutate_then_read, backend="flagtree", options=_options(tmp_path))(x, x)
    want = _mutate_then_read(reference, reference)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(x, reference)
    assert all(r.get("cache_path") is None for r in flagtree_py.report())
