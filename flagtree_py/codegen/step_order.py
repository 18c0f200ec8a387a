"""The order of `call`'s steps: extern ops, the views and size values they need, and group launches.

The steps are ordered by their data dependencies, ties broken by graph order; an in-place write into a
graph input comes after every step that reads that input.
"""

from __future__ import annotations

import networkx as nx
import torch.fx


def views_to_emit(nodes: list[torch.fx.Node], kinds: dict, group_of: dict) -> set:
    """The views outside every group that `call` computes: those an extern op, the output or a size value
    reads, directly or through other such views."""
    needed = set()
    for node in reversed(nodes):
        if kinds[node] != "view" or node in group_of:
            continue
        if any(kinds[u] in ("extern", "output", "symbolic") or u in needed for u in node.users):
            needed.add(node)
    return needed


def order_steps(nodes: list[torch.fx.Node], kinds: dict, group_of: dict, emitted_views: set,
                emitted_symbolic: set) -> list:
    """`call`'s steps in the order they run: fusion groups, and the nodes it computes itself (extern ops,
    constants, `emitted_views`, `emitted_symbolic`)."""
    emitted = {n for n in nodes if kinds[n] in ("extern", "constant")} | emitted_views | emitted_symbolic

    def producer(node):
        while True:
            if node in group_of:
                return group_of[node]
            if node in emitted:
                return node
            if kinds.get(node) == "view":
                node = node.args[0]
                continue
            return None

    dag = nx.DiGraph()
    first = {}
    for node in nodes:
        step = group_of.get(node) or (node if node in emitted else None)
        if step is None:
            continue
        dag.add_node(step)
        first.setdefault(step, node.meta["_order"])
        for source in node.all_input_nodes:
            dep = producer(source)
            if dep is not None and dep is not step:
                dag.add_edge(dep, step)
    _order_input_writes(nodes, kinds, dag, group_of, emitted)
    return list(nx.lexicographical_topological_sort(dag, key=lambda s: first[s]))


def _order_input_writes(nodes, kinds, dag, group_of, emitted) -> None:
    """An in-place write into a graph input (`copy_` of a kept input mutation, a cache's
    `index_put_`) runs after every other step that reads that input, through views too."""
    for node in nodes:
        if node not in emitted or node.op != "call_function" or not mutates_first_argument(node):
            continue
        written = node.args[0]
        readers, stack = set(), list(written.users)
        while stack:
            user = stack.pop()
            if kinds.get(user) == "view" and user not in group_of:
                stack.extend(user.users)
                continue
            step = group_of.get(user) or (user if user in emitted else None)
            if step is not None and step is not node:
                readers.add(step)
        for step in readers:
            if not nx.has_path(dag, node, step):  # a step fed by the write itself stays after it
                dag.add_edge(step, node)


def mutates_first_argument(node: torch.fx.Node) -> bool:
    """Whether `node` writes its first argument in place (copy_, index_put_, add_...)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.arguments:
        return False
    alias = schema.arguments[0].alias_info
    return alias is not None and alias.is_write
