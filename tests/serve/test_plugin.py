"""The vLLM platform plugin activates only for `flagtree serve`, and the vLLM process gets flagtree's settings."""

from __future__ import annotations

import argparse
import json

import pytest

from flagtree_py.cli.serve import vllm_command
from flagtree_py.serve import plugin

from .conftest import requires_vllm


def test_plugin_is_inactive_outside_flagtree_serve(monkeypatch):
    monkeypatch.delenv("FLAGTREE_SERVE", raising=False)
    assert plugin.activate() is None  # vLLM then uses its own platform and compiler
    monkeypatch.setenv("FLAGTREE_SERVE", "0")
    assert plugin.activate() is None


@requires_vllm
def test_plugin_wraps_the_native_platform_and_names_flagtrees_compiler(monkeypatch):
    import importlib

    import torch
    from vllm.compilation.compiler_interface import CompilerInterface
    from vllm.utils.import_utils import resolve_obj_by_qualname

    monkeypatch.setenv("FLAGTREE_SERVE", "1")
    qualname = plugin.activate()
    native = "cuda" if torch.cuda.is_available() else "cpu"
    assert qualname == f"flagtree_py.serve.{native}_platform.Flagtree{native.capitalize()}Platform"
    module, name = qualname.rsplit(".", 1)
    platform = getattr(importlib.import_module(module), name)
    compiler = resolve_obj_by_qualname(platform.get_compile_backend())()
    assert isinstance(compiler, CompilerInterface) and compiler.name == "flagtree"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU machine's settings")
def test_the_vllm_process_asks_for_flagtree_on_whole_graphs(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")  # would make vLLM skip platform plugins
    args = argparse.Namespace(host="127.0.0.1", api_key="k", target="interpreter", dump_dir=None,
                              passthrough=["--max-num-seqs", "2"])
    argv, env = vllm_command(tmp_path, "served", args, 8123, tmp_path / "r.json")
    config = json.loads(argv[argv.index("--compilation-config") + 1])
    assert config["mode"] == 3 and config["custom_ops"] == ["none"] and config["splitting_ops"] == []
    assert argv[argv.index("--dtype") + 1] == "float32" and argv[-2:] == ["--max-num-seqs", "2"]
    assert argv[argv.index("--api-key") + 1] == "k" and argv[argv.index("--port") + 1] == "8123"
    assert env["FLAGTREE_SERVE"] == "1" and env["VLLM_USE_AOT_COMPILE"] == "0" and "VLLM_TARGET_DEVICE" not in env
    assert json.loads(env["FLAGTREE_SERVE_OPTIONS"]) == {"target": "interpreter"}

    args.passthrough = ["-cc", '{"mode": 0}', "--dtype", "float16"]  # the user's own choices win
    argv, _ = vllm_command(tmp_path, "served", args, 8123, tmp_path / "r.json")
    assert "--compilation-config" not in argv and argv.count("--dtype") == 1


@requires_vllm
def test_vllm_ir_ops_keep_their_pytorch_form_when_flagtree_compiles():
    """vLLM's CUDA platform puts its own kernels first for IR ops (rms_norm...) unless Inductor compiles:
    flagtree's platforms put the PyTorch form (what flagtree fuses) first whenever flagtree compiles."""
    from types import SimpleNamespace

    from vllm.config import CompilationMode
    from vllm.config.kernel import IrOpPriorityConfig

    from flagtree_py.serve.platforms import FlagtreePlatformMixin

    class CudaLike:  # CudaPlatform.get_default_ir_op_priority with a backend other than Inductor
        @classmethod
        def get_default_ir_op_priority(cls, vllm_config):
            return IrOpPriorityConfig.with_default(["vllm_c", "native"])

    class Platform(FlagtreePlatformMixin, CudaLike):
        pass

    def config(mode):
        return SimpleNamespace(compilation_config=SimpleNamespace(mode=mode))

    compiled = Platform.get_default_ir_op_priority(config(CompilationMode.VLLM_COMPILE))
    assert compiled.rms_norm == ["native"] and compiled.fused_add_rms_norm == ["native"]
    eager = Platform.get_default_ir_op_priority(config(CompilationMode.NONE))
    assert eager.rms_norm == ["vllm_c", "native"]  # nothing compiled: vLLM's kernels stay first
