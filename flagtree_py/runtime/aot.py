"""Ahead-of-time compile of generated kernels for an NVIDIA GPU that this machine lacks.

Triton compiles for an explicit `GPUTarget("cuda", 90, 32)` with no GPU present, which gives
PTX and cubin on a CPU-only machine. Tests use it to prove every generated kernel builds for
Hopper and Ampere, not only under the interpreter.
"""

from __future__ import annotations

import torch

_POINTER_TYPES = {
    torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
    torch.int64: "*i64", torch.int32: "*i32", torch.int16: "*i16", torch.int8: "*i8",
    torch.uint8: "*u8", torch.bool: "*i1",
}


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


def compile_for_nvidia(fn, signature: dict, capability: int = 90):
    """Compile the raw kernel function `fn` for sm_<capability>; returns Triton's CompiledKernel.

    Integer arguments are shape symbols, which generated kernels mark `do_not_specialize`.
    """
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    names = list(inspect.signature(fn).parameters)
    types, constants = {}, {}
    for name, (kind, value) in zip(names, signature["arguments"]):
        if kind == "pointer":
            types[name] = value
        elif kind == "int":  # size symbols: generated kernels never specialize on them
            types[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        else:
            types[name] = "fp32"
    meta = dict(signature["meta"])
    num_warps = meta.pop("num_warps", 4)
    num_stages = meta.pop("num_stages", 3)
    for name, value in meta.items():
        types[name] = "constexpr"
        constants[name] = value
    source = ASTSource(fn=JITFunction(fn), signature=types, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})
