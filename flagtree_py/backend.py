"""The torch.compile entry: `torch.compile(model, backend="flagtree", options={...})`.

Registered through the `torch_dynamo_backends` entry point (pyproject.toml), so users need no
`import flagtree_py`. This module must not also call `register_backend("flagtree")`: torch
asserts on a duplicate name.
"""

from __future__ import annotations

import itertools
import time

import torch
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

from flagtree_py.decompositions import flagtree_decompositions
from flagtree_py.options import CompileOptions
from flagtree_py.passes.fuse_attention import route_sdpa_calls
from flagtree_py.pipeline import safe_compile_graph
from flagtree_py.report import amend_record

_GRAPH_IDS = itertools.count()


def flagtree_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """Dynamo backend: capture with AOTAutograd (inference graph), then compile with flagtree."""
    compile_options = CompileOptions.from_user(options)
    if mode not in (None, "default"):
        raise ValueError(f"flagtree has no mode {mode!r}; pass options={{...}} instead")
    graph_name = f"graph_{next(_GRAPH_IDS)}"
    entered = time.perf_counter()
    route_sdpa_calls(gm)  # before AOTAutograd: one attention op whatever SDPA backend the device has

    def forward_compiler(aten_gm, aten_inputs):
        # aten_inputs are fake tensors; Dynamo's example_inputs are the real ones (parameters
        # included, in the same order when AOTAutograd added or removed none): the layout passes
        # need the real parameters
        phases.update(aot_capture=time.perf_counter() - entered)  # AOTAutograd's trace and decompositions
        guards = _ShapeGuardWatch(aten_inputs)
        compiled_graph = safe_compile_graph(aten_gm, aten_inputs, compile_options, graph_name,
                                            real_inputs=example_inputs, phases=phases)
        amend_record(graph_name, shape_guards_added=guards.added())
        return compiled_graph

    def backward_compiler(aten_gm, aten_inputs):
        # flagtree compiles inference; a backward (training) graph runs as plain aten
        return make_boxed_func(aten_gm.forward)

    phases: dict = {}  # the compile record's phases_s (pipeline.py), the same dict
    compiled = aot_module_simplified(
        gm,
        example_inputs,
        fw_compiler=forward_compiler,
        bw_compiler=backward_compiler,
        decompositions=flagtree_decompositions(),
        keep_inference_input_mutations=True,
    )
    if "aot_capture" in phases:  # AOTAutograd's runtime wrappers, after flagtree's compile returned
        phases["aot_wrappers"] = round(time.perf_counter() - entered - sum(phases.values()), 4)
    return compiled


class _ShapeGuardWatch:
    """Guards on dynamic sizes that flagtree's compile added to Dynamo's shape env (a `==` on a SymInt
    asks the env, which answers from this call's sizes and guards on the answer). Each one makes Dynamo
    compile again at a length that fails it; the record lists them (expression and where it was added),
    so that a pass which specializes a dynamic size shows up. A cache hit runs no pass and adds none."""

    def __init__(self, fake_inputs) -> None:
        from torch._guards import detect_fake_mode

        mode = detect_fake_mode(fake_inputs)
        self.env = getattr(mode, "shape_env", None)
        self.before = len(self.env.guards) if self.env is not None else 0

    def added(self) -> list[str]:
        if self.env is None:
            return []
        return [f"{guard.expr} {getattr(guard, 'sloc', '')}".strip() for guard in self.env.guards[self.before:]]
