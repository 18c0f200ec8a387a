"""vLLM's CUDA platform with flagtree as its compiler (see platforms.py)."""

from vllm.platforms.cuda import CudaPlatform

from flagtree_py.serve.platforms import FlagtreePlatformMixin


class FlagtreeCudaPlatform(FlagtreePlatformMixin, CudaPlatform):
    pass
