"""Build a compiled graph's Triton kernels in parallel, before its first call on a GPU.

Triton's JIT compiles a kernel at its first launch, one launch after another: Qwen3-8B's decode step
has 21 kernels, 8.8-10.2 s of a 24-29 s cold first call on the H100 host, while 15 of its 16 cores sit
idle. Threads do not help (Triton holds the GIL while it compiles); processes do. Before a graph's first
call (`FirstCallBuilds`):

  1. the generated wrapper runs once on fake copies of the call's inputs (`launch.dry_run`): nothing
     launches, each kernel launch is noted with its arguments, the aten ops run on fake tensors;
  2. each launch's specialization is the one Triton's JIT will choose (`aot.jit_specialization`), with
     pointer alignment predicted from the tensor's storage offset (allocations are aligned to far more
     than 16 bytes);
  3. what the content store (cache/binaries.py) lacks is built by worker processes, one per kernel
     binary (`kernel_builds.py`, which imports Triton and no torch), and stored under the key the launch
     will look up; where Triton builds a C launcher per kernel signature (3.6), the worker builds that too,
     into Triton's cache;
  4. the first call finds each binary there (`ContentBinaries.find`): Triton's JIT compiles nothing.

Where the compile has the tensors the first call will get (backend.py: Dynamo's example inputs), steps 1-2
run when the compile ends and step 3 in a background thread (`FirstCallBuilds.start`), beside the rest of
Dynamo's work (guards, bytecode). The dry run stays in the compiling thread: it holds the GIL, and beside
Dynamo it took 1.5 s instead of 0.4 on the H100 host. The first call waits for the builds, and uses them
only if its arguments have the layout they were predicted from (`_layout`), else predicts again (the store
then has what was built).

The keys a first call needed are kept in the graph's cache entry: a later process's first call (a warm
start) that finds them all in the store skips the dry run.

Nothing here can make a call wrong or fail it. The lookup uses the real launch's specialization, so a
prediction that does not hold (a view that is not aligned after all) finds nothing and Triton's JIT builds
that kernel as before; a build that fails, or a wrapper that cannot run on fake tensors, leaves its kernels
to the JIT too. What happened is in the graph's record (`record["parallel_builds"]`).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from flagtree_py.runtime.aot import jit_specialization, launch_signature
from flagtree_py.runtime.kernel_builds import write_job
from flagtree_py.runtime.launch import counters, dry_run, dry_running

#: more workers than this gain nothing on a graph's few tens of kernels, and each holds a Triton in memory
MAX_WORKERS = 16
#: where `python -m flagtree_py.runtime.kernel_builds` finds the package, whatever the caller's path
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]
#: a build that takes longer than this is left to the JIT
_BUILD_TIMEOUT_S = 300


def default_workers() -> int:
    """One worker per core, at most MAX_WORKERS."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


@dataclass
class Build:
    """One kernel binary to build: what a worker needs, and the store key it goes under."""

    key: str
    name: str  # the kernel's name in its module (that of its GuardedKernel)
    function: str  # the name its source defines
    source: str  # the kernel's `@triton.jit` function, as written in the generated module
    origin: tuple[str, int]  # the file and line it was read from
    signature: dict  # runtime/aot.py launch_signature
    specialization: tuple[str, ...]


class FirstCallBuilds:
    """A generated module's boxed `call`, whose first call builds the module's kernels in parallel first.

    `known`: the store keys a first call of this graph needed before (kept in its cache entry); when the
    store holds them all, the first call goes ahead with no dry run. `remember(keys)` is told the keys
    this first call needed, when they differ from `known`. `start(args)` predicts before the first call and
    builds in a background thread."""

    _boxed_call = True

    def __init__(self, call, module, binaries, workers: int, record: dict, known: list[str] | None = None,
                 remember=None) -> None:
        self.call, self.module, self.binaries, self.workers, self.record = call, module, binaries, workers, record
        self.known, self.remember = known, remember
        self.pending = True
        self._early: tuple | None = None  # (thread, layout of its arguments, [its outcome])

    def start(self, args: list) -> None:
        """Prepare a first call on arguments laid out as `args`: predict its launches now, and build what the
        store lacks in a background thread (the builds are worker processes: the caller's thread goes on)."""
        outcome: list = []
        thread = None
        try:
            planned = plan_builds(self.module, self.binaries, args, self.workers, self.known)
        except Exception as error:  # noqa: BLE001 -- builds are an optimisation: the JIT builds as before
            outcome.append(_failure(error))
        else:
            thread = threading.Thread(target=lambda: outcome.append(_guarded(planned.run)), name="flagtree-builds",
                                      daemon=True)
            thread.start()
        self._early = (thread, _layout(args), outcome)

    def __call__(self, args: list):
        if self.pending and not dry_running():  # a dry run (flagtree compile) launches nothing to build for
            self.pending = False
            summary, keys = self._early_outcome(args) if self._early is not None else self._builds(args)
            if self.remember is not None and keys is not None and sorted(keys) != sorted(self.known or []):
                self.remember(sorted(keys))
            _warn_failures(summary)
            self.record["parallel_builds"] = summary
        return self.call(args)

    def _early_outcome(self, args: list) -> tuple[dict, list[str] | None]:
        """What the background builds did, once done; where they predicted for arguments laid out otherwise
        than `args`, the builds for `args` (which find in the store what the background built)."""
        thread, layout, outcome = self._early
        self._early = None
        began = time.perf_counter()
        if thread is not None:
            thread.join()
        waited = round(time.perf_counter() - began, 3)
        if outcome and _layout(args) == layout:
            summary, keys = outcome[0]
            summary["started_before_the_call"] = {"waited_s": waited}
            return summary, keys
        summary, keys = self._builds(args)
        summary["started_before_the_call"] = {"waited_s": waited, "not_used": "the call's arguments are laid out "
                                              "otherwise than those the builds were predicted from"}
        return summary, keys

    def _builds(self, args: list) -> tuple[dict, list[str] | None]:
        return _guarded(lambda: build_before_first_call(self.module, self.binaries, args, self.workers, self.known))


def _guarded(work) -> tuple[dict, list[str] | None]:
    """`work()`'s summary and keys; any exception on the way becomes the summary's `error`."""
    try:
        return work()
    except Exception as error:  # noqa: BLE001 -- builds are an optimisation: the JIT builds as before
        return _failure(error)


def _failure(error: Exception) -> tuple[dict, None]:
    return {"error": f"{type(error).__name__}: {error}"[:300]}, None


def _warn_failures(summary: dict) -> None:
    """Warn of what the summary says failed (in the caller's thread: the builds' may be a background one)."""
    if "error" in summary:
        warnings.warn(f"flagtree: parallel kernel builds failed ({summary['error']}); Triton's JIT builds each "
                      "kernel at its first launch", stacklevel=3)
    failed = summary.get("failed")
    if failed:
        first = next(iter(failed.items()))
        warnings.warn(f"flagtree: {len(failed)} of {summary['built'] + len(failed)} parallel kernel builds failed "
                      f"(first: {first[0]}: {first[1]}); Triton's JIT builds those at their first launch", stacklevel=3)


def _layout(args: list) -> list:
    """What a dry run's predictions depend on: each tensor's dtype, device, shape, strides and storage offset;
    other arguments by value."""
    return [(value.dtype, value.device, tuple(value.shape), value.stride(), value.storage_offset())
            if isinstance(value, torch.Tensor) else value for value in args]


def build_before_first_call(module, binaries, args: list, workers: int,
                            known: list[str] | None = None) -> tuple[dict, list[str] | None]:
    """Predict the launches of `module.call(args)` and build the binaries the store lacks: a summary, and the
    store keys of every binary the launches need (None where the dry run failed). With `known` keys all in
    the store, nothing is predicted: the summary says so and the keys are `known`."""
    return plan_builds(module, binaries, args, workers, known).run()


@dataclass
class PlannedBuilds:
    """What a first call needs built (`plan_builds`), and `run()`, which builds it."""

    binaries: object  # the content store (cache/binaries.py ContentBinaries)
    builds: list[Build]
    summary: dict
    keys: list[str] | None  # the keys of what the store already has (None: the dry run failed)
    began: float  # perf_counter at the plan's start

    def run(self) -> tuple[dict, list[str] | None]:
        """Build what is missing into the store: the summary, and the store keys of every binary needed."""
        summary, keys = self.summary, self.keys
        if self.builds:
            summary["workers"] = min(summary["workers"], len(self.builds))
            built, failed, notes = build_all(self.builds, self.binaries, summary["workers"])
            summary.update(built=len(built), failed=failed, **notes)
            keys = keys + built
            counters["parallel_builds"] += len(built)
        summary["seconds"] = round(time.perf_counter() - self.began, 3)
        return summary, keys


def plan_builds(module, binaries, args: list, workers: int, known: list[str] | None = None) -> PlannedBuilds:
    """The dry run and the store lookups of `build_before_first_call`, not the builds: in the caller's thread,
    since a dry run holds the GIL, where the builds are worker processes a background thread can wait on."""
    began = time.perf_counter()
    if known and all(binaries.store.get(key) is not None for key in known):
        return PlannedBuilds(binaries, [], {"skipped": f"the {len(known)} binaries of the graph's first call are in "
                                                       "the store"}, list(known), began)
    summary = {"workers": workers, "launches": 0, "binaries": 0, "in_store": 0, "built": 0, "failed": {}}
    try:
        launches = predicted_launches(module, args)
    except Exception as error:  # noqa: BLE001 -- a wrapper that cannot run on fake tensors: the JIT builds as before
        summary["dry_run_error"] = f"{type(error).__name__}: {error}"[:300]
        return PlannedBuilds(binaries, [], summary, None, began)
    summary["launches"] = len(launches)
    builds, present = missing_builds(launches, binaries)
    summary.update(binaries=len(builds) + len(present), in_store=len(present),
                   dry_run_s=round(time.perf_counter() - began, 3))
    return PlannedBuilds(binaries, builds, summary, list(present), began)


def predicted_launches(module, args: list) -> list[tuple]:
    """(kernel, arguments, meta) of every kernel launch `module.call(args)` makes, from a dry run on fake
    copies of `args`: same shapes, strides, storage offsets and devices, no memory, no kernel runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    launches = []
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(value) if isinstance(value, torch.Tensor) else value for value in args]
        with dry_run(lambda kernel, arguments, meta: launches.append((kernel, arguments, dict(meta)))):
            module.call(fake)
    return launches


def predicted_alignment(tensor: torch.Tensor) -> bool:
    """Whether a (fake) tensor's address will be 16-byte aligned: storages start aligned (torch's allocators
    align to 512 bytes on a GPU, 64 on a CPU), so its storage offset decides."""
    return tensor.storage_offset() * tensor.element_size() % 16 == 0


def missing_builds(launches: list[tuple], binaries) -> tuple[list[Build], list[str]]:
    """The binaries the launches need that neither the store nor the kernels already have, longest source
    first (the longest builds start first); and the keys of those found in the store."""
    builds: dict[str, Build] = {}
    seen, present = set(), []
    for kernel, arguments, meta in launches:
        params = getattr(kernel.kernel, "params", None)
        if kernel.interpreted or kernel.failed is not None or params is None:
            continue
        if kernel.binary is not None and kernel.binary.meta == meta:  # the entry's own build serves it
            continue
        if tuple(meta.items()) in kernel.jit_metas:  # Triton's JIT already serves it in this process
            continue
        specialization = jit_specialization(params, arguments, aligned=predicted_alignment)
        memo = (kernel.name, tuple(meta.items()), specialization)
        if specialization is None or memo in seen:
            continue
        seen.add(memo)
        signature = launch_signature(arguments, meta)
        key, ahead_of_time = binaries.keys(kernel.name, kernel.kernel, signature, specialization)
        stored = [k for k in (key, ahead_of_time) if binaries.store.get(k) is not None]
        if stored:
            present.append(stored[0])
            continue
        builds[key] = Build(key, kernel.name, kernel.kernel.fn.__name__, *kernel_definition(kernel.kernel), signature,
                            specialization)
    return sorted(builds.values(), key=lambda build: -len(build.source)), present


def prepare_driver() -> str:
    """Build (or load from Triton's cache) Triton's own C module for this GPU's driver, which a kernel's first
    launch needs: Triton builds it with the host's C compiler on first use, here beside the workers' builds
    instead of at the first launch. In a word, what happened."""
    if not torch.cuda.is_available():
        return "no GPU"
    try:
        from triton.runtime import driver

        driver.active.utils  # noqa: B018 -- the attribute builds the module
    except Exception as error:  # noqa: BLE001 -- the first launch builds it, as without parallel builds
        return f"not built ({type(error).__name__}: {str(error)[:200]})"
    return "ready"


def kernel_definition(jit) -> tuple[str, tuple[str, int]]:
    """A JITFunction's source as written (decorator and def), and the file and line it starts at."""
    lines, first = inspect.getsourcelines(jit.fn)
    return textwrap.dedent("".join(lines)), (inspect.getsourcefile(jit.fn), first)


def build_all(builds: list[Build], binaries, workers: int) -> tuple[list[str], dict[str, str], dict]:
    """Build `builds` with `workers` processes at a time; each binary built goes into the store. The keys
    stored, the error of each build that failed (by kernel name), and notes: what became of the launchers
    (kernel_builds.py `prepare_launcher`), the slowest builds' seconds, and this process's driver
    (`prepare_driver`, beside the workers)."""
    capability = int(binaries.arch.removeprefix("sm"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), env.get("PYTHONPATH")]))
    built, failed, launchers, timings = [], {}, Counter(), []
    with tempfile.TemporaryDirectory(prefix="flagtree-builds-") as root:
        def build(index: int, job: Build) -> tuple[Build, dict | str, dict]:
            began = time.perf_counter()
            directory = Path(root) / str(index)
            write_job(directory, job.function, job.source, job.origin, job.signature, job.specialization, capability)
            try:
                done = subprocess.run([sys.executable, "-m", "flagtree_py.runtime.kernel_builds", str(directory)],
                                      capture_output=True, text=True, env=env, timeout=_BUILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                return job, f"no binary after {_BUILD_TIMEOUT_S} s", {}
            if done.returncode != 0:
                lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
                return job, lines[-1][:300], {}
            files = {kind: (directory / f"kernel.{kind}").read_bytes() for kind in ("cubin", "ptx", "json")}
            done = json.loads((directory / "result.json").read_text())
            done["process_s"] = round(time.perf_counter() - began, 3)
            return job, files, done

        with ThreadPoolExecutor(max_workers=workers + 1) as pool:
            driver = pool.submit(prepare_driver)  # beside the workers: what this process's first launch needs
            for job, result, done in pool.map(build, range(len(builds)), builds):
                if isinstance(result, str):
                    failed[job.name] = result
                    continue
                launchers[done["launcher"].split(" (")[0]] += 1
                timings.append({"kernel": job.name,
                                **{part: done[part] for part in ("process_s", "compile_s", "launcher_s")}})
                stored = binaries.store.put(job.key, job.name, binaries.arch, binaries.triton_version,
                                            {**job.signature, "specialization": list(job.specialization)}, result,
                                            source=job.source)
                if stored is None:
                    failed[job.name] = f"the binary store in {binaries.store.directory} could not be written"
                else:
                    built.append(job.key)
            driver = driver.result()
    slowest = sorted(timings, key=lambda timing: -timing["process_s"])[:3]
    return built, failed, {"launchers": dict(launchers), "slowest": slowest, "driver": driver}
