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
    # tile tables (data, not code): pointwise block and the reduction budget per program
    pointwise_block: int = 1024
    pointwise_threads: int = 128
    reduction_elements: int = 4096  # XBLOCK * RBLOCK for a program of a reduction kernel
    persistent_reduction_limit: int = 8192  # largest static row reduced by one block
    looped_rblock: int = 1024
    # the target's own Jinja templates, searched before the generic ones (codegen/templates); its
    # contents are hashed, not its path, so an entry's key is the same wherever flagtree is installed
    template_dir: str | None = field(default=None, compare=False)
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

    def hash(self) -> str:
        fields = asdict(self)
        fields.pop("extra")
        fields["template_dir"] = _directory_digest(self.template_dir)
        fields["dtypes"] = sorted(self.dtypes)
        fields["features"] = sorted(self.features)
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
