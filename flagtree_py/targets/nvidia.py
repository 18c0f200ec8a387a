"""NVIDIA Hopper (sm_90: H100/H200) and Ampere (sm_80: A100).

Figures: CUDA C++ Programming Guide, "Compute Capabilities" table (warp size 32, 1024 threads per
block, 64K 32-bit registers per block; shared memory per block up to 227 KB on 9.0 and 163 KB on
8.0 with opt-in). TMA and wgmma are Hopper features (PTX ISA 8.0, sm_90/sm_90a); fp8 needs sm_89+.
"""

from pathlib import Path

from flagtree_py.targets.base import GEMM_TILES, GemmConfig, TargetSpec

_COMMON = dict(
    vendor="nvidia",
    warp_size=32,
    max_threads_per_block=1024,
    registers_per_block=65536,
    triton_language=(3, 6),
    template_dir=str(Path(__file__).parent / "templates" / "nvidia"),  # looped reductions pipelined with cp.async
    source="CUDA C++ Programming Guide, Compute Capabilities (Technical Specifications per CC)",
)

#: Hopper's tiled GEMM loads through TMA (codegen/gemm.py), measured at M=2048 on Qwen3-8B's projections
#: (benchmarks/gemm_hopper_probe.py, gemm_hopper_probe_h100_*.json): one accumulator runs fastest
#: persistent and warp-specialized at 128x256 (qkv 146 us, o_proj 99, down 269; cuBLAS 136, 95, 282);
#: SwiGLU's two keep 128x128, one program per tile (570 us; cuBLAS 593 for the GEMM alone)
_HOPPER_LARGE = (GemmConfig(128, 256, 64, 256, 3, persistent=True, warp_specialize=True),
                 GemmConfig(128, 128, 64, 256, 4), GemmConfig(128, 256, 64, 256, 4, persistent=True),
                 GemmConfig(256, 128, 64, 256, 3), GemmConfig(128, 64, 64, 128, 4))

SM90 = TargetSpec(
    name="nvidia-sm90",
    arch="sm_90",
    description="NVIDIA Hopper (H100, H200)",
    shared_memory_per_block=227 * 1024,
    multiprocessors=132,  # H100 SXM5 and H200 (NVIDIA H100 Tensor Core GPU Architecture whitepaper)
    dtypes=frozenset({"fp32", "fp16", "bf16", "fp8e4m3", "fp8e5m2", "fp64", "int64", "int32", "int8", "bool"}),
    features=frozenset({"tma", "wgmma", "async_copy", "fp8", "cuda_graphs"}),
    gemm_tiles={**GEMM_TILES, "large": _HOPPER_LARGE},
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
