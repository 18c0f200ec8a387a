"""The aten inference graph in one trace, where AOTAutograd would make two (option `capture`, default "direct").

AOTAutograd's inference capture traces the Dynamo graph twice on fake tensors: once to collect what its
runtime wrappers need (`aot_collect_metadata`: which inputs are mutated, which outputs alias what), once
to make the functional aten graph. For Qwen3-8B's 36-layer decode step that is 7.8-8.3 s of a 20.6-22.9 s
cold first call on the H100's host. Where none of those wrappers has work to do (the graphs
dynamo_link.py links, and an LLM's decode step), one trace gives the same graph:

    make_fx(functionalize(gm, remove="mutations"), decompositions) on Dynamo's own fake example values,
    under the Python dispatcher (as AOTAutograd traces), then dead code removed

Inputs mutated in place are written back at the end of the graph with `copy_` (what
`keep_inference_input_mutations=True` makes AOTAutograd do), views stay views. On the 36-layer decode step
this graph is AOTAutograd's, node for node (tests/backend/test_capture.py checks it on the tiny models),
in about half the time: 3.7 s -> 2.0 s on the CPU machine; 3.0 s on the H100's host, where AOTAutograd
took 6.7 s on the same machine that day
(`benchmarks/results/decode_qwen3_flagtree_direct_capture_h100_2026-11-23_s7e.json`).

`capture(gm, example_inputs, decompositions)` returns the graph, or the reason it cannot be used (then
backend.py runs AOTAutograd, as with `capture="aot"`). Refused, before the trace: grad on with an input that
requires grad (a joint graph), autocast on, tensor-subclass inputs, parameters or buffers left on the Dynamo
graph module, higher-order ops (effect tokens, subgraphs), custom ops that mutate an argument (AOTAutograd
wraps them in `auto_functionalized`), random ops (a packet with one random overload counts), `.item()` and
float inputs (AOTAutograd's tensorify pass rewrites those); after it: an input whose metadata the graph
changes, an output that shares storage with an input or another output, a mutated input sharing storage with
another input. The call then runs as AOTAutograd's inference wrapper would (`dynamo_link.linked_callable`):
version counters of the mutated inputs bumped, grad off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx


@dataclass
class Captured:
    """A direct capture: the aten graph, its fake inputs, and the inputs the graph mutates (positions)."""

    gm: torch.fx.GraphModule
    fake_inputs: list
    mutated: list[int]


def capture(gm: torch.fx.GraphModule, example_inputs: list, decompositions: dict) -> Captured | str:
    """The functional aten graph of Dynamo's `gm` in one trace, or why it cannot be captured so."""
    try:
        return _capture(gm, example_inputs, decompositions)
    except Exception as error:  # noqa: BLE001 -- torch internals of another version: AOTAutograd captures
        return f"not capturable here ({type(error).__name__}: {str(error)[:200]})"


def _capture(gm: torch.fx.GraphModule, example_inputs: list, decompositions: dict) -> Captured | str:
    why = _why_not_before(gm, example_inputs)
    if why is not None:
        return why
    fakes = [node.meta.get("example_value") for node in gm.graph.nodes if node.op == "placeholder"]
    mode = next((value.fake_mode for value in fakes if hasattr(value, "fake_mode")), None)
    if mode is None or len(fakes) != len(example_inputs):
        return "no fake example values on the Dynamo graph"
    if any(hasattr(value, "fake_mode") and value.fake_mode is not mode for value in fakes):
        return "example values of several fake modes"
    before = [_metadata(value) for value in fakes]
    from torch._dispatch.python import enable_python_dispatcher
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        with mode, torch.no_grad(), enable_python_dispatcher():
            aten_gm = make_fx(torch.func.functionalize(gm, remove="mutations"),
                              decomposition_table=decompositions)(*fakes)
    except Exception as error:  # noqa: BLE001 -- whatever the one trace cannot do, AOTAutograd's two may
        return f"trace failed ({type(error).__name__}: {str(error)[:200]})"
    _drop_aliases_of_fresh_constants(aten_gm.graph)
    aten_gm.graph.eliminate_dead_code()
    aten_gm.recompile()
    if any(_metadata(value) != old for value, old in zip(fakes, before)):
        return "an input's metadata is changed"
    return _checked(aten_gm, fakes, example_inputs)


def _why_not_before(gm: torch.fx.GraphModule, example_inputs: list) -> str | None:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    tensors = [value for value in example_inputs if isinstance(value, torch.Tensor)]
    if torch.is_grad_enabled() and any(value.requires_grad for value in tensors):
        return "grad on, an input requires grad (a training graph)"
    if torch._C._is_any_autocast_enabled():
        return "autocast on"
    if any(is_traceable_wrapper_subclass(value) for value in tensors):
        return "tensor subclass input"
    if next(gm.parameters(), None) is not None or next(gm.buffers(), None) is not None:
        return "parameters or buffers on the Dynamo graph module"
    for node in gm.graph.nodes:
        if node.op == "placeholder" and isinstance(node.meta.get("example_value"), torch.SymFloat):
            return f"float input {node.name}"
        if node.op == "call_module":
            return f"module call {node.target}"
        if node.op == "call_method" and node.target in ("item", "tolist"):
            # a Python float Dynamo made an input: AOTAutograd's tensorify pass turns it into tensor math
            # or specializes it (a Dynamo restart), which one trace does not do
            return f"a tensor's .{node.target}()"
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.HigherOrderOperator):
            return f"higher-order op {target.name()}"
        if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            overloads = ([getattr(target, name) for name in target.overloads()]
                         if isinstance(target, torch._ops.OpOverloadPacket) else [target])
            if any(op.namespace not in ("aten", "prims") and op._schema.is_mutable for op in overloads):
                return f"op {target} mutates its arguments"  # AOTAutograd functionalizes such custom ops
            if any(torch.Tag.nondeterministic_seeded in op.tags for op in overloads):
                return f"random op {target}"
    return None


def _checked(aten_gm: torch.fx.GraphModule, fakes: list, example_inputs: list) -> Captured | str:
    """The capture, once its outputs alias nothing and no mutated input shares storage with another."""
    from torch.multiprocessing.reductions import StorageWeakRef

    placeholders = [node for node in aten_gm.graph.nodes if node.op == "placeholder"]
    position = {node: i for i, node in enumerate(placeholders)}
    mutated = sorted({position[node.args[0]] for node in aten_gm.graph.nodes
                      if node.target is torch.ops.aten.copy_.default and node.args[0] in position})
    storages = {StorageWeakRef(value.untyped_storage()) for value in fakes if isinstance(value, torch.Tensor)}
    seen = set()
    for value in _output_values(aten_gm):
        if not isinstance(value, torch.Tensor):
            continue
        ref = StorageWeakRef(value.untyped_storage())
        if ref in storages:
            return "an output shares storage with an input"
        if ref in seen:
            return "outputs share storage"
        seen.add(ref)
    from flagtree_py.dynamo_link import inputs_alias

    if inputs_alias(example_inputs, mutated):
        return "a mutated input shares storage with another input"
    return Captured(aten_gm, list(fakes), mutated)


def _drop_aliases_of_fresh_constants(graph: torch.fx.Graph) -> None:
    """`torch.tensor(...)` in a model (transformers' empty caches) traces to `lift_fresh_copy`, which torch's
    C++ functionalization follows with an `alias` that AOTAutograd's does not make: a view of a tensor the graph
    itself just made, whose users may as well read that tensor."""
    aten = torch.ops.aten
    for node in list(graph.nodes):
        if node.target is aten.alias.default and getattr(node.args[0], "target", None) is aten.lift_fresh_copy.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def _output_values(aten_gm: torch.fx.GraphModule) -> list:
    values = []
    torch.fx.node.map_arg(aten_gm.graph.output_node().args[0], lambda node: values.append(node.meta.get("val")))
    return values


def _metadata(value) -> tuple | None:
    if not isinstance(value, torch.Tensor):
        return None
    return (value.dtype, tuple(map(str, value.shape)), tuple(map(str, value.stride())), str(value.storage_offset()))
