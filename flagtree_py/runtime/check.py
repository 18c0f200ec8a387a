"""Debug mode `check_kernels=True`: every kernel launch is recomputed by its aten fallback and compared.

Each generated kernel has an aten `*_fallback` twin with the same arguments (codegen/group_kernels.py); the
fallback's `writes` attribute names the arguments the kernel stores into. A checked launch runs the
kernel as usual, then runs the fallback on the same inputs but with fresh output buffers, and records
the largest difference per kernel. `flagtree validate` reads these records to name the kernel that is
furthest from aten, which is where a user starts looking when compiled and eager logits disagree.

Two kernels that only make sense together (flash-decoding: step 1 writes per-chunk partial results and
log-sum-exps, step 2 combines them) are checked as a pair: how step 1 splits the work over its scratch is
the kernel's own choice (the aten twin puts everything in chunk 0), so the scratch is not compared; step 1's
twin declares a `pair_reference` (the pair's final output, computed with aten) which step 2's launch, found
through the scratch tensor both read (`pair_scratch`), compares with what it wrote. The pair's error is
recorded under step 1's name; step 2 is also checked alone, against its twin on the same scratch.

Off by default, and free when off: `bind_kernels` creates `CheckedKernel`s only when asked to, so an
unchecked launch runs exactly the code it ran before this mode existed. Inside `checking_new_grids_only()`
a kernel compares only launches whose grid and meta-parameters it has not compared yet (a long greedy
generation re-runs the same launch shapes at every step; `flagtree validate` checks its prompt and final
passes in full and the steps between them this way).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator

import torch

from flagtree_py.runtime.launch import GuardedKernel

#: `on_check(kernel_name, max_abs_error, scale)`: scale is the largest finite |aten value| of the launch
CheckCallback = Callable[[str, float, float], None]

#: the attribute step 1 of a pair leaves on its scratch tensor: (step 1's kernel name, reference outputs)
_PAIR_ATTRIBUTE = "_flagtree_pair_reference"

_NEW_GRIDS_ONLY = False


@contextlib.contextmanager
def checking_new_grids_only() -> Iterator[None]:
    """Within: each kernel compares a launch only when its (grid, meta) is new to it; the others just run."""
    global _NEW_GRIDS_ONLY
    previous, _NEW_GRIDS_ONLY = _NEW_GRIDS_ONLY, True
    try:
        yield
    finally:
        _NEW_GRIDS_ONLY = previous


def _declared(fallback, attribute: str, default=None):
    """An attribute of the fallback, or of the function a `functools.partial` fallback wraps."""
    if hasattr(fallback, attribute):
        return getattr(fallback, attribute)
    if isinstance(fallback, functools.partial):
        return getattr(fallback.func, attribute, default)
    return default


class CheckedKernel(GuardedKernel):
    """A GuardedKernel whose every launch is compared with its aten fallback on fresh outputs."""

    def __init__(self, name: str, kernel, fallback, on_failure=None, interpreted: bool = False,
                 on_check: CheckCallback | None = None, **guard) -> None:
        super().__init__(name, kernel, fallback, on_failure, interpreted, **guard)
        parameters = list(inspect.signature(fallback).parameters)
        self.output_positions = [parameters.index(name) for name in _declared(fallback, "writes", ())]
        scratch = _declared(fallback, "pair_scratch")
        self.scratch_position = parameters.index(scratch) if scratch is not None else None
        reference = _declared(fallback, "pair_reference")
        if reference is not None and isinstance(fallback, functools.partial):  # the same bound keywords
            reference = functools.partial(reference, *fallback.args, **fallback.keywords)
        self.pair_reference = reference
        self.on_check = on_check
        self.checked_launches: set = set()

    def launch(self, grid, args, meta) -> None:
        super().launch(grid, args, meta)
        if self.failed is not None:
            return  # the fallback itself produced the outputs: nothing to compare
        if self.scratch_position is not None and self.pair_reference is None:
            self._compare_with_pair(args)  # step 2: whenever step 1 left its reference
        if _NEW_GRIDS_ONLY:
            shape = (tuple(grid), tuple(sorted(meta.items())))
            if shape in self.checked_launches:
                return
            self.checked_launches.add(shape)
        if self.pair_reference is not None:  # step 1 of a pair: leave the expected final output for step 2
            setattr(args[self.scratch_position], _PAIR_ATTRIBUTE, (self.name, self.pair_reference(*args)))
        if self.output_positions:
            self._compare_with_fallback(args)

    def _compare_with_fallback(self, args) -> None:
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

    def _compare_with_pair(self, args) -> None:
        """Step 2: the pair's output against the aten reference step 1 left on the scratch both read."""
        scratch = args[self.scratch_position]
        pair = getattr(scratch, _PAIR_ATTRIBUTE, None)
        if pair is None:
            return  # step 1 ran its fallback, or was not compared (checking_new_grids_only)
        delattr(scratch, _PAIR_ATTRIBUTE)
        first, reference = pair
        if len(self.output_positions) != 1:
            raise ValueError(f"{self.name}: a pair's second kernel must write one output, not {self.output_positions}")
        error, scale = compare_outputs(args[self.output_positions[0]], reference)
        if self.on_check is not None:
            self.on_check(first, error, scale)


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
