"""Compile options: what a user passes as torch.compile(..., options={...})."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

TARGET_CHOICES = ("auto", "nvidia", "metax", "iluvatar", "interpreter")


@dataclass(frozen=True)
class CompileOptions:
    target: str = "auto"  # auto | nvidia | metax | iluvatar | interpreter | a registered target name
    dump_dir: str | None = None  # write the aten graph, partition, kernels and wrapper here
    fallback: bool = True  # a group whose kernel fails to build runs its aten ops instead (warned)
    poison_outputs: bool = False  # debug: fill kernel outputs with NaN/-1 first, so unwritten elements show
    check_kernels: bool = False  # debug: recompute every kernel launch with its aten fallback, record the error
    cache: bool = True  # reuse compiled graphs across processes (flagtree_py/cache)
    cache_dir: str | None = None  # default: FLAGTREE_CACHE_DIR, else the platform's user cache dir
    cache_max_bytes: int = 4 << 30  # least recently used entries are evicted beyond this size
    merge_projections: bool = True  # q/k/v and gate/up projections -> one GEMM (parameters re-laid out)
    gemm_templates: bool = True  # mm/addmm and their pointwise epilogues run flagtree's GEMM template
    autotune: bool = False  # time the target's GEMM tiles once per M bucket; winners kept in the cache
    autotune_budget_s: float = 5.0  # at most this long tuning one kernel in one bucket
    cuda_graphs: bool = False  # NVIDIA: replay the compiled graph from a CUDA graph per shape bucket
    cuda_graph_sizes: tuple[int, ...] | None = None  # dynamic sizes that may be captured (None: any)
    # GPU, cache on: worker processes that build a graph's kernels before its first call (None: one per
    # core, at most 16; 0: none, Triton's JIT builds each kernel at its first launch)
    parallel_builds: int | None = None
    # how the aten graph is captured: "direct" (one trace where AOTAutograd's runtime wrappers would have
    # nothing to do, capture.py; AOTAutograd otherwise), or "aot" (AOTAutograd always)
    capture: str = "direct"

    @classmethod
    def from_user(cls, options: dict | None) -> CompileOptions:
        """Validate the user's dict; environment defaults are read here, once, not mid-pipeline."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown flagtree option(s) {unknown}; known: {sorted(known)}")
        if "target" not in options and os.environ.get("FLAGTREE_TARGET"):
            options["target"] = os.environ["FLAGTREE_TARGET"]
        if "cache_dir" not in options and os.environ.get("FLAGTREE_CACHE_DIR"):
            options["cache_dir"] = os.environ["FLAGTREE_CACHE_DIR"]
        if "cache_max_bytes" not in options and os.environ.get("FLAGTREE_CACHE_MAX_BYTES"):
            options["cache_max_bytes"] = int(os.environ["FLAGTREE_CACHE_MAX_BYTES"])
        if "cache" not in options and os.environ.get("FLAGTREE_CACHE") == "0":
            options["cache"] = False
        if "dump_dir" not in options and os.environ.get("FLAGTREE_DUMP_DIR"):
            options["dump_dir"] = os.environ["FLAGTREE_DUMP_DIR"]
        if "parallel_builds" not in options and os.environ.get("FLAGTREE_PARALLEL_BUILDS"):
            options["parallel_builds"] = int(os.environ["FLAGTREE_PARALLEL_BUILDS"])
        if "capture" not in options and os.environ.get("FLAGTREE_CAPTURE"):
            options["capture"] = os.environ["FLAGTREE_CAPTURE"]
        if options.get("capture", "direct") not in ("aot", "direct"):
            raise ValueError(f"flagtree option 'capture' must be 'aot' or 'direct', got {options['capture']!r}")
        workers = options.get("parallel_builds")
        if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 0):
            raise ValueError(f"flagtree option 'parallel_builds' must be an int >= 0 or None, got {workers!r}")
        if not isinstance(options.get("cuda_graphs", False), bool):
            raise TypeError(f"flagtree option 'cuda_graphs' must be True or False, got {options['cuda_graphs']!r}")
        sizes = options.get("cuda_graph_sizes")
        if sizes is not None:
            if isinstance(sizes, (str, bytes)) or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                                                          for n in sizes):
                raise ValueError(f"flagtree option 'cuda_graph_sizes' must be positive ints, got {sizes!r}")
            options["cuda_graph_sizes"] = tuple(sorted(set(sizes)))
        target = options.get("target", "auto")
        if not isinstance(target, str) or not target:
            raise ValueError(f"flagtree option 'target' must be one of {TARGET_CHOICES} or a target name, got {target!r}")
        if target != "auto":
            from flagtree_py.targets import get_target

            get_target(target)  # a one-line error naming the known targets, before any compile
        return cls(**options)

    def hash(self) -> str:
        """Only what changes generated code (neither the dump, the cache settings nor check_kernels do). The target is
        not here: the key holds the hash of the target chosen, so `target="auto"` on an H100 and
        `target="nvidia-sm90"` (what `flagtree compile` passes) give the same key."""
        fields = {"fallback": self.fallback, "poison_outputs": self.poison_outputs,
                  "merge_projections": self.merge_projections}
        if not self.gemm_templates:  # absent when on, so that keys from before the option stay valid
            fields["gemm_templates"] = False
        # autotuning changes no code: its winners are stored beside the module, in the same entry
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
