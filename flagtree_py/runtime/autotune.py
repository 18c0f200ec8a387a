"""GEMM launches: a grid that follows the tile size, and the optional per-bucket autotuner.

A GEMM kernel's launch parameters come from the target's tile table (the heuristic, first in
the list). With autotuning on, the first call in each M bucket times every candidate tile once
within a time budget and keeps the fastest: the winner per (kernel, bucket) is reused for the
rest of the process and, through `on_winner`, stored in the compiled graph's cache entry so a
later process that hits that entry starts from it and tunes nothing.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable

from flagtree_py.runtime import launch
from flagtree_py.runtime.launch import cdiv, counters, run


class GemmGrid:
    """The launch grid of a GEMM kernel for the tile size its meta-parameters name."""

    def __init__(self, m: int, n: int, split: int = 1) -> None:
        self.m, self.n, self.split = int(m), int(n), int(split)

    def __call__(self, meta: dict) -> tuple[int, ...]:
        tiles = cdiv(self.m, meta["BLOCK_M"]) * cdiv(self.n, meta["BLOCK_N"])
        if meta.get("NUM_SMS"):  # persistent: at most one program per multiprocessor, each walking tiles
            tiles = min(tiles, meta["NUM_SMS"])
        return (tiles, self.split) if self.split > 1 else (tiles,)


class GemmTuner:
    """Chooses launch parameters per (kernel, M bucket); tunes only when `enabled`."""

    def __init__(self, enabled: bool, budget_s: float, winners: dict | None = None,
                 on_winner: Callable[[dict], None] | None = None, repeats: int = 3) -> None:
        self.enabled = enabled
        self.budget_s = budget_s
        self.winners: dict[str, dict] = dict(winners or {})  # "kernel/bucket" -> launch parameters
        self.on_winner = on_winner
        self.repeats = repeats

    def choose(self, kernel, bucket: str, grid: GemmGrid, args: tuple, meta: dict) -> dict:
        key = f"{kernel.name}/{bucket}"
        if key in self.winners:
            return {**meta, **self.winners[key]}
        candidates = (kernel.candidates or {}).get(bucket, [])
        if not self.enabled or kernel.failed is not None or len(candidates) < 2:
            return meta
        deadline = time.perf_counter() + self.budget_s
        timed = []
        for candidate in candidates:
            launch = {**meta, **candidate}
            try:
                timed.append((self._time(kernel, grid(launch), args, launch), len(timed), candidate))
            except Exception:  # noqa: BLE001  a tile this chip cannot run (resources): not a candidate
                counters["autotune_rejected"] += 1
            if time.perf_counter() > deadline:
                break
        if not timed:
            return meta
        winner = min(timed)[2]
        counters["autotune_tuned"] += 1
        self.winners[key] = dict(winner)
        if self.on_winner is not None:
            self.on_winner(dict(self.winners))
        return {**meta, **winner}

    def _time(self, kernel, grid: tuple, args: tuple, meta: dict) -> float:
        import torch

        cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
        kernel.launch_unguarded(grid, args, meta)  # compile (and warm) outside the timing
        samples = []
        for _ in range(self.repeats):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                kernel.launch_unguarded(grid, args, meta)
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            else:
                begin = time.perf_counter()
                kernel.launch_unguarded(grid, args, meta)
                samples.append(time.perf_counter() - begin)
        return statistics.median(samples)


def run_gemm(kernel, bucket: str, grid: GemmGrid, *args, tma: tuple = (), **meta) -> None:
    """`run` for GEMM kernels: the tuner (if the loader attached one) may replace the tile.

    `tma`: the operand buffers a kernel reads through tensor descriptors. TMA needs 16-byte aligned
    base addresses, which only a call can tell (a view may start anywhere): a call with one that is
    not runs the kernel's aten twin, with a warning once per kernel.
    """
    if grid.m <= 0 or grid.n <= 0:
        return
    if tma and not launch.dry_running():
        if any(buffer.data_ptr() % 16 for buffer in tma):
            counters["gemm_unaligned_calls"] += 1
            if not getattr(kernel, "warned_unaligned", False):
                kernel.warned_unaligned = True
                warnings.warn(f"flagtree: {kernel.name} got an operand not 16-byte aligned, which its tensor "
                              "descriptors cannot read; such calls run its aten fallback", stacklevel=2)
            kernel.fallback(*args)
            return
        ensure_scratch_allocator()
    tuner = getattr(kernel, "tuner", None)
    if tuner is not None:
        meta = tuner.choose(kernel, bucket, grid, args, meta)
    run(kernel, grid(meta), *args, **meta)


def ensure_scratch_allocator() -> None:
    """Device-side tensor descriptors live in a global scratch buffer that Triton's launcher asks its
    allocator for. Triton's allocator is per context (a new thread starts with none): give this one
    torch's, unless the user set their own."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        import triton

        triton.set_allocator(_torch_scratch)


def _torch_scratch(size: int, alignment: int, stream):
    import torch

    # torch's caching allocator aligns to 512 bytes, beyond what descriptors need (128); under CUDA graph
    # capture the buffer comes from the graph's pool
    return torch.empty(size, dtype=torch.int8, device="cuda")


def attach_tuner(module, kernel_names: list[str], tuner: GemmTuner) -> None:
    """Give every GEMM kernel of a loaded module the tuner and its candidate tiles."""
    for name in kernel_names:
        candidates = getattr(module, f"{name}_candidates", None)
        if candidates is not None:
            kernel = getattr(module, name)
            kernel.tuner = tuner
            kernel.candidates = candidates
