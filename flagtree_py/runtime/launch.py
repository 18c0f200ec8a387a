"""What generated wrappers call at run time: grid arithmetic and guarded kernel launches."""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
import weakref
from collections import Counter

#: process-wide counts, read by `flagtree_py.report()` and tests
counters: Counter = Counter()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class GuardedKernel:
    """A Triton kernel (JIT or interpreted) with its aten fallback of the same signature.

    The first failure to build or run warns once and switches this kernel to its fallback for
    the rest of the process: a kernel that cannot compile never makes the model unusable.
    """

    def __init__(self, name: str, kernel, fallback, on_failure=None, interpreted: bool = False, binary=None,
                 on_compile=None, content_binaries=None) -> None:
        self.name = name
        self.kernel = kernel
        self.interpreted = interpreted
        self.fallback = fallback
        self.failed: str | None = None
        self.on_failure = on_failure
        self.signature: dict | None = None  # the first launch's argument types (for AOT builds)
        self.binary = binary  # a BinaryKernel from the cache entry: launched with no Triton compile
        self.on_compile = on_compile  # called once per Triton compile of this kernel
        # runtime/aot.py ContentBinaries: binaries found by content, asked before any JIT compile
        self.content_binaries = content_binaries
        # launch parameters Triton's JIT already serves in this process: no content lookup (an argument
        # scan per launch) for them again; the JIT specializes on its own
        self.jit_metas: set[tuple] = set()
        self.tuner = None  # GEMM kernels: runtime/autotune.py chooses their tile per M bucket
        self.candidates: dict | None = None
        self.compiles = 0
        if not interpreted:
            _count_triton_compiles(self)

    def compiled(self) -> None:
        self.compiles += 1
        counters["triton_compiles"] += 1
        if self.on_compile is not None:
            self.on_compile(self.name)

    def launch_unguarded(self, grid, args, meta) -> None:
        """Launch with no fallback: the autotuner's trial of a tile, whose failure rejects the tile."""
        if self.interpreted:
            with _interpreter_stdlib():
                self.kernel[grid](*args, **meta)
        else:
            self.kernel[grid](*args, **meta)

    def launch(self, grid, args, meta) -> None:
        if self.signature is None:
            from flagtree_py.runtime.aot import launch_signature

            self.signature = launch_signature(args, meta)
        record = getattr(_DRY, "record", None)
        if record is not None:  # flagtree compile, parallel builds: the launch is what was wanted; nothing runs
            record(self, args, meta)
            return
        counters["kernel_launches"] += 1  # here, not in `run`: a dry run's launches are not launches
        if self.binary is not None and self.failed is None and self.binary.accepts(args, meta):
            try:
                self.binary.launch(grid, args, meta)
                counters["binary_launches"] += 1
                return
            except Exception as error:  # noqa: BLE001 -- any load or launch error: Triton's JIT takes over
                warnings.warn(f"flagtree: cached binary of {self.name} failed ({type(error).__name__}: {error}); "
                              "compiling it with Triton", stacklevel=3)
                self.binary = None
        jit_meta = tuple(meta.items())
        if (self.content_binaries is not None and self.failed is None and not self.interpreted
                and jit_meta not in self.jit_metas):
            binary = self.content_binaries.find(self.name, self.kernel, args, meta)
            if binary is not None:
                try:
                    binary.launch(grid, args, meta)
                    counters["binary_launches"] += 1
                    counters["content_binary_launches"] += 1
                    return
                except Exception as error:  # noqa: BLE001 -- as above: Triton's JIT takes over
                    warnings.warn(f"flagtree: binary of {self.name} found by content failed "
                                  f"({type(error).__name__}: {error}); compiling it with Triton", stacklevel=3)
                    self.content_binaries = None
        if self.failed is None:
            try:
                if self.interpreted:
                    with _interpreter_stdlib():
                        self.kernel[grid](*args, **meta)
                    return
                # Triton's JIT returns the CompiledKernel it launched (3.6 and 3.9), just compiled or
                # taken from its caches: kept by content so that a later process launches it directly
                compiled = self.kernel[grid](*args, **meta)
            except Exception as error:  # noqa: BLE001 -- compile errors, interpreter errors, resource limits
                self.failed = f"{type(error).__name__}: {error}"[:2000]
                counters["kernel_fallbacks"] += 1
                first_line = self.failed.splitlines()[0][:200]
                warnings.warn(f"flagtree: kernel {self.name} failed ({first_line}); running its aten fallback", stacklevel=3)
                if self.on_failure is not None:
                    self.on_failure(self.name, self.failed)
            else:
                self.jit_metas.add(jit_meta)
                if self.content_binaries is not None and compiled is not None:
                    self._remember(compiled, args, meta)
                return
        self.fallback(*args)

    def _remember(self, compiled, args, meta) -> None:
        """Store a JIT build by content; any failure only means it is not stored (never a failed launch)."""
        try:
            self.content_binaries.remember(self.name, self.kernel, args, meta, compiled)
        except Exception as error:  # noqa: BLE001 -- an optimisation for later processes, not this launch
            warnings.warn(f"flagtree: binary of {self.name} not stored ({type(error).__name__}: {error})", stacklevel=4)
            self.content_binaries = None


def run(kernel: GuardedKernel, grid: tuple, *args, **meta) -> None:
    if grid[0] <= 0:
        return  # an empty tensor: nothing to compute, and a zero grid is an error on a GPU
    kernel.launch(grid, args, meta)


#: the dry run in progress, per thread: one in a thread (a graph's first call building its kernels) never
#: silences another thread's launches
_DRY = threading.local()


def _ignore(kernel, args, meta) -> None:
    """A dry run's record when its caller wants only each kernel's first signature."""


@contextlib.contextmanager
def dry_run(record=None):
    """Run generated wrappers without launching kernels (on fake tensors), in this thread: each kernel only
    records its launch signature. `flagtree compile` uses it to learn what to build ahead of time.
    `record(kernel, args, meta)`, if given, sees every launch (parallel_builds.py)."""
    previous = getattr(_DRY, "record", None)
    _DRY.record = record or _ignore
    try:
        yield
    finally:
        _DRY.record = previous


#: id(JITFunction) -> the GuardedKernel that owns it, for the compile counter
_OWNERS: dict = {}
_COUNTING = False


def _count_triton_compiles(kernel: GuardedKernel) -> None:
    """Count every `triton.compile` of a flagtree kernel (JIT first launches of a specialization).

    Triton's JIT looks `compile` up in `triton.compiler` when it builds a kernel's binder (3.6 and
    3.9), so one wrapper there sees each compile. A compile that Triton serves from its own disk
    cache is counted too: it is still the JIT path, not a binary from flagtree's entry.
    """
    global _COUNTING
    _OWNERS[id(kernel.kernel)] = weakref.ref(kernel)
    if _COUNTING:
        return
    _COUNTING = True
    try:
        import triton.compiler
        import triton.compiler.compiler as compiler_module
    except ImportError:
        return
    original = compiler_module.compile

    @functools.wraps(original)
    def counting_compile(src, *args, **kwargs):
        result = original(src, *args, **kwargs)
        owner = _OWNERS.get(id(getattr(src, "fn", None)))
        if owner is not None and owner() is not None:
            owner().compiled()
        return result

    for module in (triton.compiler, compiler_module):
        module.compile = counting_compile


_STDLIB_LOCK = threading.RLock()
_INTERPRETED: dict = {}


@contextlib.contextmanager
def _interpreter_stdlib():
    """Let interpreted kernels call Triton's own @jit library functions (tl.sum, tl.sigmoid...).

    Those were decorated when triton was imported (by torch, before flagtree could set
    TRITON_INTERPRET), so they are JIT functions the interpreter refuses to call. For the
    duration of an interpreted launch they are swapped for interpreted twins, then restored.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    with contextlib.suppress(ImportError):
        # imported lazily by launches; it checks the originals, so it must load before the swap
        import triton.experimental.gluon  # noqa: F401
    # Triton's interpreter also patches tl's builtins for device-function calls and never
    # restores them: snapshot everything first and restore it all, so that a later GPU (or
    # ahead-of-time) compile in this process sees the real triton.language
    patched_objects = [tl, tl.core, tl.math, tl.standard, tl.core.tensor, tl.core.dtype, tl.core.condition]
    if hasattr(tl.core, "tensor_descriptor_base"):
        patched_objects.append(tl.core.tensor_descriptor_base)
    with _STDLIB_LOCK:
        snapshot = [(obj, dict(vars(obj))) for obj in patched_objects]
        for module in (tl, tl.standard, tl.math):
            for name, value in list(vars(module).items()):
                if isinstance(value, JITFunction):
                    setattr(module, name, _INTERPRETED.setdefault(value, InterpretedFunction(value.fn)))
        try:
            # masked-off lanes compute on filler values (rsqrt(0), exp overflow): numpy must not
            # warn about what the masks discard; eager PyTorch is silent on inf/nan as well
            with np.errstate(all="ignore"):
                yield
        finally:
            for obj, attributes in snapshot:
                for name, value in attributes.items():
                    if vars(obj).get(name) is not value:
                        setattr(obj, name, value)


def dry_running() -> bool:
    """Whether wrappers run under `dry_run` in this thread (fake tensors: nothing to launch or inspect)."""
    return getattr(_DRY, "record", None) is not None
