"""The GEMM template's reading of a fusion group: its operands and its epilogue as a `GemmSpec`.

The partitioner hands over a group whose members are one GEMM node and the pointwise ops that
consume it (see passes/partition_fusion_groups.py, which asks `gemm_operands` whether the template
takes a node's form). The epilogue is built by the ordinary `KernelBuilder`, asked for values on a
2-D tile: the group's row variable prints as `xm` (`rm[:, None]`) and its column variable as `xn`
(`rn[None, :]`); wherever the epilogue reads the GEMM at column `xn + c`, that is accumulator
`acc<j>` of the tile, computed against the columns `c .. c + N` of B. A merged gate/up projection
read through two slices thus becomes two accumulators and `silu(acc0) * acc1`, and only the product
is stored.

Operands are read in place through the strides of their views: a transposed weight (`permute`,
`t`) is a stride swap, never a copy. Whether their layout lets the large bucket's kernel load them
through tensor descriptors (`<name>_tma`) is decided here too; which kernels are rendered and
launched, with which tiles, is codegen/gemm.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch
import torch.fx

from flagtree_py.codegen import indexing
from flagtree_py.codegen.indexing import LoweringError, pexpr
from flagtree_py.codegen.kernel import _PLACEHOLDER, KernelBuilder
from flagtree_py.codegen.types import Value, compute_dtype, dot_forms, triton_dtype

aten = torch.ops.aten
GEMM_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})


@dataclass
class GemmOperands:
    """mm(A, B) or addmm(bias, A, B), with A and B traced through views to their buffers."""

    node: torch.fx.Node
    a: torch.fx.Node  # the operand as the GEMM reads it (often a view)
    b: torch.fx.Node
    a_base: torch.fx.Node  # the materialized buffer under the views
    b_base: torch.fx.Node
    bias: torch.fx.Node | None
    m: sympy.Expr
    n: sympy.Expr
    k: int


def gemm_operands(node: torch.fx.Node, kinds: dict) -> GemmOperands | None:
    """The template's reading of `node`, or None when the template does not take this form."""
    if node.target == aten.mm.default and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        bias = None
    elif node.target == aten.addmm.default and len(node.args) == 3 and all(
            node.kwargs.get(name, 1) == 1 for name in ("beta", "alpha")) and set(node.kwargs) <= {"beta", "alpha"}:
        bias, a, b = node.args
    else:
        return None
    val = node.meta.get("val")
    operands = [a, b] + ([bias] if bias is not None else [])
    if not isinstance(val, torch.Tensor) or val.dtype not in GEMM_DTYPES or val.device.type == "meta":
        return None
    for operand in operands:
        if not isinstance(operand, torch.fx.Node):
            return None
        ov = operand.meta.get("val")
        if not isinstance(ov, torch.Tensor) or ov.dtype != val.dtype or ov.device != val.device:
            return None
    m, n = indexing.shape_of(val.shape)
    k = indexing.as_expr(a.meta["val"].shape[1])
    if not (k.is_Integer and n.is_Integer) or int(k) == 0:
        return None  # weights have static shapes; a symbolic K or N is attention's, not a projection's
    if bias is not None and bias.meta["val"].dim() > 2:
        return None
    bases = [_base(x, kinds) for x in (a, b)]
    if any(base is None for base in bases):
        return None
    return GemmOperands(node, a, b, bases[0], bases[1], bias, m, n, int(k))


def _base(node: torch.fx.Node, kinds: dict) -> torch.fx.Node | None:
    while kinds.get(node) == "view":
        node = node.args[0]
    if kinds.get(node) in ("placeholder", "constant", "extern", "pointwise", "reduction", "gemm"):
        return node
    return None


@dataclass
class GemmSpec:
    """What gemm.py.jinja needs; `arguments`/`name` also serve the writer's aten fallback.

    The builder fills it from the group; which kernels are rendered (`tiled`, `split`, `tma`,
    `persistent`) is set by gemm.py's `launch_lines` from the chosen tiles.
    """

    name: str
    arguments: list[str]
    launch_args: list[str]
    partial_arguments: list[str]
    partial_launch_args: list[str]
    a_ptr: str
    b_ptr: str
    m: str
    n: str
    k: int
    a_offset: str
    stride_am: str
    stride_ak: str
    b_offset: str
    stride_bk: str
    stride_bn: str
    offsets: list[int]
    dot_cast: str
    dot_options: str
    epilogue: list[str]
    index_dtype: str
    symbols: list[str]
    unspecialized: list[str]
    partial_unspecialized: list[str]
    comment: list[str] = field(default_factory=list)
    m_expr: sympy.Expr | None = None  # rows and columns of the tile space, as sympy
    n_expr: sympy.Expr | None = None
    tiled: bool = True
    split: bool = True
    # `{name}_tma`, the large bucket's kernel where the layout allows: operands through tensor descriptors
    # (TMA), B read as rows of the weight [columns, K]. Fewer rows keep pointer loads (faster there on the H100)
    tma_layout: bool = False
    tma: bool = False  # rendered: the layout allows it and the graph's M may take the large bucket
    b_columns: int = 0
    tma_buffers: list[str] = field(default_factory=list)  # the wrapper's A and B buffers, alignment-checked
    persistent: bool = False  # rendered: a candidate of the TMA kernel runs persistent (NUM_SMS > 0)


class GemmEpilogueBuilder(KernelBuilder):
    """A `KernelBuilder` whose iteration space is one GEMM output tile, not a flat block."""

    def __init__(self, group, buffers, lowerings, views, device_type: str, gemm: GemmOperands, target) -> None:
        super().__init__(group, buffers, lowerings, views, 1, device_type)
        self.gemm = gemm
        self.target = target
        self.m_var: sympy.Symbol | None = None
        self.n_var: sympy.Symbol | None = None
        self.offsets: list[int] = []  # B column offset of each accumulator

        self._storing = False

    def zeros(self, outer: bool = False) -> str:
        return "tl.zeros([BLOCK_M, BLOCK_N], tl.int32)"

    def store(self, node: torch.fx.Node, role: str) -> None:
        self._storing = True
        try:
            super().store(node, role)
        finally:
            self._storing = False

    def mask_for(self, expr: sympy.Expr) -> str | None:
        # a store's pointer block must have the tile's shape (a load's may broadcast): an offset
        # missing the row or the column variable (one row when M == 1) is widened by `store`
        if self._storing and (self.m_var is None or not {self.m_var, self.n_var} <= expr.free_symbols):
            return None
        return super().mask_for(expr)

    def value(self, node: torch.fx.Node, index, extra_mask: str | None = None) -> Value:
        if node is not self.gemm.node:
            return super().value(node, index, extra_mask)
        key = ("gemm", tuple(index))
        if key in self.scope.memo:
            return self.scope.memo[key]
        if extra_mask:
            raise LoweringError("the GEMM output is read under a condition (cat/pad): not a tile epilogue")
        row, column = (sympy.sympify(i) for i in index)
        self._check_row(row)
        name = f"acc{self._accumulator(column)}"
        dtype = self.gemm.node.meta["val"].dtype
        result = Value(name, torch.float32)
        if self.gemm.bias is not None:
            bias = self.to_compute(self.operand(self.gemm.bias, (row, column)), dtype)
            result = self.emit(f"{name} + {bias.name}", torch.float32)
        if compute_dtype(dtype) != dtype:  # eager rounds the GEMM's result before the epilogue reads it
            rounded = self.emit(f"{result.name}.to({triton_dtype(dtype)}).to(tl.float32)", torch.float32)
            result = Value(rounded.name, torch.float32, narrow=dtype)
        self.scope.memo[key] = result
        return result

    def _check_row(self, row: sympy.Expr) -> None:
        if row == 0 and indexing.same(self.gemm.m, sympy.Integer(1)):
            return
        if not (isinstance(row, sympy.Symbol) and row in self.full_vars) or self.m_var not in (None, row):
            raise LoweringError(f"the epilogue reads GEMM row {row}: not one tile row")
        self.m_var = row

    def _accumulator(self, column: sympy.Expr) -> int:
        variables = column.free_symbols & set(self.full_vars)
        if len(variables) != 1 or column.free_symbols - variables:
            raise LoweringError(f"the epilogue reads GEMM column {column}: not a column range")
        variable = next(iter(variables))
        offset = sympy.expand(column - variable)
        if not offset.is_Integer or int(offset) < 0 or self.n_var not in (None, variable):
            raise LoweringError(f"the epilogue reads GEMM column {column}: not a column range")
        self.n_var = variable
        if int(offset) not in self.offsets:
            if len(self.offsets) == 4:
                raise LoweringError("more than 4 column ranges of one GEMM")
            self.offsets.append(int(offset))
        return self.offsets.index(int(offset))

    def _finish(self, name, comment, index_dtype, outer_lines, loop_lines) -> GemmSpec:
        if self.n_var is None:
            raise LoweringError("the group never reads its GEMM")
        full = self.group.full_shape
        tile_vars = {self.m_var, self.n_var} - {None}
        for variable, size in zip(self.full_vars, full):
            if isinstance(variable, sympy.Symbol) and variable not in tile_vars:
                raise LoweringError(f"the epilogue iterates a dimension of size {size} outside the GEMM tile")
        m = full[self.full_vars.index(self.m_var)] if self.m_var is not None else sympy.Integer(1)
        n = full[self.full_vars.index(self.n_var)]
        if not indexing.same(m, self.gemm.m):
            raise LoweringError(f"the epilogue has {m} rows, the GEMM {self.gemm.m}")
        if not n.is_Integer or any(c + int(n) > int(self.gemm.n) for c in self.offsets):
            raise LoweringError(f"column ranges {self.offsets} of width {n} exceed the GEMM's {self.gemm.n}")
        a_val, b_val = self.gemm.a.meta["val"], self.gemm.b.meta["val"]
        layout = [indexing.as_expr(x) for x in (a_val.storage_offset(), *a_val.stride(),
                                                 b_val.storage_offset(), *b_val.stride())]
        for expr in layout + [m]:
            self.symbols |= expr.free_symbols
        rename = {self.n_var: sympy.Symbol("xn", integer=True, nonnegative=True)}
        if self.m_var is not None:
            rename[self.m_var] = sympy.Symbol("xm", integer=True, nonnegative=True)
        printed = [pexpr(sympy.sympify(e).xreplace(rename)) for e in self.expressions]
        lines = [_PLACEHOLDER.sub(lambda match: printed[int(match.group(1))], line) for line in self.body.lines]
        symbols = sorted({s.name for s in self.symbols} - {"xm", "xn"} - {v.name for v in self.indirect})
        arguments, launch = self._signature(symbols)
        a_ptr = self.inputs[self.buffers[self.gemm.a_base]]
        b_ptr = self.inputs[self.buffers[self.gemm.b_base]]
        pointers = dict.fromkeys([a_ptr, b_ptr])
        wrapper_name = {pointer: buffer for buffer, pointer in self.inputs.items()}
        unspecialized = [scalar for scalar, dtype in self.scalars.values() if not dtype.is_floating_point] + symbols
        dot_cast, dot_options = dot_forms(self.gemm.node.meta["val"].dtype, self.target)
        tma = _tma_layout(self.target, layout, self.gemm.k, a_val.element_size())
        return GemmSpec(
            name=name, arguments=arguments, launch_args=launch,
            partial_arguments=[*pointers, "workspace", *symbols],
            partial_launch_args=[*(wrapper_name[p] for p in pointers), f"{name}_workspace", *symbols],
            a_ptr=a_ptr, b_ptr=b_ptr, m=pexpr(m), n=pexpr(n), k=self.gemm.k,
            a_offset=pexpr(layout[0]), stride_am=pexpr(layout[1]), stride_ak=pexpr(layout[2]),
            b_offset=pexpr(layout[3]), stride_bk=pexpr(layout[4]), stride_bn=pexpr(layout[5]),
            offsets=list(self.offsets), dot_cast=dot_cast, dot_options=dot_options, epilogue=lines, index_dtype=index_dtype,
            symbols=symbols, unspecialized=unspecialized, partial_unspecialized=symbols, comment=comment,
            m_expr=m, n_expr=n, tma_layout=tma, b_columns=int(b_val.shape[1]) if tma else 0,
            tma_buffers=[wrapper_name[a_ptr], wrapper_name[b_ptr]] if tma else [],
        )


def _tma_layout(target, layout: list[sympy.Expr], k: int, element: int) -> bool:
    """Whether `<name>_tma` can load A [M, K] and B's weight rows [columns, K] through tensor descriptors: the target has TMA, both are contiguous along K with static row strides and offsets
    that keep every row 16-byte aligned (TMA's rule; the wrapper checks the base pointers per call).
    Descriptor coordinates are 32-bit per dimension (rows and columns, not elements): int64 indexing of
    the epilogue's stores does not matter to them."""
    if "tma" not in target.features:
        return False
    a_offset, stride_am, stride_ak, b_offset, stride_bk, stride_bn = layout
    if not all(x.is_Integer for x in layout) or stride_ak != 1 or stride_bk != 1:
        return False
    return all(int(x) * element % 16 == 0 for x in (a_offset, stride_am, b_offset, stride_bn)) \
        and int(stride_am) >= k and int(stride_bn) >= k
