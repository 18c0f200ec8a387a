"""What a target chip offers, as data: the one thing lowering asks about hardware.

A target never drives code generation; codegen asks it for tile sizes and warps and checks its
limits. Vendors override only the numbers that differ (see the per-vendor modules).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path


@dataclass(frozen=True)
class TileConfig:
    """Launch shape of one kernel: block sizes, threads (not warps) and pipelining depth."""

    XBLOCK: int
    RBLOCK: int = 1
    threads: int = 128
    num_stages: int = 1


@dataclass(frozen=True)
class GemmConfig:
    """One GEMM tile: a program computes BLOCK_M x BLOCK_N of the output, BLOCK_K at a time.

    SPLIT_K > 1 is the decode (few rows) form: K is cut into SPLIT_K slices whose partial sums
    a second kernel adds in a fixed order (deterministic, unlike atomics).

    On targets with TMA, the large bucket's kernel loads through tensor descriptors where the operands'
    layout allows it (codegen/gemm_spec.py decides, codegen/gemm.py launches `<name>_tma`); there
    `persistent` runs one program per multiprocessor walking the tiles, and `warp_specialize` asks
    Triton to split those programs into loading and computing warps. Elsewhere both are ignored.
    """

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    threads: int = 128
    num_stages: int = 3
    SPLIT_K: int = 1
    persistent: bool = False
    warp_specialize: bool = False

    def shared_memory_bytes(self, element_bytes: int, accumulators: int) -> int:
        """Operand tiles held in shared memory across the software pipeline's stages."""
        tile = self.BLOCK_M * self.BLOCK_K + accumulators * self.BLOCK_K * self.BLOCK_N
        return tile * element_bytes * max(1, self.num_stages)


#: M buckets of the GEMM template, chosen per call by the wrapper: decode (split-K), small, large
GEMM_BUCKETS = (("m16", 16), ("m128", 128), ("large", None))

GEMM_TILES = {
    # decode: BLOCK_M=16 is tl.dot's smallest M; split-K gives the few rows enough programs (the
    # target's `decode_split` may choose SPLIT_K from its multiprocessors). Order: the H100 sweep's
    # best over Qwen3-8B's four projections first (benchmarks/results/gemm_tiles_sweep_h100_*.json)
    "m16": (GemmConfig(16, 64, 128, 128, 4, 4), GemmConfig(16, 128, 128, 128, 4, 4),
            GemmConfig(16, 32, 256, 128, 4, 1), GemmConfig(16, 64, 64, 128, 4, 4)),
    "m128": (GemmConfig(64, 64, 128, 256, 4), GemmConfig(32, 64, 128, 128, 4), GemmConfig(64, 128, 128, 256, 4),
             GemmConfig(64, 64, 64, 128, 4), GemmConfig(128, 64, 64, 256, 3)),
    # prefill: 128x256 is fastest for one accumulator; SwiGLU's two would spill (gemm_candidates
    # drops it) and take 128x128, their best (gemm_tiles_sweep_large_h100_*.json)
    "large": (GemmConfig(128, 256, 64, 256, 3), GemmConfig(128, 128, 64, 256, 3), GemmConfig(64, 128, 64, 128, 4),
              GemmConfig(128, 64, 64, 128, 4), GemmConfig(128, 128, 32, 256, 4)),
}

#: fused MoE experts (codegen/moe_experts.py): grouped-GEMM tiles per bucket, best first ("small": few
#: pairs per expert, decode; "large": prefill), shared by the gate/up GEMM (two B tiles) and the down GEMM;
#: BLOCK_M is also the row padding of each expert's segment. "sort_elements": the one-hot tile
#: (pairs x experts) of one sort program. "small" tiles are 16 rows (tl.dot's smallest) and narrow in N, in
#: the spirit of vLLM's fused_moe defaults for few tokens: a decode step has one row block per chosen expert,
#: and narrow N gives those few blocks enough programs to stream the experts' weights. Not yet tuned on a GPU.
_MOE_TILES = {
    "small": (GemmConfig(16, 32, 64, 128, 4), GemmConfig(16, 64, 128, 128, 3), GemmConfig(16, 32, 32, 128, 2)),
    "large": (GemmConfig(64, 128, 64, 256, 3), GemmConfig(64, 64, 64, 128, 3), GemmConfig(32, 64, 32, 128, 2)),
    "sort_elements": 8192,
}


@dataclass(frozen=True)
class TargetSpec:
    name: str  # unique: "nvidia-sm90", "metax-c500", ...
    vendor: str  # "nvidia" | "metax" | "iluvatar" | "interpreter" | a plugin's own
    arch: str
    description: str
    warp_size: int
    max_threads_per_block: int
    shared_memory_per_block: int  # bytes a block may use (opt-in maximum)
    registers_per_block: int | None
    dtypes: frozenset[str]
    features: frozenset[str]  # "tma", "wgmma", "async_copy", "fp8", ...
    triton_language: tuple[int, int]  # newest Triton language level its compiler accepts
    # operand dtypes tl.dot multiplies as they are; others are widened to fp32 in the kernel
    dot_dtypes: frozenset[str] = frozenset({"fp32", "fp16", "bf16"})
    # tile tables (data, not code): pointwise block and the reduction budget per program
    pointwise_block: int = 1024
    pointwise_threads: int = 128
    reduction_elements: int = 4096  # XBLOCK * RBLOCK for a program of a reduction kernel
    persistent_reduction_limit: int = 8192  # largest static row reduced by one block
    looped_rblock: int = 1024
    # the target's own Jinja templates, searched before the generic ones (codegen/templates); its
    # contents are hashed, not its path, so an entry's key is the same wherever flagtree is installed
    template_dir: str | None = field(default=None, compare=False)
    # GEMM template tiles per M bucket, best guess first (the heuristic config without autotuning)
    gemm_tiles: dict = field(default_factory=lambda: dict(GEMM_TILES))
    # streaming multiprocessors (compute units): decode GEMMs split K until about two programs run
    # on each; None (no public figure) keeps the tile table's SPLIT_K
    multiprocessors: int | None = None
    moe_tiles: dict = field(default_factory=lambda: dict(_MOE_TILES))  # fused MoE experts (see _MOE_TILES)
    source: str = ""  # where the figures come from
    toolchain: str = ""  # e.g. "triton-3.6.0"; part of the hash
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def num_warps(self, threads: int) -> int:
        """Threads -> warps in units of *this* target's warp size (64 on MetaX and Iluvatar)."""
        threads = min(threads, self.max_threads_per_block)
        return max(1, threads // self.warp_size)

    def pointwise_config(self, numel_hint: int | None) -> TileConfig:
        block = self.pointwise_block
        if numel_hint is not None:
            block = max(16, min(block, _next_power_of_2(numel_hint)))
        threads = min(self.pointwise_threads, max(self.warp_size, block // 4))
        return TileConfig(XBLOCK=block, threads=threads)

    def reduction_config(self, rnumel: int | None, persistent: bool) -> TileConfig:
        if persistent and rnumel is not None:
            rblock = max(2, _next_power_of_2(rnumel))
            xblock = max(1, min(64, self.reduction_elements // rblock))
        else:
            rblock = self.looped_rblock
            xblock = max(1, self.reduction_elements // rblock)
        threads = min(self.max_threads_per_block, max(self.warp_size, (xblock * rblock) // 8))
        threads = min(threads, 8 * self.warp_size if self.warp_size == 32 else 4 * self.warp_size)
        return TileConfig(XBLOCK=xblock, RBLOCK=rblock, threads=_floor_power_of_2(threads))

    def safer_config(self, tile: TileConfig, row_split: bool = False) -> TileConfig | None:
        """The next smaller launch shape after `tile` from this target's tables, or None at the
        smallest: fewer pipeline stages first, then half the rows, then (a looped reduction, which
        may split its row: `row_split`) half the row chunk, then half the threads."""
        if tile.num_stages > 1:
            return replace(tile, num_stages=tile.num_stages - 1)
        if tile.XBLOCK > 1:
            return replace(tile, XBLOCK=tile.XBLOCK // 2, threads=max(self.warp_size, tile.threads // 2))
        if row_split and tile.RBLOCK > self.warp_size:
            return replace(tile, RBLOCK=tile.RBLOCK // 2, threads=max(self.warp_size, tile.threads // 2))
        if tile.threads > self.warp_size:
            return replace(tile, threads=tile.threads // 2)
        return None
    def decode_split(self, tile: GemmConfig, n: int | None, k: int) -> int:
        """SPLIT_K of a decode GEMM with `n` output columns (per accumulator) and depth `k`.

        Few rows leave one program per BLOCK_N columns, too few to stream the weights at full
        bandwidth when N is small: K is split until about two programs run per multiprocessor
        (rounded down to a power of two, measured best on the H100: o_proj and down at N=4096
        split 4, gate_up's 12288 columns not at all), and never into more slices than K has blocks.
        """
        split = tile.SPLIT_K
        if self.multiprocessors is not None and n is not None:
            wanted = -(-2 * self.multiprocessors // -(-n // tile.BLOCK_N))
            split = min(16, _floor_power_of_2(wanted))
        return max(1, min(split, -(-k // tile.BLOCK_K)))

    def fit_gemm_tile(self, tile: GemmConfig, element_bytes: int, accumulators: int) -> GemmConfig | None:
        """`tile` with as many pipeline stages as the shared memory holds (64 KB chips keep fewer);
        None when one stage never fits, it needs too many threads, or its fp32 accumulators would take
        more than half the register file (they spill)."""
        stages = tile.num_stages
        while stages > 1 and replace(tile, num_stages=stages).shared_memory_bytes(
                element_bytes, accumulators) > self.shared_memory_per_block:
            stages -= 1
        fitted = replace(tile, num_stages=stages)
        registers = accumulators * tile.BLOCK_M * tile.BLOCK_N
        if self.registers_per_block is not None and registers > self.registers_per_block // 2:
            return None
        if (fitted.shared_memory_bytes(element_bytes, accumulators) > self.shared_memory_per_block
                or tile.threads > self.max_threads_per_block):
            return None
        return fitted

    def gemm_candidates(self, bucket: str, element_bytes: int, accumulators: int) -> list[GemmConfig]:
        """The bucket's tiles on this target: a tile whose pipeline does not fit the shared memory
        keeps fewer stages (64 KB chips), one that never fits, needs too many threads or holds
        too many accumulators for the registers is dropped; never none (a small tile that fits any chip closes an empty list)."""
        found: list[GemmConfig] = []
        for tile in self.gemm_tiles[bucket]:
            fitted = self.fit_gemm_tile(tile, element_bytes, accumulators)
            if fitted is not None and fitted not in found:
                found.append(fitted)
        smallest = self.gemm_tiles[bucket][-1]
        return found or [GemmConfig(16, 32, 32, 2 * self.warp_size, 1, smallest.SPLIT_K)]

    def hash(self) -> str:
        fields = asdict(self)
        fields.pop("extra")
        fields["template_dir"] = _directory_digest(self.template_dir)
        fields["dtypes"] = sorted(self.dtypes)
        fields["features"] = sorted(self.features)
        fields["dot_dtypes"] = sorted(self.dot_dtypes)
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _floor_power_of_2(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def _directory_digest(directory: str | None) -> str | None:
    """A hash of the names and contents of a template directory's files (None: no directory)."""
    if directory is None:
        return None
    digest = hashlib.sha256()
    root = Path(directory)
    for path in sorted(root.rglob("*.jinja")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
