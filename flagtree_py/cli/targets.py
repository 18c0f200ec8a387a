"""`flagtree targets [--json]`: the registered targets (in-tree and plugins) and how they differ."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable

from flagtree_py.cli.common import format_bytes, format_table

# (label, how to read the value off a TargetSpec, how to print it): the columns of the table after the
# name, vendor and arch that identify a target; "how they differ" compares these.
COLUMNS: list[tuple[str, Callable, Callable]] = [
    ("warp size", lambda spec: spec.warp_size, str),
    ("max threads/block", lambda spec: spec.max_threads_per_block, str),
    ("shared memory/block", lambda spec: spec.shared_memory_per_block, format_bytes),
    ("Triton language", lambda spec: spec.triton_language, lambda level: ".".join(map(str, level))),
    ("features", lambda spec: tuple(sorted(spec.features)), lambda features: ",".join(features) or "-"),
]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "targets",
        help="list the registered targets and how they differ",
        description="The targets flagtree can lower for: in-tree ones and those added by plugins through the "
        "'flagtree.targets' entry-point group. A target is data (warp size, limits, Triton language level, "
        "features, tile tables) that shapes lowering.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.set_defaults(run=run, prog=parser.prog)


def run(args: argparse.Namespace) -> int:
    from flagtree_py.targets import VENDOR_DEFAULTS, registered_targets

    # in-tree vendors first, in VENDOR_DEFAULTS' order, then plugins; a stable sort keeps each vendor's own order
    vendor_rank = {vendor: rank for rank, vendor in enumerate(VENDOR_DEFAULTS)}
    specs = sorted(registered_targets().values(),
                   key=lambda spec: (vendor_rank.get(spec.vendor, len(vendor_rank)), spec.vendor))
    aliases = {name: vendor for vendor, name in VENDOR_DEFAULTS.items() if vendor != name}
    if args.json:
        print(json.dumps({
            "targets": [_as_json(spec, aliases.get(spec.name)) for spec in specs],
            "vendor_defaults": dict(VENDOR_DEFAULTS),
            "how_they_differ": describe_differences(specs),
        }, indent=2))
        return 0
    headers = ["name", "vendor", "arch", *(label for label, _, _ in COLUMNS)]
    rows = [[spec.name, spec.vendor, spec.arch, *(show(read(spec)) for _, read, show in COLUMNS)] for spec in specs]
    print(format_table(headers, rows))
    print()
    print(describe_differences(specs))
    if aliases:
        picks = ", ".join(f"{vendor} -> {name}" for vendor, name in VENDOR_DEFAULTS.items() if name in aliases)
        print(f"--target takes a name above, or a vendor for its default target ({picks}), or auto.")
    return 0


def describe_differences(specs: list) -> str:
    """One line: what sets the targets apart, from the data (so plugin targets are described too)."""
    if len(specs) < 2:
        return "Only one target is registered."
    grouped, per_target, shared = [], [], []
    for label, read, show in COLUMNS:
        groups: dict = {}
        for spec in specs:
            groups.setdefault(read(spec), []).append(spec.name)
        if len(groups) == 1:
            shared.append(f"{label} {show(next(iter(groups)))}")
        elif len(groups) == 2:  # two camps are worth naming; more would be the table again
            camps = [f"{show(value)} ({', '.join(names)})" for value, names in groups.items()]
            grouped.append(f"{label} {' vs '.join(camps)}")
        else:
            per_target.append(label)
    parts = grouped[:]
    if per_target:
        parts.append(f"{' and '.join(per_target)} vary from target to target (see the table)")
    line = "How they differ: " + ("; ".join(parts) if parts else "in name only") + "."
    if shared:
        line += f" All share {', '.join(shared)}."
    return line


def _as_json(spec, vendor_default_for: str | None) -> dict:
    fields = dataclasses.asdict(spec)
    fields.pop("extra")
    fields["dtypes"] = sorted(spec.dtypes)
    fields["features"] = sorted(spec.features)
    fields["dot_dtypes"] = sorted(spec.dot_dtypes)
    fields["triton_language"] = ".".join(map(str, spec.triton_language))
    fields["hash"] = spec.hash()
    fields["default_for_vendor"] = vendor_default_for
    return fields
