"""The `vllm.platform_plugins` entry point (pyproject.toml): which platform class vLLM should use.

vLLM calls every platform plugin in every process it starts; a plugin returning a class qualname wins over
vLLM's built-in detection. flagtree's returns one only in processes `flagtree serve` started, and then the
platform vLLM would have detected itself (CUDA where vLLM's CUDA probe finds a GPU, else CPU), wrapped.
"""

from __future__ import annotations

import os

from flagtree_py.serve import ACTIVATE_ENV


def activate() -> str | None:
    """The qualname of flagtree's platform for this machine, or None (vLLM then ignores this plugin)."""
    if os.environ.get(ACTIVATE_ENV) != "1":
        return None
    from vllm.platforms import cuda_platform_plugin

    if cuda_platform_plugin() is not None:
        return "flagtree_py.serve.cuda_platform.FlagtreeCudaPlatform"
    return "flagtree_py.serve.cpu_platform.FlagtreeCpuPlatform"
