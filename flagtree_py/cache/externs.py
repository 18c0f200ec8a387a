"""The non-aten callables a generated wrapper calls, stored in an entry by import path."""

from __future__ import annotations

import torch


def extern_import_paths(externs: dict) -> dict | None:
    """Import paths of the non-aten callables a wrapper calls, or None if one has none."""
    names = {}
    for name, target in externs.items():
        if isinstance(target, torch._ops.HigherOrderOperator):
            names[name] = f"torch.ops.higher_order.{target.name()}"
            continue
        module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", "")
        if not module or "<" in qualname:
            return None
        names[name] = f"{module}:{qualname}"
    return names


def resolve_import_paths(names: dict) -> dict:
    import importlib

    resolved = {}
    for name, path in names.items():
        if path.startswith("torch.ops.higher_order."):
            resolved[name] = getattr(torch.ops.higher_order, path.rsplit(".", 1)[1])
            continue
        module, qualname = path.split(":")
        value = importlib.import_module(module)
        for part in qualname.split("."):
            value = getattr(value, part)
        resolved[name] = value
    return resolved
