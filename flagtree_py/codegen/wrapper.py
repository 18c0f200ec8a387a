"""Write the Python module for one compiled graph: Triton kernels, their aten fallbacks, `call`.

The module is meant to be read (`flagtree cache show`): `call(args)` runs, in a topological
order, the extern aten ops, the views they need, and one `run(kernel, grid, ...)` per fusion
group; each kernel has a `*_fallback` twin with the same signature that computes the group with
aten ops, used if the kernel fails to build or run. Groups of the same structure (the same norm or
GEMM in every decoder layer) launch one kernel, the first group's (share_kernels.py): the module's
kernel count, and the Triton compiles behind it, do not grow with the layer count.

`ModuleWriter` prints values and calls, lowers the nodes `call` runs itself (extern ops, attention
through attention.py, constants, and the flagtree ops with a template of their own) and assembles the
module; it lowers fusion groups through its `GroupLowering` half (group_kernels.py) and orders `call`'s
steps with step_order.py.
"""

from __future__ import annotations

import contextlib
import math
import operator
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx

import flagtree_py.ops  # noqa: F401  (registers torch.ops.flagtree.*)
from flagtree_py.codegen import indexing
from flagtree_py.codegen.attention import AttentionWriter
from flagtree_py.codegen.check_kernel import KernelCheckFailed
from flagtree_py.codegen.group_kernels import GroupLowering, KernelRecord, SharedKernel, template_environment
from flagtree_py.codegen.indexing import LoweringError, pexpr
from flagtree_py.codegen.moe_experts import lower_moe_experts
from flagtree_py.codegen.moe_routing import lower_moe_routing
from flagtree_py.codegen.share_kernels import rename_identifiers
from flagtree_py.codegen.step_order import order_steps, views_to_emit

#: flagtree ops a fusion pass put in the graph, each lowered by a template of its own
_TEMPLATE_LOWERINGS = {torch.ops.flagtree.moe_routing.default: lower_moe_routing,
                       torch.ops.flagtree.moe_routing_dense.default: lower_moe_routing,
                       torch.ops.flagtree.moe_experts.default: lower_moe_experts}


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


class ModuleWriter(GroupLowering):
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
        self.signature_values: dict = {}  # node -> its fake value as structural keys read it (share_kernels.py)
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
        emitted_views = views_to_emit(nodes, self.kinds, self.partition.group_of)

        kernel_sections, group_calls = {}, {}
        for group in self.partition.groups:
            with self.timed("gemm_groups" if group.gemm is not None else "groups"):
                section, call = self.lower_group(group, buffers, views)
            if section:
                kernel_sections[group] = section
            group_calls[group] = call
        kernel_sections = [self._sharing_note(group) + section for group, section in kernel_sections.items()]

        with self.timed("order"):
            steps = order_steps(nodes, self.kinds, self.partition.group_of, emitted_views, self.emitted_symbolic)
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
