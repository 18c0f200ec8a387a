"""Fusion groups to kernels: each group's Triton kernel, its aten `*_fallback` twin, and its wrapper lines.

`GroupLowering` is the part of `ModuleWriter` (wrapper.py) that lowers the partition's fusion groups. A GEMM
group goes to its template (gemm.py); any other group is built by `KernelBuilder` (kernel.py) and launched
with the first tile, from the target's table down its safer configs, that passes `check_kernel`. A persistent
reduction that no tile fits is lowered again as a looped one; a group that cannot be lowered, or that no tile
fits, runs with aten. A group of the same structure as an earlier one launches that group's kernel
(share_kernels.py). Every kernel of the module, a group's or not, is rendered from the templates found by
`template_environment` and leaves a `KernelRecord`.
"""
from __future__ import annotations

import functools
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import sympy
import torch
import torch.fx

from flagtree_py.codegen import indexing
from flagtree_py.codegen.check_kernel import SOURCE_PROBLEMS as _SOURCE_PROBLEMS
from flagtree_py.codegen.check_kernel import check_kernel
from flagtree_py.codegen.gemm import lower_gemm_group
from flagtree_py.codegen.indexing import LoweringError
from flagtree_py.codegen.kernel import KernelBuilder
from flagtree_py.codegen.lowerings import POINTWISE, REDUCTIONS, VIEWS
from flagtree_py.codegen.share_kernels import group_signature, rename_identifiers

_LOWERINGS = {**POINTWISE, **VIEWS, **REDUCTIONS}
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


class GroupLowering:
    """The fusion-group half of `ModuleWriter`, which it is mixed into. It uses the writer's `kinds`, `target`,
    `device_type`, `out`, `emitted_symbolic`, `share_kernels`, `shared` and `signature_values`, its `timed`
    steps and its printing (`call_line`, `allocation`); gemm.py uses `_group_subgraph`, `_subgraph_symbols`,
    `_needs_int64` and `_fallback_source` too."""

    def lower_group(self, group, buffers, views) -> tuple[str | None, list[str]]:
        """(the group's kernel section, or None when it launches an earlier group's kernel or runs aten;
        its wrapper lines)."""
        key = order = None
        if self.share_kernels:
            key, order = group_signature(group, self.kinds, buffers, self.emitted_symbolic, self.signature_values)
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


def _flatten(value):
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    else:
        yield value
