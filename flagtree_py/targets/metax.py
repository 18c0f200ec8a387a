"""MetaX C500 (MACA software stack).

Warp size 64: FlagTree's MetaX backend (third_party/metax) compiles with a 64-thread warp.
FlagTree's MetaX backend follows an older Triton (3.0/3.1 language level), so no tensor
descriptors / TMA. No public figure for shared memory per block was found: 64 KB is assumed
(conservative; the common GPGPU LDS size), and 1024 threads per block.
"""

from flagtree_py.targets.base import TargetSpec

C500 = TargetSpec(
    name="metax-c500",
    vendor="metax",
    arch="c500",
    description="MetaX C500 (MACA)",
    warp_size=64,
    max_threads_per_block=1024,
    shared_memory_per_block=64 * 1024,
    registers_per_block=None,
    dtypes=frozenset({"fp32", "fp16", "bf16", "int64", "int32", "int8", "bool"}),
    features=frozenset({"async_copy"}),
    triton_language=(3, 1),
    pointwise_threads=256,
    source="FlagTree third_party/metax backend (warp size 64, Triton 3.0/3.1); shared memory: no public figure, assumed 64 KB",
)

TARGETS = [C500]
