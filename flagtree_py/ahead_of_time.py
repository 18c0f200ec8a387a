"""Compile a model for a chip this machine does not have (`flagtree compile`), into the cache.

The graphs must be the ones a run on the chip would compile, so that the entry's key is the one that
run computes. MetaX and Iluvatar cards show up to torch as "cuda" devices like NVIDIA's, so every GPU
target is traced the same way: the model's parameters and its input are *fake* CUDA tensors (shapes,
dtypes, strides and a "cuda" device, no memory), and `torch.compile(model, backend="flagtree")` runs
unchanged: Dynamo, AOTAutograd, the passes and code generation see what they would see on the GPU,
and the entry is stored under the same key. Then the generated wrapper runs once on the fake tensors
in a dry run (`runtime.launch.dry_run`): no kernel launches, each records its launch signature. For
NVIDIA targets each kernel is then built for its sm_XX with Triton (`runtime/aot.py`) and the cubin,
PTX and Triton's launch metadata go into the entry; for every target the launch signatures do.

The key matches a GPU run's only with the same toolchain (torch, Triton, Python and flagtree versions
are in the key) and the same model code (transformers version): build where you will run, or on a
machine with the same versions.
"""

from __future__ import annotations

import ctypes
import inspect
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import flagtree_py
from flagtree_py.cache import KernelCache
from flagtree_py.runtime.launch import GuardedKernel, dry_run
from flagtree_py.targets import get_target

#: c10's DeviceType::CPU and ::CUDA (c10/core/DeviceType.h)
_CPU, _CUDA = 0, 1


def allow_fake_cuda() -> None:
    """Let fake "cuda" tensors pass the device guards of a CPU-only torch build.

    Python-level indexing and `.to()` open a device guard for the tensor's device; a CPU-only build has
    none for CUDA and raises. FakeTensorMode installs a no-op guard itself only on CUDA builds with no
    device (c10's ensureCUDADeviceGuardSet), so on a CPU-only build the CPU's no-op guard is registered
    for CUDA too, as torchdistx's fake mode did. Nothing then runs on a GPU: every op on these tensors
    is a fake one.
    """
    if torch.version.cuda is not None or torch.version.hip is not None:
        return  # a GPU build: FakeTensorMode handles it
    library = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libc10.so"))
    registry = (ctypes.c_void_p * 64).in_dll(library, "_ZN3c104impl26device_guard_impl_registryE")
    if not registry[_CUDA]:
        registry[_CUDA] = registry[_CPU]


def fake_cuda_model(model: torch.nn.Module, mode: FakeTensorMode) -> torch.nn.Module:
    """The model's parameters and buffers replaced, in place, by fake tensors on cuda:0."""

    def fake(tensor: torch.Tensor) -> FakeTensor:
        meta = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")
        return FakeTensor(mode, meta, torch.device("cuda", 0))

    for module in model.modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            module._parameters[name] = torch.nn.Parameter(fake(parameter), requires_grad=parameter.requires_grad)
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None:
                module._buffers[name] = fake(buffer)
    return model


def compile_ahead(build_model: Callable[[], torch.nn.Module], vocab_size: int, length: int, target_name: str,
                  cache_dir: Path, dynamic: bool | None = None, note: Callable[[str], None] = print) -> list[dict]:
    """Compile the model's graphs for `target_name` into the cache at `cache_dir`; one summary per graph."""
    target = get_target(target_name)
    allow_fake_cuda()
    torch._dynamo.reset()
    first = len(flagtree_py.report())
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    model = fake_cuda_model(build_model(), mode)
    options = {"target": target.name, "cache_dir": str(cache_dir)}
    with torch.no_grad(), mode, dry_run():
        input_ids = torch.randint(0, vocab_size, (1, length), device="cuda")
        torch.compile(model, backend="flagtree", options=options, dynamic=dynamic)(input_ids)
    cache = KernelCache(cache_dir)
    summaries = []
    for record in flagtree_py.report()[first:]:
        if record.get("fallback") == "graph" or not record.get("cache_key"):
            raise RuntimeError(f"{record['graph']} was not compiled: {record.get('error', 'cache disabled')}")
        note(f"{record['graph']}: {record['triton_kernels']} kernels for {target.name} (cache {record['cache']})")
        summaries.append(_store_builds(cache, record, target, note))
    return summaries


def _store_builds(cache: KernelCache, record: dict, target, note) -> dict:
    """Launch signatures of every kernel, and for NVIDIA its cubin and PTX, into the graph's entry."""
    key = record["cache_key"]
    module = sys.modules[Path(record["module_path"]).stem]
    kernels = [k for k in vars(module).values() if isinstance(k, GuardedKernel)]
    launches = {k.name: k.signature for k in kernels if k.signature is not None}
    if cache.update_meta(key, lambda meta: meta.update(launches=launches)) is None:
        raise RuntimeError(f"cannot write cache entry {key}")
    summary = {"graph": record["graph"], "target": target.name, "key": key, "cache": record["cache"],
               "kernels": len(kernels), "launched": len(launches), "binaries": {}, "triton_compiles": 0}
    capability = _nvidia_capability(target)
    if capability is None:
        summary["note"] = f"no ahead-of-time compiler for {target.vendor} here: Triton source and launch metadata"
        return summary
    import triton

    from flagtree_py.cache.binaries import BinaryStore, binary_key, kernel_source
    from flagtree_py.runtime.aot import binary_files, compile_for_nvidia

    arch = f"sm{capability}"
    have = cache.peek(key)
    present = have.binaries(arch) if have is not None else {}
    store = BinaryStore(cache.directory)
    summary["binaries_by_content"] = {}
    for index, kernel in enumerate(sorted(kernels, key=lambda k: k.name), 1):
        if kernel.signature is None:
            continue
        # the content-keyed copy is what a GPU with another torch finds (cache/binaries.py)
        content = binary_key(kernel_source(kernel.kernel.fn), kernel.signature, arch, triton.__version__)
        summary["binaries_by_content"][kernel.name] = content
        stored = store.get(content)
        if stored is not None and kernel.name in present:
            continue
        if stored is not None:
            files = {kind: path.read_bytes() for kind, path in stored[1].items()}
        else:
            compiled = compile_for_nvidia(kernel.kernel.fn, kernel.signature, capability)
            summary["triton_compiles"] += 1
            files = binary_files(compiled)
            store.put(content, kernel.name, arch, triton.__version__, kernel.signature, files,
                      source=textwrap.dedent(inspect.getsource(kernel.kernel.fn)))
            note(f"  {arch} {index}/{len(kernels)} {kernel.name}: cubin {len(files['cubin'])} bytes")
        if kernel.name not in present:
            cache.add_binaries(key, kernel.name, arch, kernel.signature, files)
    entry = cache.peek(key)
    summary["binaries"] = {arch: sorted(entry.binaries(arch)) if entry else []}
    return summary


def _nvidia_capability(target) -> int | None:
    if target.vendor != "nvidia" or not target.arch.startswith("sm_"):
        return None
    return int(target.arch[3:])
