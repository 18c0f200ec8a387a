"""What a compile says about itself: the record `flagtree_py.report()` returns, and the texts kept to read later.

pipeline.py fills one record per graph as it goes: `new_record` starts it (target, executor, `phases_s` from a
`PhaseClock`), `record_callbacks` let the loaded kernels add their failures and Triton compiles, and after
code generation `graph_statistics` and `fusions_split` say what ran where. A cache entry keeps the part of the
record that a hit reports again (`cacheable_record`) and, for `flagtree cache show` and the dump directory,
the aten graph, the fusion groups (`partition_text`) and the toolchain (`toolchain_versions`).
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import torch
import torch.fx

from flagtree_py.codegen.lowerings import is_gemm_or_attention
from flagtree_py.options import CompileOptions
from flagtree_py.runtime.check import KernelErrors
from flagtree_py.runtime.merged_weights import merged_weight


class PhaseClock:
    """Wall seconds of consecutive compile phases: `done(name)` closes the phase that just ran."""

    def __init__(self, before: dict | None) -> None:
        # the caller's dict itself: backend.py adds what AOTAutograd does after the compile returns
        self.seconds = before if before is not None else {}
        self.seconds.update({name: round(value, 4) for name, value in self.seconds.items()})
        self.last = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self.last, 4)
        self.last = now


def new_record(graph_name: str, target, reason: str, device_type: str, phase: PhaseClock, passes: dict) -> dict:
    """A graph's record as its compile starts; `passes` and `phase.seconds` are held, not copied."""
    return {
        "graph": graph_name,
        "target": target.name,
        "target_vendor": target.vendor,
        "target_reason": reason,
        "executor": "triton" if device_type == "cuda" else "interpreter",
        "passes": passes,
        "kernel_failures": [],
        # builds of this graph's kernels by triton.compile: JIT first launches on a GPU (later, at run
        # time); always 0 under the interpreter, which compiles nothing; 0 for kernels whose binary
        # comes from the cache entry
        "triton_compiles": 0,
        # wall seconds per compile phase, in order (benchmarks/compile_time.py reads them)
        "phases_s": phase.seconds,
    }


def record_callbacks(record: dict, options: CompileOptions):
    """(on_failure, on_compile, on_check) of the loaded kernels, writing into `record`."""
    def on_failure(kernel: str, error: str) -> None:
        record["kernel_failures"].append({"kernel": kernel, "error": error})

    def on_compile(kernel: str) -> None:
        record["triton_compiles"] += 1

    return on_failure, on_compile, (KernelErrors(record) if options.check_kernels else None)


def graph_statistics(graph: torch.fx.Graph, partition, generated) -> dict:
    """What ran where. "Work" is every computing node except GEMMs and attention (views are
    metadata, not work: they are counted apart, as folded into kernel indexing or not)."""
    kinds = partition.kinds
    failed = {f["group"] for f in generated.codegen_fallbacks}
    in_kernels = {n for n in graph.nodes if n.name in generated.template_nodes}
    for group in partition.groups:
        if group.name not in failed:
            in_kernels |= group.members
    calls = [n for n in graph.nodes if n.op == "call_function" and kinds[n] not in ("symbolic",)]
    # merged_weight returns a view of colocated parameters: layout, not work
    work = [n for n in calls if kinds[n] != "view" and not is_gemm_or_attention(n)
            and str(n.target) != "<built-in function getitem>" and n.target is not merged_weight]
    views = [n for n in calls if kinds[n] == "view"]
    wrapper_source = generated.source.split("\ndef call(args):", 1)[-1]
    assigned = set(re.findall(r"(?m)^ {4,}(\w+) = ", wrapper_source))  # one scan, not one per view
    emitted_views = [n for n in views if n.name in assigned]
    lowered = [n for n in work if n in in_kernels]
    symbols = sorted({str(s) for n in graph.nodes if n.op == "placeholder" for s in _symbols(n)})
    return {
        # the module's @triton.jit kernels: groups of the same structure (one per layer) launch one kernel
        "triton_kernels": len(generated.kernels),
        "kernels_distinct": len(generated.kernels),
        # what one kernel per group would have made (attention kernels were always one per shape)
        "kernels_without_sharing": sum(max(1, len(k.groups)) for k in generated.kernels),
        "lowered_nodes": generated.lowered_nodes,
        "work_nodes": len(work),
        "work_nodes_in_kernels": len(lowered),
        "lowered_fraction": round(len(lowered) / len(work), 4) if work else 1.0,
        "views_folded": len(views) - len(emitted_views),
        "views_in_wrapper": len(emitted_views),
        "extern_ops": generated.extern_ops,
        "codegen_fallbacks": generated.codegen_fallbacks,
        "kernel_checks": generated.kernel_checks,
        "dynamic_symbols": symbols,
        "kernels": [dataclasses.asdict(k) | {"source": None} for k in generated.kernels],
    }


def fusions_split(graph: torch.fx.Graph, partition) -> list[str]:
    """Stamped pattern instances whose computing nodes did not all land in one kernel."""
    instances: dict = {}
    for node in graph.nodes:
        if "fusion" in node.meta and partition.kinds.get(node) != "view":
            instances.setdefault(node.meta["fusion"], set()).add(partition.group_of.get(node))
    return sorted(f"{pattern}#{i}" for (pattern, i), groups in instances.items() if len(groups) != 1 or None in groups)


def _symbols(node) -> set:
    val = node.meta.get("val")
    if isinstance(val, torch.SymInt):
        return set(val.node.expr.free_symbols)
    if isinstance(val, torch.Tensor):
        found = set()
        for size in val.shape:
            if isinstance(size, torch.SymInt):
                found |= set(size.node.expr.free_symbols)
        return found
    return set()


def partition_text(partition) -> str:
    """The fusion groups, readable: each group's shape, reduction dims and stores, then its members."""
    lines = []
    for group in partition.groups:
        roles = ", ".join(f"{n.name}:{r}" for n, r in group.stores())
        lines.append(f"{group.name}: shape={tuple(map(str, group.full_shape))} rdims={group.rdims} stores=[{roles}]")
        lines.append("    " + " ".join(n.name for n in group.ordered_members()))
    return "\n".join(lines) + "\n"


def dump_graph_texts(directory: Path, graph_name: str, graph_text: str, partition_listing: str) -> None:
    """The option `dump_dir`: `<graph>.aten.txt` (the graph after the passes) and `<graph>.partition.txt`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{graph_name}.aten.txt").write_text(graph_text)
    (directory / f"{graph_name}.partition.txt").write_text(partition_listing)


_CACHED_FIELDS = ("triton_kernels", "kernels_distinct", "kernels_without_sharing", "lowered_nodes", "work_nodes", "work_nodes_in_kernels", "lowered_fraction",
                  "views_folded", "views_in_wrapper", "extern_ops", "codegen_fallbacks", "kernel_checks", "dynamic_symbols",
                  "kernels", "fusions_split", "passes")


def cacheable_record(record: dict) -> dict:
    """What a cache entry keeps of the record, for a hit to report again (`compile_s` as `compile_s_cold`)."""
    return {k: record[k] for k in _CACHED_FIELDS if k in record} | {"compile_s_cold": record["compile_s"]}


def toolchain_versions() -> dict:
    """The toolchain in the key, readable: why an entry built elsewhere is not hit here."""
    import platform

    import triton

    import flagtree_py

    return {"flagtree": flagtree_py.__version__, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version()}
