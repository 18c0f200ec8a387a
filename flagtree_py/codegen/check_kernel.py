"""Check a rendered Triton kernel against a target before it is built: language level and resources.

    check_kernel(source, config, target) -> list[KernelProblem]

- **language**: an AST walk finds every `tl.<api>` the kernel uses (and the keywords it passes to
  `tl.range`); an API newer than the target's Triton language level, or one that needs a hardware
  feature the target lacks (TMA), is a problem. The table below is data, each row with its source.
- **resources**: threads per block (num_warps x the target's warp size) and an estimate of shared
  memory (tiles x element bytes x pipeline stages) within the target's limits.

Every template's kernels go through this one function, so a template added later is checked the
same way: the wrapper calls it for pointwise and reduction kernels, codegen/gemm.py for every
candidate tile of the tiled, split-K partial and reduce kernels, codegen/attention.py for the prefill,
decode and combine kernels with their fitted tiles, codegen/moe_routing.py for the routing kernel.
`SOURCE_PROBLEMS` are those of the source itself, which no other config mends (aten then).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from flagtree_py.codegen.indexing import LoweringError


@dataclass(frozen=True)
class TritonApi:
    introduced: tuple[int, int]  # first Triton release whose language has it
    feature: str | None  # hardware feature it needs on the target ("tma"), if any
    source: str


_NOTES_33 = "Triton 3.3 release notes (tensor descriptors, experimental)"
_NOTES_34 = "Triton 3.4 release notes (tensor descriptors public; warp specialization for Blackwell)"
#: `tl.<name>` -> when it appeared. Only APIs newer than the oldest language level a target declares
#: (3.0/3.1, FlagTree's MetaX and Iluvatar backends) need a row; older ones pass everywhere. Versions
#: come from Triton's release notes. Cross-checked against FlagTree's Triton-3.1-based language
#: (flagos-ai/FlagTree python/triton/language/__init__.py and core.py): it exports
#: _experimental_descriptor_load/store, clamp, histogram, range(num_stages, loop_unroll_factor) and none
#: of gather, dot_scaled, assume, make_tensor_descriptor, map_elementwise; the exact minor release of
#: the newer rows (3.2 vs 3.3...) matters only to a target declaring a level between 3.1 and 3.6.
TRITON_APIS: dict[str, TritonApi] = {
    "_experimental_descriptor_load": TritonApi((3, 0), "tma", "Triton 3.0: Hopper TMA, host-built descriptors"),
    "_experimental_descriptor_store": TritonApi((3, 0), "tma", "Triton 3.0: Hopper TMA, host-built descriptors"),
    "_experimental_make_tensor_descriptor": TritonApi((3, 3), "tma", _NOTES_33),
    "make_tensor_descriptor": TritonApi((3, 4), "tma", _NOTES_34),
    "load_tensor_descriptor": TritonApi((3, 4), "tma", _NOTES_34),
    "store_tensor_descriptor": TritonApi((3, 4), "tma", _NOTES_34),
    "tensor_descriptor": TritonApi((3, 4), "tma", _NOTES_34),
    "gather": TritonApi((3, 2), None, "Triton 3.2: tl.gather (python/triton/language/core.py)"),
    "dot_scaled": TritonApi((3, 2), None, "Triton 3.2: tl.dot_scaled (microscaling formats)"),
    "assume": TritonApi((3, 3), None, "Triton 3.3: tl.assume"),
    "map_elementwise": TritonApi((3, 5), None, "Triton 3.5: tl.map_elementwise"),
}

#: keywords of `tl.range(...)` -> when they appeared
RANGE_KEYWORDS: dict[str, TritonApi] = {
    "num_stages": TritonApi((3, 0), None, "Triton 3.0: tl.range(num_stages=)"),
    "loop_unroll_factor": TritonApi((3, 1), None, "Triton 3.1: tl.range(loop_unroll_factor=)"),
    "disallow_acc_multi_buffer": TritonApi((3, 3), None, "Triton 3.3: tl.range(disallow_acc_multi_buffer=)"),
    "flatten": TritonApi((3, 3), None, "Triton 3.3: tl.range(flatten=)"),
    "warp_specialize": TritonApi((3, 4), None, _NOTES_34),
}

#: other keywords that appeared late on old calls
CALL_KEYWORDS: dict[tuple[str, str], TritonApi] = {
    ("device_assert", "mask"): TritonApi((3, 5), None, "Triton 3.5 release notes: mask parameter of tl.device_assert"),
}


#: check_kernel problems no other config can mend: the kernel is left to its aten twin
SOURCE_PROBLEMS = ("language", "feature", "syntax")


@dataclass(frozen=True)
class KernelProblem:
    kind: str  # "language" | "feature" | "threads" | "shared_memory" | "syntax"
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


def check_kernel(source: str, config: dict, target) -> list[KernelProblem]:
    """What keeps `source` launched with `config` from building or running on `target`; [] if nothing.

    `config` holds the launch meta (num_warps, num_stages) and the tile (XBLOCK/RBLOCK, or
    BLOCK_M/BLOCK_N/BLOCK_K for dot kernels), plus `kind` and `element_bytes` where known.
    """
    return _with_config(*_source_check(source, target), config, target)


def _source_check(source: str, target) -> tuple[list[KernelProblem], list[int] | None]:
    """What `source` alone says, whatever the config: its syntax or language problems, and the
    `num_stages=` of its loops (None where it does not parse)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as error:
        return [KernelProblem("syntax", str(error))], None
    return check_language(tree, target), _loop_stages(tree)


def _with_config(problems: list[KernelProblem], loop_stages: list[int] | None, config: dict,
                 target) -> list[KernelProblem]:
    """The source's problems, and the resources of `config` (with the deepest pipeline of its loops)."""
    if loop_stages is None:
        return problems
    stages = max([int(config.get("num_stages", 1)), *loop_stages])
    return problems + check_resources({**config, "num_stages": stages}, target)


def check_language(tree: ast.AST, target) -> list[KernelProblem]:
    level = tuple(target.triton_language)
    problems: list[KernelProblem] = []
    seen: set[str] = set()

    def judge(what: str, api: TritonApi) -> None:
        if what in seen:
            return
        seen.add(what)
        if api.introduced > level:
            problems.append(KernelProblem(
                "language", f"{what} needs Triton {_version(api.introduced)}; {target.name} accepts "
                f"{_version(level)} ({api.source})"))
        elif api.feature and api.feature not in target.features:
            problems.append(KernelProblem("feature", f"{what} needs {api.feature}, which {target.name} lacks"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            name = _language_name(node)
            if name in TRITON_APIS:
                judge(f"tl.{name}", TRITON_APIS[name])
        if isinstance(node, ast.Call):
            name = _language_name(node.func)
            for keyword in node.keywords:
                if name == "range" and keyword.arg in RANGE_KEYWORDS:
                    judge(f"tl.range({keyword.arg}=)", RANGE_KEYWORDS[keyword.arg])
                elif (name, keyword.arg) in CALL_KEYWORDS:
                    judge(f"tl.{name}({keyword.arg}=)", CALL_KEYWORDS[(name, keyword.arg)])
    return problems


def estimate_shared_memory(config: dict) -> int:
    """Bytes of shared memory a kernel of this config may use (an estimate, erring high).

    Dot kernels stage an A and a B tile per pipeline stage. Reductions need a cross-warp scratch
    of at most the whole tile, and loads a software pipeline prefetches are staged per stage.
    Pointwise kernels keep everything in registers.
    """
    if "shared_bytes" in config:  # a template that sizes its own buffers (attention) says how much
        return int(config["shared_bytes"])
    stages = max(1, int(config.get("num_stages", 1)))
    element = int(config.get("element_bytes", 4))
    if "BLOCK_K" in config:
        tile = config["BLOCK_M"] * config["BLOCK_K"] + config["BLOCK_K"] * config["BLOCK_N"]
        return tile * element * stages
    if config.get("kind") == "reduction":
        return config.get("XBLOCK", 1) * config.get("RBLOCK", 1) * element * stages
    return 0


def check_resources(config: dict, target) -> list[KernelProblem]:
    problems = []
    threads = int(config.get("num_warps", 4)) * target.warp_size
    if threads > target.max_threads_per_block:
        problems.append(KernelProblem(
            "threads", f"{config.get('num_warps')} warps x {target.warp_size} = {threads} threads > "
            f"{target.max_threads_per_block} per block on {target.name}"))
    shared = estimate_shared_memory(config)
    if shared > target.shared_memory_per_block:
        problems.append(KernelProblem(
            "shared_memory", f"about {shared} bytes > {target.shared_memory_per_block} per block on {target.name}"))
    return problems


class KernelCheckFailed(LoweringError):
    """No config of the target passes check_kernel: the template's kernel is left to its aten twin."""

    def __init__(self, kernel: str, problems: list[str]) -> None:
        super().__init__(f"check_kernel: {'; '.join(problems)}")
        self.kernel = kernel
        self.problems = problems


def passing_configs(source: str, candidates: list[dict], target, extra: dict | None = None
                    ) -> tuple[list[dict], list[str], bool]:
    """The candidates (launch metas, best first) under which `source` passes check_kernel on `target`;
    the problems of the first candidate that failed ([] if none did); and whether the source itself is
    at fault (no config can pass). `extra` adds what the check needs but the launch does not take
    (kind, element_bytes)."""
    passing: list[dict] = []
    first: list[str] = []
    checked = _source_check(source, target)  # parsed and walked once for all candidates
    for meta in candidates:
        problems = _with_config(*checked, {**meta, **(extra or {})}, target)
        if not problems:
            passing.append(meta)
            continue
        first = first or [str(p) for p in problems]
        if any(p.kind in SOURCE_PROBLEMS for p in problems):
            return [], first, True
    return passing, first, False


def _loop_stages(tree: ast.AST) -> list[int]:
    """The constant `num_stages=` of every `tl.range` loop: each stage buffers one more tile."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _language_name(node.func) == "range":
            for keyword in node.keywords:
                if keyword.arg == "num_stages" and isinstance(keyword.value, ast.Constant):
                    found.append(int(keyword.value.value))
    return found


def _language_name(node) -> str | None:
    """`tl.x`, `triton.language.x` -> "x"; anything else -> None."""
    if not isinstance(node, ast.Attribute):
        return None
    base = node.value
    if isinstance(base, ast.Name) and base.id == "tl":
        return node.attr
    if isinstance(base, ast.Attribute) and base.attr == "language" and isinstance(base.value, ast.Name) \
            and base.value.id == "triton":
        return node.attr
    return None


def _version(level) -> str:
    return ".".join(map(str, level))
