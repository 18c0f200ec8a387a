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
from collections.abc import Callable

from flagtree_py.runtime.launch import cdiv, counters, run


class GemmGrid:
    """The launch grid of a GEMM kernel for the tile size its meta-parameters name."""

    def __init__(self, m: int, n: int, split: int = 1) -> None:
        self.m, self.n, self.split = int(m), int(n), int(split)

    def __call__(self, meta: dict) -> tuple[int, ...]:
        tiles = cdiv(self.m, meta["BLOCK_M"]) * cdiv(self.n, meta["BLOCK_N"])
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


def run_gemm(kernel, bucket: str, grid: GemmGrid, *args, **meta) -> None:
    """`run` for GEMM kernels: the tuner (if the loader attached one) may replace the tile."""
    if grid.m <= 0 or grid.n <= 0:
        return
    tuner = getattr(kernel, "tuner", None)
    if tuner is not None:
        meta = tuner.choose(kernel, bucket, grid, args, meta)
    run(kernel, grid(meta), *args, **meta)


def attach_tuner(module, kernel_names: list[str], tuner: GemmTuner) -> None:
    """Give every GEMM kernel of a loaded module the tuner and its candidate tiles."""
    for name in kernel_names:
        candidates = getattr(module, f"{name}_candidates", None)
        if candidates is not None:
            kernel = getattr(module, name)
            kernel.tuner = tuner
            kernel.candidates = candidates
