"""The content key of a compiled graph: everything that changes the output, nothing else.

    flagtree's version and a hash of its own source files (passes, codegen, templates...)
    the canonical aten graph with every node's target, arguments and value metadata
    (dtypes, shapes and strides, symbolic sizes as their sympy expressions)
    the target's hash (its data) and the toolchain: torch, Triton and Python versions
    the options that change generated code (`CompileOptions.hash()`)
Tensor *values* of constants are not in it: the generated code binds them at load time.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from pathlib import Path

import flagtree_py

# torch is imported inside the functions: `flagtree cache ...` reads entries without it


@functools.cache
def source_hash() -> str:
    """A hash of flagtree's own source: any change to the compiler invalidates the cache."""
    digest = hashlib.sha256()
    root = Path(flagtree_py.__file__).parent
    for path in sorted(root.rglob("*")):
        if path.suffix in (".py", ".jinja") and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _describe(value) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return f"T[{value.dtype},{tuple(map(str, value.shape))},{tuple(map(str, value.stride()))},{value.device.type}]"
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return f"S[{value.node.expr}]"
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(_describe(v) for v in value) + ")"
    return type(value).__name__


def canonical_graph(gm) -> str:
    import torch.fx

    lines = []
    for node in gm.graph.nodes:
        args = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{n.name}")
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__qualname__", str(node.target))
        lines.append(f"{node.op} {node.name} {target} {args!r} {_describe(node.meta.get('val'))}")
    return "\n".join(lines)


def cache_key(gm, target_hash: str, options_hash: str) -> str:
    """The key of `gm` (an aten torch.fx.GraphModule) compiled for a target with options."""
    import torch
    import triton

    parts = [
        f"flagtree {flagtree_py.__version__} {source_hash()}",
        f"torch {torch.__version__} triton {triton.__version__} python {platform.python_version()}",
        f"target {target_hash} options {options_hash}",
        canonical_graph(gm),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]
