"""Targets: found through the `flagtree.targets` entry-point group, in-tree ones too.

A vendor package adds a target by declaring, in its own pyproject:
    [project.entry-points."flagtree.targets"]
    myvendor = "my_package.flagtree_target:TARGETS"
where TARGETS is a list of `TargetSpec`.
"""

from __future__ import annotations

import functools
import warnings
from importlib import metadata

from flagtree_py.targets.base import TargetSpec, TileConfig

__all__ = ["TargetSpec", "TileConfig", "registered_targets", "get_target", "select_target"]

ENTRY_POINT_GROUP = "flagtree.targets"
VENDOR_DEFAULTS = {"nvidia": "nvidia-sm90", "metax": "metax-c500", "iluvatar": "iluvatar-bi150", "interpreter": "interpreter"}


@functools.cache
def registered_targets() -> dict[str, TargetSpec]:
    found: dict[str, TargetSpec] = {}
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            for spec in entry.load():
                found[spec.name] = spec
        except Exception as error:  # a broken plugin must not break the compiler
            warnings.warn(f"flagtree: target plugin {entry.name!r} failed to load: {error}", stacklevel=2)
    if not found:  # running from a source tree that was never installed
        from flagtree_py.targets import interpreter, iluvatar, metax, nvidia

        for module in (nvidia, metax, iluvatar, interpreter):
            for spec in module.TARGETS:
                found[spec.name] = spec
    return found


def get_target(name: str) -> TargetSpec:
    targets = registered_targets()
    name = VENDOR_DEFAULTS.get(name, name)
    if name not in targets:
        known = sorted(set(targets) | set(VENDOR_DEFAULTS))
        raise ValueError(f"unknown flagtree target {name!r}; known: {', '.join(known)}")
    return targets[name]


def select_target(requested: str | None, device_type: str) -> tuple[TargetSpec, str]:
    """The target to lower for, and why it was chosen."""
    if requested and requested != "auto":
        return get_target(requested), f"requested: {requested}"
    if device_type != "cuda":
        return get_target("interpreter"), f"inputs on {device_type}: Triton interpreter"
    import torch

    name = torch.cuda.get_device_name()
    lowered = name.lower()
    if "metax" in lowered or "mxc" in lowered or lowered.startswith("c500"):
        return get_target("metax"), f"device name {name!r}"
    if "iluvatar" in lowered or "bi-v" in lowered or "mr-v" in lowered:
        return get_target("iluvatar"), f"device name {name!r}"
    major, minor = torch.cuda.get_device_capability()
    arch = "nvidia-sm90" if major >= 9 else "nvidia-sm80"
    return get_target(arch), f"{name} (compute capability {major}.{minor})"
