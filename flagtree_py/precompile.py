"""Precompiled functions: a warm start with no Dynamo trace (issue 9's "warm <= 2 s").

A warm start through `torch.compile` finds flagtree's compiled graph in the cache (`dynamo_link.py`), but
Dynamo still traces the model first: about 11 s for Qwen3-8B's 36 layers on the H100's host. torch's
precompile, `torch.compile(fn, fullgraph=True, ...).aot_compile((args, kwargs))`, saves what Dynamo made
(the transformed bytecode and the guards) with the backend's compiled graph, and a later process loads it
with `torch.compiler.load_compiled_function` and traces nothing. The backend's graph must then be a
`SerializableCallable`: `FlagtreeGraph`, which backend.py returns for every graph.

What `FlagtreeGraph` serializes is small: the Dynamo graph's key, its link to the aten entry (the link a
cold compile writes, `cache/links.py`) and the compile options. The kernels stay in flagtree's cache, so
an artifact serves on a machine whose cache holds its entry (this one, or one the entry was moved to with
`flagtree cache export/import`); a missing entry is a clear error at the first call, never a silent
recompile. Loading is lazy: the first call binds the entry to the real inputs (parameters colocated as
the cold compile laid them out), as a hit found from the Dynamo graph does.

`precompiled(fn, args, path)` is the one-call form: it loads `path` when there is one, else precompiles `fn`
with flagtree and saves it there. An artifact it cannot read (another torch or flagtree), or whose cache entry
is gone at the first call, is precompiled again, with a warning. Calls whose inputs fail the saved guards
(another batch size, say) run through a plain `torch.compile(fn, backend="flagtree")`, with one warning.

`dynamic=True` precompiles with Python floats specialized (see `PRECOMPILE_DYNAMO_CONFIG`): sizes stay
dynamic, floats become guarded constants as in a static compile. For prompts of any length, 1 included,
the length recipe (`flagtree_py.models.dynamic_length.any_length`) is still the way: Dynamo specializes a
size of 1 under `dynamic=True`, so such calls take the fallback.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from flagtree_py.cache import KernelCache, default_cache_dir
from flagtree_py.cache.links import GraphLinks
from flagtree_py.options import CompileOptions
from flagtree_py.report import report, update_record

try:  # torch >= 2.10: precompile's protocol for a backend's compiled graph
    from torch._dynamo.aot_compile_types import SerializableCallable
except ImportError:  # older torch: graphs still compile; precompiled() says what is missing
    SerializableCallable = object

ARTIFACT_FORMAT = 1

#: Dynamo settings for a precompile's trace. torch 2.11 attaches `aot_compile` to a compiled function only with
#: `enable_aot_compile` (on by default later). `specialize_float`: under `dynamic=True` Dynamo makes Python
#: floats graph inputs (an RMSNorm eps, an SDPA scale); one that AOTAutograd cannot turn into tensor math makes
#: Dynamo restart its analysis to specialize it, and a precompile cannot restart (TensorifyScalarRestartAnalysis
#: escapes). backend.py's `specialize_float_inputs` cannot avert it here: it tells model constants from
#: arguments by the inputs' Dynamo sources, which aot_compile drops before calling the backend. Specialized up
#: front, each float is a constant with an equality guard (saved with the artifact), as in a static compile;
#: sizes stay dynamic. A float argument of `fn` (a temperature) is specialized too: another value fails the
#: guards and takes the fallback. Without `dynamic=True` floats are specialized anyway: no change there.
PRECOMPILE_DYNAMO_CONFIG = {"enable_aot_compile": True, "specialize_float": True}


class PrecompileError(RuntimeError):
    """A precompiled function that cannot be saved or served (the message says why and what to do)."""


class FlagtreeGraph(SerializableCallable):
    """One compiled graph as Dynamo calls it, and what a precompiled artifact keeps of it.

    `call` runs the graph (AOTAutograd's wrapper around flagtree's module, or a linked hit); `key` is the
    Dynamo graph's key (None: cache off or graph not keyable, so nothing to save). A graph loaded from an
    artifact has no `call` until its first call binds the cache entry to the inputs."""

    def __init__(self, call: Callable | None, key: str | None, options: CompileOptions, graph_name: str,
                 link: dict | None = None) -> None:
        self.call, self.key, self.options, self.graph_name, self.link = call, key, options, graph_name, link

    def __call__(self, *args):
        if self.call is None:
            self.call = self._bind(args)
        return self.call(*args)

    @classmethod
    def serialize_compile_artifacts(cls, fn: FlagtreeGraph) -> bytes:
        link = fn.link or _link_of(fn)
        options = dataclasses.asdict(fn.options)
        return json.dumps({"format": ARTIFACT_FORMAT, "flagtree": _version(), "key": fn.key, "link": link,
                           "options": options, "graph": fn.graph_name}, sort_keys=True).encode()

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes) -> FlagtreeGraph:
        from flagtree_py.backend import next_graph_name

        state = json.loads(data)
        if state.get("format") != ARTIFACT_FORMAT:
            raise PrecompileError(f"flagtree: a precompiled graph of format {state.get('format')!r}; this flagtree "
                                  f"reads format {ARTIFACT_FORMAT}: precompile again")
        options = dict(state["options"])
        if options.get("cuda_graph_sizes") is not None:
            options["cuda_graph_sizes"] = tuple(options["cuda_graph_sizes"])
        return cls(None, state["key"], CompileOptions(**options), next_graph_name(), link=state["link"])

    def _bind(self, args: tuple) -> Callable:
        """The cache entry bound to this first call's inputs (see the module): or a PrecompileError."""
        from flagtree_py.dynamo_link import inputs_alias, serve_link

        inputs = list(args)
        if inputs_alias(inputs, self.link["written"]):
            raise PrecompileError("flagtree: this call passes one tensor twice, or tensors sharing storage with "
                                  "one the graph writes; the precompiled graph was compiled without: use "
                                  "torch.compile for such calls")
        call = serve_link(self.key, self.link, inputs, self.options, self.graph_name)
        if call is None:
            cache_dir = self.options.cache_dir or default_cache_dir()
            raise PrecompileError(
                f"flagtree: the precompiled graph needs cache entry {self.link['aten_key']} in {cache_dir}, and it "
                "is not there or not intact (removed, evicted, or the artifact came from another machine: "
                "`flagtree cache export` / `import` move entries); precompile again")
        update_record(self.graph_name, {"cache_path": "precompiled"})
        return call


def _link_of(fn: FlagtreeGraph) -> dict:
    """The link a cold compile wrote for this graph, or a PrecompileError saying why there is none."""
    if fn.key is None:
        raise PrecompileError("flagtree: this graph has no Dynamo-graph key (the cache is off, or the graph "
                              "cannot be keyed): it cannot be precompiled; compile with the cache on")
    cache = KernelCache(fn.options.cache_dir or default_cache_dir())
    link = GraphLinks(cache.directory).get(fn.key) if cache.usable() else None
    if link is None:
        why = next((r.get("link") for r in reversed(report()) if r.get("graph") == fn.graph_name), None)
        raise PrecompileError(f"flagtree: graph {fn.graph_name} cannot be precompiled: its cold compile wrote no "
                              f"link to its cache entry ({why or 'no link in the cache'})")
    return link


def _version() -> str:
    from flagtree_py import __version__

    return __version__


def serializable_guards(entries: Sequence) -> list[bool]:
    """A `guard_filter_fn` for precompiling: keeps the guards torch can save (tensor metadata, sizes,
    constants of the inputs and the module's attributes) and drops the ones it cannot: identities of
    classes, functions and closures, dict versions, and guards on module globals (transformers'
    registries). Those hold for the same code in a new process; the artifact is for the same code."""
    from torch._dynamo.guards import CheckFunctionManager

    unsupported = set(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
    return [not (entry.is_global or entry.guard_type in unsupported
                 or unsupported.intersection(entry.derived_guard_types)) for entry in entries]


class PrecompiledFunction:
    """`fn` served from a precompiled artifact (see `precompiled`)."""

    def __init__(self, fn: Callable, path: Path, options: dict | None, dynamic: bool | None, save: bool) -> None:
        self.fn, self.path, self.options, self.dynamic, self.save = fn, path, options, dynamic, save
        self.bound = (fn.__self__,) if hasattr(fn, "__self__") and not isinstance(fn, functools.partial) else ()
        self.source = "none"  # "loaded" from path, or "compiled" here
        self.loaded = None
        self.fallback_calls = 0
        self._fallback: Callable | None = None
        self._served = False  # whether the artifact ran a call (its cache entry bound)

    def load(self) -> bool:
        """Load the artifact at `path`; False (with a warning) when it cannot be read by this torch/flagtree."""
        try:
            with open(self.path, "rb") as file:
                loaded = torch.compiler.load_compiled_function(file)
        except Exception as error:  # noqa: BLE001 -- another torch, flagtree or format: precompile again
            warnings.warn(f"flagtree: {self.path} could not be loaded ({type(error).__name__}: {_short(error)}); "
                          "precompiling again", stacklevel=3)
            return False
        self._use(loaded, "loaded")
        return True

    def precompile(self, args: tuple, kwargs: dict) -> None:
        """Trace and compile `fn` for calls like these (Dynamo runs; flagtree's cache may hit), and save it."""
        torch_options = {**(self.options or {}), "guard_filter_fn": serializable_guards}
        with torch._dynamo.config.patch(PRECOMPILE_DYNAMO_CONFIG):
            compiled = torch.compile(self.fn, backend="flagtree", fullgraph=True, dynamic=self.dynamic,
                                     options=torch_options)
            try:
                artifact = compiled.aot_compile((tuple(args), kwargs))
            except Exception as error:
                if not _is_float_restart(error):
                    raise
                raise PrecompileError(
                    "flagtree: precompiling with dynamic=True is not supported for this function: Dynamo made a "
                    "Python float an input and must restart its analysis to specialize it, which a precompile "
                    "cannot do. For prompts of any length, precompile the length recipe's first call under "
                    "flagtree_py.models.dynamic_length.any_length(ids, positions) without dynamic=True (README: "
                    "\"Precompiled: a warm start with no Dynamo trace\")") from error
        if self.save:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # written beside, then moved into place: torch 2.11 opens the file before serializing, so a graph
            # that cannot be saved would leave a partial artifact at `path`
            partial = self.path.with_name(f"{self.path.name}.{os.getpid()}.partial")
            try:
                artifact.save_compiled_function(str(partial))
                os.replace(partial, self.path)
            finally:
                partial.unlink(missing_ok=True)
        self._use(artifact, "compiled")

    def _use(self, loaded, source: str) -> None:
        loaded.disable_guard_check()  # checked in __call__, once per call, to choose the fallback instead of raising
        self.loaded, self.source, self._served = loaded, source, False

    def __call__(self, *args, **kwargs):
        if not self.loaded.guard_check(*self.bound, *args, **kwargs):
            return self._compiled_call(args, kwargs)
        if self._served:
            return self.loaded(*self.bound, *args, **kwargs)
        try:  # the first call binds flagtree's cache entry: it may be gone since the artifact was saved
            result = self.loaded(*self.bound, *args, **kwargs)
        except PrecompileError as error:
            if self.source != "loaded":
                raise
            warnings.warn(f"{error}; precompiling again", stacklevel=2)
            self.precompile(args, kwargs)
            result = self.loaded(*self.bound, *args, **kwargs)
        self._served = True
        return result

    def _compiled_call(self, args: tuple, kwargs: dict):
        """A call the saved guards refuse (another batch size, say): through a plain torch.compile."""
        if self._fallback is None:
            reason = self.loaded._artifacts.guard_manager.check_verbose(
                self.loaded.prepare_f_locals(*self.bound, *args, **kwargs))
            warnings.warn(f"flagtree: a call the precompiled function does not serve ({_short(reason)}); such calls "
                          "compile through torch.compile", stacklevel=3)
            self._fallback = torch.compile(self.fn, backend="flagtree", dynamic=self.dynamic, options=self.options)
        self.fallback_calls += 1
        return self._fallback(*args, **kwargs)


def _is_float_restart(error: BaseException) -> bool:
    """Whether `error`, or an exception it was raised from, is Dynamo's float-input restart (see
    `PRECOMPILE_DYNAMO_CONFIG`), matched by class name: torch._dynamo.exc has the class in some versions only."""
    while error is not None:
        if any(cls.__name__ == "TensorifyScalarRestartAnalysis" for cls in type(error).__mro__):
            return True
        error = error.__cause__
    return False


def _short(reason) -> str:
    text = " ".join(str(getattr(reason, "verbose_code_parts", reason)).split())
    return text[:300]


def precompiled(fn: Callable, args: tuple, path: str | os.PathLike, *, kwargs: dict | None = None,
                options: dict | None = None, dynamic: bool | None = None, save: bool = True) -> PrecompiledFunction:
    """`fn` (a function, a bound method or an nn.Module) compiled by flagtree for calls like `fn(*args,
    **kwargs)`, from the artifact at `path` when there is one, else precompiled now and saved there.
    The returned function's `source` says which: "loaded" or "compiled". An artifact this torch or flagtree
    cannot read, or whose cache entry is gone at the first call, is precompiled again (with a warning).
    `dynamic` is torch.compile's; with True, floats are specialized (see `PRECOMPILE_DYNAMO_CONFIG`)."""
    if not hasattr(torch.compiler, "load_compiled_function"):
        raise PrecompileError(f"flagtree: precompiling needs torch >= 2.10 (this is {torch.__version__})")
    fn = fn.forward if isinstance(fn, torch.nn.Module) else fn
    served = PrecompiledFunction(fn, Path(path), options, dynamic, save)
    if not (served.path.is_file() and served.load()):
        served.precompile(tuple(args), kwargs or {})
    return served
