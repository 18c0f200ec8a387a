"""Lower one fusion group to a kernel description: loads, computations, reductions, stores.

The builder walks backwards from every value the group must store, asking each FX node for its
value at a symbolic index (one sympy expression per dimension). Views transform the index,
pointwise ops combine their operands' values, reductions accumulate over the group's reduction
dimensions, and anything produced outside the group is loaded from its buffer. The result is a
`KernelSpec` whose code lines still hold index placeholders; `finish()` simplifies the loops
(contiguous dimensions merge into one flat variable) and prints the indices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx

from flagtree_py.codegen import indexing
from flagtree_py.codegen.indexing import Index, LoweringError, pexpr
from flagtree_py.codegen.types import Value, compute_dtype, triton_dtype

_PLACEHOLDER = re.compile(r"«(\d+)»")


@dataclass
class Scope:
    """A straight-line region of the kernel: the whole body, one reduction loop, or the epilogue."""

    in_r: bool  # whether the reduction variables are live here
    lines: list[str] = field(default_factory=list)
    memo: dict = field(default_factory=dict)
    init: list[str] = field(default_factory=list)  # looped reductions: accumulators before the loop
    finish: list[str] = field(default_factory=list)  # ... and their reductions after it


@dataclass
class KernelSpec:
    """Everything the template needs to render one kernel."""

    name: str
    kind: str  # "pointwise" | "reduction"
    persistent: bool
    arguments: list[str]
    index_dtype: str
    x_decode: list[str]
    r_decode: list[str]
    scopes: list[Scope]  # reduction loops (looped) or the single body (persistent/pointwise)
    epilogue_outer: list[str]  # looped reductions: per-row stores after the loops
    epilogue_loop: list[str]  # looped reductions: the final loop storing full-size values
    xnumel: str
    rnumel: str
    comment: list[str]
    launch_args: list[str]  # wrapper-side expressions, one per kernel argument
    static_rnumel: int | None
    symbols: list[str]
    unspecialized: list[str]  # integer arguments Triton must not specialize on (sizes, scalars)


class KernelBuilder:
    """Builds the `KernelSpec` for one fusion group."""

    def __init__(self, group, buffers, lowerings, views, persistent_limit: int, device_type: str = "cpu") -> None:
        self.group = group
        self.device_type = device_type
        self.scalars: dict[str, tuple[str, torch.dtype]] = {}  # host scalar buffer -> (argument, dtype)
        self.size_scalars: set[str] = set()  # of those, sizes (SymInt inputs): plain ints in the fallback too
        self.views = views  # view nodes: folded into index expressions, never loaded
        self.buffers = buffers  # node -> wrapper buffer name, for everything materialized
        self.lowerings = lowerings
        self.counter = 0
        self.expressions: list[sympy.Expr] = []
        self.inputs: dict[str, str] = {}  # wrapper buffer name -> kernel pointer argument
        self.outputs: dict[str, str] = {}
        self.symbols: set[sympy.Symbol] = set()  # size symbols the kernel takes as arguments
        self.indirect: set[sympy.Symbol] = set()  # loaded values used as indices (gathers)
        full = group.full_shape
        # a dimension of size 1 has index 0: no variable, so no mask or pointer block for it
        self.full_vars = [
            sympy.Integer(0) if size == 1 else sympy.Symbol(f"d{i}", integer=True, nonnegative=True)
            for i, size in enumerate(full)
        ]
        self.x_dims = [d for d in range(len(full)) if d not in group.rdims]
        self.r_dims = list(group.rdims)
        self.xnumel = indexing.numel([full[d] for d in self.x_dims])
        self.rnumel = indexing.numel([full[d] for d in self.r_dims])
        self.is_reduction = bool(self.r_dims)
        static_r = int(self.rnumel) if self.rnumel.is_Integer else None
        self.persistent = not self.is_reduction or (static_r is not None and static_r <= persistent_limit)
        self.static_rnumel = static_r
        self.reductions: dict[torch.fx.Node, Value] = {}
        self.reduction_scopes: list[Scope] = []
        self.accumulators = 0
        self.body = Scope(in_r=self.is_reduction)
        self.scope = self.body

    # -- code emission -------------------------------------------------------------------------

    def index_token(self, expr: sympy.Expr) -> str:
        """A placeholder for an index expression, printed once loops are simplified."""
        self.expressions.append(sympy.sympify(expr))
        return f"«{len(self.expressions) - 1}»"

    def emit(self, expression: str, dtype: torch.dtype) -> Value:
        key = ("expr", expression)
        if key in self.scope.memo:
            return self.scope.memo[key]
        name = f"tmp{self.counter}"
        self.counter += 1
        self.scope.lines.append(f"{name} = {expression}")
        value = Value(name, dtype)
        self.scope.memo[key] = value
        return value

    def to_compute(self, value: Value, dtype: torch.dtype) -> Value:
        """`value` in the compute representation of `dtype`, without rounding."""
        target = compute_dtype(dtype)
        if value.literal:
            return Value(_literal(value.python, target), target, python=value.python)
        if value.dtype == target:
            return value
        if target == torch.bool:
            return self.emit(f"{value.name} != 0", torch.bool)
        return self.emit(f"{value.name}.to({triton_dtype(target)})", target)

    def convert(self, value: Value, dtype: torch.dtype) -> Value:
        """An explicit dtype conversion: a cast to fp16/bf16 rounds, as in eager."""
        value = self.to_compute(value, dtype)
        if compute_dtype(dtype) == dtype or value.literal or value.narrow == dtype:
            return value
        rounded = self.emit(f"{value.name}.to({triton_dtype(dtype)}).to(tl.float32)", value.dtype)
        return Value(rounded.name, rounded.dtype, narrow=dtype)

    def constant(self, python_value, dtype: torch.dtype) -> Value:
        target = compute_dtype(dtype)
        if target == torch.float64:
            return self.emit(f"tl.full([1], {_literal(python_value, target)}, tl.float64)", target)
        return Value(_literal(python_value, target), target, python=python_value)

    # -- values --------------------------------------------------------------------------------

    def value(self, node: torch.fx.Node, index: Index, extra_mask: str | None = None) -> Value:
        """The value of `node` at `index` (inside the current scope)."""
        key = ("node", node, index, extra_mask)
        if key in self.scope.memo:
            return self.scope.memo[key]
        if node in self.group.members or node in self.views:
            lowering = self.lowerings.get(node.target)
            if lowering is None:
                raise LoweringError(f"no lowering for {node.target}")
            result = lowering(self, node, index, extra_mask)
        else:
            result = self.load(node, index, extra_mask)
        self.scope.memo[key] = result
        return result

    def load(self, node: torch.fx.Node, index: Index, extra_mask: str | None) -> Value:
        buffer = self.buffers.get(node)
        if buffer is None:
            raise LoweringError(f"{node.name} is neither computed in the group nor materialized")
        val = node.meta["val"]
        argument = self.add_input(node, buffer)
        if argument.startswith("in_scalar"):
            return self.to_compute(Value(argument, torch.float32 if val.dtype.is_floating_point else val.dtype), val.dtype)
        strides = indexing.shape_of(val.stride())
        offset = indexing.flat_offset(index, strides)
        self.symbols |= offset.free_symbols - set(self.full_vars) - self.indirect
        pointer = argument
        token = self.index_token(offset)
        if extra_mask or offset.free_symbols & self.indirect:
            # a gathered index or a cat/pad condition may vary along any dimension: give the
            # pointer the whole block shape so that pointer, mask and value shapes agree
            token = f"{token} + {self.zeros()}"
            mask = self.scope_mask() + (f" & {extra_mask}" if extra_mask else "")
        else:
            mask = self.mask_for(offset)
        text = f"tl.load({pointer} + ({token})" + (f", {mask}, other=0)" if mask else ")")
        loaded = self.emit(text, val.dtype)
        if compute_dtype(val.dtype) == val.dtype:
            return loaded
        upcast = self.to_compute(loaded, val.dtype)
        return Value(upcast.name, upcast.dtype, narrow=val.dtype)

    def add_input(self, node: torch.fx.Node, buffer: str) -> str:
        """The kernel argument that carries `buffer` (materialized `node`): a pointer, or, for a
        0-dim CPU tensor read by a GPU kernel, its value as a number (Triton: fp32 / i32 / i64)."""
        val = node.meta["val"]
        if isinstance(val, (torch.SymInt, int)):  # a size the aten fallback reads: a number for both
            self.size_scalars.add(buffer)
            return self.scalars.setdefault(buffer, (f"in_scalar{len(self.scalars)}", torch.int64))[0]
        if self.device_type != "cpu" and val.device.type == "cpu":
            if val.dim() != 0:
                raise LoweringError(f"{node.name} lives on the CPU")
            return self.scalars.setdefault(buffer, (f"in_scalar{len(self.scalars)}", val.dtype))[0]
        return self.inputs.setdefault(buffer, f"in_ptr{len(self.inputs)}")

    def zeros(self, outer: bool = False) -> str:
        """A block of zero offsets shaped like the current scope (or like one row's values)."""
        if not self.is_reduction:
            return "tl.zeros([XBLOCK], tl.int32)"
        if self.scope.in_r and not outer:
            return "tl.zeros([XBLOCK, RBLOCK], tl.int32)"
        return "tl.zeros([XBLOCK, 1], tl.int32)"

    def scope_mask(self) -> str:
        return "xmask & rmask" if self.is_reduction and self.scope.in_r else "xmask"

    def mask_for(self, expr: sympy.Expr) -> str | None:
        """The mask of a load whose offset is `expr`: only the dimensions it varies along
        (a pointer block of shape [1, RBLOCK] takes `rmask`, not `xmask & rmask`)."""
        parts = []
        if expr.free_symbols & {self.full_vars[d] for d in self.x_dims}:
            parts.append("xmask")
        if self.is_reduction and expr.free_symbols & {self.full_vars[d] for d in self.r_dims}:
            parts.append("rmask")
        return " & ".join(parts) or None

    def operand(self, arg, index: Index, extra_mask: str | None = None) -> Value:
        """An op's argument at the op's output index: a broadcast tensor, a SymInt or a literal."""
        if isinstance(arg, torch.fx.Node):
            val = arg.meta.get("val")
            if isinstance(val, torch.Tensor):
                in_index = indexing.broadcast_index(index, indexing.shape_of(val.shape))
                return self.value(arg, in_index, extra_mask)
            if isinstance(val, torch.SymInt):
                return self.symbolic(indexing.as_expr(val))
            raise LoweringError(f"unsupported operand {arg.name}")
        if isinstance(arg, torch.SymInt):
            return self.symbolic(indexing.as_expr(arg))
        if isinstance(arg, bool):
            return self.constant(arg, torch.bool)
        if isinstance(arg, int):
            return self.constant(arg, torch.int64)
        if isinstance(arg, float):
            return self.constant(arg, torch.float32)
        raise LoweringError(f"unsupported operand {arg!r}")

    def indirect_symbol(self, value: Value) -> sympy.Symbol:
        """A loaded integer value as a symbol that index expressions may contain."""
        symbol = sympy.Symbol(value.name, integer=True)
        self.indirect.add(symbol)
        return symbol

    def symbolic(self, expr: sympy.Expr) -> Value:
        """An integer expression of the index variables and size symbols, as a value."""
        self.symbols |= expr.free_symbols - set(self.full_vars) - self.indirect
        if not expr.free_symbols:
            return self.constant(int(expr), torch.int64)
        return self.emit(f"({self.index_token(expr)}).to(tl.int64)", torch.int64)

    # -- reductions ----------------------------------------------------------------------------

    def reduce(self, key, kind: str, input_fn) -> Value:
        """Reduce `input_fn()` (evaluated at the full index) over the group's reduction dims.

        kind: "sum" | "max" | "min". Persistent kernels reduce in the body; looped kernels get a
        loop of their own, placed before the loop of any reduction that needs this one.
        """
        if key in self.reductions:
            return self.reductions[key]
        outer_scope = self.scope
        if not self.persistent:
            self.scope = Scope(in_r=True)
        value = input_fn()
        acc_dtype = value.dtype if value.dtype.is_floating_point else torch.int64
        if kind in ("max", "min") and not value.dtype.is_floating_point:
            acc_dtype = value.dtype
        neutral = {"sum": "0", "max": _lowest(acc_dtype), "min": _highest(acc_dtype)}[kind]
        v = self.to_compute(value, acc_dtype).name
        parts = [(kind, f"tl.where(xmask & rmask, {v}, {neutral})", acc_dtype, neutral)]
        if kind in ("max", "min") and acc_dtype.is_floating_point:
            # tl.max/tl.min skip NaNs; eager's amax/amin return NaN for a row holding one
            parts.append(("max", f"tl.where(xmask & rmask & ({v} != {v}), 1, 0)", torch.int32, "0"))
        results = []
        for part_kind, masked, dtype, start_value in parts:
            tl_reduce = {"sum": "tl.sum", "max": "tl.max", "min": "tl.min"}[part_kind]
            if self.persistent:
                results.append(self.emit(f"{tl_reduce}({masked}, 1)[:, None]", dtype))
                continue
            n = self.accumulators
            self.accumulators += 1
            self.scope.lines.append(f"acc{n} = {_combine(part_kind, f'acc{n}', masked)}")
            self.scope.init.append(f"acc{n} = tl.full([XBLOCK, RBLOCK], {start_value}, {triton_dtype(dtype)})")
            self.scope.finish.append(f"red{n} = {tl_reduce}(acc{n}, 1)[:, None]")
            results.append(Value(f"red{n}", dtype))
        result = results[0]
        if len(results) == 2:
            nan_row = f'tl.where({results[1].name} > 0, float("nan"), {result.name})'
            if self.persistent:
                result = self.emit(nan_row, acc_dtype)
            else:  # fold it into the loop's result, which every later scope may read
                self.scope.finish.append(f"{result.name} = {nan_row}")
        if not self.persistent:
            self.reduction_scopes.append(self.scope)
            self.scope = outer_scope
        self.reductions[key] = result
        return result

    def row_source_index(self, node: torch.fx.Node, index: Index, reduced: tuple[int, ...]) -> Index:
        """The index of a reduction's input for the row that `index` (its output index) names.

        The reduced dimensions take the group's reduction variables; the others come from
        `index`, which must hold row (x) variables only. The reduction's input may be laid out
        differently from the group (the q/k norm reduces [b, s, h, d] inside a kernel that
        iterates the rotary output [b, h, s, d]): any order works as long as rows correspond.
        """
        source_shape = indexing.shape_of(node.args[0].meta["val"].shape)
        group_r = [self.group.full_shape[d] for d in self.r_dims]
        if [source_shape[d] for d in reduced] != group_r:
            raise LoweringError(f"{node.name} reduces {[source_shape[d] for d in reduced]}, the group {group_r}")
        r_vars = {self.full_vars[d] for d in self.r_dims}
        if any(sympy.sympify(i).free_symbols & (r_vars | self.indirect) for i in index):
            raise LoweringError(f"{node.name} is read at {index}, which is not one row of the group")
        keepdim = len(index) == len(source_shape)
        rows = iter(index)
        r_iter = iter(self.full_vars[d] for d in self.r_dims)
        source_index = []
        for d in range(len(source_shape)):
            if d in reduced:
                source_index.append(next(r_iter))
                if keepdim:
                    next(rows)
            else:
                source_index.append(next(rows))
        return tuple(source_index)

    # -- stores --------------------------------------------------------------------------------

    def store(self, node: torch.fx.Node, role: str) -> None:
        """Compute `node` at its place in the iteration space and store it to its buffer."""
        val = node.meta["val"]
        out_shape = indexing.shape_of(val.shape)
        if role == "full":
            index = tuple(self.full_vars)
        else:
            keepdim = len(out_shape) == len(self.group.full_shape)
            index = tuple(
                (sympy.Integer(0) if keepdim else None) if d in self.r_dims else self.full_vars[d]
                for d in range(len(self.group.full_shape))
            )
            index = tuple(i for i in index if i is not None)
        value = self.value(node, index)
        stored = value.name
        if value.dtype != val.dtype and not value.literal:
            stored = f"{value.name}.to({triton_dtype(val.dtype)})"
        buffer = self.buffers[node]
        pointer = self.outputs.setdefault(buffer, f"out_ptr{len(self.outputs)}")
        offset = indexing.flat_offset(index, indexing.shape_of(val.stride()))
        self.symbols |= offset.free_symbols - set(self.full_vars) - self.indirect
        mask = self.scope_mask() if role == "full" else "xmask"
        token = self.index_token(offset)
        if self.mask_for(offset) != mask:
            # the stored element does not vary along every masked dimension (size-1 or
            # broadcast dims): widen the pointer block to the mask's shape
            token = f"{token} + {self.zeros(outer=role == 'outer')}"
        self.scope.lines.append(f"tl.store({pointer} + ({token}), {stored}, {mask})")

    # -- assembly ------------------------------------------------------------------------------

    def build(self, name: str, comment: list[str], index_dtype: str) -> KernelSpec:
        outer_lines: list[str] = []
        loop_lines: list[str] = []
        for node, role in self.group.stores():
            if self.persistent:
                self.scope = self.body
                self.store(node, role)
            elif role == "outer":
                self.scope = Scope(in_r=False)
                self.store(node, role)
                outer_lines += self.scope.lines
            else:
                self.scope = Scope(in_r=True)
                self.store(node, role)
                loop_lines += self.scope.lines
        self.scope = self.body
        return self._finish(name, comment, index_dtype, outer_lines, loop_lines)

    def _finish(self, name, comment, index_dtype, outer_lines, loop_lines) -> KernelSpec:
        x_vars = [self.full_vars[d] for d in self.x_dims]
        r_vars = [self.full_vars[d] for d in self.r_dims]
        x_sizes = [self.group.full_shape[d] for d in self.x_dims]
        r_sizes = [self.group.full_shape[d] for d in self.r_dims]
        exprs = list(self.expressions)
        x_sizes, x_vars, exprs = indexing.merge_loop_dims(x_sizes, x_vars, exprs)
        r_sizes, r_vars, exprs = indexing.merge_loop_dims(r_sizes, r_vars, exprs)
        rename = {v: sympy.Symbol(f"x{i}", integer=True, nonnegative=True) for i, v in enumerate(x_vars)}
        rename.update({v: sympy.Symbol(f"r{i}", integer=True, nonnegative=True) for i, v in enumerate(r_vars)})
        printed = [pexpr(e.xreplace(rename)) for e in exprs]

        def fill(lines: list[str]) -> list[str]:
            return [_PLACEHOLDER.sub(lambda m: printed[int(m.group(1))], line) for line in lines]

        for scope in [self.body, *self.reduction_scopes]:
            scope.lines = fill(scope.lines)
        x_names = [rename[v].name for v in x_vars]
        r_names = [rename[v].name for v in r_vars]
        x_decode = [f"{n} = {e}" for n, e in zip(x_names, indexing.unflatten("xindex", x_sizes, pexpr)) if e != n]
        r_decode = [f"{n} = {e}" for n, e in zip(r_names, indexing.unflatten("rindex", r_sizes, pexpr)) if e != n]
        # every size symbol the printed code mentions becomes a kernel argument
        mentioned = set().union(*(e.free_symbols for e in exprs + x_sizes + r_sizes), set())
        variables = set(rename) | set(rename.values()) | self.indirect
        symbols = sorted({s.name for s in (self.symbols | mentioned) - variables if not s.name.startswith("tmp")})
        # sizes travel as the shape symbols alone; numels are computed in the kernel, so Triton
        # sees that 128*s0 is a multiple of 16 without specializing on any value
        arguments, launch = self._signature(symbols)
        scopes = self.reduction_scopes if not self.persistent else [self.body]
        return KernelSpec(
            name=name,
            kind="reduction" if self.is_reduction else "pointwise",
            persistent=self.persistent,
            arguments=arguments,
            index_dtype=index_dtype,
            x_decode=x_decode,
            r_decode=r_decode,
            scopes=scopes,
            epilogue_outer=fill(outer_lines),
            epilogue_loop=fill(loop_lines),
            xnumel=pexpr(self.xnumel),
            rnumel=pexpr(self.rnumel),
            comment=comment,
            launch_args=launch,
            static_rnumel=self.static_rnumel,
            symbols=symbols,
            unspecialized=[name for name, dtype in self.scalars.values() if not dtype.is_floating_point] + symbols,
        )

    def _signature(self, symbols: list[str]) -> tuple[list[str], list[str]]:
        """The kernel's parameters (inputs, outputs, scalars, size symbols) and the wrapper's arguments for
        them, in the same order: scalars are passed as Python floats or ints."""
        scalars = [name for name, _ in self.scalars.values()]
        arguments = list(self.inputs.values()) + list(self.outputs.values()) + scalars + symbols
        convert = {True: "float", False: "int"}
        launch = (list(self.inputs) + list(self.outputs)
                  + [f"{convert[dtype.is_floating_point]}({buffer})" for buffer, (_, dtype) in self.scalars.items()]
                  + symbols)
        return arguments, launch


def _combine(kind: str, acc: str, value: str) -> str:
    if kind == "sum":
        return f"{acc} + {value}"
    return f"tl.{'maximum' if kind == 'max' else 'minimum'}({acc}, {value})"


def _literal(value, dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "True" if value else "False"
    if dtype.is_floating_point:
        number = float(value)
        if number != number:
            return 'float("nan")'
        if number in (float("inf"), float("-inf")):
            return 'float("inf")' if number > 0 else 'float("-inf")'
        return repr(number)
    return str(int(value))


def _lowest(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return 'float("-inf")'
    if dtype == torch.bool:
        return "0"
    return str(torch.iinfo(dtype).min)


def _highest(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return 'float("inf")'
    if dtype == torch.bool:
        return "1"
    return str(torch.iinfo(dtype).max)
