"""Graph passes: each takes the aten graph and a PassContext, returns whether it changed it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from flagtree_py.options import CompileOptions


@dataclass
class PassContext:
    options: CompileOptions
    counters: Counter = field(default_factory=Counter)
    #: placeholder -> the real nn.Parameter behind it (empty when the pipeline could not tell)
    parameters: dict = field(default_factory=dict)
    #: placeholders whose parameters the pipeline must lay back to back in one buffer, per merge
    merged_parameters: list = field(default_factory=list)
