"""Merged projection weights (passes/merge_qkv.py, merge_gate_up.py) without a second copy.

At compile time `colocate` moves the parameters of one merged projection (q, k, v weights) into
consecutive rows of one new buffer and re-points each parameter at its rows (`param.data = view`):
the module keeps its parameters, its state_dict and load_state_dict work (an in-place copy into a
parameter writes the shared buffer), and the merged [q; k; v] weight is a free view of that buffer.
The old storages are freed: weights are held once.

At run time the generated wrapper calls `merged_weight(q, k, v)`. It checks that the parameters
it receives still lie back to back in one storage (a few pointer comparisons): if so it returns the
merged view; if not (the user assigned a new tensor to a weight, moved the module, ...) it
concatenates them again, on every call: always correct, slower, and warned once.
"""

from __future__ import annotations

import warnings

import torch

_warned = False


def are_colocated(parts: list[torch.Tensor]) -> bool:
    """Whether `parts` are contiguous, of one dtype, and back to back in one storage, in order."""
    first = parts[0]
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for part in parts:
        if (part.dtype != first.dtype or not part.is_contiguous() or part.shape[1:] != first.shape[1:]
                or part.untyped_storage().data_ptr() != storage or part.storage_offset() != offset):
            return False
        offset += part.numel()
    return True


def merged_weight(*parts: torch.Tensor) -> torch.Tensor:
    """The parts concatenated along dim 0: a view when they are colocated, else a fresh copy."""
    if are_colocated(parts):
        first = parts[0]
        rows = sum(part.shape[0] for part in parts)
        return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())
    global _warned
    if not _warned:
        _warned = True
        warnings.warn("flagtree: merged projection weights are no longer one buffer (a weight was replaced "
                      "or moved); concatenating them on every call", stacklevel=2)
    return torch.cat(parts)


def colocate(parts: list[torch.Tensor]) -> bool:
    """Re-point `parts` (parameters) at consecutive rows of one new buffer; False if they already are.

    Peak memory: the parts plus one copy of them while copying; afterwards the parts' old
    storages are freed (unless something else still holds them).
    """
    if are_colocated(parts):
        return False
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    # the pipeline runs inside AOTAutograd's fake-tensor mode: these are real tensors
    with torch.no_grad(), unset_fake_temporarily():
        merged = torch.cat([part.detach() for part in parts])
        start = 0
        for part in parts:
            rows = part.shape[0]
            part.data = merged[start:start + rows]
            start += rows
    return True
