"""Bad input to `flagtree serve`: one line on stderr, exit status 2, nothing started, nothing built."""

from __future__ import annotations

import importlib.util
import socket

import pytest

from flagtree_py.cli.main import main


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("flagtree serve: error: ")
    return lines[0]


@pytest.fixture(autouse=True)
def _no_checkpoint_built(monkeypatch, tmp_path):
    """None of these may reach the checkpoint builder (or vLLM): fail loudly if one does."""
    from flagtree_py.models import checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("a bad-input run went on to build a checkpoint")

    monkeypatch.setattr(checkpoint, "build_tiny_checkpoint", refuse)
    monkeypatch.setenv("FLAGTREE_CACHE_DIR", str(tmp_path))


def test_unknown_preset(capsys):
    assert main(["serve", "llama-7b", "--tiny"]) == 2
    line = one_error_line(capsys)
    assert "unknown model preset 'llama-7b'" in line and "qwen3-30b-a3b" in line and "step3" in line


def test_preset_without_local_weights_names_model_and_tiny(capsys):
    assert main(["serve", "qwen3"]) == 2
    line = one_error_line(capsys)
    assert "Qwen/Qwen3-8B" in line and "--model DIR" in line and "--tiny" in line


def test_model_folder_that_does_not_exist(capsys, tmp_path):
    assert main(["serve", "qwen3", "--model", str(tmp_path / "missing")]) == 2
    assert "no such folder" in one_error_line(capsys)


def test_unknown_target(capsys):
    assert main(["serve", "qwen3", "--tiny", "--target", "tpu"]) == 2
    line = one_error_line(capsys)
    assert "'tpu'" in line and "nvidia" in line


def test_port_in_use(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "qwen3", "--tiny", "--port", str(port)]) == 2
    line = one_error_line(capsys)
    assert f"port {port} on 127.0.0.1 is in use" in line


def test_vllm_not_installed(capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "vllm" else real_find_spec(name, *args))
    with socket.socket() as probe:  # a port that is free now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["serve", "qwen3", "--tiny", "--port", str(port)]) == 2
    assert "vLLM is not installed" in one_error_line(capsys)


def test_qwen3_omni_tiny_is_refused_in_one_line(capsys):
    assert main(["serve", "qwen3-omni", "--tiny"]) == 2
    assert "multimodal thinker" in one_error_line(capsys)


def test_arguments_after_double_dash_only_for_serve(capsys):
    assert main(["targets", "--", "--max-num-seqs", "4"]) == 2
    assert "takes no arguments after `--`" in capsys.readouterr().err
