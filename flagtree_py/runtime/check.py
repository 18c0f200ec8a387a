"""Debug mode `check_kernels=True`: every kernel launch is recomputed by its aten fallback and compared.

Each generated kernel has an aten `*_fallback` twin with the same arguments (codegen/wrapper.py); the
fallback's `writes` attribute names the arguments the kernel stores into. A checked launch runs the
kernel as usual, then runs the fallback on the same inputs but with fresh output buffers, and records
the largest difference per kernel. `flagtree validate` reads these records to name the kernel that is
furthest from aten, which is where a user starts looking when compiled and eager logits disagree.

Off by default, and free when off: `bind_kernels` creates `CheckedKernel`s only when asked to, so an
unchecked launch runs exactly the code it ran before this mode existed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from flagtree_py.runtime.launch import GuardedKernel

#: `on_check(kernel_name, max_abs_error, scale)`: scale is the largest finite |aten value| of the launch
CheckCallback = Callable[[str, float, float], None]


class CheckedKernel(GuardedKernel):
    """A GuardedKernel whose every launch is compared with its aten fallback on fresh outputs."""

    def __init__(self, name: str, kernel, fallback, on_failure=None, interpreted: bool = False,
                 on_check: CheckCallback | None = None, **guard) -> None:
        super().__init__(name, kernel, fallback, on_failure, interpreted, **guard)
        parameters = list(inspect.signature(fallback).parameters)
        self.output_positions = [parameters.index(name) for name in getattr(fallback, "writes", ())]
        self.on_check = on_check

    def launch(self, grid, args, meta) -> None:
        super().launch(grid, args, meta)
        if self.failed is not None or not self.output_positions:
            return  # the fallback itself produced the outputs: nothing to compare
        reference_args = list(args)
        for position in self.output_positions:
            out = args[position]
            reference_args[position] = torch.empty_strided(out.size(), out.stride(), dtype=out.dtype, device=out.device)
        self.fallback(*reference_args)
        worst, scale = 0.0, 0.0
        for position in self.output_positions:
            error, magnitude = compare_outputs(args[position], reference_args[position])
            worst, scale = max(worst, error), max(scale, magnitude)
        if self.on_check is not None:
            self.on_check(self.name, worst, scale)


def compare_outputs(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max |got - want|, max finite |want|). A NaN or inf where aten has a different value is an infinite
    error; the same non-finite value in both is agreement (masked softmax rows, -inf attention biases)."""
    if not got.dtype.is_floating_point:  # indices, masks: exact or wrong
        return (float("inf") if (got != want).any().item() else 0.0), 1.0
    got, want = got.double(), want.double()
    same = (got == want) | (got.isnan() & want.isnan())
    finite = want.isfinite()
    if (~same & ~(finite & got.isfinite())).any().item():
        return float("inf"), _finite_max(want)
    difference = torch.where(same, torch.zeros_like(got), (got - want).abs())
    return (difference.max().item() if difference.numel() else 0.0), _finite_max(want)


def _finite_max(values: torch.Tensor) -> float:
    finite = values[values.isfinite()]
    return finite.abs().max().item() if finite.numel() else 0.0


class KernelErrors:
    """Collects the checks of one compiled graph into `record["kernel_errors"]`: per kernel, the number of
    checked launches, the largest absolute error, and that error relative to the largest aten magnitude."""

    def __init__(self, record: dict) -> None:
        self.errors = record.setdefault("kernel_errors", {})

    def __call__(self, kernel: str, error: float, scale: float) -> None:
        entry = self.errors.setdefault(kernel, {"launches": 0, "max_abs_error": 0.0, "max_rel_error": 0.0})
        entry["launches"] += 1
        entry["max_abs_error"] = max(entry["max_abs_error"], error)
        relative = error / scale if scale > 0 else (0.0 if error == 0 else float("inf"))
        entry["max_rel_error"] = max(entry["max_rel_error"], relative)
