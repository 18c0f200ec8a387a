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
    """A node's fake value as the key reads it."""
    import torch

    from flagtree_py.codegen.indexing import size_text

    if isinstance(value, torch.Tensor):
        shape, stride = tuple(map(size_text, value.shape)), tuple(map(size_text, value.stride()))
        return f"T[{value.dtype},{shape},{stride},{value.device.type}]"
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


#: argument leaves a Dynamo graph may carry whose repr is their whole content (anything else: no key)
_PLAIN_LEAVES = (int, float, bool, str, type(None), type(Ellipsis))


def _dynamo_argument(value) -> str | None:
    """A Dynamo graph node's argument as text, or None when its repr might not say all it is."""
    import torch
    import torch.fx

    if isinstance(value, torch.fx.Node):
        return f"%{value.name}"
    if isinstance(value, (*_PLAIN_LEAVES, torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return repr(value)
    if isinstance(value, slice):
        parts = [_dynamo_argument(v) for v in (value.start, value.stop, value.step)]
        return None if None in parts else f"slice({','.join(parts)})"
    if isinstance(value, (list, tuple)):
        parts = [_dynamo_argument(v) for v in value]
        return None if None in parts else f"{type(value).__name__}({','.join(parts)})"
    if isinstance(value, dict):
        parts = [(repr(k), _dynamo_argument(v)) for k, v in value.items()]
        if not all(isinstance(k, str) for k in value) or any(v is None for _, v in parts):
            return None
        return "{" + ",".join(f"{k}:{v}" for k, v in parts) + "}"
    return None


def _dynamo_value(value) -> str:
    """An example value with what AOTAutograd reads of it: dtype, sizes and strides (symbolic as sympy),
    device, whether it requires grad, and whether it is a Parameter (the layout passes merge those)."""
    import torch

    if isinstance(value, torch.Tensor):
        kind = "P" if isinstance(value, torch.nn.Parameter) else "T"
        return (f"{kind}[{value.dtype},{tuple(map(str, value.shape))},{tuple(map(str, value.stride()))},"
                f"{value.device},{value.requires_grad},{value.is_leaf}]")
    return _describe(value)


#: functorch settings that change no inference graph: AOTAutograd's own cache and backward lowering, which
#: torch's precompile (`aot_compile`) forces on around the backend; keyed, a precompile would miss the link
_FUNCTORCH_NOT_KEYED = frozenset({"enable_autograd_cache", "bundled_autograd_cache", "strict_autograd_cache",
                                  "bypass_autograd_cache_key", "force_autograd_cache",
                                  "force_non_lazy_backward_lowering"})


def dynamo_graph_key(gm, example_inputs: list, target_hash: str, options_hash: str) -> str | None:
    """The key of a *Dynamo* graph (before AOTAutograd) compiled for a target with options, or None when
    the graph holds something its text would not capture (a submodule, an attribute, an opaque argument).

    What AOTAutograd makes of the graph is a function of what is in here: the graph's nodes with their
    example values, the inputs (metadata, Parameter or not, requires_grad), the symbolic context Dynamo
    left in the shape environment (each symbol's range, its replacements, the guards so far), the grad
    and autocast modes, the functorch config, the default dtype, and the versions (torch's decompositions,
    flagtree's source). A key from this maps to the aten entry that compile made (backend.py's link).
    """
    import torch
    import torch.fx
    import triton

    if any(True for _ in gm.parameters()) or any(True for _ in gm.buffers()):
        return None
    lines = []
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            return None
        arguments = _dynamo_argument((node.args, node.kwargs))
        if arguments is None:
            return None
        target = node.target if isinstance(node.target, str) else _qualified_name(node.target)
        if target is None:
            return None
        lines.append(f"{node.op} {node.name} {target} {arguments} {_dynamo_value(node.meta.get('example_value'))}")
    inputs = [_dynamo_value(value) for value in example_inputs]
    shape_env = shape_env_of(gm)
    symbolic = []
    if shape_env is not None:
        ranges, replacements = symbol_ranges_and_replacements(shape_env)
        symbolic = ["ranges " + ranges, "replacements " + replacements,
                    "guards " + repr([str(guard.expr) for guard in shape_env.guards])]
    functorch = {k: v for k, v in torch._functorch.config.save_config_portable().items()
                 if k not in _FUNCTORCH_NOT_KEYED}
    parts = [
        f"dynamo graph; flagtree {flagtree_py.__version__} {source_hash()}",
        f"torch {torch.__version__} triton {triton.__version__} python {platform.python_version()}",
        f"target {target_hash} options {options_hash}",
        f"grad {torch.is_grad_enabled()} autocast {torch._C._is_any_autocast_enabled()}",
        f"default dtype {torch.get_default_dtype()} deterministic {torch.are_deterministic_algorithms_enabled()}",
        "functorch " + repr(sorted((k, repr(v)) for k, v in functorch.items())),
        "inputs " + ";".join(inputs),
        *symbolic,
        *lines,
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _qualified_name(target) -> str | None:
    """`module.qualname` of a node's callable; None for one a name does not pin down (a lambda, a local)."""
    import torch

    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):  # "aten.add.Tensor"
        return f"op {target}"
    module = getattr(target, "__module__", None) or type(target).__module__
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if name is None or "<" in name:
        return None
    return f"{module}.{name}"


def symbol_ranges_and_replacements(shape_env) -> tuple[str, str]:
    """The shape environment's symbol ranges and replacements as text (sorted: the same env, the same text)."""
    return (repr(sorted((str(s), str(r)) for s, r in shape_env.var_to_range.items())),
            repr(sorted((str(s), str(r)) for s, r in shape_env.replacements.items())))


def shape_env_of(gm):
    """The ShapeEnv Dynamo traced `gm` with (its fake mode's), or None."""
    import torch

    for node in gm.graph.nodes:
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor):
            mode = getattr(value, "fake_mode", None)
            if mode is not None:
                return mode.shape_env
    return None
