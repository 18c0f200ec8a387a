"""Iluvatar CoreX BI-V150 / MR-V100 (ivcore).

Warp size 64: FlagTree's Iluvatar backend (third_party/iluvatar) uses 64-thread warps. It follows
Triton 3.1 (no tensor descriptors / TMA). No public per-block shared-memory figure was found:
64 KB is assumed (conservative), 1024 threads per block.
"""

from flagtree_py.targets.base import TargetSpec

BI_V150 = TargetSpec(
    name="iluvatar-bi150",
    vendor="iluvatar",
    arch="ivcore11",
    description="Iluvatar CoreX BI-V150 / MR-V100",
    warp_size=64,
    max_threads_per_block=1024,
    shared_memory_per_block=64 * 1024,
    registers_per_block=None,
    dtypes=frozenset({"fp32", "fp16", "bf16", "int64", "int32", "int8", "bool"}),
    features=frozenset(),
    triton_language=(3, 1),
    pointwise_threads=256,
    source="FlagTree third_party/iluvatar backend (warp size 64, Triton 3.1); shared memory: no public figure, assumed 64 KB",
)

TARGETS = [BI_V150]
