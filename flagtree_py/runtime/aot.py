"""Ahead-of-time builds of generated kernels for an NVIDIA GPU this machine may lack, and their reuse.

Triton compiles for an explicit `GPUTarget("cuda", 90, 32)` with no GPU present, which gives PTX
and cubin on a CPU-only machine (`compile_for_nvidia`). `binary_files` turns the result into the
files a cache entry keeps; `BinaryKernel` loads those files on a GPU as Triton's own `CompiledKernel`
(the object Triton's JIT launches) and launches it with no Triton compile.

What an AOT build does not assume: pointer alignment. Triton's JIT specializes pointers that are
16-byte aligned (`tt.divisibility`), which lets it vectorize loads; an AOT build knows no pointer
values, so it leaves that out and any pointer is valid (possibly slower loads).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

_POINTER_TYPES = {
    torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
    torch.int64: "*i64", torch.int32: "*i32", torch.int16: "*i16", torch.int8: "*i8",
    torch.uint8: "*u8", torch.bool: "*i1",
}
_I32 = (-(2**31), 2**31)


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


def binary_files(compiled) -> dict[str, bytes]:
    """A CompiledKernel's cubin, PTX and launch metadata (Triton's own json) by file extension."""
    metadata = next(Path(path) for name, path in compiled.metadata_group.items() if name.endswith(".json"))
    return {"cubin": bytes(compiled.asm["cubin"]), "ptx": compiled.asm["ptx"].encode(), "json": metadata.read_bytes()}


class BinaryKernel:
    """A kernel built ahead of time, loaded from a cache entry's files: launching it compiles nothing."""

    def __init__(self, fn, signature: dict, files: dict[str, Path]) -> None:
        from triton.compiler import CompiledKernel

        source, _ = _source(fn, signature)
        group = {f"{fn.__name__}.{kind}": str(path) for kind, path in files.items() if kind in ("json", "cubin", "ptx")}
        self.compiled = CompiledKernel(source, group, Path(files["cubin"]).stem)
        names = list(inspect.signature(fn).parameters)
        self.arity = len(signature["arguments"])
        self.constexprs = names[self.arity:]  # XBLOCK, RBLOCK...: passed after the arguments
        self.kinds = [kind for kind, _ in signature["arguments"]]
        # an int built as i32 must still fit when a dynamic size grows
        self.narrow_ints = [i for i, (kind, value) in enumerate(signature["arguments"])
                            if kind == "int" and _I32[0] <= value < _I32[1]]
        # tile sizes and launch options are baked into the binary: a launch with other ones (a GEMM's
        # tile for another M bucket, an autotuner's trial) is not this binary's
        self.meta = dict(signature.get("meta", {}))

    def accepts(self, args: tuple, meta: dict | None = None) -> bool:
        if meta is not None and dict(meta) != self.meta:
            return False
        return len(args) == self.arity and all(_I32[0] <= args[i] < _I32[1] for i in self.narrow_ints)

    def launch(self, grid: tuple, args: tuple, meta: dict) -> None:
        full_grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        self.compiled[full_grid](*args, *(meta[name] for name in self.constexprs))


class ContentBinaries:
    """Kernel binaries found by content (cache/binaries.py) for this GPU's `arch` and this Triton.

    `find(kernel, args, meta)` is asked before a kernel would be JIT-compiled, graph cache hit or miss:
    a BinaryKernel built from the same source for the same launch signature, or None. Each outcome is
    kept per (kernel, argument widths, meta), so the store is read once per specialization; `lookups`
    says, per kernel, whether its binary was found (what the GPU check reports).
    """

    def __init__(self, cache_dir: Path | str, arch: str) -> None:
        import triton

        from flagtree_py.cache.binaries import BinaryStore

        self.store = BinaryStore(cache_dir)
        self.arch = arch
        self.triton_version = triton.__version__
        self._found: dict = {}
        self._sources: dict = {}
        self.lookups: dict[str, dict] = {}

    def find(self, name: str, fn, args: tuple, meta: dict) -> BinaryKernel | None:
        # every launch asks, so the memo is per (kernel, meta) alone: a generated kernel's pointer dtypes
        # are fixed by its graph, and the binary's `accepts` checks the integer widths it was built for
        memo = (name, tuple(meta.items()))
        if memo in self._found:
            binary = self._found[memo]
            return binary if binary is not None and binary.accepts(args, meta) else None
        from flagtree_py.cache.binaries import binary_key, kernel_source

        signature = launch_signature(args, meta)

        if name not in self._sources:
            self._sources[name] = kernel_source(fn)
        key = binary_key(self._sources[name], signature, self.arch, self.triton_version)
        stored = self.store.get(key)
        binary = None
        if stored is not None:
            built_for, files = stored
            binary = BinaryKernel(fn, built_for, files)
            if not binary.accepts(args, meta):
                binary = None
        self._found[memo] = binary
        self.lookups[f"{name} {dict(meta)}"] = {"kernel": name, "key": key, "found": binary is not None}
        return binary
