"""flagtree as vLLM's compiler: a `CompilerInterface` for vLLM's piecewise compilation.

vLLM (VLLM_COMPILE mode) traces the model once with Dynamo, splits the graph at its attention ops and hands
every piece to `compile()` once per compile range, with a symbolic token count. Each piece goes through
flagtree's torch.compile backend (AOTAutograd capture, passes, Triton kernels; backend.py), so vLLM's own ops
in the piece (KV-cache writes, rotary embedding as a custom op, attention when not split off) stay extern
calls in flagtree's wrapper, and everything else becomes flagtree kernels.

Caching: flagtree's content-keyed cache (flagtree_py/cache) holds every compiled piece; the handle returned
to vLLM names those cache keys, and `load()` compiles the piece again through flagtree, which then finds
every module in its cache (no passes, no code generation, no Triton compile).

Visibility: one log line per compiled graph on stderr, and flagtree's report records of this process in the
JSON file named by FLAGTREE_SERVE_REPORT (written after every compile; `flagtree serve` prints its path).

FLAGTREE_SERVE_AOT_CHECK=90 (a compute capability; tests use it on CPU machines): after a compiled graph's
first run, every kernel it launched is also compiled ahead of time for that NVIDIA GPU (runtime/aot.py), and
the report's record says how many built; proof that what vLLM's graphs became would build for the GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from vllm.compilation.compiler_interface import CompilerInterface

from flagtree_py import __version__
from flagtree_py.options import CompileOptions
from flagtree_py.report import report
from flagtree_py.serve import OPTIONS_ENV, REPORT_ENV

AOT_CHECK_ENV = "FLAGTREE_SERVE_AOT_CHECK"

_LOCK = threading.Lock()


class FlagtreeCompiler(CompilerInterface):
    name = "flagtree"

    def __init__(self) -> None:
        # Options are read once, here, from what `flagtree serve` put in the environment.
        self.options = CompileOptions.from_user(json.loads(os.environ.get(OPTIONS_ENV) or "{}"))
        self.report_path = os.environ.get(REPORT_ENV)
        self.aot_capability = int(os.environ[AOT_CHECK_ENV]) if os.environ.get(AOT_CHECK_ENV) else None

    def compute_hash(self, vllm_config) -> str:
        """What changes flagtree's output beyond vLLM's own hash: flagtree's version, source and options."""
        from flagtree_py.cache.key import source_hash

        text = f"flagtree {__version__} {source_hash()} {self.options.hash()}"
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def compile(self, graph, example_inputs: list[Any], compiler_config: dict[str, Any], compile_range,
                key: str | None = None):
        compiled, records = self._compile(graph, example_inputs)
        for record in records:
            _log(record, compile_range)
        # vLLM keeps handles in a dict and a Python-literal file: a plain string
        handle = f"flagtree {__version__}: " + " ".join(str(r.get("cache_key")) for r in records)
        return compiled, handle

    def load(self, handle: Any, graph, example_inputs: list[Any], graph_index: int, compile_range):
        if not isinstance(handle, str) or not handle.startswith(f"flagtree {__version__}: "):
            raise ValueError(f"not a handle of this flagtree ({__version__}): {handle!r}")
        compiled, records = self._compile(graph, example_inputs)
        for record in records:
            _log(record, compile_range)
        return compiled

    def _compile(self, graph, example_inputs):
        from flagtree_py.backend import flagtree_backend

        with _LOCK:
            before = len(report())
            options = {f: getattr(self.options, f) for f in ("target", "dump_dir", "fallback", "cache", "cache_dir")}
            compiled = flagtree_backend(graph, example_inputs, options=options)
            records = report()[before:]
            if self.report_path:
                _write_report(Path(self.report_path), report())
        if self.aot_capability is not None:
            compiled = self._checked_ahead_of_time(compiled, records)
        return compiled, records

    def _checked_ahead_of_time(self, compiled, records):
        """`compiled`, which after its first run builds the kernels it launched for an NVIDIA GPU."""
        pending = [True]

        def call(*args):
            result = compiled(*args)
            if pending:
                pending.clear()
                for record in records:
                    _AOT_RESULTS[record["graph"]] = _compile_ahead_of_time(record, self.aot_capability)
                if self.report_path:
                    with _LOCK:
                        _write_report(Path(self.report_path), report())
            return result

        return call


_AOT_RESULTS: dict[str, dict] = {}  # graph name -> what the ahead-of-time check built


def _compile_ahead_of_time(record: dict, capability: int) -> dict:
    from flagtree_py.runtime.aot import compile_for_nvidia
    from flagtree_py.runtime.launch import GuardedKernel

    module = sys.modules.get(Path(record.get("module_path", "")).stem)
    kernels = [k for k in vars(module).values() if isinstance(k, GuardedKernel)] if module else []
    result = {"capability": capability, "built": [], "failed": {}, "not_launched": []}
    for kernel in kernels:
        if kernel.signature is None:
            result["not_launched"].append(kernel.name)
            continue
        try:
            compiled = compile_for_nvidia(kernel.kernel.fn, kernel.signature, capability)
            if compiled.asm.get("cubin"):
                result["built"].append(kernel.name)
        except Exception as error:  # noqa: BLE001 (reported, not raised: a check; the server keeps serving)
            result["failed"][kernel.name] = f"{type(error).__name__}: {error}"[:300]
    print(f"flagtree: {record['graph']}: {len(result['built'])}/{len(kernels)} kernels built ahead of time for "
          f"sm_{capability}", file=sys.stderr, flush=True)
    return result


def _log(record: dict, compile_range) -> None:
    externs = sorted(set(record.get("extern_ops", [])))
    print(f"flagtree: compiled {record['graph']} (tokens {compile_range}) for {record.get('target')}: "
          f"{record.get('triton_kernels', 0)} Triton kernels, {len(record.get('extern_ops', []))} extern ops "
          f"[{', '.join(externs)}], cache {record.get('cache', 'off')}, {record.get('compile_s', 0)} s"
          + (f", FELL BACK TO EAGER: {record['error']}" if record.get("fallback") else ""),
          file=sys.stderr, flush=True)


def _write_report(path: Path, records: list[dict]) -> None:
    """All records of this process, rewritten whole (a reader never sees half a file: write, then rename)."""
    kept = [{k: v for k, v in r.items() if k != "kernels"} | {"kernel_names": [k["name"] for k in r.get("kernels", [])]}
            | ({"aot_check": _AOT_RESULTS[r["graph"]]} if r["graph"] in _AOT_RESULTS else {})
            for r in records]
    summary = {
        "graphs": len(kept),
        "graphs_fallen_back": sum(1 for r in kept if r.get("fallback")),
        "triton_kernels": sum(r.get("triton_kernels", 0) for r in kept),
        "extern_ops": sorted({op for r in kept for op in r.get("extern_ops", [])}),
        "passes": _sum_counters(r.get("passes", {}) for r in kept),
        "pid": os.getpid(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"summary": summary, "records": kept}, indent=1, default=str))
    tmp.replace(path)


def _sum_counters(counters) -> dict:
    total: dict = {}
    for counter in counters:
        for name, count in counter.items():
            total[name] = total.get(name, 0) + count
    return dict(sorted(total.items()))
