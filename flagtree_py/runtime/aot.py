"""Ahead-of-time builds of generated kernels for an NVIDIA GPU this machine may lack, and their reuse.

Triton compiles for an explicit `GPUTarget("cuda", 90, 32)` with no GPU present, which gives PTX
and cubin on a CPU-only machine (`compile_for_nvidia`). `binary_files` turns the result into the
files a cache entry keeps; `BinaryKernel` loads those files on a GPU as Triton's own `CompiledKernel`
(the object Triton's JIT launches) and launches it with no Triton compile.

What an AOT build does not assume: pointer alignment. Triton's JIT specializes pointers that are
16-byte aligned (`tt.divisibility`), which lets it vectorize loads; an AOT build knows no pointer
values, so it leaves that out and any pointer is valid (possibly slower loads).

Binaries Triton's JIT built on a GPU are kept too (`ContentBinaries.remember`, after a kernel's first
JIT launch of a specialization), with the specialization the JIT chose (`jit_specialization`): which
pointers it took as 16-byte aligned, which integers as multiples of 16 or as the constant 1. Such a
binary is launched only for calls that have those properties (`BinaryKernel.accepts`), so a second
process launches what the first one compiled, with no Triton compile, and a misaligned view never
runs a kernel built for aligned pointers (Triton's JIT builds it another binary).
"""

from __future__ import annotations

import inspect
import textwrap
import warnings
import weakref
from pathlib import Path

import torch

from flagtree_py.runtime.kernel_builds import DIVISIBILITY, binary_files, jit_source

_POINTER_TYPES = {
    torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
    torch.int64: "*i64", torch.int32: "*i32", torch.int16: "*i16", torch.int8: "*i8",
    torch.uint8: "*u8", torch.bool: "*i1",
}
_I32 = (-(2**31), 2**31)
#: Triton's own names for pointer element types (`canonicalize_dtype`): a bool tensor is "*u1" to the JIT
_JIT_POINTER_TYPES = {**_POINTER_TYPES, torch.bool: "*u1"}


def launch_signature(args: tuple, meta: dict) -> dict:
    """What Triton's JIT would specialize on for this launch: pointer dtypes and int values."""
    arguments = []
    for value in args:
        if isinstance(value, torch.Tensor):
            arguments.append(("pointer", _POINTER_TYPES[value.dtype]))
        elif isinstance(value, bool):
            arguments.append(("int", int(value)))
        elif isinstance(value, int):
            arguments.append(("int", value))
        elif isinstance(value, float):
            arguments.append(("float", value))
        else:
            raise TypeError(f"unsupported kernel argument {value!r}")
    return {"arguments": arguments, "meta": dict(meta)}


def _source(fn, signature: dict):
    """Triton's ASTSource for `fn` with the argument types of `signature`, and its compile options."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    names = list(inspect.signature(fn).parameters)
    types, constants = {}, {}
    for name, (kind, value) in zip(names, signature["arguments"]):
        if kind == "pointer":
            types[name] = value
        elif kind == "int":  # size symbols: generated kernels never specialize on them
            types[name] = "i32" if _I32[0] <= value < _I32[1] else "i64"
        else:
            types[name] = "fp32"
    meta = dict(signature["meta"])
    options = {"num_warps": meta.pop("num_warps", 4), "num_stages": meta.pop("num_stages", 3)}
    for name, value in meta.items():
        types[name] = "constexpr"
        constants[name] = value
    return ASTSource(fn=JITFunction(fn), signature=types, constexprs=constants), options


def compile_for_nvidia(fn, signature: dict, capability: int = 90):
    """Compile the raw kernel function `fn` for sm_<capability>; returns Triton's CompiledKernel.

    Integer arguments are shape symbols, which generated kernels mark `do_not_specialize`.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    from flagtree_py.runtime.launch import counters

    source, options = _source(fn, signature)
    counters["triton_compiles"] += 1
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def is_aligned(tensor: torch.Tensor) -> bool:
    """Whether a tensor's address is a multiple of 16 bytes (what Triton's JIT specializes pointers on)."""
    return tensor.data_ptr() % 16 == 0


def jit_specialization(params: list, args: tuple, aligned=is_aligned) -> tuple[str, ...] | None:
    """The specialization Triton's JIT chooses for a launch with `args` (positional, constexprs left out),
    one string per argument: its type, with ":D" where Triton assumes a multiple of 16 (a pointer's address
    or an integer's value), or "constexpr:1" for an integer 1 it compiles in as a constant.

    `params` is the JITFunction's `params` (do_not_specialize, do_not_specialize_on_alignment). The rule
    is Triton's `specialize_impl` (3.6 in Python, 3.9 native; the same rule): tests check it against
    Triton's own binder. None where the kernel has what the rule does not cover (annotated types).
    `aligned(tensor)` says whether a pointer is 16-byte aligned: its address, or for a fake tensor, which has
    none, a prediction (parallel_builds.py).
    """
    if len(params) < len(args):
        return None
    spec = []
    for param, value in zip(params, args):
        if param.is_constexpr or param.annotation_type:
            return None
        specialize, align = not param.do_not_specialize, not param.do_not_specialize_on_alignment
        if isinstance(value, bool):
            spec.append("u1")
        elif isinstance(value, int):
            if specialize and value == 1:
                spec.append("constexpr:1")
                continue
            kind = "i32" if _I32[0] <= value < _I32[1] else "u64" if 2**63 <= value < 2**64 else "i64"
            spec.append(f"{kind}:D" if specialize and align and value % 16 == 0 else kind)
        elif isinstance(value, float):
            spec.append("fp32")
        elif isinstance(value, torch.Tensor):
            kind = _JIT_POINTER_TYPES[value.dtype]
            spec.append(f"{kind}:D" if specialize and align and aligned(value) else kind)
        else:
            return None
    return tuple(spec)


def compiled_specialization(compiled, arity: int) -> tuple[str, ...] | None:
    """The specialization a CompiledKernel from Triton's JIT was built for, read from its source
    (`src.signature`, `src.constants`, `src.attrs`: the same fields in Triton 3.6 and 3.9), in the form
    of `jit_specialization`; None if it is not a JIT build of a plain kernel (a constant other than 1)."""
    src = getattr(compiled, "src", None)
    names = getattr(getattr(src, "fn", None), "arg_names", None)
    if names is None or len(names) < arity:
        return None
    constants = getattr(src, "constants", {}) or {}
    attrs = getattr(src, "attrs", {}) or {}
    spec = []
    for index, name in enumerate(names[:arity]):
        kind = src.signature.get(name)
        if kind == "constexpr":
            value = constants.get((index,), constants.get(name))
            if value != 1 or isinstance(value, bool):
                return None
            spec.append("constexpr:1")
        elif isinstance(kind, str):
            found = [list(attribute) for attribute in attrs.get((index,), [])]
            spec.append(f"{kind}:D" if DIVISIBILITY in found else kind)
        else:
            return None
    return tuple(spec)


class BinaryKernel:
    """A kernel binary loaded from the cache's files: launching it compiles nothing.

    `signature["specialization"]`, present for binaries Triton's JIT built, is what the binary assumes of
    each argument (`jit_specialization`); binaries built ahead of time assume nothing of pointers and
    compile integers as i32/i64 values.
    """

    def __init__(self, fn, signature: dict, files: dict[str, Path]) -> None:
        from triton.compiler import CompiledKernel

        specialization = signature.get("specialization")
        source, _ = _source(fn, signature) if specialization is None else jit_source(fn, signature, specialization)
        group = {f"{fn.__name__}.{kind}": str(path) for kind, path in files.items() if kind in ("json", "cubin", "ptx")}
        self.compiled = CompiledKernel(source, group, Path(files["cubin"]).stem)
        names = list(inspect.signature(fn).parameters)
        self.arity = len(signature["arguments"])
        self.constexprs = names[self.arity:]  # XBLOCK, RBLOCK...: passed after the arguments
        self.kinds = [kind for kind, _ in signature["arguments"]]
        self.specialization = None if specialization is None else tuple(specialization)
        # what each launch must have for this binary: an int built as i32 must still fit when a dynamic
        # size grows; a JIT build also assumes aligned pointers, multiples of 16 and constant 1s
        self.narrow_ints, self.aligned, self.multiples, self.ones = [], [], [], []
        if specialization is None:
            self.narrow_ints = [i for i, (kind, value) in enumerate(signature["arguments"])
                                if kind == "int" and _I32[0] <= value < _I32[1]]
        else:
            for i, (kind, _) in enumerate(signature["arguments"]):
                built = specialization[i]
                if built == "constexpr:1":
                    self.ones.append(i)
                elif built.startswith("i32"):
                    self.narrow_ints.append(i)
                if built.endswith(":D"):
                    (self.aligned if kind == "pointer" else self.multiples).append(i)
        # tile sizes and launch options are baked into the binary: a launch with other ones (a GEMM's
        # tile for another M bucket, an autotuner's trial) is not this binary's
        self.meta = dict(signature.get("meta", {}))

    def accepts(self, args: tuple, meta: dict | None = None) -> bool:
        """Whether this binary computes the right thing for a launch with `args` and `meta`."""
        if meta is not None and dict(meta) != self.meta:
            return False
        if len(args) != self.arity:
            return False
        return (all(_I32[0] <= args[i] < _I32[1] for i in self.narrow_ints)
                and all(args[i].data_ptr() % 16 == 0 for i in self.aligned)
                and all(args[i] % 16 == 0 for i in self.multiples)
                and all(args[i] == 1 for i in self.ones))

    def launch(self, grid: tuple, args: tuple, meta: dict) -> None:
        full_grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        # arguments compiled in as constants (an integer 1) are passed too: Triton's launcher skips them
        self.compiled[full_grid](*args, *(meta[name] for name in self.constexprs))


class ContentBinaries:
    """Kernel binaries found by content (cache/binaries.py) for this GPU's `arch` and this Triton.

    `find(name, kernel, args, meta)` is asked before a kernel would be JIT-compiled, graph cache hit or
    miss: a BinaryKernel built from the same source for the same launch, or None. It looks first for the
    binary Triton's JIT built for this launch's specialization, then for one built ahead of time (which
    assumes nothing of pointers). Each outcome is kept per (kernel, meta, specialization), so the store is
    read once per specialization; `lookups` says, per lookup, whether a binary was found and which binaries
    this process stored (what the GPU checks report).

    `remember(...)`, after a JIT launch, stores the binary the JIT built (or took from Triton's own cache)
    under its specialization. A store that cannot be written (full disk, read-only) is given up for the
    rest of the process with one warning: binaries are an optimisation, never a reason to fail.
    """

    def __init__(self, cache_dir: Path | str, arch: str) -> None:
        import triton

        from flagtree_py.cache.binaries import BinaryStore

        self.store = BinaryStore(cache_dir)
        self.arch = arch
        self.triton_version = triton.__version__
        self.writable = True
        self._found: dict = {}
        self._sources: dict = {}
        self._remembered: weakref.WeakSet = weakref.WeakSet()  # CompiledKernels considered (not their ids:
        # an id is reused once a build is freed)
        self.lookups: dict[str, dict] = {}

    def source_of(self, name: str, kernel) -> str:
        if name not in self._sources:
            from flagtree_py.cache.binaries import kernel_source

            self._sources[name] = kernel_source(kernel)
        return self._sources[name]

    def find(self, name: str, kernel, args: tuple, meta: dict) -> BinaryKernel | None:
        """`kernel`: the JITFunction (its `params` give the specialization) or, for lookups of binaries built
        ahead of time only, the raw function."""
        params = getattr(kernel, "params", None)
        specialization = jit_specialization(params, args) if params is not None else None
        # every launch asks: the memo needs no argument scan beyond the specialization, and a generated
        # kernel's pointer dtypes are fixed by its graph; `specialization` holds the integer widths
        memo = (name, tuple(meta.items()), specialization)
        if memo in self._found:
            binary = self._found[memo]
            return binary if binary is not None and (specialization is not None or binary.accepts(args, meta)) else None
        fn = getattr(kernel, "fn", kernel)
        keys = self.keys(name, kernel, launch_signature(args, meta), specialization)
        binary, found_key = None, None
        for key in keys:
            stored = self.store.get(key)
            if stored is None:
                continue
            built_for, files = stored
            try:
                candidate = BinaryKernel(fn, built_for, files)
            except Exception as error:  # noqa: BLE001 -- an unloadable binary (metadata of another Triton): not used
                self.lookups[f"{name} {dict(meta)} {specialization} {key[:12]}"] = {
                    "kernel": name, "key": key, "found": False, "unloadable": f"{type(error).__name__}: {error}"[:300]}
                candidate = None
            if candidate is not None and candidate.accepts(args, meta):
                binary, found_key = candidate, key
                break
        self._found[memo] = binary
        lookup = {"kernel": name, "key": found_key or keys[0], "found": binary is not None}
        if specialization is not None:
            lookup["specialization"] = list(specialization)
            lookup["jit_build"] = binary is not None and binary.specialization is not None
        self.lookups[f"{name} {dict(meta)} {specialization}"] = lookup
        return binary

    def keys(self, name: str, kernel, signature: dict, specialization: tuple | None) -> list[str]:
        """The store keys a launch of `signature` looks up, in order: the JIT build of its specialization
        (where there is one), then the build made ahead of time (which assumes nothing of pointers)."""
        from flagtree_py.cache.binaries import binary_key

        source = self.source_of(name, kernel)
        keys = [binary_key(source, signature, self.arch, self.triton_version)]
        if specialization is not None:
            keys.insert(0, binary_key(source, signature, self.arch, self.triton_version, specialization))
        return keys

    def remember(self, name: str, kernel, args: tuple, meta: dict, compiled) -> str | None:
        """Store the binary Triton's JIT launched for (`args`, `meta`); its key, or None if not stored.

        Asked after every JIT launch; each CompiledKernel is considered once. Not stored: a build whose
        specialization this module cannot read, or one that differs from what `jit_specialization` computes
        for the launch (a later lookup would never find it under that key).
        """
        try:
            if not self.writable or compiled in self._remembered:
                return None
            self._remembered.add(compiled)
        except TypeError:  # not weakly referable: not a CompiledKernel
            return None
        from flagtree_py.cache.binaries import binary_key
        from flagtree_py.runtime.launch import counters

        params = getattr(kernel, "params", None)
        specialization = compiled_specialization(compiled, len(args))
        if params is None or specialization is None or specialization != jit_specialization(params, args):
            # counted: on a GPU this says that this Triton specializes otherwise than `jit_specialization`
            counters["jit_binaries_unmatched"] += 1
            return None

        signature = launch_signature(args, meta)
        key = binary_key(self.source_of(name, kernel), signature, self.arch, self.triton_version, specialization)
        if self.store.get(key) is not None:
            return key
        try:
            files = binary_files(compiled)
            stored = self.store.put(key, name, self.arch, self.triton_version,
                                    {**signature, "specialization": list(specialization)}, files,
                                    source=textwrap.dedent(inspect.getsource(getattr(kernel, "fn", kernel))))
        except (OSError, KeyError, StopIteration, ValueError) as error:
            stored, problem = None, f"{type(error).__name__}: {error}"
        else:
            problem = None if stored is not None else "the binary store could not be written"
        if stored is None:
            self.writable = False
            warnings.warn(f"flagtree: cannot store kernel binaries in {self.store.directory} ({problem}); "
                          "later processes will compile them again", stacklevel=2)
            return None
        counters["jit_binaries_stored"] += 1
        self.lookups.setdefault(f"{name} {dict(meta)} {specialization}", {"kernel": name, "key": key, "found": False,
                                                                          "specialization": list(specialization)})
        self.lookups[f"{name} {dict(meta)} {specialization}"]["stored"] = key
        return key
