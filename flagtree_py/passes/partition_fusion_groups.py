"""Group the lowerable nodes of an aten graph into fusion groups, one Triton kernel each.

Nodes are visited from the outputs backwards. A pointwise or reduction node whose value is used
only inside one group joins that group and is computed there, never stored (vertical fusion:
the chain of pointwise producers is inlined into its consumer). A node used by several groups,
by an extern op or by the graph output is stored: it joins one of its consumer groups as an
extra output when its shape fits that group's iteration space (the residual sum stored by the
norm kernel that reads it), else it starts a group of its own. Groups are vertices of a
networkx DAG together with the extern ops; a merge that would close a cycle is refused.

A GEMM the template takes (`gemm_templates`) is a group's anchor: it joins the pointwise group
that consumes all of its output (the epilogue: bias, residual add, activation, silu(gate) * up
over the two halves of a merged projection), or else starts a group of its own that stores it.
Its operands are always materialized: a GEMM group takes no producers.

A group iterates over `full_shape`; `rdims` are the dimensions its reductions reduce (empty for
a pointwise group). A stored node is a "full" member (shape == full_shape) or an "outer" member
(the reduced shape, with or without the reduced dims kept as 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import sympy
import torch
import torch.fx

from flagtree_py.codegen import indexing
from flagtree_py.codegen.gemm_spec import gemm_operands
from flagtree_py.codegen.lowerings import classify, reduction_dims


@dataclass(eq=False)
class FusionGroup:
    id: int
    full_shape: tuple[sympy.Expr, ...]
    rdims: tuple[int, ...] = ()
    members: set = field(default_factory=set)  # every node computed in the kernel
    stored: dict = field(default_factory=dict)  # node -> "full" | "outer"
    reductions: list = field(default_factory=list)
    gemm: torch.fx.Node | None = None  # the mm/addmm this group's kernel is a GEMM template for

    def stores(self) -> list[tuple[torch.fx.Node, str]]:
        return sorted(self.stored.items(), key=lambda item: _order(item[0]))

    def ordered_members(self) -> list[torch.fx.Node]:
        return sorted(self.members, key=_order)

    def outer_shapes(self) -> tuple[tuple, tuple]:
        keep = tuple(sympy.Integer(1) if d in self.rdims else s for d, s in enumerate(self.full_shape))
        drop = tuple(s for d, s in enumerate(self.full_shape) if d not in self.rdims)
        return keep, drop

    def role_of_shape(self, shape: tuple) -> str | None:
        if tuple(shape) == tuple(self.full_shape):
            return "full"
        if self.rdims and tuple(shape) in self.outer_shapes():
            return "outer"
        return None

    @property
    def name(self) -> str:
        ops = []
        for node in self.ordered_members():
            op = getattr(node.target, "__name__", str(node.target)).split(".")[0].lstrip("_")
            if kinds_cache.get(node) in ("pointwise", "reduction", "gemm") and op not in ops:
                ops.append(op)
        label = "_".join(ops[:4]) or "copy"
        return f"k{self.id}_{label}"


kinds_cache: dict = {}


def _order(node: torch.fx.Node) -> int:
    return node.meta.get("_order", 0)


@dataclass
class Partition:
    groups: list[FusionGroup]
    kinds: dict  # node -> "placeholder" | "constant" | "pointwise" | "view" | "reduction" | "gemm" | "extern" | "symbolic" | "output"
    group_of: dict  # node -> FusionGroup (members only)
    dag: nx.DiGraph


def shape(node: torch.fx.Node) -> tuple:
    return indexing.shape_of(node.meta["val"].shape)


def partition_fusion_groups(graph: torch.fx.Graph, device_type: str, gemm_templates: bool = True) -> Partition:
    """Partition for kernels that run on `device_type` ("cuda", or "cpu" for the interpreter);
    with `gemm_templates`, GEMMs become template groups instead of extern aten calls."""
    nodes = list(graph.nodes)
    for position, node in enumerate(nodes):
        node.meta["_order"] = position
    kinds = {}
    for node in nodes:
        if node.op == "placeholder":
            kinds[node] = "placeholder"
        elif node.op == "get_attr":
            kinds[node] = "constant"
        elif node.op == "output":
            kinds[node] = "output"
        elif node.op == "call_function":
            kinds[node] = classify(node)
            val = node.meta.get("val")
            if kinds[node] != "symbolic" and isinstance(val, torch.Tensor) and val.device.type != device_type:
                kinds[node] = "extern"  # e.g. a 0-dim CPU tensor in a CUDA graph: stays aten
        else:
            kinds[node] = "extern"
    if gemm_templates:
        for node in nodes:
            if kinds[node] == "extern" and node.op == "call_function" and gemm_operands(node, kinds) is not None:
                kinds[node] = "gemm"
    kinds_cache.clear()
    kinds_cache.update(kinds)

    groups: list[FusionGroup] = []
    group_of: dict = {}
    dag = nx.DiGraph()

    def vertex(node):
        return group_of.get(node, node)

    def effective_users(node):
        """Users reached through view chains: the consumers that actually read the data."""
        found, stack = [], list(node.users)
        while stack:
            user = stack.pop()
            if kinds[user] == "view":
                stack.extend(user.users)
            else:
                found.append(user)
        return found

    def closes_cycle(group, targets) -> bool:
        return any(t is not group and t in dag and group in dag and nx.has_path(dag, t, group) for t in targets)

    def link(source, node_users):
        dag.add_node(source)
        for user in node_users:
            target = vertex(user)
            if target is not source and kinds[user] != "output":
                dag.add_edge(source, target)

    for node in reversed(nodes):
        kind = kinds[node]
        if kind in ("extern",):
            link(node, effective_users(node))
            continue
        if kind == "gemm":
            users = effective_users(node)
            consumer_groups = {group_of[u] for u in users if u in group_of}
            external = any(u not in group_of for u in users) or not users
            group = next(iter(consumer_groups)) if len(consumer_groups) == 1 and not external else None
            if group is None or not _epilogue_fits(node, group):
                group = FusionGroup(len(groups), shape(node))
                groups.append(group)
                group.stored[node] = "full"
            group.gemm = node
            group.members.add(node)
            group_of[node] = group
            link(group, users)
            continue
        if kind not in ("pointwise", "reduction"):
            continue
        users = effective_users(node)
        consumer_groups = {group_of[u] for u in users if u in group_of}
        external = any(u not in group_of for u in users) or not users
        targets = {vertex(u) for u in users if kinds[u] != "output"}

        if not external and len(consumer_groups) == 1:
            group = next(iter(consumer_groups))
            if _fits_internal(node, kind, group) and not closes_cycle(group, targets - {group}):
                _add(node, kind, group, group_of, stored_role=None)
                link(group, users)
                continue
        placed = False
        for group in sorted(consumer_groups, key=lambda g: g.id):
            role = _fits_stored(node, kind, group)
            if role and not closes_cycle(group, targets - {group}):
                _add(node, kind, group, group_of, stored_role=role)
                link(group, users)
                placed = True
                break
        if placed:
            continue
        group = _new_group(node, kind, len(groups))
        role = _fits_stored(node, kind, group)
        if role is None:
            raise AssertionError(f"{node.name} does not fit the group it starts")
        groups.append(group)
        _add(node, kind, group, group_of, stored_role=role)
        link(group, users)

    # views of values computed inside a group belong to that group
    for node in nodes:
        if kinds[node] == "view":
            base = node.args[0]
            while kinds.get(base) == "view":
                base = base.args[0]
            group = group_of.get(base)
            if group is not None and base not in group.stored:
                group.members.add(node)
                group_of[node] = group

    groups.sort(key=lambda g: min(_order(n) for n in g.members))
    for new_id, group in enumerate(groups):
        group.id = new_id
    return Partition(groups=groups, kinds=kinds, group_of=group_of, dag=dag)


def _new_group(node, kind, group_id: int) -> FusionGroup:
    if kind == "reduction":
        source = shape(node.args[0])
        return FusionGroup(group_id, source, reduction_dims(node))
    return FusionGroup(group_id, shape(node))


def _reduction_fits(node, group: FusionGroup) -> bool:
    return _reduction_placement(node, group) is not None


def _reduction_placement(node, group: FusionGroup) -> tuple[tuple, tuple[int, ...]] | None:
    """The (full_shape, rdims) of `group` once `node` (a reduction) joins it, or None.

    The kernel builder checks the last word: that every read of the reduction is one row of
    the group (else the group is lowered to aten, and the report says why).
    """
    source = shape(node.args[0])
    dims = reduction_dims(node)
    if group.rdims:
        if tuple(source) == tuple(group.full_shape) and dims == tuple(group.rdims):
            return group.full_shape, group.rdims
        if _same_rows_permuted(source, dims, group.full_shape, group.rdims):
            return group.full_shape, group.rdims
        return None
    # a pointwise group becomes a reduction group: either it iterates over the reduction's
    # input (the norm's x * rsqrt(mean) epilogue), or over its output (rsqrt(mean + eps))
    if tuple(source) == tuple(group.full_shape):
        return source, dims
    last = (len(group.full_shape) - 1,)
    if _same_rows_permuted(source, dims, group.full_shape, last):
        # it iterates over a permutation of the input that keeps the reduced (last) dim last:
        # the q/k norm followed by transpose and rotary embedding
        return group.full_shape, last
    candidate = FusionGroup(-1, source, dims)
    if group.stored and all(candidate.role_of_shape(shape(n)) == "outer" for n in group.stored):
        return source, dims
    return None


def _same_rows_permuted(source, dims, full_shape, rdims) -> bool:
    """Both reduce only their last dimension, of the same size, and the group's other dims hold
    the input's (permuted, plus dims the rows are broadcast along: the GQA repeat of k)."""
    last = len(source) - 1
    if dims != (last,) or tuple(rdims) != (len(full_shape) - 1,) or source[last] != full_shape[-1]:
        return False
    remaining = [str(size) for size in full_shape[:-1]]
    for size in source[:-1]:
        if str(size) not in remaining:
            return False
        remaining.remove(str(size))
    return True


def _epilogue_fits(gemm: torch.fx.Node, group: FusionGroup) -> bool:
    """Whether `group` can be `gemm`'s epilogue: pointwise, no GEMM yet, iterating rows x columns
    (size-1 dims aside) with the GEMM's rows. The kernel builder checks every read of the GEMM."""
    if group.gemm is not None or group.rdims:
        return False
    rows, columns = shape(gemm)
    space = [size for size in group.full_shape if size != 1]
    expected = [columns] if rows == 1 else [rows, columns]
    return len(space) == len(expected) and (len(space) == 1 or indexing.same(space[0], rows))


def _feeds_gemm(node, group: FusionGroup) -> bool:
    """Whether `node` is an ancestor of the GEMM's operands A and B: those are materialized (the
    template reads them tile by tile), so their producers never join the GEMM's group. A bias is
    read by the epilogue, like any other input: its producers may be computed there.

    A path from `node` to an operand only passes through nodes after `node` in the graph's order
    (`meta["_order"]`): the walk back from the operands stops there, so a candidate just before the
    GEMM costs a few steps, not a walk through every earlier layer."""
    floor = _order(node)
    seen, stack = set(), [a for a in group.gemm.args[-2:] if isinstance(a, torch.fx.Node)]
    while stack:
        current = stack.pop()
        if current is node:
            return True
        if current in seen or _order(current) < floor:
            continue
        seen.add(current)
        stack.extend(current.all_input_nodes)
    return False


def _fits_internal(node, kind, group: FusionGroup) -> bool:
    if group.gemm is not None:
        return kind == "pointwise" and not _feeds_gemm(node, group)
    if kind == "pointwise":
        return True
    return _reduction_fits(node, group)


def _fits_stored(node, kind, group: FusionGroup) -> str | None:
    if group.gemm is not None and (kind != "pointwise" or _feeds_gemm(node, group)):
        return None
    if kind == "reduction":
        if not _reduction_fits(node, group):
            return None
        candidate = FusionGroup(-1, shape(node.args[0]), reduction_dims(node))
        return candidate.role_of_shape(shape(node))
    return group.role_of_shape(shape(node))


def _add(node, kind, group: FusionGroup, group_of: dict, stored_role: str | None) -> None:
    if kind == "reduction" and not group.rdims:
        group.full_shape, group.rdims = _reduction_placement(node, group)
        for member in list(group.stored):
            group.stored[member] = group.role_of_shape(shape(member)) or group.stored[member]
    if kind == "reduction":
        group.reductions.append(node)
    group.members.add(node)
    group_of[node] = group
    if stored_role is not None:
        group.stored[node] = stored_role
