"""Write the Python module for one compiled graph: Triton kernels, their aten fallbacks, `call`.

The module is meant to be read (`flagtree cache show`): `call(args)` runs, in a topological
order, the extern aten ops, the views they need, and one `run(kernel, grid, ...)` per fusion
group; each kernel has a `*_fallback` twin with the same signature that computes the group with
aten ops, used if the kernel fails to build or run.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import networkx as nx
import sympy
import torch
import torch.fx

from flagtree_py.codegen import indexing
from flagtree_py.codegen.indexing import LoweringError, pexpr
from flagtree_py.codegen.kernel import KernelBuilder
from flagtree_py.codegen.lowerings import POINTWISE, REDUCTIONS, VIEWS

_LOWERINGS = {**POINTWISE, **VIEWS, **REDUCTIONS}
_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
    keep_trailing_newline=True,
    undefined=jinja2.StrictUndefined,
)


@dataclass
class KernelRecord:
    name: str
    group_id: int
    kind: str
    source: str
    config: dict
    nodes: list[str]
    stored: list[str]


@dataclass
class GeneratedModule:
    source: str
    kernels: list[KernelRecord] = field(default_factory=list)
    codegen_fallbacks: list[dict] = field(default_factory=list)  # groups left to aten, and why
    extern_ops: list[str] = field(default_factory=list)
    lowered_nodes: int = 0
    extern_targets: dict = field(default_factory=dict)  # name -> callable for non-aten externs
    constants: dict = field(default_factory=dict)  # name -> tensor (get_attr)
    constant_targets: dict = field(default_factory=dict)  # name -> the GraphModule attribute it reads


class ModuleWriter:
    def __init__(self, gm: torch.fx.GraphModule, partition, target, graph_name: str, device_type: str) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.partition = partition
        self.kinds = partition.kinds
        self.target = target
        self.graph_name = graph_name
        self.device_type = device_type  # where kernels run: "cuda", or "cpu" (the interpreter)
        self.out = GeneratedModule(source="")
        self.bound: dict[sympy.Symbol, str] = {}
        self.devices: dict[str, str] = {}

    # -- printing ------------------------------------------------------------------------------

    def expr(self, value) -> str:
        e = indexing.as_expr(value)
        missing = e.free_symbols - set(self.bound)
        if missing:
            raise LoweringError(f"size symbols {sorted(map(str, missing))} are not bound by any input")
        return pexpr(e)

    def arg(self, a) -> str:
        if isinstance(a, torch.fx.Node):
            if self.kinds.get(a) == "symbolic" and a not in self.emitted_symbolic:
                return self.expr(a.meta["val"])
            return a.name
        if isinstance(a, (list, tuple)):
            inner = ", ".join(self.arg(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return self.expr(a)
        if isinstance(a, torch.dtype):
            return str(a)
        if isinstance(a, torch.device):
            return self.device(a)
        if isinstance(a, (torch.layout, torch.memory_format)):
            return str(a)
        if isinstance(a, torch._ops.OpOverload):  # the op a higher-order op wraps (vLLM's auto_functionalized ops)
            return self.target_name_of(a)
        if isinstance(a, float):
            if math.isnan(a):
                return 'float("nan")'
            if math.isinf(a):
                return f'float("{"-" if a < 0 else ""}inf")'
            return repr(a)
        if a is None or isinstance(a, (bool, int, str)):
            return repr(a)
        raise LoweringError(f"cannot print argument {a!r}")

    def device(self, device: torch.device) -> str:
        key = str(device)
        if key not in self.devices:
            self.devices[key] = f"DEVICE_{key.replace(':', '_').upper()}"
        return self.devices[key]

    @staticmethod
    def target_name_of(target: torch._ops.OpOverload) -> str:
        namespace = target.namespace
        packet = target._overloadpacket.__name__
        if namespace in ("aten", "prims"):
            return f"{namespace}.{packet}.{target._overloadname}"
        return f"torch.ops.{namespace}.{packet}.{target._overloadname}"

    def target_name(self, node: torch.fx.Node) -> str:
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return self.target_name_of(target)
        if target is operator.getitem:
            return "operator.getitem"
        name = f"extern_{len(self.out.extern_targets)}"
        self.out.extern_targets[name] = target
        return name

    def extern_label(self, node: torch.fx.Node) -> str:
        """How the report names an extern op: the op a higher-order wrapper calls, not `extern_3`."""
        target = node.target
        if isinstance(target, torch._ops.HigherOrderOperator):
            inner = next((a for a in node.args if isinstance(a, torch._ops.OpOverload)), None)
            return f"{target.name()}({self.target_name_of(inner) if inner is not None else ''})"
        if isinstance(target, torch._ops.OpOverload) or target is operator.getitem:
            return self.target_name(node)
        return getattr(target, "__qualname__", str(target))

    def call_line(self, node: torch.fx.Node, name: str | None = None) -> str:
        args = [self.arg(a) for a in node.args] + [f"{k}={self.arg(v)}" for k, v in node.kwargs.items()]
        return f"{name or node.name} = {self.target_name(node)}({', '.join(args)})"

    def allocation(self, node: torch.fx.Node) -> str:
        val = node.meta["val"]
        size = self.arg(tuple(val.shape))
        stride = self.arg(tuple(val.stride()))
        return f"{node.name} = empty_strided({size}, {stride}, dtype={val.dtype}, device={self.device(val.device)})"

    # -- planning ------------------------------------------------------------------------------

    def generate(self) -> GeneratedModule:
        nodes = list(self.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        bind_lines = self.bind_symbols(placeholders)
        self.emitted_symbolic = {n for n in nodes if self.kinds[n] == "symbolic" and self._needs_emit(n)}
        for node in self.emitted_symbolic:
            val = node.meta["val"]
            if isinstance(val, torch.SymInt) and isinstance(val.node.expr, sympy.Symbol):
                self.bound[val.node.expr] = node.name
        buffers = {n: n.name for n in nodes if self.kinds[n] in ("placeholder", "constant", "extern")}
        for group in self.partition.groups:
            for node in group.stored:
                buffers[node] = node.name
        views = {n for n in nodes if self.kinds[n] == "view"}
        emitted_views = self._views_to_emit(nodes)

        kernel_sections, group_calls = [], {}
        for group in self.partition.groups:
            section, call = self.lower_group(group, buffers, views)
            if section:
                kernel_sections.append(section)
            group_calls[group] = call

        steps = self._order_steps(nodes, emitted_views)
        body = list(bind_lines)
        for step in steps:
            if isinstance(step, torch.fx.Node):
                body.extend(self._node_lines(step))
            else:
                body.extend(group_calls[step])
        output = next(n for n in nodes if n.op == "output")
        body.append(f"return {self.arg(tuple(output.args[0]))}")
        self.out.source = self._module_source(kernel_sections, placeholders, body)
        return self.out

    def bind_symbols(self, placeholders) -> list[str]:
        lines = [f"{', '.join(p.name for p in placeholders)}{',' if len(placeholders) == 1 else ''} = args" if placeholders else "pass"]
        if placeholders:
            lines.append("args.clear()")
        for p in placeholders:
            val = p.meta.get("val")
            if isinstance(val, torch.SymInt):
                e = val.node.expr
                if isinstance(e, sympy.Symbol) and e not in self.bound:
                    self.bound[e] = p.name
                    lines.append(f"{e.name} = {p.name}")
            elif isinstance(val, torch.Tensor):
                for method, values in (("size", val.shape), ("stride", val.stride())):
                    for d, size in enumerate(values):
                        e = indexing.as_expr(size)
                        if isinstance(e, sympy.Symbol) and e not in self.bound:
                            self.bound[e] = f"{p.name}.{method}({d})"
                            lines.append(f"{e.name} = {p.name}.{method}({d})")
        return lines

    def _needs_emit(self, node) -> bool:
        val = node.meta["val"]
        expr = indexing.as_expr(val) if isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool) else None
        return expr is None or bool(expr.free_symbols - set(self.bound))

    def _views_to_emit(self, nodes) -> set:
        needed = set()
        for node in reversed(nodes):
            if self.kinds[node] != "view" or node in self.partition.group_of:
                continue
            if any(self.kinds[u] in ("extern", "output", "symbolic") or u in needed for u in node.users):
                needed.add(node)
        return needed

    def _node_lines(self, node) -> list[str]:
        kind = self.kinds[node]
        if kind == "constant":
            self.out.constants[node.name] = getattr(self.gm, node.target)
            self.out.constant_targets[node.name] = node.target
            return [f"{node.name} = constants[{node.name!r}]"]
        if kind == "extern":
            self.out.extern_ops.append(self.extern_label(node))
            lines = [self.call_line(node)]
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and any(u in self.partition.group_of for u in node.users):
                # kernels index this buffer with the strides its fake value has: check them
                lines.append(f"assert_size_stride({node.name}, {self.arg(tuple(val.shape))}, {self.arg(tuple(val.stride()))})")
            return lines
        return [self.call_line(node)]

    def _order_steps(self, nodes, emitted_views) -> list:
        group_of = self.partition.group_of
        emitted = {n for n in nodes if self.kinds[n] in ("extern", "constant")} | emitted_views | self.emitted_symbolic

        def producer(node):
            while True:
                if node in group_of:
                    return group_of[node]
                if node in emitted:
                    return node
                if self.kinds.get(node) == "view":
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
        return list(nx.lexicographical_topological_sort(dag, key=lambda s: first[s]))

    # -- groups --------------------------------------------------------------------------------

    def lower_group(self, group, buffers, views) -> tuple[str | None, list[str]]:
        subgraph, externals = self._group_subgraph(group, buffers)
        stored = [n for n, _ in group.stores()]
        header = f"# {group.name}: {', '.join(n.name for n in group.ordered_members() if self.kinds[n] != 'view')}"
        try:
            builder = KernelBuilder(group, buffers, _LOWERINGS, views, self.target.persistent_reduction_limit,
                                    self.device_type)
            for node in externals:  # what the aten fallback reads: the kernel takes it too
                builder.add_input(node, buffers[node])
            builder.symbols |= self._subgraph_symbols(subgraph)
            index_dtype = "int64" if self._needs_int64(group) else "int32"
            spec = builder.build(group.name, [], index_dtype)
        except LoweringError as error:
            self.out.codegen_fallbacks.append({"group": group.name, "reason": str(error)})
            lines = [header + " (aten: " + str(error).replace("\n", " ")[:120] + ")"]
            lines += [self.call_line(n) for n in subgraph]
            return None, lines
        self.out.lowered_nodes += sum(1 for n in group.members if self.kinds[n] != "view")
        config = self._config(spec)
        spec.comment = [f"computes: {', '.join(n.name for n in group.ordered_members() if self.kinds[n] != 'view')}",
                        f"stores: {', '.join(n.name for n in stored)}"]
        template = _TEMPLATES.get_template(f"{spec.kind}.py.jinja")
        kernel_source = template.render(k=spec)
        fallback = self._fallback_source(spec, subgraph, stored, builder)
        launch_meta = {k: v for k, v in config.items() if k == "XBLOCK" or (k == "RBLOCK" and spec.kind == "reduction")}
        launch_meta["num_warps"] = self.target.num_warps(config["threads"])
        if config.get("num_stages", 1) != 1:
            launch_meta["num_stages"] = config["num_stages"]
        grid = f"cdiv({spec.xnumel}, {config['XBLOCK']})"
        meta = ", ".join(f"{k}={v}" for k, v in launch_meta.items())
        call = [header] + [self.allocation(n) for n in stored]
        call.append(f"run({spec.name}, ({grid},), {', '.join(spec.launch_args)}, {meta})")
        self.out.kernels.append(KernelRecord(
            name=spec.name, group_id=group.id, kind=spec.kind, source=kernel_source,
            config={**launch_meta, "persistent": spec.persistent, "index_dtype": index_dtype},
            nodes=[n.name for n in group.ordered_members()], stored=[n.name for n in stored]))
        return kernel_source + "\n\n" + fallback, call

    def _needs_int64(self, group) -> bool:
        for node in group.members | set(group.stored):
            numel = indexing.numel(indexing.shape_of(node.meta["val"].shape))
            if not numel.is_Integer or int(numel) >= 2**31:
                return True
        return not indexing.numel(group.full_shape).is_Integer

    def _config(self, spec) -> dict:
        if spec.kind == "pointwise":
            hint = int(sympy.sympify(spec.xnumel)) if sympy.sympify(spec.xnumel).is_Integer else None
            tile = self.target.pointwise_config(hint)
        else:
            tile = self.target.reduction_config(spec.static_rnumel, spec.persistent)
        return {"XBLOCK": tile.XBLOCK, "RBLOCK": tile.RBLOCK, "threads": tile.threads, "num_stages": tile.num_stages}

    def _group_subgraph(self, group, buffers):
        """The nodes to run with aten for this group, and the buffers they read."""
        needed, externals = set(), set()
        stack = list(group.stored)
        while stack:
            node = stack.pop()
            if node in needed:
                continue
            if node in group.members or (self.kinds[node] == "view" and node not in buffers):
                needed.add(node)
                stack.extend(n for n in node.all_input_nodes if self.kinds[n] != "symbolic" or n in self.emitted_symbolic)
            elif node in buffers:
                externals.add(node)
        order = sorted(needed, key=lambda n: n.meta["_order"])
        return order, sorted(externals, key=lambda n: n.meta["_order"])

    def _subgraph_symbols(self, subgraph) -> set:
        symbols = set()
        for node in subgraph:
            for value in _flatten((node.args, node.kwargs)):
                if isinstance(value, torch.fx.Node) and self.kinds.get(value) == "symbolic" and value not in self.emitted_symbolic:
                    symbols |= indexing.as_expr(value.meta["val"]).free_symbols
                elif isinstance(value, torch.SymInt):
                    symbols |= indexing.as_expr(value).free_symbols
        return symbols

    def _fallback_source(self, spec, subgraph, stored, builder) -> str:
        params = list(spec.arguments)
        lines = [f"def {spec.name}_fallback({', '.join(params)}):",
                 f'    """{spec.name} with aten ops: used if the kernel fails to build or run."""']
        for buffer, pointer in builder.inputs.items():
            lines.append(f"    {buffer} = {pointer}")
        for buffer, (name, dtype) in builder.scalars.items():
            lines.append(f"    {buffer} = torch.scalar_tensor({name}, dtype={dtype})")
        for node in subgraph:
            lines.append("    " + self.call_line(node))
        for node in stored:
            lines.append(f"    {builder.outputs[node.name]}.copy_({node.name})")
        return "\n".join(lines)

    # -- module --------------------------------------------------------------------------------

    def _module_source(self, kernel_sections, placeholders, body) -> str:
        header = [
            f"# flagtree: compiled graph {self.graph_name} for target {self.target.name} ({self.target.description})",
            "# Kernels are Triton; each has an aten `*_fallback` with the same arguments. `call(args)` runs the graph.",
            "import operator",
            "",
            "import torch",
            "import triton",
            "import triton.language as tl",
        ]
        header += [
            "from torch import empty_strided",
            "from torch._C._dynamo.guards import assert_size_stride",
            "",
            "from flagtree_py.runtime.launch import cdiv, run",
            "",
            "aten = torch.ops.aten",
            "prims = torch.ops.prims",
        ]
        header += [f"{name} = torch.device({device!r})" for device, name in self.devices.items()]
        header += ["constants = {}  # filled by the loader (get_attr tensors)", ""]
        parts = ["\n".join(header)]
        parts += kernel_sections
        call = ["def call(args):"] + ["    " + line for line in body]
        parts.append("\n".join(call))
        return "\n\n\n".join(parts) + "\n"


def _flatten(value):
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    else:
        yield value
