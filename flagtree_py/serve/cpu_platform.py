"""vLLM's CPU platform with flagtree as its compiler (see platforms.py)."""

from vllm.platforms.cpu import CpuPlatform

from flagtree_py.serve.platforms import FlagtreePlatformMixin


class FlagtreeCpuPlatform(FlagtreePlatformMixin, CpuPlatform):
    pass
