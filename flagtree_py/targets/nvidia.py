"""NVIDIA Hopper (sm_90: H100/H200) and Ampere (sm_80: A100).

Figures: CUDA C++ Programming Guide, "Compute Capabilities" table (warp size 32, 1024 threads per
block, 64K 32-bit registers per block; shared memory per block up to 227 KB on 9.0 and 163 KB on
8.0 with opt-in). TMA and wgmma are Hopper features (PTX ISA 8.0, sm_90/sm_90a); fp8 needs sm_89+.
"""

from pathlib import Path

from flagtree_py.targets.base import TargetSpec

_COMMON = dict(
    vendor="nvidia",
    warp_size=32,
    max_threads_per_block=1024,
    registers_per_block=65536,
    triton_language=(3, 6),
    template_dir=str(Path(__file__).parent / "templates" / "nvidia"),  # looped reductions pipelined with cp.async
    source="CUDA C++ Programming Guide, Compute Capabilities (Technical Specifications per CC)",
)

SM90 = TargetSpec(
    name="nvidia-sm90",
    arch="sm_90",
    description="NVIDIA Hopper (H100, H200)",
    shared_memory_per_block=227 * 1024,
    multiprocessors=132,  # H100 SXM5 and H200 (NVIDIA H100 Tensor Core GPU Architecture whitepaper)
    dtypes=frozenset({"fp32", "fp16", "bf16", "fp8e4m3", "fp8e5m2", "fp64", "int64", "int32", "int8", "bool"}),
    features=frozenset({"tma", "wgmma", "async_copy", "fp8", "cuda_graphs"}),
    **_COMMON,
)

SM80 = TargetSpec(
    name="nvidia-sm80",
    arch="sm_80",
    description="NVIDIA Ampere (A100)",
    shared_memory_per_block=163 * 1024,
    multiprocessors=108,  # A100 (NVIDIA A100 Tensor Core GPU Architecture whitepaper)
    dtypes=frozenset({"fp32", "fp16", "bf16", "fp64", "int64", "int32", "int8", "bool"}),
    features=frozenset({"async_copy", "cuda_graphs"}),
    **_COMMON,
)

TARGETS = [SM90, SM80]
