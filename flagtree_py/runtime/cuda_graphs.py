"""Replay a compiled graph from CUDA graphs, one per shape bucket (`cuda_graphs=True`).

Decode is launch-bound: a layer is tens of small kernels, each a few microseconds of launch. A CUDA
graph replays them all with one launch. How a call is served:

  1. a bucket (the values of the graph's dynamic sizes and of its host scalars: Dynamo's guards
     already fix every other shape, stride, dtype and device of the inputs) is seen for the first time: the call runs normally (warm-up: Triton compiles its kernels, lazy
     allocations happen) and the address of every input is noted;
  2. the bucket's next call captures: an input at the same address as in the warm-up (weights,
     a static KV cache) is read in place by the graph; any other input gets a static buffer that the
     call's value is copied into before each replay;
  3. later calls replay (if an input read in place has moved, e.g. a new cache object, the call
     runs as a warm-up again and the next one captures anew): copy the moving inputs in, replay, copy back the inputs the graph mutates
     (a KV-cache write into a moved cache), and return clones of the outputs (the graph's own output
     memory is overwritten by its next replay).

An input mutation is correct either way AOTAutograd hands it over: kept in the graph (an in-place
write, applied to the real tensor or, for a copied input, copied back after replay), or returned
as an output (the caller's copy-back reads our cloned output). A capture that fails (a host sync, a
CPU tensor in the graph) or a bucket beyond the limits runs the call without a graph; the reason is
in the report (`record["cuda_graphs"]`).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["CudaGraphRunner", "TorchGraphs", "why_no_cuda_graphs"]


def why_no_cuda_graphs(device_type: str, target_features: frozenset, enabled: bool) -> str | None:
    """None if the compiled graph should be wrapped in a CudaGraphRunner, else why not."""
    if not enabled:
        return "off"
    if device_type != "cuda":
        return f"off: inputs on {device_type} (CUDA graphs need CUDA tensors)"
    if "cuda_graphs" not in target_features:
        return "off: the target does not list the cuda_graphs feature"
    return None


class TorchGraphs:
    """The real thing: torch.cuda.CUDAGraph, the runner's graphs sharing one memory pool.

    The caching allocator keeps a pool alive while a graph captured into it lives; once the last
    one is released the pool is dead and a capture into it fails an allocator assertion (and
    leaves the RNG in capture mode). So the graphs alive are counted, and the next capture after
    the last release, or after a failed capture with none alive, starts a new pool.
    """

    def __init__(self) -> None:
        self.pool = None
        self.alive = 0

    def capture(self, fn: Callable[[], list], tensors: list) -> tuple[object, list]:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            graph, outputs = self._capture(fn)
        except BaseException:
            if self.alive == 0:
                self.pool = None
            raise
        self.alive += 1
        return graph, outputs

    def release(self, graph) -> None:
        """Free a graph that will not be replayed again (its pool goes with the last one)."""
        graph.reset()
        self.alive -= 1
        if self.alive == 0:
            self.pool = None

    def _capture(self, fn: Callable[[], list]) -> tuple[object, list]:
        # the warm-up call compiled the Triton kernels; torch.cuda.graph captures on its own side
        # stream, after the work queued so far has finished
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        inner: list[BaseException] = []
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                try:
                    outputs = fn()
                except BaseException as error:  # what broke the capture, before the capture's own
                    inner.append(error)         # clean-up can raise a less telling error over it
                    raise
        except BaseException as error:
            if inner and inner[0] is not error:
                raise RuntimeError(f"{type(inner[0]).__name__}: {inner[0]} (then: {error})") from inner[0]
            raise
        return graph, outputs

    def replay(self, graph) -> None:
        graph.replay()


@dataclass
class _Captured:
    graph: object
    static_args: list
    outputs: list
    in_place: dict  # argument index -> data_ptr the graph reads/writes directly
    copied: list  # argument indices whose values are copied into static buffers
    replays: int = 0


@dataclass
class _Bucket:
    warm_pointers: dict  # argument index -> data_ptr at warm-up
    captured: _Captured | None = None
    captures: int = 0
    failed: str | None = None  # why this bucket runs without a graph


@dataclass
class CudaGraphRunner:
    """A boxed `call(args)` that replays CUDA graphs (see the module docstring)."""

    call: Callable[[list], list]
    mutated_inputs: frozenset  # indices of inputs the graph writes in place
    symbolic_positions: list  # (argument index, dim or None) holding a dynamic size
    sizes: tuple | None = None  # allowed values of dynamic sizes (None: any)
    max_buckets: int = 16
    max_recaptures: int = 2
    device: str = "cuda"  # where inputs must live (tests simulate graphs on "cpu")
    record: dict = field(default_factory=dict)
    graphs: object = field(default_factory=TorchGraphs)
    buckets: dict = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    _boxed_call: bool = True
    _host_scalars: list | None = None  # positions of 0-dim CPU tensor inputs (values baked in at capture)

    def __call__(self, args: list) -> list:
        args = list(args)  # the generated call clears the list it gets; keep our own
        key = self._key(args)
        reason = None if key in self.buckets else self._why_not(args, key)
        if reason is not None:
            return self._eager(args, reason)
        bucket = self.buckets.get(key)
        if bucket is None:
            self.buckets[key] = _Bucket(warm_pointers=_pointers(args))
            self.counts["warmup"] += 1
            return self.call(list(args))
        if bucket.failed is not None:
            return self._eager(args, bucket.failed)
        captured = bucket.captured
        if captured is not None and any(args[i].data_ptr() != p for i, p in captured.in_place.items()):
            # an input the graph reads in place has moved (a new cache object): this call warms up
            # again, the next one captures with the inputs that stayed put read in place
            self._release(bucket)
            bucket.warm_pointers = _pointers(args)
            self.counts["recapture"] += 1
            if bucket.captures > self.max_recaptures:
                bucket.failed = "inputs read in place keep moving between calls"
                return self._eager(args, bucket.failed)
            return self.call(list(args))
        if captured is None:
            try:
                captured = bucket.captured = self._capture(args, bucket)
            except Exception as error:  # noqa: BLE001  (a failed capture must cost speed, not the run)
                bucket.failed = f"capture failed: {type(error).__name__}: {str(error)[:200]}"
                warnings.warn(f"flagtree: CUDA graph {bucket.failed}; running without a graph", stacklevel=2)
                return self._eager(args, bucket.failed)
        return self._replay(captured, args)

    def _release(self, bucket: _Bucket) -> None:
        """Drop the bucket's graph; its outputs, which live in the graph's memory, go with it."""
        captured, bucket.captured = bucket.captured, None
        self.graphs.release(captured.graph)

    def _key(self, args: list) -> tuple:
        """The bucket of a call, cheaply: this runs on every replay, where host time is the cost."""
        if self._host_scalars is None:
            self._host_scalars = [i for i, value in enumerate(args) if isinstance(value, torch.Tensor)
                                  and value.device.type == "cpu" and value.dim() == 0]
        sizes = tuple(int(args[i] if dim is None else args[i].shape[dim]) for i, dim in self.symbolic_positions)
        return sizes + tuple(args[i].item() for i in self._host_scalars)

    def _why_not(self, args: list, key: tuple) -> str | None:
        """Why a call of a new bucket runs without a graph (a bucket once seen is not asked again)."""
        for value in args:
            if isinstance(value, torch.Tensor) and value.device.type != self.device and value.dim() > 0:
                return f"a {value.device.type} tensor input"
        if self.sizes is not None:
            for index, dim in self.symbolic_positions:
                value = args[index] if dim is None else args[index].shape[dim]
                if int(value) not in self.sizes:
                    return f"dynamic size {int(value)} outside cuda_graph_sizes"
        if key not in self.buckets and len(self.buckets) >= self.max_buckets:
            return f"more than {self.max_buckets} shape buckets"
        return None

    def _eager(self, args: list, reason: str) -> list:
        self.counts["eager"] += 1
        self.record.setdefault("cuda_graph_skips", {})
        self.record["cuda_graph_skips"][reason] = self.record["cuda_graph_skips"].get(reason, 0) + 1
        return self.call(list(args))

    def _capture(self, args: list, bucket: _Bucket) -> _Captured:
        bucket.captures += 1
        in_place, copied, static_args = {}, [], []
        for index, value in enumerate(args):
            if not isinstance(value, torch.Tensor):
                static_args.append(value)
            elif bucket.warm_pointers.get(index) == value.data_ptr():
                in_place[index] = value.data_ptr()
                static_args.append(value)
            else:
                buffer = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
                buffer.copy_(value)
                copied.append(index)
                static_args.append(buffer)
        # Triton specializes kernels on pointer alignment, and static buffers may differ there from
        # the warm-up's inputs: a compile inside a capture is an error, so one uncaptured run on the
        # static arguments comes first (inputs written in place get a scratch copy: written once)
        self.call([a.clone() if i in in_place and i in self.mutated_inputs else a for i, a in enumerate(static_args)])
        tensors = [a for a in static_args if isinstance(a, torch.Tensor)]
        graph, outputs = self.graphs.capture(lambda: list(self.call(list(static_args))), tensors)
        self.counts["capture"] += 1
        # the capture recorded the work without doing it: the replay below runs this call
        return _Captured(graph, static_args, outputs, in_place, copied)

    def _replay(self, captured: _Captured, args: list) -> list:
        for index in captured.copied:
            captured.static_args[index].copy_(args[index])
        self.graphs.replay(captured.graph)
        captured.replays += 1
        self.counts["replay"] += 1
        for index in captured.copied:
            if index in self.mutated_inputs:
                args[index].copy_(captured.static_args[index])
        return [out.clone() if isinstance(out, torch.Tensor) else out for out in captured.outputs]


def _pointers(args: list) -> dict:
    return {i: v.data_ptr() for i, v in enumerate(args) if isinstance(v, torch.Tensor)}
