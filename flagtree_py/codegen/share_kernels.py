"""One kernel for every fusion group of the same structure (the same kernel in each decoder layer).

A 36-layer model has 36 RMSNorm groups, 36 q/k/v GEMM groups...: groups whose generated Triton source is
identical but for the kernel's name. Lowering, rendering, `check_kernel`, the module import, and on a GPU
the Triton compile would each be paid 36 times. Instead the writer lowers a group once per
*structural key* and later groups of the same key launch the first group's kernel with their own
buffers.

The key is what the lowering reads, with node names left out: walking back from the group's stored
values through what the kernel computes (its members, and the views folded into its indexing) to what
it loads (the leaves), each node contributes its op, its arguments (other nodes as positions in the
walk), its fake value's shape, strides, dtype and device (size symbols by name: `s0` is the same symbol
in every layer), its kind, and whether it is stored (and how), materialized or a member. The relative
graph order of the loaded nodes is in it too: it numbers the kernel's pointer arguments. Two groups
with equal keys lower to the same source up to node names, which appear only in comments, in the aten
fallback's local variables and in the wrapper's launch lines; a later group's launch lines are the first
group's, with its node names replaced by the corresponding nodes' (`rename_identifiers`).

tests/codegen/test_dedup.py checks that claim on whole models: every shared kernel's source equals, up
to names and comments, what lowering the group on its own gives.
"""

from __future__ import annotations

import math
import re

import torch
import torch.fx

from flagtree_py.codegen import indexing


def group_signature(group, kinds: dict, buffers: dict, emitted_symbolic: set,
                    values: dict | None = None) -> tuple[tuple, list[torch.fx.Node]]:
    """(the structural key of `group`, the nodes it visited in walk order): groups of equal keys lower
    to the same kernel; their visited nodes correspond position by position. `values`: node -> `_value` of
    its fake value, kept across the groups of one module (a node is read by several groups)."""
    values = {} if values is None else values
    index: dict[torch.fx.Node, int] = {}
    order: list[torch.fx.Node] = []
    described: list[tuple] = []
    roots = [node for node, _ in group.stores()] + ([group.gemm] if group.gemm is not None else [])
    roots += group.ordered_members()
    stack = list(reversed(roots))
    while stack:  # depth first, arguments in order: equal structures number their nodes alike
        node = stack.pop()
        if node in index:
            continue
        index[node] = len(order)
        order.append(node)
        if node in group.members or kinds.get(node) == "view":
            stack.extend(reversed(node.all_input_nodes))
    for node in order:
        if node not in values:
            values[node] = _value(node.meta.get("val"))
        common = (values[node], node in buffers, node in emitted_symbolic)
        if node in group.members or kinds.get(node) == "view":
            described.append(("computed", _target(node.target), _argument(node.args, index),
                              _argument(dict(node.kwargs), index), kinds.get(node), group.stored.get(node),
                              node is group.gemm, node in group.members, *common))
        else:  # a loaded value: what made it (a GEMM, an extern, a reduction...) changes no load
            described.append(("loaded", kinds.get(node) == "symbolic", *common))
    # the graph order of what it loads numbers the kernel's pointer arguments (computed nodes are ordered by
    # their data dependences alone: their graph order only orders the aten fallback's lines, any order of a
    # topological sort computing the same)
    loaded = [n for n in order if not (n in group.members or kinds.get(n) == "view")]
    graph_order = tuple(index[n] for n in sorted(loaded, key=lambda n: n.meta.get("_order", 0)))
    shape = tuple(indexing.size_text(s) for s in group.full_shape)
    return (shape, tuple(group.rdims), tuple(described), graph_order), order


#: a name that is neither an attribute (`torch.empty`) nor a keyword (`dtype=`; wrapper lines write keywords
#: with no space, assignments with spaces)
_IDENTIFIER = re.compile(r"(?<![\w.])[A-Za-z_]\w*(?!\w)(?!=[^=])")


def rename_identifiers(line: str, names: dict[str, str]) -> str:
    """`line` (wrapper code) with each identifier in `names` replaced; attribute names (`torch.empty`)
    and keyword names (`dtype=`) are left alone."""
    if not names:
        return line
    return _IDENTIFIER.sub(lambda m: names.get(m.group(), m.group()), line)


def _target(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"


def _value(val) -> tuple:
    """What code generation reads of a node's fake value."""
    if isinstance(val, torch.Tensor):
        size_text = indexing.size_text
        return ("tensor", tuple(map(size_text, val.shape)), tuple(map(size_text, val.stride())), str(val.dtype),
                str(val.device), size_text(val.storage_offset()))
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("symbolic", type(val).__name__, str(val.node.expr))
    if isinstance(val, (list, tuple)):
        return ("sequence", tuple(_value(v) for v in val))
    return ("other", type(val).__name__, _scalar(val))


def _scalar(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return repr(value)


def _argument(value, index: dict) -> tuple | str:
    if isinstance(value, torch.fx.Node):
        return ("node", index.get(value, -1))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_argument(v, index) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _argument(v, index)) for k, v in value.items()))
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("symbolic", str(value.node.expr))
    if isinstance(value, torch._ops.OpOverload):
        return ("op", str(value))
    return (type(value).__name__, _scalar(value))
