"""Lower `flagtree::attention` nodes to flagtree's Triton attention kernels.

The wrapper hands each attention node to `AttentionWriter.lines(node)` (its one hook) and appends
`AttentionWriter.sections` to the module. Per distinct kernel shape (mask kind, causal, head size,
dtype, path) one kernel is rendered and shared by every layer that uses it:

  * prefill: flash attention (codegen/templates/attention_prefill.py.jinja);
  * decode (few query rows per K/V head): flash-decoding, a split-KV kernel and a combine kernel
    (attention_decode.py.jinja).

A static query length picks one path at compile time; a symbolic one gets both, and the wrapper
picks per call. Tile sizes come from the target's vendor (tables below) and are shrunk until the
kernel's shared memory fits the target; warps are counted in the target's own warp size.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx

from flagtree_py.codegen import indexing
from flagtree_py.codegen.check_kernel import check_language, check_resources
from flagtree_py.codegen.types import dot_forms

#: most query rows (q heads per K/V head x query positions) that take the decode path
DECODE_MAX_ROWS = 64


@dataclass(frozen=True)
class AttentionTiles:
    """Tile table of one vendor: prefill and decode block sizes, threads, pipelining, and how many
    decode programs to aim for (a few per multiprocessor, so that a single sequence fills the chip)."""

    prefill_block_m: int = 64
    prefill_block_n: int = 64
    prefill_threads: int = 128
    decode_block_n: int = 64
    decode_threads: int = 128
    num_stages: int = 2
    decode_programs: int = 256


_TILES = {
    # H100: 132 SMs; FA2-style 128x64 tiles with 8 warps for head dim <= 128
    "nvidia": AttentionTiles(prefill_block_m=128, prefill_block_n=64, prefill_threads=256, decode_block_n=64,
                             decode_threads=128, num_stages=3, decode_programs=264),
    # warp 64 parts on an older Triton level: smaller tiles, no deep pipelining
    "metax": AttentionTiles(prefill_block_m=64, prefill_block_n=64, prefill_threads=256, decode_threads=256,
                            num_stages=1, decode_programs=256),
    "iluvatar": AttentionTiles(prefill_block_m=64, prefill_block_n=32, prefill_threads=256, decode_threads=256,
                               num_stages=1, decode_programs=256),
    # the interpreter steps a program in Python: blocks of 32 keep odd lengths covered and run fast
    "interpreter": AttentionTiles(prefill_block_m=32, prefill_block_n=32, prefill_threads=128, decode_block_n=32,
                                  decode_programs=4, num_stages=1),
}


@dataclass
class AttentionKernel:
    """What a template renders: one kernel (and the decode path's combine kernel)."""

    name: str
    path: str  # "prefill" | "decode"
    mask: str  # "none" | "additive" | "bool"
    causal: bool
    dot_precision: str  # ', input_precision="ieee"' for fp32 (no TF32), else ""
    dot_cast: str  # ".to(tl.float32)" where the target cannot multiply the operands' dtype
    comment: list[str] = field(default_factory=list)

    @property
    def combine_name(self) -> str:
        return f"{self.name}_combine"


class AttentionWriter:
    """The wrapper's attention hook: kernel sources, and the wrapper lines that launch them."""

    def __init__(self, writer) -> None:
        self.writer = writer  # the ModuleWriter: argument printing, allocations, the records
        self.sections: list[str] = []
        self.kernels: dict[tuple, AttentionKernel] = {}

    @staticmethod
    def handles(node: torch.fx.Node) -> bool:
        return node.op == "call_function" and node.target is torch.ops.flagtree.attention.default

    def imports(self) -> list[str]:
        if not self.kernels:
            return []
        return ["import functools", "",
                "from flagtree_py.runtime.attention import (combine_fallback, decode_fallback, flash_attention,",
                "                                           flash_decoding, prefill_fallback)"]

    def lines(self, node: torch.fx.Node) -> list[str] | None:
        """The wrapper lines that launch `node`'s kernels; None when a kernel fails check_kernel on the
        target (the node then runs as its extern aten op)."""
        q, k, v, mask, scale, causal = node.args
        qv, kv = q.meta["val"], k.meta["val"]
        mask_kind = "none" if mask is None else ("bool" if mask.meta["val"].dtype == torch.bool else "additive")
        head_dim = int(qv.shape[-1])
        group = indexing.as_expr(qv.shape[1]) / indexing.as_expr(kv.shape[1])
        rows = group * indexing.as_expr(qv.shape[2])
        paths = ["decode"] if _at_most(rows, DECODE_MAX_ROWS) else ["prefill"]
        if not rows.is_Integer:
            paths = ["prefill", "decode"]  # symbolic query length: chosen per call
        tiles = _TILES.get(self.writer.target.vendor, AttentionTiles())
        element = qv.element_size()
        fitted = {}
        if "prefill" in paths:
            fitted["prefill"] = self._fit(tiles.prefill_block_m, tiles.prefill_block_n, tiles.num_stages,
                                          head_dim, element) + (tiles.prefill_threads,)
        if "decode" in paths:
            block_m = max(16, _pow2(int(rows)) if rows.is_Integer else DECODE_MAX_ROWS)
            fitted["decode"] = self._fit(block_m, tiles.decode_block_n, tiles.num_stages, head_dim, element,
                                         shrink_m=False) + (tiles.decode_threads,)
        warps = {path: self._checked_warps(node, path, tile, head_dim, element) for path, tile in fitted.items()}
        if None in warps.values():
            return None
        kernels = {p: self._kernel(p, mask_kind, bool(causal), qv.dtype, head_dim, node) for p in paths}
        if None in kernels.values():
            return None
        out = node.name
        w = self.writer
        title = (f"# {node.name}: flagtree attention ({', '.join(paths)}; group {group}, mask {mask_kind}, "
                 f"causal {bool(causal)})")
        text = [title, w.allocation(node)]
        args = f"{w.arg(q)}, {w.arg(k)}, {w.arg(v)}, {w.arg(mask)}, {out}, scale={scale!r}"
        launches = {}
        if "prefill" in kernels:
            block_m, block_n, stages, _ = fitted["prefill"]
            launches["prefill"] = (f"flash_attention({kernels['prefill'].name}, {args}, block_m={block_m}, "
                                   f"block_n={block_n}, num_warps={warps['prefill']}, num_stages={stages})")
        if "decode" in kernels:
            block_m, block_n, stages, _ = fitted["decode"]
            warps = warps["decode"]
            name = kernels["decode"].name
            launches["decode"] = (f"flash_decoding({name}, {name}_combine, {args}, block_m={block_m}, "
                                  f"block_n={block_n}, num_warps={warps}, num_stages={stages}, "
                                  f"programs={tiles.decode_programs})")
        if len(launches) == 1:
            text.append(next(iter(launches.values())))
        else:
            text.append(f"if {w.arg(q)}.size(1) // {w.arg(k)}.size(1) * {w.arg(q)}.size(2) <= {DECODE_MAX_ROWS}:")
            text.append("    " + launches["decode"])
            text.append("else:")
            text.append("    " + launches["prefill"])
        return text

    def _kernel(self, path: str, mask_kind: str, causal: bool, dtype: torch.dtype, head_dim: int,
                node: torch.fx.Node) -> AttentionKernel:
        key = (path, mask_kind, causal, dtype == torch.float32)
        kernel = self.kernels.get(key)
        if kernel is not None:
            kernel.comment.append(f"also: {node.name}")
            for record in self.writer.out.kernels:
                if record.name in (kernel.name, kernel.combine_name):
                    record.nodes.append(node.name)
            return kernel
        from flagtree_py.codegen.group_kernels import KernelRecord, render_template

        name = f"k_attention{len(self.kernels)}_{path}"
        cast, precision = dot_forms(dtype, self.writer.target)
        kernel = AttentionKernel(name, path, mask_kind, causal, precision, cast, comment=[f"computes: {node.name}"])
        source = render_template(f"attention_{path}.py.jinja", self.writer.target, a=kernel)
        # the language level (APIs, features) does not depend on the tile: checked once per source
        problems = [str(p) for p in check_language(ast.parse(source), self.writer.target)]
        if problems:
            self.writer.out.kernel_checks.append({"kernel": name, "problems": problems, "action": "aten fallback"})
            self.writer.out.codegen_fallbacks.append({"group": node.name, "reason": f"check_kernel: {'; '.join(problems)}"})
            return None
        self.kernels[key] = kernel
        fallback_args = f"mask_kind={mask_kind!r}, causal={causal}"
        section = [source, f"{name}_fallback = functools.partial({path}_fallback, {fallback_args})"]
        names = [name]
        if path == "decode":
            section.append(f"{name}_combine_fallback = combine_fallback")
            names.append(f"{name}_combine")
        self.sections.append("\n".join(section))
        for kernel_name in names:
            self.writer.out.kernels.append(KernelRecord(
                name=kernel_name, group_id=-1, kind=f"attention_{path}", source=source,
                config={"mask": mask_kind, "causal": causal, "head_dim": head_dim}, nodes=[node.name],
                stored=[node.name]))
        return kernel

    def _checked_warps(self, node: torch.fx.Node, path: str, tile: tuple, head_dim: int, element: int) -> int | None:
        """The kernel's num_warps once its fitted tile passes the target's resource checks, halving the
        threads if they do not fit (the decode path's combine kernel launches with the same warps); None
        (the node stays aten) if nothing fits."""
        block_m, block_n, stages, threads = tile
        target = self.writer.target
        config = {"num_warps": target.num_warps(threads), "num_stages": stages,
                  "shared_bytes": _shared_bytes(block_m, block_n, stages, head_dim, element)}
        first: list[str] = []
        while True:
            problems = [str(p) for p in check_resources(config, target)]
            if not problems:
                break
            first = first or problems
            if config["num_warps"] == 1:
                self.writer.out.kernel_checks.append({"kernel": f"{node.name} ({path})", "problems": first,
                                                      "action": "aten fallback"})
                self.writer.out.codegen_fallbacks.append({"group": node.name, "reason": f"check_kernel: {first[0]}"})
                return None
            config["num_warps"] //= 2
        if first:
            self.writer.out.kernel_checks.append({"kernel": f"{node.name} ({path})", "problems": first,
                                                  "action": f"re-lowered with num_warps={config['num_warps']}"})
        return config["num_warps"]

    def _fit(self, block_m: int, block_n: int, stages: int, head_dim: int, element: int,
             shrink_m: bool = True) -> tuple[int, int, int]:
        """Shrink the tiles until Q (resident) and `stages` K/V tiles fit the target's shared memory."""
        budget = self.writer.target.shared_memory_per_block
        d = _pow2(head_dim)
        if shrink_m and d > 128:
            block_m = min(block_m, 64)  # a [BLOCK_M, 256] fp32 accumulator of 128 rows spills registers

        def need(m, n, s):
            return _shared_bytes(m, n, s, head_dim, element)

        while need(block_m, block_n, stages) > budget:
            if stages > 1:
                stages -= 1
            elif block_n > 16:
                block_n //= 2
            elif shrink_m and block_m > 16:
                block_m //= 2
            else:
                break
        return block_m, block_n, stages


def _shared_bytes(block_m: int, block_n: int, stages: int, head_dim: int, element: int) -> int:
    """Shared memory of an attention tile: Q resident, `stages` K and V tiles, one score tile (fp32)."""
    d = _pow2(head_dim)
    return (block_m * d + max(1, stages) * 2 * block_n * d) * element + block_m * block_n * 4


def _at_most(expr: sympy.Expr, bound: int) -> bool:
    return bool(expr.is_Integer and int(expr) <= bound)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
