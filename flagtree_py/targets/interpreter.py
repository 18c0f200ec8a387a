"""Triton's interpreter on any CPU: correctness, not speed.

Each program instance is a Python-level step over numpy arrays, so large blocks run fastest.
"""

from flagtree_py.targets.base import GemmConfig, TargetSpec

INTERPRETER = TargetSpec(
    name="interpreter",
    vendor="interpreter",
    arch="cpu",
    description="Triton interpreter (CPU, numpy)",
    warp_size=32,
    max_threads_per_block=1024,
    shared_memory_per_block=1 << 30,
    registers_per_block=None,
    dtypes=frozenset({"fp32", "fp16", "fp64", "int64", "int32", "int8", "bool"}),
    features=frozenset(),
    triton_language=(3, 6),
    # the interpreter's tl.dot multiplies bf16 operands as raw integers (Triton 3.9): widen them
    dot_dtypes=frozenset({"fp32", "fp16"}),
    pointwise_block=8192,
    reduction_elements=65536,
    persistent_reduction_limit=16384,
    looped_rblock=4096,
    # each program is a Python-level step: wide tiles run tiny models fastest (a third less time for a
    # 64-token qwen3 validate than 16x32 tiles); the second tile of each bucket is small, so odd sizes
    # still cross tile edges where the tests ask for it (autotuning, explicit tiles)
    gemm_tiles={
        "m16": (GemmConfig(16, 64, 32, 128, 1, 2), GemmConfig(16, 16, 16, 128, 1, 3)),
        "m128": (GemmConfig(32, 64, 32, 128, 1), GemmConfig(32, 16, 16, 128, 1)),
        "large": (GemmConfig(64, 64, 32, 128, 1), GemmConfig(32, 32, 16, 128, 1)),
    },
    # MoE: small blocks so that tiny tests cross block and sort-program edges
    moe_tiles={"small": (GemmConfig(16, 16, 16, 128, 1),), "large": (GemmConfig(32, 32, 32, 128, 1),),
               "sort_elements": 64},
    source="no hardware: Triton's interpreter (TRITON_INTERPRET)",
)

TARGETS = [INTERPRETER]
