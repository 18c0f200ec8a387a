"""runtime/merged_weights.py: parameters moved into one buffer, the merged weight a view of it."""

from __future__ import annotations

import gc
import weakref

import torch
from torch import nn

from flagtree_py.runtime.merged_weights import are_colocated, colocate, merged_weight


def test_colocate_moves_parameters_into_one_buffer_and_frees_the_old_storage():
    parts = [nn.Parameter(torch.randn(n, 4), requires_grad=False) for n in (3, 2, 2)]
    values = [p.detach().clone() for p in parts]
    old = weakref.ref(parts[1].untyped_storage())
    assert not are_colocated(parts)
    assert colocate(parts) and not colocate(parts)  # the second time there is nothing to do
    gc.collect()
    assert old() is None  # no second copy kept
    assert are_colocated(parts) and all(isinstance(p, nn.Parameter) for p in parts)
    assert all(torch.equal(p, v) for p, v in zip(parts, values))
    merged = merged_weight(*parts)
    assert merged.data_ptr() == parts[0].data_ptr() and torch.equal(merged, torch.cat(values))
    parts[2].data.copy_(torch.ones(2, 4))  # an in-place update is seen through the merged view
    assert torch.equal(merged_weight(*parts)[5:], torch.ones(2, 4))


def test_merged_weight_concatenates_when_the_parts_no_longer_alias():
    parts = [torch.randn(3, 4), torch.randn(2, 4)]
    merged = merged_weight(*parts)  # warns once per process; a copy, but the right values
    assert torch.equal(merged, torch.cat(parts)) and merged.data_ptr() != parts[0].data_ptr()
    assert not are_colocated([parts[1], parts[0]])
