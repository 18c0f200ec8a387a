"""Turn generated module source into a callable: import it, wrap kernels for the executor."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import torch

from flagtree_py.runtime.check import CheckCallback, CheckedKernel
from flagtree_py.runtime.launch import GuardedKernel


def load_module(source: str, directory: Path, name_hint: str):
    """Import `source` from a file (Triton's JIT reads kernel source through `inspect`)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    module_name = f"flagtree_generated_{name_hint}_{digest}"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{module_name}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".tmp{id(source)}")
        tmp.write_text(source)
        tmp.replace(path)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module, path


def poisoned_empty_strided(size, stride, *, dtype, device):
    """`torch.empty_strided`, filled with a value no kernel computes by accident."""
    tensor = torch.empty_strided(size, stride, dtype=dtype, device=device)
    if dtype.is_floating_point:
        return tensor.fill_(float("nan"))
    return tensor.fill_(True if dtype == torch.bool else -7)


def bind_kernels(module, kernel_names: list[str], interpret: bool, constants: dict, externs: dict, on_failure=None,
                 poison: bool = False, binaries: dict | None = None, on_compile=None,
                 on_check: CheckCallback | None = None, content_binaries=None) -> None:
    """Replace each `@triton.jit` kernel in the module by a `GuardedKernel`.

    On a machine without the target GPU the same source runs through Triton's interpreter.
    `binaries` maps a kernel name to (launch signature, {"cubin"|"ptx"|"json": path}) built ahead of
    time for this GPU: such a kernel launches its binary and Triton compiles nothing.
    `content_binaries` (runtime/aot.py ContentBinaries, on a GPU with the cache on) finds a kernel's binary by
    its source and launch signature, whatever graph entry it was built for, before Triton would compile it.
    With `on_check` (option check_kernels) each becomes a `CheckedKernel` that compares every launch with aten.
    """
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
    for name in kernel_names:
        jit = getattr(module, name)
        kernel = InterpretedFunction(jit.fn) if interpret else jit
        binary = None
        if not interpret and binaries and name in binaries:
            from flagtree_py.runtime.aot import BinaryKernel

            signature, files = binaries[name]
            binary = BinaryKernel(jit.fn, signature, files)
        fallback = getattr(module, f"{name}_fallback")
        guard = {"interpreted": interpret, "binary": binary, "on_compile": on_compile,
                 "content_binaries": None if interpret else content_binaries}
        if on_check is None:
            guarded = GuardedKernel(name, kernel, fallback, on_failure, **guard)
        else:
            guarded = CheckedKernel(name, kernel, fallback, on_failure, on_check=on_check, **guard)
        setattr(module, name, guarded)
    module.constants.update(constants)
    if poison:
        module.empty_strided = poisoned_empty_strided
    for extern_name, target in externs.items():
        setattr(module, extern_name, target)
