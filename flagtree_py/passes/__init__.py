"""Graph passes: each takes the aten graph and a PassContext, returns whether it changed it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from flagtree_py.options import CompileOptions


@dataclass
class PassContext:
    options: CompileOptions
    counters: Counter = field(default_factory=Counter)
