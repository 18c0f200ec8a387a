"""The direct capture (flagtree_py/capture.py, option `capture="direct"`): one trace gives AOTAutograd's graph.

Checked: on the tiny models (a Qwen3 decode step writing its static KV cache, the three presets' forward),
the aten graph is AOTAutograd's node for node; compiled with it, outputs and the cache writes match eager;
what AOTAutograd's runtime wrappers would have to handle (a training graph, an output aliasing an input,
inputs sharing storage with a mutated one, a custom op that mutates) is refused, and AOTAutograd compiles
it instead, correctly; the option.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

import flagtree_py
from flagtree_py.capture import Captured, capture
from flagtree_py.decompositions import flagtree_decompositions
from flagtree_py.options import CompileOptions
from flagtree_py.passes.fuse_attention import route_sdpa_calls


def _graph_text(gm: torch.fx.GraphModule) -> str:
    """The graph's code with node numbering and `= None` frees dropped: the ops, their order and arguments."""
    lines = [line.split(";")[0] for line in gm.code.splitlines()]
    return re.sub(r"_\d+\b", "", "\n".join(lines))


def _both_captures(fn, args) -> tuple[str, Captured | str]:
    """AOTAutograd's graph text and the direct capture of the Dynamo graph of `fn(*args)`."""
    seen = {}

    def backend(gm, example_inputs):
        route_sdpa_calls(gm)
        seen["direct"] = capture(gm, example_inputs, flagtree_decompositions())

        def forward(aten_gm, _):
            seen["aot"] = _graph_text(aten_gm)
            return make_boxed_func(aten_gm.forward)

        return aot_module_simplified(gm, example_inputs, fw_compiler=forward, decompositions=flagtree_decompositions(),
                                     keep_inference_input_mutations=True)

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return seen["aot"], seen["direct"]


def _decode_step():
    """The tiny Qwen3 (transformers) stepping one token over a static cache of 16, and its arguments."""
    from transformers import StaticCache

    from flagtree_py.models import build_model, tiny_config

    lm = build_model(tiny_config("qwen3"), dtype=torch.float32, seed=0).causal_lm
    config = lm.config
    cache = StaticCache(config=config, max_cache_len=16)
    cache.early_initialization(1, config.num_key_value_heads, config.head_dim, lm.dtype, torch.device("cpu"))

    def step(ids, positions):
        return lm(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True).logits

    return step, cache, (torch.tensor([[5]]), torch.tensor([[3]]))


def test_the_decode_step_is_captured_as_aotautograd_captures_it():
    step, _, args = _decode_step()
    aot, direct = _both_captures(step, args)
    assert isinstance(direct, Captured), direct
    assert _graph_text(direct.gm) == aot
    # the key and value caches of both layers (and, with newer transformers, each layer's length), written
    # back in the graph as AOTAutograd writes them
    assert len(direct.mutated) == aot.count("aten.copy_.default") >= 2 * 2


@pytest.mark.parametrize("preset", ["qwen3", "qwen3-30b-a3b", "step3"])
def test_each_presets_forward_is_captured_as_aotautograd_captures_it(preset):
    from flagtree_py.models import build_model, tiny_config

    model = build_model(tiny_config(preset), dtype=torch.float32, seed=0)
    lm = getattr(model, "causal_lm", model)
    def forward(ids):
        out = lm(input_ids=ids)
        return getattr(out, "logits", out)

    aot, direct = _both_captures(forward, (torch.randint(0, 100, (1, 7)),))
    assert isinstance(direct, Captured), direct
    assert _graph_text(direct.gm) == aot and direct.mutated == []


def test_compiled_with_the_direct_capture_the_decode_step_and_its_cache_match_eager(tmp_path):
    step, cache, args = _decode_step()
    eager_step, eager_cache, _ = _decode_step()
    torch._dynamo.reset()
    flagtree_py.clear_report()
    compiled = torch.compile(step, backend="flagtree",
                             options={"target": "interpreter", "cache_dir": str(tmp_path), "capture": "direct"})
    with torch.no_grad():
        for token, position in ((5, 3), (7, 4)):
            ids, positions = torch.tensor([[token]]), torch.tensor([[position]])
            torch.testing.assert_close(compiled(ids, positions), eager_step(ids, positions), rtol=1e-4, atol=1e-4)
    for layer, eager_layer in zip(cache.layers, eager_cache.layers):
        torch.testing.assert_close(layer.keys, eager_layer.keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.values, eager_layer.values, rtol=1e-4, atol=1e-4)
    records = flagtree_py.report()
    assert records and all(r["capture"] == "direct" for r in records), [r.get("capture") for r in records]
    assert all("direct_capture" in r["phases_s"] and "aot_capture" not in r["phases_s"] for r in records)

    # the link the direct capture wrote serves a warm start found from the Dynamo graph (dynamo_link.py)
    torch._dynamo.reset()
    flagtree_py.clear_report()
    warm = torch.compile(step, backend="flagtree",
                         options={"target": "interpreter", "cache_dir": str(tmp_path), "capture": "direct"})
    with torch.no_grad():
        ids, positions = torch.tensor([[9]]), torch.tensor([[5]])
        torch.testing.assert_close(warm(ids, positions), eager_step(ids, positions), rtol=1e-4, atol=1e-4)
    assert [r.get("cache_path") for r in flagtree_py.report()] == ["dynamo_graph"]
    for layer, eager_layer in zip(cache.layers, eager_cache.layers):
        torch.testing.assert_close(layer.keys, eager_layer.keys, rtol=1e-4, atol=1e-4)


def test_the_length_recipes_dynamic_graph_is_captured_directly_and_serves_every_length():
    """Symbolic sizes through the one trace: the tiny Qwen3 under the length recipe (models/dynamic_length.py),
    one graph for prompts of 3, 5 and 1 tokens, each matching eager."""
    from flagtree_py.models import dynamic_length
    from tests.backend.test_precompile import _length_recipe_step

    step, _, prompt = _length_recipe_step()
    eager_step, _, _ = _length_recipe_step()
    torch._dynamo.reset()
    flagtree_py.clear_report()
    compiled = torch.compile(step.forward, backend="flagtree", options={"target": "interpreter", "cache": False})
    with torch.no_grad():
        for length in (3, 5, 1):
            ids, positions = prompt(length)
            with dynamic_length.any_length(ids, positions):
                got = compiled(ids, positions)
            torch.testing.assert_close(got, eager_step.forward(ids, positions), rtol=1e-4, atol=1e-4)
    (record,) = flagtree_py.report()  # one graph for every length
    assert record["capture"] == "direct" and record["dynamic_symbols"], record.get("capture")


def _compile_direct(fn, tmp_path):
    torch._dynamo.reset()
    flagtree_py.clear_report()
    return torch.compile(fn, backend="flagtree",
                         options={"target": "interpreter", "cache_dir": str(tmp_path), "capture": "direct"})


def _mutate_then_read(x, y):
    x.add_(1.0)
    return y * 2.0


def _assert_refused_because(expected: str) -> None:
    """The one graph was compiled through AOTAutograd, the direct capture having refused it for `expected`."""
    (record,) = flagtree_py.report()
    assert record["capture"].startswith("aot (direct refused: " + expected), record["capture"]


def test_an_output_aliasing_an_input_is_refused_and_stays_an_alias(tmp_path):
    def fn(x):
        return x.view(4, 4), x.sin()

    x = torch.randn(16)
    with torch.no_grad():
        got = _compile_direct(fn, tmp_path)(x)
    want = fn(x.clone())
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])
    assert got[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()  # still an alias
    _assert_refused_because("an output shares storage with an input")


def test_inputs_sharing_storage_with_a_mutated_one_are_refused_and_match_eager(tmp_path):
    base = torch.randn(8)
    eager_base = base.clone()
    got = _compile_direct(_mutate_then_read, tmp_path)(base, base[2:6])
    torch.testing.assert_close(got, _mutate_then_read(eager_base, eager_base[2:6]))
    torch.testing.assert_close(base, eager_base)
    _assert_refused_because("a mutated input shares storage with another input")


def test_a_training_graph_is_refused_and_matches_eager(tmp_path):
    weight = torch.nn.Parameter(torch.randn(4, 4))

    def fn(x):
        return torch.relu(x @ weight)

    x = torch.randn(2, 4)
    torch.testing.assert_close(_compile_direct(fn, tmp_path)(x), fn(x.clone()))
    _assert_refused_because("grad on, an input requires grad")


def test_a_custom_op_that_mutates_is_refused():
    @torch.library.custom_op("flagtree_test::scale_in_place", mutates_args=("x",))
    def scale_in_place(x: torch.Tensor) -> None:
        x.mul_(2.0)

    seen = {}

    def backend(gm, example_inputs):
        seen["why"] = capture(gm, example_inputs, flagtree_decompositions())
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(lambda x: scale_in_place(x), backend=backend)(torch.randn(4))
    assert isinstance(seen["why"], str) and "mutates its arguments" in seen["why"]


def test_the_option(monkeypatch):
    monkeypatch.delenv("FLAGTREE_CAPTURE", raising=False)
    assert CompileOptions.from_user({}).capture == "direct"
    assert CompileOptions.from_user({"capture": "aot"}).capture == "aot"
    with pytest.raises(ValueError, match="capture"):
        CompileOptions.from_user({"capture": "single"})
    monkeypatch.setenv("FLAGTREE_CAPTURE", "aot")
    assert CompileOptions.from_user({}).capture == "aot"
    assert CompileOptions.from_user({"capture": "direct"}).capture == "direct"
    # the graph is the same either way: not in the cache key
    assert CompileOptions(capture="direct").hash() == CompileOptions().hash()
