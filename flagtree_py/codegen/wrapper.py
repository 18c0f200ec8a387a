"""Write the Python module for one compiled graph: Triton kernels, their aten fallbacks, `call`.

The module is meant to be read (`flagtree cache show`): `call(args)` runs, in a topological
order, the extern aten ops, the views they need, and one `run(kernel, grid, ...)` per fusion
group; each kernel has a `*_fallback` twin with the same signature that computes the group with
aten ops, used if the kernel fails to build or run. Groups of the same structure (the same norm or
GEMM in every decoder layer) launch one kernel, the first group's (share_kernels.py): the module's
kernel count, and the Triton compiles behind it, do not grow with the layer count.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import re
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import networkx as nx
import sympy
import torch
import torch.fx

import flagtree_py.ops  # noqa: F401  (registers torch.ops.flagtree.*)
from flagtree_py.codegen import indexing
from flagtree_py.codegen.attention import AttentionWriter
from flagtree_py.codegen.check_kernel import SOURCE_PROBLEMS as _SOURCE_PROBLEMS
from flagtree_py.codegen.check_kernel import KernelCheckFailed, check_kernel
from flagtree_py.codegen.gemm import lower_gemm_group
from flagtree_py.codegen.indexing import LoweringError, pexpr
from flagtree_py.codegen.kernel import KernelBuilder
from flagtree_py.codegen.lowerings import POINTWISE, REDUCTIONS, VIEWS
from flagtree_py.codegen.moe_experts import lower_moe_experts
from flagtree_py.codegen.moe_routing import lower_moe_routing
from flagtree_py.codegen.share_kernels import group_signature, rename_identifiers

_LOWERINGS = {**POINTWISE, **VIEWS, **REDUCTIONS}
#: flagtree ops a fusion pass put in the graph, each lowered by a template of its own
_TEMPLATE_LOWERINGS = {torch.ops.flagtree.moe_routing.default: lower_moe_routing,
                       torch.ops.flagtree.moe_routing_dense.default: lower_moe_routing,
                       torch.ops.flagtree.moe_experts.default: lower_moe_experts}
_GENERIC_TEMPLATES = Path(__file__).parent / "templates"


@functools.cache
def template_environment(target_dir: str | None) -> jinja2.Environment:
    """Templates for a target: its own directory first (a vendor variant), then the generic ones."""
    loaders = [jinja2.FileSystemLoader(target_dir)] if target_dir else []
    return jinja2.Environment(
        loader=jinja2.ChoiceLoader([*loaders, jinja2.FileSystemLoader(str(_GENERIC_TEMPLATES))]),
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )


def render_template(name: str, target, **values) -> str:
    """Render template `name` as `target` sees it (its own variant first, else the generic one)."""
    return template_environment(target.template_dir).get_template(name).render(**values)


@dataclass
class KernelRecord:
    name: str
    group_id: int
    kind: str
    source: str
    config: dict
    nodes: list[str]  # every node it computes, of every group that launches it
    stored: list[str]
    groups: list[str] = field(default_factory=list)  # the groups that launch it, its own first


@dataclass
class SharedKernel:
    """A group's lowering, launched again by every later group of the same structure (share_kernels.py)."""

    group: object  # the first group, whose kernel it is
    order: list  # the nodes its structural key visited
    call: list[str]  # its wrapper lines, header first
    records: list[KernelRecord]
    lowered_nodes: int


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
    template_nodes: list[str] = field(default_factory=list)  # nodes lowered by a template of their own
    kernel_checks: list[dict] = field(default_factory=list)  # kernels re-lowered or left to aten by check_kernel
    timings: Counter = field(default_factory=Counter)  # seconds per code generation step (the compile record's codegen_s)


class ModuleWriter:
    def __init__(self, gm: torch.fx.GraphModule, partition, target, graph_name: str, device_type: str,
                 share_kernels: bool = True) -> None:
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
        self.template_sections: list[str] = []
        self.uses_gemm = False  # set by codegen/gemm.py: the module imports its launcher
        self.attention = AttentionWriter(self)  # the hook for flagtree::attention nodes
        # groups of the same structure launch one kernel (share_kernels.py); off only to check that claim
        self.share_kernels = share_kernels
        self.shared: dict[tuple, SharedKernel] = {}  # by structural key
        self.template_keys: dict[str, str] = {}  # template kernel source, name left out -> kernel name

    @contextlib.contextmanager
    def timed(self, step: str):
        """Add the block's wall seconds to `step` in the generated module's timings."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.out.timings[step] += time.perf_counter() - began

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
        for name, known in self.out.extern_targets.items():
            if known is target:
                return name
        label = getattr(target, "__name__", "")
        name = f"{label if label.isidentifier() else 'extern'}_{len(self.out.extern_targets)}"
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

        kernel_sections, group_calls = {}, {}
        for group in self.partition.groups:
            with self.timed("gemm_groups" if group.gemm is not None else "groups"):
                section, call = self.lower_group(group, buffers, views)
            if section:
                kernel_sections[group] = section
            group_calls[group] = call
        kernel_sections = [self._sharing_note(group) + section for group, section in kernel_sections.items()]

        with self.timed("order"):
            steps = self._order_steps(nodes, emitted_views)
        body = list(bind_lines)
        with self.timed("wrapper"):
            for step in steps:
                if isinstance(step, torch.fx.Node):
                    body.extend(self._node_lines(step))
                else:
                    body.extend(group_calls[step])
            output = next(n for n in nodes if n.op == "output")
            body.append(f"return {self.arg(tuple(output.args[0]))}")
            kernel_sections += self.attention.sections
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
        if kind == "extern" and self.attention.handles(node):
            lines = self.attention.lines(node)
            if lines is not None:
                return lines
        if kind == "extern" and node.target in _TEMPLATE_LOWERINGS:
            lines = self._template_kernel(node)
            if lines is not None:
                return lines
        if kind == "extern":
            self.out.extern_ops.append(self.extern_label(node))
            lines = [self.call_line(node)]
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and any(u in self.partition.group_of for u in node.users):
                # kernels index this buffer with the strides its fake value has: check them
                lines.append(f"assert_size_stride({node.name}, {self.arg(tuple(val.shape))}, {self.arg(tuple(val.stride()))})")
            return lines
        return [self.call_line(node)]

    def _template_kernel(self, node) -> list[str] | None:
        """The launch of `node`'s own kernel, or None (it then runs as an extern aten call)."""
        name = f"k{len(self.partition.groups) + len(self.template_sections)}_{node.target._overloadpacket.__name__}"
        val = node.args[0].meta["val"]
        numel = indexing.numel(indexing.shape_of(val.shape))
        int64 = not numel.is_Integer or int(numel) >= 2**31
        try:
            kernel = _TEMPLATE_LOWERINGS[node.target](node, name, template_environment(self.target.template_dir), self.target, self.arg, int64)
        except LoweringError as error:
            self.out.codegen_fallbacks.append({"group": name, "reason": str(error)})
            if isinstance(error, KernelCheckFailed):
                self.out.kernel_checks.append({"kernel": name, "problems": error.problems, "action": "aten fallback"})
            return None
        self.out.template_nodes.append(node.name)
        self.out.lowered_nodes += 1
        # the same template kernel for another node (each MoE layer's routing): launch the first one
        key = re.sub(rf"\b{name}", "<kernel>", kernel.source)
        first = self.template_keys.get(key) if self.share_kernels else None
        if first is not None:
            for record in self.out.kernels:
                if record.name == first or record.name.startswith(first + "_"):
                    record.nodes.append(node.name)
                    record.groups.append(node.name)
            # the call names the kernel and what derives from its name (`{name}_count`, `{name}_fallback`)
            words = {word for line in kernel.call for word in re.findall(r"\b\w+\b", line)}
            renames = {word: first + word[len(name):] for word in words if word == name or word.startswith(name + "_")}
            return [rename_identifiers(line, renames) for line in kernel.call]
        self.template_keys[key] = name
        if kernel.checks:
            self.out.kernel_checks.append({"kernel": name, "problems": kernel.checks,
                                           "action": f"re-lowered with {kernel.config}"})
        self.template_sections.append(kernel.source)
        for kernel_name in kernel.names or [name]:  # a template may hold several kernels (moe_experts)
            self.out.kernels.append(KernelRecord(name=kernel_name, group_id=-1, kind=kernel_name.split("_", 1)[1],
                                                 source=kernel.source, config=kernel.config, nodes=[node.name],
                                                 stored=[node.name], groups=[node.name]))
        return kernel.call

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
        self._order_input_writes(nodes, dag, group_of, emitted)
        return list(nx.lexicographical_topological_sort(dag, key=lambda s: first[s]))

    def _order_input_writes(self, nodes, dag, group_of, emitted) -> None:
        """An in-place write into a graph input (`copy_` of a kept input mutation, a cache's
        `index_put_`) runs after every other step that reads that input, through views too."""
        for node in nodes:
            if node not in emitted or node.op != "call_function" or not mutates_first_argument(node):
                continue
            written = node.args[0]
            readers, stack = set(), list(written.users)
            while stack:
                user = stack.pop()
                if self.kinds.get(user) == "view" and user not in group_of:
                    stack.extend(user.users)
                    continue
                step = group_of.get(user) or (user if user in emitted else None)
                if step is not None and step is not node:
                    readers.add(step)
            for step in readers:
                if not nx.has_path(dag, node, step):  # a step fed by the write itself stays after it
                    dag.add_edge(step, node)

    # -- groups --------------------------------------------------------------------------------

    def lower_group(self, group, buffers, views) -> tuple[str | None, list[str]]:
        """(the group's kernel section, or None when it launches an earlier group's kernel or runs aten;
        its wrapper lines)."""
        key = order = None
        if self.share_kernels:
            key, order = group_signature(group, self.kinds, buffers, self.emitted_symbolic)
            shared = self.shared.get(key)
            if shared is not None:
                with self.timed("shared"):
                    return None, self._launch_shared(shared, group, order)
        first_record, lowered_before = len(self.out.kernels), self.out.lowered_nodes
        section, call = self._lower_group(group, buffers, views)
        records = self.out.kernels[first_record:]
        for record in records:
            record.groups.append(group.name)
        if key is None or section is None:  # a group left to aten is not shared: the next tries on its own
            return section, call
        # only groups of one structure share: a kernel's source alone may come out the same for groups whose views
        # differ (step3's o-projection reads its input through a permute), and then the first group's aten fallback,
        # which applies those views, would not fit the other's buffers
        self.shared[key] = SharedKernel(group, order, call, records, self.out.lowered_nodes - lowered_before)
        return section, call

    def _launch_shared(self, shared: SharedKernel, group, order) -> list[str]:
        """`group`'s wrapper lines launching `shared`'s kernel: the first group's lines, with each of its
        nodes' names replaced by the corresponding node's of `group`."""
        names = {a.name: b.name for a, b in zip(shared.order, order) if a.name != b.name}
        for record in shared.records:
            record.groups.append(group.name)
            record.nodes += [n.name for n in group.ordered_members()]
        self.out.lowered_nodes += shared.lowered_nodes
        computes = ", ".join(n.name for n in group.ordered_members() if self.kinds[n] != "view")
        header = f"# {group.name}: {computes} (the kernel of {shared.group.name})"
        return [header] + [rename_identifiers(line, names) for line in shared.call[1:]]

    def _sharing_note(self, group) -> str:
        """A comment above a kernel section that other groups launch too."""
        shared = next((s for s in self.shared.values() if s.group is group), None)
        if shared is None or len(shared.records[0].groups) < 2:
            return ""
        others = shared.records[0].groups[1:]
        text = f"{group.name} is also launched by {len(others)} group(s) of the same structure: {', '.join(others)}"
        return "".join(f"# {line}\n" for line in textwrap.wrap(text, 116, break_on_hyphens=False))

    def _lower_group(self, group, buffers, views) -> tuple[str | None, list[str]]:
        if group.gemm is not None:  # GEMM template groups: codegen/gemm.py
            return lower_gemm_group(self, group, buffers, views, _LOWERINGS)
        subgraph, externals = self._group_subgraph(group, buffers)
        stored = [n for n, _ in group.stores()]
        header = f"# {group.name}: {', '.join(n.name for n in group.ordered_members() if self.kinds[n] != 'view')}"
        first_problems = None
        # a persistent reduction that no config of the target fits is lowered again as a looped one
        for persistent_limit in (self.target.persistent_reduction_limit, 0):
            try:
                with self.timed("groups.lower"):
                    builder = KernelBuilder(group, buffers, _LOWERINGS, views, persistent_limit, self.device_type)
                    for node in externals:  # what the aten fallback reads: the kernel takes it too
                        builder.add_input(node, buffers[node])
                    builder.symbols |= self._subgraph_symbols(subgraph)
                    index_dtype = "int64" if self._needs_int64(group) else "int32"
                    spec = builder.build(group.name, [], index_dtype)
            except LoweringError as error:
                reason = str(error) if first_problems is None else f"check_kernel: {'; '.join(first_problems)}"
                self.out.codegen_fallbacks.append({"group": group.name, "reason": reason})
                if first_problems is not None:
                    self.out.kernel_checks.append({"kernel": group.name, "problems": first_problems,
                                                   "action": "aten fallback"})
                lines = [header + " (aten: " + reason.replace("\n", " ")[:120] + ")"]
                lines += [self.call_line(n) for n in subgraph]
                return None, lines
            spec.comment = [f"computes: {', '.join(n.name for n in group.ordered_members() if self.kinds[n] != 'view')}",
                            f"stores: {', '.join(n.name for n in stored)}"]
            with self.timed("groups.render"):
                template = template_environment(self.target.template_dir).get_template(f"{spec.kind}.py.jinja")
                kernel_source = template.render(k=spec)
            with self.timed("groups.check"):
                launch_meta, problems = self._checked_launch(spec, kernel_source)
            first_problems = first_problems or problems
            if launch_meta is not None or not spec.persistent or any(p.startswith(_SOURCE_PROBLEMS) for p in problems):
                break
        if launch_meta is None:  # no config of the target's tables passes its checks: aten it is
            self.out.kernel_checks.append({"kernel": spec.name, "problems": first_problems, "action": "aten fallback"})
            self.out.codegen_fallbacks.append({"group": group.name, "reason": f"check_kernel: {'; '.join(first_problems)}"})
            return None, [header + " (aten: check_kernel)"] + [self.call_line(n) for n in subgraph]
        if first_problems:
            how = "looped, " if persistent_limit == 0 else ""
            self.out.kernel_checks.append({"kernel": spec.name, "problems": first_problems,
                                           "action": f"re-lowered {how}with {launch_meta}"})
        self.out.lowered_nodes += sum(1 for n in group.members if self.kinds[n] != "view")
        fallback = self._fallback_source(spec, subgraph, stored, builder)
        grid = f"cdiv({spec.xnumel}, {launch_meta['XBLOCK']})"
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

    def _tile(self, spec):
        if spec.kind == "pointwise":
            hint = int(sympy.sympify(spec.xnumel)) if sympy.sympify(spec.xnumel).is_Integer else None
            return self.target.pointwise_config(hint)
        return self.target.reduction_config(spec.static_rnumel, spec.persistent)

    def _launch_meta(self, spec, tile) -> dict:
        meta = {"XBLOCK": tile.XBLOCK}
        if spec.kind == "reduction":
            meta["RBLOCK"] = tile.RBLOCK
        meta["num_warps"] = self.target.num_warps(tile.threads)
        if tile.num_stages != 1:
            meta["num_stages"] = tile.num_stages
        return meta

    def _checked_launch(self, spec, kernel_source: str) -> tuple[dict | None, list[str]]:
        """The launch meta of the first tile, from the target's table down its safer configs, that passes
        check_kernel (None if none does: a problem of the source itself never passes), and the problems
        of the first tile tried."""
        tile, first_problems = self._tile(spec), []
        while tile is not None:
            meta = self._launch_meta(spec, tile)
            problems = check_kernel(kernel_source, {**meta, "kind": spec.kind}, self.target)
            if not problems:
                return meta, first_problems
            first_problems = first_problems or [str(p) for p in problems]
            if any(p.kind in _SOURCE_PROBLEMS for p in problems):
                break
            tile = self.target.safer_config(tile, row_split=spec.kind == "reduction" and not spec.persistent)
        return None, first_problems

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
            if buffer in builder.size_scalars:
                lines.append(f"    {buffer} = {name}")
            else:
                lines.append(f"    {buffer} = torch.scalar_tensor({name}, dtype={dtype})")
        for node in subgraph:
            lines.append("    " + self.call_line(node))
        for node in stored:
            lines.append(f"    {builder.outputs[node.name]}.copy_({node.name})")
        # which arguments the kernel writes: a kernel check (runtime/check.py) gives the fallback fresh ones
        written = ", ".join(repr(builder.outputs[node.name]) for node in stored)
        lines.append(f"\n\n{spec.name}_fallback.writes = ({written}{',' if len(stored) == 1 else ''})")
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
            "import flagtree_py.ops  # noqa: F401  (registers torch.ops.flagtree.*)",
            "from flagtree_py.runtime.launch import cdiv, run",
        ]
        if self.uses_gemm:
            header.append("from flagtree_py.runtime.autotune import GemmGrid, run_gemm")
        header += ["", "aten = torch.ops.aten", "prims = torch.ops.prims"]
        header += self.attention.imports()
        header += [f"{name} = torch.device({device!r})" for device, name in self.devices.items()]
        header += ["constants = {}  # filled by the loader (get_attr tensors)", ""]
        parts = ["\n".join(header)]
        parts += kernel_sections + self.template_sections
        call = ["def call(args):"] + ["    " + line for line in body]
        parts.append("\n".join(call))
        return "\n\n\n".join(parts) + "\n"


def mutates_first_argument(node: torch.fx.Node) -> bool:
    """Whether `node` writes its first argument in place (copy_, index_put_, add_...)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.arguments:
        return False
    alias = schema.arguments[0].alias_info
    return alias is not None and alias.is_write


def _flatten(value):
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    else:
        yield value
