"""Precompiled functions (flagtree_py/precompile.py): torch's `aot_compile` with flagtree's graphs, loaded in a
new process with no Dynamo trace, matching eager; and the clear errors and fallbacks around it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flagtree_py
from flagtree_py import precompile
from flagtree_py.precompile import PrecompileError, precompiled

pytestmark = pytest.mark.skipif(not hasattr(torch.compiler, "load_compiled_function"),
                                reason="torch's precompile needs torch >= 2.10")

STEP_SCRIPT = Path(__file__).with_name("precompile_step.py")


def _fresh_process_state() -> None:
    torch._dynamo.reset()
    flagtree_py.clear_report()


class _Affine(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.weight) + 1.0


class _RMSNorm(torch.nn.Module):
    """Under dynamic=True Dynamo makes `eps` a float input that AOTAutograd cannot turn into tensor math
    (rms_norm's eps argument): a Dynamo restart, unless the precompile specializes floats up front."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(16))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, (16,), self.weight, eps=self.eps)


def _options(cache_dir: Path, **extra) -> dict:
    return {"target": "interpreter", "cache_dir": str(cache_dir), **extra}


@pytest.mark.slow
def test_a_precompiled_decode_step_serves_a_new_process_without_a_dynamo_trace(tmp_path):
    from precompile_step import decode_steps

    artifact, cache_dir = tmp_path / "step.bin", tmp_path / "cache"
    _fresh_process_state()
    cold = decode_steps(str(artifact), str(cache_dir))
    assert cold["source"] == "compiled" and artifact.is_file()
    assert cold["dynamo_graphs"] == 1 and cold["records"][0]["link"] == "written"
    assert cold["max_abs_error"] < 1e-4

    run = subprocess.run([sys.executable, str(STEP_SCRIPT), str(artifact), str(cache_dir)], capture_output=True,
                         text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    warm = json.loads(run.stdout.strip().splitlines()[-1])
    assert warm["source"] == "loaded"
    assert warm["dynamo_graphs"] == 0  # Dynamo traced nothing: its bytecode and guards came from the artifact
    assert warm["records"] == [{"cache": "hit", "cache_path": "precompiled", "link": None}]
    assert warm["fallback_calls"] == 0
    assert warm["max_abs_error"] < 1e-4  # three greedy steps against eager, the KV cache written by the graph


def test_calls_the_saved_guards_refuse_run_through_torch_compile(tmp_path):
    model = _Affine().eval()
    with torch.no_grad():
        served = precompiled(model, (torch.randn(2, 16),), tmp_path / "affine.bin", options=_options(tmp_path))
        _fresh_process_state()
        loaded = precompiled(model, (torch.randn(2, 16),), tmp_path / "affine.bin", options=_options(tmp_path))
        assert (served.source, loaded.source) == ("compiled", "loaded")
        x = torch.randn(2, 16)
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
        assert loaded.fallback_calls == 0
        wider = torch.randn(5, 16)  # the saved graph is static: size 2 guarded
        with pytest.warns(UserWarning, match="does not serve"):
            out = loaded(wider)
        torch.testing.assert_close(out, model(wider), rtol=1e-5, atol=1e-5)
        assert loaded.fallback_calls == 1


def test_a_missing_cache_entry_is_a_clear_error_or_a_new_precompile(tmp_path):
    model = _Affine().eval()
    cache_dir, artifact = tmp_path / "cache", tmp_path / "affine.bin"
    with torch.no_grad():
        precompiled(model, (torch.randn(2, 16),), artifact, options=_options(cache_dir))
        shutil.rmtree(cache_dir)
        _fresh_process_state()
        with open(artifact, "rb") as file:  # torch's own loader: the first call names the entry and what to do
            loaded = torch.compiler.load_compiled_function(file)
        with pytest.raises(PrecompileError, match="needs cache entry [0-9a-f]+ in .*precompile again"):
            loaded(model, torch.randn(2, 16))

        _fresh_process_state()
        served = precompiled(model, (torch.randn(2, 16),), artifact, options=_options(cache_dir))
        assert served.source == "loaded"
        x = torch.randn(2, 16)
        with pytest.warns(UserWarning, match="needs cache entry .*precompiling again"):
            out = served(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
        assert served.source == "compiled" and artifact.is_file()
        _fresh_process_state()  # what was saved again serves the next process
        again = precompiled(model, (torch.randn(2, 16),), artifact, options=_options(cache_dir))
        torch.testing.assert_close(again(x), model(x), rtol=1e-5, atol=1e-5)
        assert again.source == "loaded" and flagtree_py.report()[-1]["cache_path"] == "precompiled"


def test_a_graph_compiled_without_the_cache_cannot_be_saved(tmp_path):
    with torch.no_grad(), pytest.raises(PrecompileError, match="no Dynamo-graph key"):
        precompiled(_Affine().eval(), (torch.randn(2, 16),), tmp_path / "affine.bin",
                    options=_options(tmp_path, cache=False))
    assert not (tmp_path / "affine.bin").exists()


def test_an_unreadable_artifact_is_compiled_again_with_a_warning(tmp_path):
    artifact = tmp_path / "affine.bin"
    artifact.write_bytes(b"not an artifact")
    model = _Affine().eval()
    with torch.no_grad(), pytest.warns(UserWarning, match="could not be loaded"):
        served = precompiled(model, (torch.randn(2, 16),), artifact, options=_options(tmp_path))
    assert served.source == "compiled"
    x = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(served(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_dynamic_precompile_serves_other_sizes_with_its_floats_guarded(tmp_path):
    """dynamic=True: the float is specialized (no Dynamo restart), the sizes are not; a loaded artifact serves
    other sizes with no Dynamo trace, matching eager, and a changed float fails the saved guards."""
    model = _RMSNorm().eval()
    artifact, options = tmp_path / "norm.bin", _options(tmp_path)
    with torch.no_grad():
        cold = precompiled(model, (torch.randn(2, 3, 16),), artifact, options=options, dynamic=True)
        _fresh_process_state()
        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        served = precompiled(model, (torch.randn(2, 3, 16),), artifact, options=options, dynamic=True)
        assert (cold.source, served.source) == ("compiled", "loaded")
        for shape in ((2, 3, 16), (2, 7, 16), (5, 4, 16)):
            x = torch.randn(shape)
            torch.testing.assert_close(served(x), model(x), rtol=1e-5, atol=1e-5)
        assert served.fallback_calls == 0
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before
        model.eps = 0.5  # not ignored: the guard `eps == 1e-06` sends the call to torch.compile
        with pytest.warns(UserWarning, match="does not serve"):
            out = served(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
        assert served.fallback_calls == 1


def test_a_float_restart_in_a_precompile_is_a_precompile_error_naming_the_recipe(tmp_path, monkeypatch):
    """Where Dynamo still restarts to specialize a float (here: the precompile's float setting taken away), the
    error says so and names the length recipe, chained to torch's internal exception."""
    monkeypatch.setitem(precompile.PRECOMPILE_DYNAMO_CONFIG, "specialize_float", False)
    artifact = tmp_path / "norm.bin"
    with torch.no_grad(), pytest.raises(PrecompileError, match=r"dynamic=True is not supported.*any_length") as raised:
        precompiled(_RMSNorm().eval(), (torch.randn(2, 3, 16),), artifact, options=_options(tmp_path), dynamic=True)
    assert type(raised.value.__cause__).__name__ == "TensorifyScalarRestartAnalysis"
    assert not artifact.exists()


def _length_recipe_step():
    """The tiny Qwen3 under the length recipe (flagtree_py/models/dynamic_length.py), one decode `Step` over a
    static cache of 16, and a function making seeded prompts of a given length."""
    from precompile_step import Step
    from transformers import StaticCache

    from flagtree_py.models import build_model, dynamic_length, tiny_config

    lm = dynamic_length.use_flagtree_attention(build_model(tiny_config("qwen3"), dtype=torch.float32, seed=0).causal_lm)
    config, length = lm.config, 16
    cache = StaticCache(config=config, max_cache_len=length)  # allocated before compiling, as serving does
    cache.early_initialization(1, config.num_key_value_heads, config.head_dim, lm.dtype, torch.device("cpu"))
    generator = torch.Generator().manual_seed(2)

    def prompt(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randint(0, config.vocab_size, (1, n), generator=generator), torch.arange(n)[None]

    return Step(lm, cache, mask_length=length), cache, prompt


@pytest.mark.slow
def test_one_precompiled_dynamic_graph_serves_every_prompt_length(tmp_path):
    """The length recipe (flagtree_py/models/dynamic_length.py) precompiled once: a loaded artifact serves
    prompts of other lengths, 1 included, with no Dynamo trace and no fallback, matching eager."""
    from flagtree_py.models import dynamic_length

    step, cache, prompt = _length_recipe_step()
    options = _options(tmp_path)
    with torch.no_grad():
        ids, positions = prompt(5)
        with dynamic_length.any_length(ids, positions):
            cold = precompiled(step.forward, (ids, positions), tmp_path / "prefill.bin", options=options)
        _fresh_process_state()
        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        served = precompiled(step.forward, (ids, positions), tmp_path / "prefill.bin", options=options)
        assert (cold.source, served.source) == ("compiled", "loaded")
        _assert_serves_lengths(served, step, cache, prompt, (5, 3, 1, 9))
    assert served.fallback_calls == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before


def _assert_serves_lengths(served, step, cache, prompt, lengths) -> None:
    """`served` matches eager on a prompt of each length, each from an empty cache."""
    for n in lengths:
        ids, positions = prompt(n)
        cache.reset()
        out = served(ids, positions)
        cache.reset()
        torch.testing.assert_close(out, step.forward(ids, positions), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_dynamic_true_precompile_of_the_causal_lm_serves_lengths_above_one(tmp_path):
    """dynamic=True instead of `any_length`: one artifact serves prompt lengths above 1, matching eager with no
    Dynamo trace; Dynamo specialized size 1, so a length-1 call takes the fallback (the recipe avoids that)."""
    step, cache, prompt = _length_recipe_step()
    options = _options(tmp_path)
    with torch.no_grad():
        ids, positions = prompt(5)
        cold = precompiled(step.forward, (ids, positions), tmp_path / "prefill.bin", options=options, dynamic=True)
        _fresh_process_state()
        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        served = precompiled(step.forward, (ids, positions), tmp_path / "prefill.bin", options=options, dynamic=True)
        assert (cold.source, served.source) == ("compiled", "loaded")
        _assert_serves_lengths(served, step, cache, prompt, (5, 3, 9, 2))
        assert served.fallback_calls == 0
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_before
        ids, positions = prompt(1)
        cache.reset()
        with pytest.warns(UserWarning, match="does not serve"):
            out = served(ids, positions)
        cache.reset()
        torch.testing.assert_close(out, step.forward(ids, positions), rtol=1e-4, atol=1e-4)
        assert served.fallback_calls == 1
