"""A warm start without AOTAutograd: the cache entry found from the Dynamo graph (issue 9).

On a cache hit, backend.py used to run AOTAutograd's capture (20 s for Qwen3-8B's 36 layers on the H100's
host) only to compute the key of the aten graph, whose compiled module it then imported. Here the key is
computed from the Dynamo graph (`cache/key.py` `dynamo_graph_key`), and a *link* (`cache/links.py`) written at
the cold compile leads to the aten entry.

What AOTAutograd adds at run time must then be done here, or the hit is refused. Its runtime wrappers
(`torch/_functorch/_aot_autograd/runtime_wrappers.py`) deduplicate arguments passed twice, merge inputs that
alias a mutated one into a synthetic base, apply input mutations the graph did not keep, regenerate outputs
that alias inputs or intermediates, thread effect tokens and RNG state, wrap subclasses, and turn autocast
off where it was on. A link is written only when the cold compile's metadata shows that none of that
applies (`why_not_linkable`); what remains is what the inference wrapper always does, redone in
`linked_callable`: bump the version counters of the inputs the graph mutates in place (the KV cache
writes), and run with grad off. Whether arguments are passed twice or share storage with a mutated input
depends on the call, not the graph: `inputs_alias` checks that at every hit. And the link is written only
when AOTAutograd and flagtree's compile added no guard or symbol to the shape environment: a hit, which runs
neither, installs no guard beyond Dynamo's own.
"""

from __future__ import annotations

import time
import warnings

import torch

from flagtree_py.cache import KernelCache, default_cache_dir
from flagtree_py.cache.key import dynamo_graph_key, shape_env_of, symbol_ranges_and_replacements
from flagtree_py.cache.links import GraphLinks
from flagtree_py.options import CompileOptions
from flagtree_py.pipeline import graph_inputs_of, inputs_line_up, load_linked_entry
from flagtree_py.report import update_record
from flagtree_py.targets import select_target


def link_key(gm: torch.fx.GraphModule, example_inputs: list, options: CompileOptions) -> str | None:
    """The Dynamo graph's key, or None where no link may serve it (cache off, graph not keyable)."""
    if not options.cache:
        return None
    device_type = next((v.device.type for v in example_inputs if isinstance(v, torch.Tensor)), "cpu")
    target, _ = select_target(options.target, device_type)
    try:  # torch internals read here (the shape environment, functorch's config) differ across versions
        return dynamo_graph_key(gm, example_inputs, target.hash(), options.hash())
    except (AttributeError, TypeError, ValueError) as error:
        _warn_once(f"no Dynamo-graph key ({type(error).__name__}: {error}); warm starts run AOTAutograd")
        return None


def inputs_alias(example_inputs: list, mutated: list[int]) -> bool:
    """Whether this call passes one tensor twice (AOTAutograd would deduplicate) or an input shares
    storage with one the graph mutates (it would build a synthetic base)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    tensors = [(i, v) for i, v in enumerate(example_inputs) if isinstance(v, torch.Tensor)]
    if len({id(v) for _, v in tensors}) != len(tensors):
        return True
    storages: dict = {}
    for i, value in tensors:
        storages.setdefault(StorageWeakRef(value.untyped_storage()), []).append(i)
    return any(len(users) > 1 and any(i in mutated for i in users) for users in storages.values())


def compile_from_link(key: str, example_inputs: list, options: CompileOptions, graph_name: str, phases: dict):
    """The compiled graph from a link, or None (no link, stale entry, aliasing inputs): compile in full."""
    cache = KernelCache(options.cache_dir or default_cache_dir())
    if not cache.usable():  # a directory the cache refuses (another owner, writable by all): no link read
        return None
    link = GraphLinks(cache.directory).get(key)
    if link is None or inputs_alias(example_inputs, link["written"]):
        return None
    try:
        return serve_link(key, link, example_inputs, options, graph_name, phases)
    except Exception as error:  # noqa: BLE001 - a link is a shortcut: whatever goes wrong, the full path remains
        _warn_once(f"the Dynamo-graph link failed ({type(error).__name__}: {error}); compiling in full")
        return None


def serve_link(key: str, link: dict, example_inputs: list, options: CompileOptions, graph_name: str,
               phases: dict | None = None):
    """The link's entry bound to these inputs and run as AOTAutograd's wrapper would (`linked_callable`), or
    None where the entry is missing or damaged. The caller has checked `inputs_alias` (a warm start here, a
    precompiled graph's first call in precompile.py)."""
    call = load_linked_entry(link["aten_key"], link, example_inputs, options, graph_name, phases)
    if call is None:
        return None
    update_record(graph_name, {"dynamo_key": key})
    return linked_callable(call, link["mutated_seen_by_autograd"])


def linked_callable(call, mutated_seen_by_autograd: list[int]):
    """`call(args)` as AOTAutograd's inference runtime wrapper would run it, for a graph that needs none of
    its other work: the version counters of inputs mutated in place bumped (autograd must see the writes
    the graph made), grad off while it runs."""
    increment_version = torch.autograd.graph.increment_version

    def run(*args):
        args = list(args)
        if mutated_seen_by_autograd:
            increment_version(tuple(args[i] for i in mutated_seen_by_autograd))
        grad_enabled = torch.is_grad_enabled()
        try:
            if grad_enabled:
                torch._C._set_grad_enabled(False)
            return call(args)
        finally:
            if grad_enabled:
                torch._C._set_grad_enabled(True)

    return run


def symbolic_state(gm: torch.fx.GraphModule) -> tuple | None:
    """What of the shape environment a compile may add to (guards, symbols, ranges, replacements,
    runtime asserts): compared before and after AOTAutograd and flagtree ran."""
    env = shape_env_of(gm)
    if env is None or not all(hasattr(env, name) for name in _SHAPE_ENV_FIELDS):
        return None  # no link: a hit could not know which guards the compile added
    return (len(env.guards), len(env.var_to_range), *symbol_ranges_and_replacements(env),
            sum(len(asserts) for asserts in env.deferred_runtime_asserts.values()), len(env.divisible))


_SHAPE_ENV_FIELDS = ("guards", "var_to_range", "replacements", "deferred_runtime_asserts", "divisible")
_WARNED: set = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(f"flagtree: {message}", stacklevel=3)


def why_not_linkable(aten_gm: torch.fx.GraphModule, example_inputs: list) -> str | None:
    """None when the AOTAutograd capture just made needs no runtime wrapper work beyond `linked_callable`'s
    and its graph's inputs are Dynamo's, one for one; else the reason (kept in the record)."""
    from torch._guards import TracingContext
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    context = TracingContext.try_get()
    meta = getattr(context, "fw_metadata", None)
    if meta is None:
        return "no AOTAutograd metadata"
    if torch._C._is_any_autocast_enabled():
        return "autocast on (AOTAutograd turns it off at run time)"
    if any(is_traceable_wrapper_subclass(v) for v in example_inputs if isinstance(v, torch.Tensor)):
        return "tensor subclass input"
    for i, info in enumerate(meta.input_info):
        if info.mutates_metadata or getattr(info, "mutates_storage_metadata", False):
            return f"input {i}: metadata mutation"
        if info.mutation_type.name not in ("NOT_MUTATED", "MUTATED_IN_GRAPH"):
            return f"input {i}: mutation applied outside the graph"
        if info.requires_grad and torch.is_grad_enabled():  # AOTAutograd's needs_autograd: a joint graph
            return f"input {i} requires grad, grad mode on"
    for j, info in enumerate(meta.output_info):
        if info.output_type.name != "non_alias":
            return f"output {j}: {info.output_type.name}"
    if meta.num_intermediate_bases or getattr(meta, "tokens", None) or meta.is_rng_op_functionalized:
        return "intermediate bases, effect tokens or functionalized RNG"
    if len(meta.input_info) != len(example_inputs) or not inputs_line_up(aten_gm, example_inputs):
        return "the aten graph's inputs are not Dynamo's, one for one (deduplicated, synthetic base, lifted parameters)"
    return None


def write_link(key: str, options: CompileOptions, graph_name: str, capture: dict, before: tuple | None,
               after: tuple | None) -> None:
    """After a full compile: link the Dynamo graph's key to the aten entry, when that is safe (see the module)."""
    reason = capture.get("why_not")
    if reason is None and (before is None or before != after):
        reason = "AOTAutograd or flagtree added guards or symbols"
    record = update_record(graph_name, {"link": reason or "pending"})
    if reason is not None or record is None or not record.get("cache_key") or record.get("fallback"):
        return
    started = time.perf_counter()
    cache = KernelCache(options.cache_dir or default_cache_dir())
    if not cache.usable() or cache.peek(record["cache_key"]) is None:  # refused, or the entry was not stored
        update_record(graph_name, {"link": "not written: no intact entry to link to"})
        return
    written = GraphLinks(cache.directory).put(key, {
        "aten_key": record["cache_key"], "graph": graph_name, "inputs": capture["inputs"],
        "mutated": sorted(capture["graph_inputs"]["mutated"]), "symbolic": capture["graph_inputs"]["symbolic"],
        "mutated_seen_by_autograd": capture["mutated_seen_by_autograd"],
        # every input AOTAutograd saw written (the graph's own list may miss a write flagtree's passes see later)
        "written": sorted(set(capture["written"]) | set(capture["graph_inputs"]["mutated"])),
    })
    phases = {**record.get("phases_s", {}), "link_write": round(time.perf_counter() - started, 4)}
    update_record(graph_name, {"link": "written" if written else "not written (disk)", "dynamo_key": key,
                               "phases_s": phases})


def note_capture(aten_gm: torch.fx.GraphModule, example_inputs: list) -> dict:
    """What a link needs of the capture, read in the forward compiler before flagtree's passes change it."""

    try:
        return _read_capture(aten_gm, example_inputs)
    except (AttributeError, TypeError, KeyError) as error:  # AOTAutograd's metadata of another torch version
        return {"why_not": f"AOTAutograd metadata unreadable ({type(error).__name__}: {error})"}


def note_direct_capture(aten_gm: torch.fx.GraphModule, example_inputs: list, mutated: list[int]) -> dict:
    """`note_capture` for a direct capture (capture.py), which refuses whatever `why_not_linkable` refuses: the
    graph's inputs are Dynamo's, and the inputs it mutates are written in the graph."""
    return {"why_not": None, "inputs": len(example_inputs), "graph_inputs": graph_inputs_of(aten_gm),
            "mutated_seen_by_autograd": list(mutated), "written": list(mutated)}


def _read_capture(aten_gm: torch.fx.GraphModule, example_inputs: list) -> dict:
    from torch._guards import TracingContext

    meta = getattr(TracingContext.try_get(), "fw_metadata", None)
    # ViewAndMutationMeta.mutated_graph_handled_indices_seen_by_autograd, computed as torch does (the
    # attribute is newer than some torch versions flagtree runs on)
    seen = [i for i, info in enumerate(getattr(meta, "input_info", []))
            if info.mutation_type.name == "MUTATED_IN_GRAPH" and not info.mutations_hidden_from_autograd]
    written = [i for i, info in enumerate(getattr(meta, "input_info", [])) if info.mutates_data]
    return {"why_not": why_not_linkable(aten_gm, example_inputs), "inputs": len(example_inputs),
            "graph_inputs": graph_inputs_of(aten_gm), "mutated_seen_by_autograd": seen, "written": written}
