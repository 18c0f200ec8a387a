"""The compiler, in order. Reading this file should explain flagtree.

    capture   (backend.py)  Dynamo's FX graph -> AOTAutograd inference graph in core aten ops,
                            dynamic sizes kept as sympy symbols
    canonicalize            attention forms -> flagtree::attention (K/V repeat looked through), dead code, common subexpressions, splits into slices, views that do nothing
    fuse                    LLM patterns (RMSNorm, add+RMSNorm, q/k norm+RoPE, RoPE, SwiGLU) stamped,
                            counted, and each kept in one kernel by the partitioner; MoE routing
                            rewritten into one op with a kernel template of its own
    layout                  q/k/v and gate/up projections reading one input -> one GEMM; their
                            parameters are then laid back to back in one buffer (held once)
    partition               fusion groups on a networkx DAG (vertical fusion, no cycles)
    lower                   each group -> a Triton kernel from a Jinja2 template (codegen/),
                            shaped by the target's tile tables; the rest stays extern aten
    build                   import the module; kernels JIT on the GPU or run in Triton's
                            interpreter on a CPU; a kernel that fails runs its aten fallback
    run                     the generated `call(args)` wrapper
    cache                   the module is stored under a content key; a later compile of the
                            same graph (any process) imports it: no passes, no code generation

What each compile reports (`flagtree_py.report()`) and what its cache entry keeps to be read: compile_record.py.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.fx

from flagtree_py.cache import KernelCache, cache_key, default_cache_dir
from flagtree_py.cache.externs import extern_import_paths, resolve_import_paths
from flagtree_py.cache.store import AUTOTUNE_FILE
from flagtree_py.codegen.step_order import mutates_first_argument
from flagtree_py.codegen.wrapper import ModuleWriter
from flagtree_py.compile_record import (PhaseClock, cacheable_record, dump_graph_texts, fusions_split, graph_statistics,
                                        new_record, partition_text, record_callbacks, toolchain_versions)
from flagtree_py.options import CompileOptions
from flagtree_py.passes import PassContext
from flagtree_py.passes.decompose_batched_gemv import decompose_batched_gemv
from flagtree_py.passes.decompose_rank1_matmul import decompose_rank1_matmul
from flagtree_py.passes.decompose_split import decompose_split
from flagtree_py.passes.decompose_vllm_rotary import decompose_vllm_rotary
from flagtree_py.passes.eliminate_common_subexpressions import eliminate_common_subexpressions
from flagtree_py.passes.eliminate_dead_code import eliminate_dead_code
from flagtree_py.passes.fuse_add_rms_norm import fuse_add_rms_norm
from flagtree_py.passes.fuse_attention import fuse_attention
from flagtree_py.passes.fuse_moe_experts import fuse_moe_experts
from flagtree_py.passes.fuse_moe_routing import fuse_moe_routing
from flagtree_py.passes.fuse_qk_norm_rope import fuse_qk_norm_rope
from flagtree_py.passes.fuse_rms_norm import fuse_rms_norm
from flagtree_py.passes.fuse_rope import fuse_rope
from flagtree_py.passes.fuse_silu_mul import fuse_silu_mul
from flagtree_py.passes.merge_gate_up import merge_gate_up
from flagtree_py.passes.merge_qkv import merge_qkv
from flagtree_py.passes.partition_fusion_groups import partition_fusion_groups
from flagtree_py.passes.reinplace_cache_writes import reinplace_cache_writes
from flagtree_py.passes.remove_noop_views import remove_noop_views
from flagtree_py.report import add_record
from flagtree_py.runtime.autotune import GemmTuner, attach_tuner
from flagtree_py.runtime.cuda_graphs import CudaGraphRunner, why_no_cuda_graphs
from flagtree_py.runtime.loader import bind_kernels, load_module
from flagtree_py.runtime.merged_weights import colocate
from flagtree_py.runtime.parallel_builds import FirstCallBuilds, default_workers
from flagtree_py.targets import select_target

#: canonicalization, in order; each pass is `fn(graph, ctx) -> changed`
CANONICALIZE = [
    fuse_attention,  # every SDPA form -> flagtree::attention on un-repeated K/V (the repeat dies next)
    decompose_vllm_rotary,  # vLLM's in-place _C.rotary_embedding -> its PyTorch form, fused like that
    reinplace_cache_writes,  # copy_(cache, index_put(cache, ...)) -> index_put_: no full cache copies
    eliminate_dead_code,
    eliminate_common_subexpressions,
    decompose_split,  # split pieces become slices: views that kernels fold
    decompose_batched_gemv,  # MoE batched_mm: expert GEMVs as reductions that read W[ids] in place
    decompose_rank1_matmul,  # K = 1 matmuls (rotary angles) -> broadcast multiplies
    remove_noop_views,
    eliminate_dead_code,
]

#: LLM patterns, most specific first: each stamps its instances, which the partitioner keeps
#: in one kernel apiece (see passes/patterns.py)
FUSE = [fuse_qk_norm_rope, fuse_add_rms_norm, fuse_rms_norm, fuse_rope, fuse_silu_mul,
        fuse_moe_routing,  # rewrites its instances into one flagtree::moe_routing node (own template)
        fuse_moe_experts]  # routed experts -> one flagtree::moe_experts node (sort + grouped GEMMs)

#: layout: parallel projections -> one GEMM (needs the real parameters: PassContext.parameters)
LAYOUT = [merge_qkv, merge_gate_up]

_MODULE_DIR = Path(tempfile.gettempdir()) / "flagtree_modules"
#: entry meta: per GPU architecture, the content-store keys of the binaries the graph's first call needed
FIRST_CALL_BINARIES = "first_call_binaries"


def compile_graph(gm: torch.fx.GraphModule, example_inputs: list, options: CompileOptions, graph_name: str,
                  real_inputs: list | None = None, phases: dict | None = None):
    """Compile one aten inference graph; returns a boxed callable `call(args)`.

    `real_inputs`: the real tensors behind the graph's placeholders, where the caller has them
    (backend.py: Dynamo's example inputs); the layout passes merge only real parameters.
    `phases`: seconds the caller spent before (backend.py: AOTAutograd's capture), kept in the record.
    """
    start = time.perf_counter()
    phase = PhaseClock(phases)
    device_type = _device_type(example_inputs)
    target, reason = select_target(options.target, device_type)
    if not inputs_line_up(gm, real_inputs):  # before the passes change the placeholders' values
        real_inputs = None
    ctx = PassContext(options, parameters=_real_parameters(gm, real_inputs))
    record = new_record(graph_name, target, reason, device_type, phase, ctx.counters)
    on_failure, on_compile, on_check = record_callbacks(record, options)

    graph_inputs = _graph_inputs(gm.graph)  # before the passes: what CUDA graph replay must know
    cache = KernelCache(options.cache_dir or default_cache_dir()) if options.cache else None
    # which inputs are parameters decides what the layout passes may merge: part of the key
    parameter_positions = _placeholder_positions(gm, ctx.parameters)
    key = cache_key(gm, target.hash(), f"{options.hash()} parameters {parameter_positions}") if cache else None
    record["cache_key"] = key
    if cache is not None:
        entry, problem = cache.load(key)
        phase.done("cache_lookup")
        if entry is not None:
            _colocate(entry.meta.get("colocated_inputs", []), _parameters_by_position(gm, ctx.parameters))
            call = _load_cached(entry, gm, record, options, device_type, graph_name, start, on_failure, on_compile, cache, on_check)
            _start_builds(call, real_inputs)
            phase.done("cache_hit_import")
            return _with_cuda_graphs(call, graph_inputs, options, device_type, target, record)
        record["cache"] = f"rebuilt: {problem}" if problem else "miss"
    else:
        record["cache"] = "off"

    graph = gm.graph
    for fn in CANONICALIZE + FUSE + LAYOUT:
        fn(graph, ctx)
    gm.recompile()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    colocated = [[placeholders.index(n) for n in merge] for merge in ctx.merged_parameters]
    _colocate(colocated, _parameters_by_position(gm, ctx.parameters))
    phase.done("passes")
    partition = partition_fusion_groups(graph, device_type, options.gemm_templates)
    ctx.counters["partition_fusion_groups"] += len(partition.groups)
    phase.done("partition")
    writer = ModuleWriter(gm, partition, target, graph_name, device_type)
    generated = writer.generate()
    phase.done("codegen")
    record["codegen_s"] = {name: round(seconds, 4) for name, seconds in generated.timings.items()}

    directory = Path(options.dump_dir) if options.dump_dir else _MODULE_DIR
    module, path = load_module(generated.source, directory, graph_name)
    content_binaries = _content_binaries(cache, device_type, record)
    bind_kernels(module, [k.name for k in generated.kernels], interpret=device_type != "cuda",
                 constants=generated.constants, externs=generated.extern_targets, on_failure=on_failure,
                 poison=options.poison_outputs, on_compile=on_compile, on_check=on_check,
                 content_binaries=content_binaries)
    phase.done("import")
    listing = partition_text(partition)
    if options.dump_dir:
        dump_graph_texts(Path(options.dump_dir), graph_name, str(graph), listing)

    record.update(graph_statistics(graph, partition, generated))
    record["fusions_split"] = fusions_split(graph, partition)
    phase.done("statistics")
    record["module_path"] = str(path)
    record["compile_s"] = round(time.perf_counter() - start, 4)
    record["passes"] = dict(ctx.counters)
    record["kernels_generated"] = len(generated.kernels)  # this compile's kernels, each shared kernel once
    if cache is not None:
        externs = extern_import_paths(generated.extern_targets)
        if externs is not None:  # an extern no import path reaches cannot be cached
            stored = cache.store(key, generated.source, {
                "graph": graph_name, "target": target.name, "target_hash": target.hash(),
                "kernels": [k.name for k in generated.kernels], "externs": externs,
                "constants": generated.constant_targets, "record": cacheable_record(record),
                "colocated_inputs": colocated,
                "aten_graph": str(graph), "partition": listing, "versions": toolchain_versions(),
            })
            if stored is not None:
                cache.evict(options.cache_max_bytes)
        phase.done("cache_write")
    _attach_tuner(module, [k.name for k in generated.kernels], options, cache, key, {})
    add_record(record)
    call = _first_call_builds(module, content_binaries, options, record, cache, key)
    if _start_builds(call, real_inputs):
        phase.done("first_call_plan")  # the dry run predicting the first call's launches
    return _with_cuda_graphs(call, graph_inputs, options, device_type, target, record)


def load_linked_entry(aten_key: str, link: dict, example_inputs: list, options: CompileOptions, graph_name: str,
                      phases: dict | None = None):
    """A cache hit found from the Dynamo graph (backend.py's link): the entry `aten_key` bound to Dynamo's
    own inputs, with no AOTAutograd graph. The link vouches that the aten graph's inputs are Dynamo's, in
    order, and that the entry needs no constant of the graph; this checks the entry like any hit and
    returns None (the caller compiles in full) when it is missing, damaged or needs constants after all."""
    start = time.perf_counter()
    phase = PhaseClock(phases)
    device_type = _device_type(example_inputs)
    target, reason = select_target(options.target, device_type)
    cache = KernelCache(options.cache_dir or default_cache_dir())
    entry, _problem = cache.load(aten_key)
    phase.done("cache_lookup")
    if entry is None or entry.meta.get("constants") or len(example_inputs) != link["inputs"]:
        return None
    record = new_record(graph_name, target, reason, device_type, phase, {})
    record.update(cache_key=aten_key, cache_path="dynamo_graph")
    on_failure, on_compile, on_check = record_callbacks(record, options)
    _colocate(entry.meta.get("colocated_inputs", []),
              [value if isinstance(value, torch.nn.Parameter) else None for value in example_inputs])
    call = _load_cached(entry, None, record, options, device_type, graph_name, start, on_failure, on_compile, cache,
                        on_check)
    phase.done("cache_hit_import")
    graph_inputs = {"mutated": frozenset(link["mutated"]),
                    "symbolic": [(index, dim) for index, dim in link["symbolic"]]}
    return _with_cuda_graphs(call, graph_inputs, options, device_type, target, record)


def graph_inputs_of(gm: torch.fx.GraphModule) -> dict:
    """What CUDA graph replay must know of an aten graph's inputs (for a link: `load_linked_entry`)."""
    return _graph_inputs(gm.graph)


def _graph_inputs(graph: torch.fx.Graph) -> dict:
    """Which inputs the graph writes in place, and where its dynamic sizes sit among the inputs."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    mutated, symbolic = set(), []
    for index, node in enumerate(placeholders):
        if any(mutates_first_argument(user) and user.args[0] is node for user in node.users):
            mutated.add(index)
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt):
            symbolic.append((index, None))
        elif isinstance(val, torch.Tensor):
            symbolic += [(index, d) for d, size in enumerate(val.shape) if isinstance(size, torch.SymInt)]
    return {"mutated": frozenset(mutated), "symbolic": symbolic}


def _with_cuda_graphs(call, graph_inputs: dict, options: CompileOptions, device_type: str, target, record: dict):
    """`call`, replayed from CUDA graphs when the option is on and the graph runs on a CUDA device."""
    reason = why_no_cuda_graphs(device_type, target.features, options.cuda_graphs)
    record["cuda_graphs"] = reason or "on"
    if reason is not None:
        return call
    runner = CudaGraphRunner(call, graph_inputs["mutated"], graph_inputs["symbolic"], options.cuda_graph_sizes,
                             record=record)
    record["cuda_graph_counts"] = runner.counts
    return runner


def _real_parameters(gm: torch.fx.GraphModule, real_inputs: list | None) -> dict:
    """placeholder -> real nn.Parameter, given real inputs lined up with the placeholders (`inputs_line_up`)."""
    if real_inputs is None:
        return {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {node: real for node, real in zip(placeholders, real_inputs)
            if isinstance(real, torch.nn.Parameter) and tuple(real.shape) == tuple(node.meta["val"].shape)}


def _placeholder_positions(gm: torch.fx.GraphModule, nodes) -> list[int]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [i for i, n in enumerate(placeholders) if n in nodes]


def _parameters_by_position(gm: torch.fx.GraphModule, parameters: dict) -> list:
    """The real parameter behind each placeholder, None where there is none."""
    return [parameters.get(n) for n in gm.graph.nodes if n.op == "placeholder"]


def _colocate(merges: list[list[int]], parameters: list) -> None:
    """Lay each merge's parameters (input positions) back to back in one buffer (runtime/merged_weights.py)."""
    for positions in merges:
        parts = [parameters[i] for i in positions]
        if all(p is not None for p in parts):
            colocate(parts)


def _load_cached(entry, gm, record, options, device_type, graph_name, start, on_failure, on_compile, cache, on_check):
    """A cache hit: import the stored module; no code generation, no pass runs. On a GPU, kernels
    whose binary for this device's architecture is in the entry launch it: no Triton compile."""
    meta = entry.meta
    # gm is None for a hit found from the Dynamo graph (load_linked_entry), whose entry has no constants
    constants = {name: getattr(gm, attribute) for name, attribute in meta["constants"].items()}
    directory = Path(options.dump_dir) if options.dump_dir else _MODULE_DIR
    module, path = load_module(entry.module_source, directory, graph_name)
    arch = _device_arch() if device_type == "cuda" else None
    binaries = entry.binaries(arch) if arch else {}
    content_binaries = _content_binaries(cache, device_type, record)
    bind_kernels(module, meta["kernels"], interpret=device_type != "cuda", constants=constants,
                 externs=resolve_import_paths(meta["externs"]), on_failure=on_failure, poison=options.poison_outputs,
                 binaries=binaries, on_compile=on_compile, on_check=on_check, content_binaries=content_binaries)
    record["binaries_loaded"] = sorted(binaries)
    _attach_tuner(module, meta["kernels"], options, cache, entry.key, entry.autotune_winners())
    if options.dump_dir:
        dump_graph_texts(Path(options.dump_dir), graph_name, meta["aten_graph"], meta["partition"])
    record.update(meta["record"])
    record.update({"cache": "hit", "kernels_generated": 0, "module_path": str(path), "kernel_failures": [],
                   "compile_s": round(time.perf_counter() - start, 4)})
    add_record(record)
    return _first_call_builds(module, content_binaries, options, record, cache, entry.key,
                              meta.get(FIRST_CALL_BINARIES, {}).get(arch))


def _attach_tuner(module, kernel_names, options: CompileOptions, cache, key, stored: dict) -> None:
    """GEMM kernels choose their tile per M bucket: stored winners first, then (if on) tuning."""
    def persist(found: dict) -> None:
        if cache is None or key is None:
            return
        try:
            cache.add_extra(key, AUTOTUNE_FILE, {"winners": found})
        except ValueError:  # the graph's entry was never stored, or is damaged: the winners stay in memory
            pass

    tuner = GemmTuner(options.autotune, options.autotune_budget_s, stored, persist)
    attach_tuner(module, kernel_names, tuner)


def _first_call_builds(module, content_binaries, options: CompileOptions, record: dict, cache=None, key=None,
                       known: list[str] | None = None):
    """The module's boxed call; on a GPU with the cache on, one whose first call builds the module's kernels
    in parallel first (runtime/parallel_builds.py). Not under check_kernels, whose launches compare on data.
    The binaries a first call needed are kept in the graph's entry (`known` on a hit): a later first call
    that finds them all in the store skips the dry run."""
    workers = default_workers() if options.parallel_builds is None else options.parallel_builds
    if content_binaries is None or workers == 0 or options.check_kernels:
        call = module.call
        call._boxed_call = True
        return call

    def remember(keys: list[str]) -> None:
        try:
            cache.update_meta(key, lambda meta: meta.setdefault(FIRST_CALL_BINARIES, {}).update(
                {content_binaries.arch: keys}))
        except ValueError:  # a damaged entry: the next first call predicts again
            pass

    return FirstCallBuilds(module.call, module, content_binaries, workers, record, known,
                           None if cache is None else remember)


def _start_builds(call, real_inputs: list | None) -> bool:
    """Start a first call's parallel builds now, in the background (runtime/parallel_builds.py), where the
    caller has the real inputs (lined up with the placeholders): Dynamo's example inputs are the tensors of
    the call that follows, so the builds run beside the rest of Dynamo's compile. The first call checks that
    its arguments have the layout the builds were predicted from. Whether they started."""
    if isinstance(call, FirstCallBuilds) and real_inputs is not None:
        call.start(list(real_inputs))
        return True
    return False


def inputs_line_up(gm: torch.fx.GraphModule, real_inputs: list | None) -> bool:
    """Same count as the placeholders, and every tensor's dtype, device type and rank agree with its
    placeholder's fake value."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if real_inputs is None or len(real_inputs) != len(placeholders):
        return False
    for node, real in zip(placeholders, real_inputs):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) != isinstance(real, torch.Tensor):
            return False
        if isinstance(val, torch.Tensor) and (val.dtype, val.device.type, val.dim()) != (
                real.dtype, real.device.type, real.dim()):
            return False
    return True


def _content_binaries(cache, device_type: str, record: dict):
    """On a GPU with the cache on: kernel binaries found by content (cache/binaries.py), whichever graph
    entry they were built for; `record["binaries_by_content"]` fills, per kernel, as kernels launch."""
    arch = _device_arch() if device_type == "cuda" and cache is not None else None
    if arch is None:
        return None
    from flagtree_py.runtime.aot import ContentBinaries

    found = ContentBinaries(cache.directory, arch)
    record["binaries_by_content"] = found.lookups
    return found


def _device_arch() -> str | None:
    """This GPU's architecture as binaries in cache entries name it: "sm90" on an H100; None with no
    GPU (`flagtree compile` traces "cuda" graphs on fake tensors)."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"


def _device_type(example_inputs) -> str:
    for value in example_inputs:
        if isinstance(value, torch.Tensor):
            return value.device.type
    return "cpu"


def safe_compile_graph(gm, example_inputs, options: CompileOptions, graph_name: str, real_inputs: list | None = None,
                       phases: dict | None = None):
    """compile_graph, but a compiler bug costs speed, not the user's run: fall back to eager."""
    try:
        return compile_graph(gm, example_inputs, options, graph_name, real_inputs, phases)
    except Exception as error:
        if not options.fallback:
            raise
        warnings.warn(f"flagtree: compiling {graph_name} failed ({type(error).__name__}: {error}); running it in eager aten", stacklevel=2)
        add_record({"graph": graph_name, "target": options.target, "fallback": "graph", "error": f"{type(error).__name__}: {error}",
                    "triton_kernels": 0, "lowered_nodes": 0, "extern_ops": [], "passes": {}, "compile_s": 0.0})
        return gm.forward
