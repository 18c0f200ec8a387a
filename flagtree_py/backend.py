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

from flagtree_py.capture import Captured
from flagtree_py.capture import capture as capture_directly
from flagtree_py.decompositions import flagtree_decompositions
from flagtree_py.dynamo_link import (compile_from_link, link_key, linked_callable, note_capture, note_direct_capture,
                                     symbolic_state, write_link)
from flagtree_py.options import CompileOptions
from flagtree_py.passes.fuse_attention import route_sdpa_calls
from flagtree_py.pipeline import safe_compile_graph
from flagtree_py.precompile import FlagtreeGraph
from flagtree_py.report import update_record

_GRAPH_IDS = itertools.count()
#: AOTAutograd's own cache stores Inductor's output code only; torch's precompile forces it on around the
#: backend (flagtree's precompiled graphs are saved by precompile.py instead)
_NO_AOTAUTOGRAD_CACHE = {"force_autograd_cache": False, "bundled_autograd_cache": False,
                         "strict_autograd_cache": False}


def flagtree_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """Dynamo backend: capture the inference graph in one trace (capture.py), or with AOTAutograd where that
    cannot be used or `capture="aot"`, then compile with flagtree."""
    compile_options = CompileOptions.from_user(options)
    if mode not in (None, "default"):
        raise ValueError(f"flagtree has no mode {mode!r}; pass options={{...}} instead")
    graph_name = next_graph_name()
    entered = time.perf_counter()
    route_sdpa_calls(gm)  # before AOTAutograd: one attention op whatever SDPA backend the device has
    specialize_float_inputs(gm)  # before AOTAutograd: no second Dynamo trace (see the function)

    key = link_key(gm, example_inputs, compile_options)  # the Dynamo graph's: a hit needs no AOTAutograd
    phases: dict = {"dynamo_key": 0.0}  # the compile record's phases_s (pipeline.py), the same dict
    if key is not None:
        phases["dynamo_key"] = round(time.perf_counter() - entered, 4)
        linked = compile_from_link(key, example_inputs, compile_options, graph_name, phases)
        if linked is not None:
            return FlagtreeGraph(linked, key, compile_options, graph_name)
        phases.clear()
        phases["dynamo_key"] = round(time.perf_counter() - entered, 4)  # the key and the link looked up
    capture: dict = {}  # what the link written after the compile needs (dynamo_link.py)
    symbols_before = symbolic_state(gm) if key is not None else None

    def forward_compiler(aten_gm, aten_inputs, direct: Captured | None = None):
        # aten_inputs are fake tensors; Dynamo's example_inputs are the real ones (parameters
        # included, in the same order when AOTAutograd added or removed none): the layout passes
        # need the real parameters
        # AOTAutograd's trace and decompositions, or the direct capture's one trace (capture.py)
        seconds = time.perf_counter() - entered - phases["dynamo_key"]
        phases.update({"aot_capture" if direct is None else "direct_capture": seconds})
        if key is not None:
            capture.update(note_capture(aten_gm, example_inputs) if direct is None
                           else note_direct_capture(aten_gm, example_inputs, direct.mutated))
        guards = _ShapeGuardWatch(aten_inputs)
        compiled_graph = safe_compile_graph(aten_gm, aten_inputs, compile_options, graph_name,
                                            real_inputs=example_inputs, phases=phases)
        update_record(graph_name, {"shape_guards_added": guards.added()})
        return compiled_graph

    def backward_compiler(aten_gm, aten_inputs):
        # flagtree compiles inference; a backward (training) graph runs as plain aten
        return make_boxed_func(aten_gm.forward)

    direct = capture_directly(gm, example_inputs, flagtree_decompositions()) if compile_options.capture == "direct" \
        else None
    if isinstance(direct, Captured):
        compiled = linked_callable(forward_compiler(direct.gm, direct.fake_inputs, direct), direct.mutated)
        update_record(graph_name, {"capture": "direct"})
    else:
        with torch._functorch.config.patch(_NO_AOTAUTOGRAD_CACHE):
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
            update_record(graph_name, {"capture": "aot" if direct is None else f"aot (direct refused: {direct})"})
    if key is not None and capture:
        write_link(key, compile_options, graph_name, capture, symbols_before, symbolic_state(gm))
    # what Dynamo calls; torch's precompile (`aot_compile`) can also save it (precompile.py)
    return FlagtreeGraph(compiled, key, compile_options, graph_name)


def next_graph_name() -> str:
    """The name of the next graph compiled or loaded in this process (its record's `graph`)."""
    return f"graph_{next(_GRAPH_IDS)}"


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


def specialize_float_inputs(gm: torch.fx.GraphModule) -> int:
    """Python floats Dynamo made graph inputs (dynamic=True) become constants, guarded; returns how many.

    With `specialize_float=False` (Dynamo's default) a float attribute such as an RMSNorm eps, a rotary
    scaling or an SDPA `scale` reaches the graph as a 0-d tensor input and `.item()`. AOTAutograd's
    `tensorify_python_scalars` then turns the floats it can into tensor math; one it cannot (SDPA's
    `scale=`, embedding's `norm_type`) is specialized and Dynamo *restarts*: the whole frame is traced
    and captured again (issue 9: `attempts: 2`, a second Dynamo trace and AOTAutograd capture of the
    model). This does up front what Dynamo's restart does for those floats
    (`OutputGraph.remove_tensorify_specialized_graphargs`), for every float input: each `.item()` is
    replaced by its value through `guard_scalar`, which records a guard (`eps == 1e-06`) in the shape
    environment that Dynamo's guards include, so a changed float recompiles instead of being ignored.
    The float names are marked specialized so that tensorify does not restart for them. The input
    itself stays (Dynamo still passes it), unused. Floats become literals in the kernels, as in a
    static (dynamic=None) compile. Only floats read from an attribute (a module's, a config's) or a
    global are specialized: those are constants of the model. A float passed as an argument of the
    compiled function (a temperature) may change every call: it keeps Dynamo's handling.
    """
    try:  # Dynamo internals (torch >= 2.6); without them the restart costs time, not correctness
        from torch._dynamo.symbolic_convert import TensorifyState
        from torch._subclasses.fake_tensor import FakeTensor
        from torch.fx.experimental.symbolic_shapes import guard_scalar
    except ImportError:
        return 0
    specialized = 0
    for node in list(gm.graph.nodes):
        if node.op != "placeholder":
            continue
        value = node.meta.get("example_value")
        memo = getattr(value, "item_memo", None) if isinstance(value, FakeTensor) else None
        symbol = getattr(getattr(memo, "node", None), "_expr", None)
        if not isinstance(memo, torch.SymFloat) or not hasattr(symbol, "name") or not node.users:
            continue
        if not all(user.op == "call_method" and user.target == "item" for user in node.users):
            continue
        if not _is_constant_float(node):
            continue
        constant = guard_scalar(memo)
        for user in list(node.users):
            user.replace_all_uses_with(constant)
            gm.graph.erase_node(user)
        TensorifyState.specialize(symbol.name)
        specialized += 1
    if specialized:
        gm.recompile()
    return specialized


def _is_constant_float(node: torch.fx.Node) -> bool:
    """Whether Dynamo read this float input from an attribute or a global (a model constant such as
    `self.variance_epsilon`), not from an argument of the compiled function."""
    try:
        from torch._dynamo.source import AttrSource, FloatTensorSource, GlobalSource
    except ImportError:
        return False
    source = getattr(node.meta.get("grapharg"), "source", None)
    if isinstance(source, FloatTensorSource):  # the 0-d tensor Dynamo made of the float: its base is the float
        source = source.base
    return isinstance(source, (AttrSource, GlobalSource))
