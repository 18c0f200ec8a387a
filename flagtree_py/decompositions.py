"""The core aten op set flagtree compiles, and the decompositions that produce it.

Start from PyTorch's core ATen decompositions (the op set `torch.export` targets: ~180 ops),
then:
  * add softmax / log-softmax -> amax, sub, exp, sum, div (so they fuse like any reduction);
  * keep scaled-dot-product attention whole (one extern op on every device; the kernels issue
    replaces it with flagtree's own), instead of the CPU math decomposition.
What remains is lowered by `codegen/lowerings.py` (pointwise, views, reductions) or stays an
extern aten call (GEMMs, attention, scans, sorts, scatters).
"""

from __future__ import annotations

import torch
from torch._decomp import core_aten_decompositions, get_decompositions

aten = torch.ops.aten

_ADDED = [aten._softmax, aten._log_softmax, aten._safe_softmax]
_KEPT_WHOLE = {
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten.scaled_dot_product_attention.default,
}


def flagtree_decompositions() -> dict:
    table = dict(core_aten_decompositions())
    table.update(get_decompositions(_ADDED))
    for op in _KEPT_WHOLE:
        table.pop(op, None)
    return table
