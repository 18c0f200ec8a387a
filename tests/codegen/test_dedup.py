"""Groups of the same structure launch one kernel (codegen/share_kernels.py): the kernel count of a model
does not grow with its layers, results still match eager, the cache keeps each shared kernel once."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import flagtree_py
from flagtree_py import pipeline
from flagtree_py.codegen.wrapper import ModuleWriter
from flagtree_py.models import build_model, tiny_config
from flagtree_py.runtime.launch import dry_run
from tests.codegen.conftest import assert_matches

VOCAB = 256


def _model(preset: str, layers: int) -> torch.nn.Module:
    """The preset's tiny model with `layers` decoder layers (Step3's tiny config keeps its own count)."""
    config = copy.deepcopy(tiny_config(preset))
    if not hasattr(config, "truncated"):
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = [config.layer_types[0]] * layers
    return build_model(config)


def _compile_and_run(model, ids, options: dict) -> tuple[torch.Tensor, dict]:
    torch._dynamo.reset()
    flagtree_py.clear_report()
    with torch.no_grad():
        out = torch.compile(model, backend="flagtree", dynamic=False, options={"target": "interpreter", **options})(ids)
    (record,) = flagtree_py.report()
    return out, record


def _jit_names(source: str) -> list[str]:
    return re.findall(r"^@triton\.jit.*\ndef (\w+)\(", source, flags=re.MULTILINE)


def test_kernel_count_does_not_grow_with_layers():
    ids = torch.randint(0, VOCAB, (1, 7))
    records = {}
    for layers in (2, 4):
        model = _model("qwen3", layers)
        out, record = _compile_and_run(model, ids, {"cache": False})
        with torch.no_grad():
            assert_matches(out, model(ids))  # fp32, interpreter: see conftest.assert_matches for the bound
        assert record["kernel_failures"] == [] and record["codegen_fallbacks"] == []
        source = Path(record["module_path"]).read_text()
        names = _jit_names(source)
        assert len(names) == len(set(names)) == record["triton_kernels"] == record["kernels_distinct"]
        records[layers] = record
    two, four = records[2], records[4]
    assert two["triton_kernels"] == four["triton_kernels"] == 22
    # one kernel per group would have grown by 12 per layer (4 GEMM groups as split-K pairs, 4 others)
    assert (two["kernels_without_sharing"], four["kernels_without_sharing"]) == (34, 58)
    by_name = {k["name"]: k for k in four["kernels"]}
    # the residual add + RMSNorm of every layer, both norms of a layer included: one kernel of 2 * 4 groups
    norm = next(k for k in four["kernels"] if re.fullmatch(r"k\d+_add_pow_mean_rsqrt", k["name"]))
    assert len(norm["groups"]) == 2 * 4 - 1 and norm["groups"][0] == norm["name"]
    source = Path(four["module_path"]).read_text()
    assert f"# {norm['name']} is also launched by {len(norm['groups']) - 1} group(s)" in source
    assert len(re.findall(rf"^    run\({norm['name']},", source, flags=re.MULTILINE)) == len(norm["groups"])
    assert sum(len(k["groups"]) for k in by_name.values() if k["kind"] != "attention_decode") > len(by_name)


class _Capture(ModuleWriter):
    generated: ClassVar[dict] = {}  # share_kernels -> the GeneratedModule of the last compile

    def generate(self):
        out = super().generate()
        _Capture.generated[self.share_kernels] = out
        return out


def _own_sources(generated) -> dict[str, frozenset]:
    """group -> its kernels' sources, names (the group's name is their prefix) and comments left out. Attention
    kernels name no group: they were one per shape before groups were shared (codegen/attention.py)."""
    sources: dict[str, set] = {}
    for kernel in generated.kernels:
        if not kernel.groups:
            continue
        owner = kernel.groups[0]
        prefix = re.sub(r"_(partial|reduce|combine|count|scatter|gate_up|down)$", "", kernel.name)  # a template's several kernels
        text = re.sub(rf"\b{re.escape(prefix)}", "<kernel>", kernel.source)
        sources.setdefault(owner, set()).add("\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    return {group: frozenset(texts) for group, texts in sources.items()}


@pytest.mark.parametrize("preset", ["qwen3", "qwen3-30b-a3b", "step3"])
def test_shared_kernels_are_what_each_group_lowers_to(preset, monkeypatch):
    """Compiled once with each group lowered on its own, once with sharing: a kernel is shared by exactly the
    groups whose own kernels have its source (up to names and comments): none wrongly, and only step3's
    permuted o-projection input is missed (see ModuleWriter.lower_group)."""
    model, ids = _model(preset, 4), torch.randint(0, VOCAB, (1, 7))
    for share in (False, True):
        monkeypatch.setattr(pipeline, "ModuleWriter", functools.partial(_Capture, share_kernels=share))
        with dry_run():  # code generation is what is compared: no kernel needs to run
            _compile_and_run(model, ids, {"cache": False})
    own, shared = _own_sources(_Capture.generated[False]), _Capture.generated[True]
    kernel_of = {group: kernel.name for kernel in shared.kernels for group in kernel.groups}
    assert set(kernel_of) == set(own)  # every group that has a kernel of its own launches one when shared
    by_source: dict[frozenset, set] = {}
    for group, texts in own.items():
        by_source.setdefault(texts, set()).add(kernel_of[group])
    # groups of one source may still launch several kernels where their structures differ (step3's o-projection
    # reads a permuted input: the same kernel, but an aten fallback of other views): never more than one per structure
    assert sum(len(kernels) for kernels in by_source.values()) <= len(by_source) + (1 if preset == "step3" else 0)
    for kernel in (k for k in shared.kernels if k.groups):
        assert len({own[group] for group in kernel.groups}) == 1, f"{kernel.name} serves groups of other sources"
    assert len(shared.kernels) < len(_Capture.generated[False].kernels)
    # the same nodes run in kernels either way: a shared kernel lists the nodes of all its groups
    alone = _Capture.generated[False]
    assert shared.lowered_nodes == alone.lowered_nodes
    assert {n for k in shared.kernels for n in k.nodes} == {n for k in alone.kernels for n in k.nodes}


def test_cache_round_trip_and_show_list_a_shared_kernel_once():
    model, ids = _model("qwen3", 4), torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        expected = model(ids)
    cold_out, cold = _compile_and_run(model, ids, {})
    warm_out, warm = _compile_and_run(model, ids, {})
    assert (cold["cache"], warm["cache"]) == ("miss", "hit") and warm["cache_key"] == cold["cache_key"]
    assert cold["kernels_generated"] == cold["kernels_distinct"] == 22 and warm["kernels_generated"] == 0
    assert warm["kernels_distinct"] == 22 and warm["kernels_without_sharing"] == cold["kernels_without_sharing"] == 58
    assert warm["kernel_failures"] == []
    assert_matches(cold_out, expected)
    assert_matches(warm_out, expected)

    cache_dir = os.environ["FLAGTREE_CACHE_DIR"]  # this test's own (tests/conftest.py)

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "flagtree_py.cli.main", "cache", "--cache-dir", str(cache_dir),
                               *args], capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    meta = json.loads(cli("show", cold["cache_key"], "--json"))
    assert len(meta["kernels"]) == len(set(meta["kernels"])) == 22
    entry_source = (Path(meta["path"]) / "module.py").read_text()
    assert sorted(_jit_names(entry_source)) == sorted(meta["kernels"])
    norm = next(k for k in meta["record"]["kernels"] if re.fullmatch(r"k\d+_add_pow_mean_rsqrt", k["name"]))
    text = cli("show", cold["cache_key"])
    rows = [line.split() for line in text.splitlines() if line.split()[:1] == [norm["name"]]]
    assert len(rows) == 1 and rows[0][3] == str(len(norm["groups"])) == "7"  # name, kind, group, launched by
    shown = json.loads(cli("show", cold["cache_key"], "--kernel", norm["name"], "--json"))
    assert shown["groups"] == norm["groups"] and len(shown["launches"]) == 7
