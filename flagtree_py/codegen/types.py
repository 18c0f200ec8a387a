"""Dtypes as kernels see them: torch dtype -> Triton dtype, and the dtype a value is computed in."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_TRITON_DTYPES = {
    torch.float32: "tl.float32",
    torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16",
    torch.float64: "tl.float64",
    torch.int64: "tl.int64",
    torch.int32: "tl.int32",
    torch.int16: "tl.int16",
    torch.int8: "tl.int8",
    torch.uint8: "tl.uint8",
    torch.bool: "tl.int1",
}

SUPPORTED_DTYPES = frozenset(_TRITON_DTYPES)


def triton_dtype(dtype: torch.dtype) -> str:
    try:
        return _TRITON_DTYPES[dtype]
    except KeyError:
        from flagtree_py.codegen.indexing import LoweringError

        raise LoweringError(f"dtype {dtype} has no Triton equivalent here") from None


_SHORT_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dot_forms(dtype: torch.dtype, target) -> tuple[str, str]:
    """(operand cast, tl.dot options) for a dot of `dtype` operands on `target`.

    fp32 operands get full-precision products, as eager's fp32 mm (Triton would use TF32). Operands
    the target cannot multiply (`TargetSpec.dot_dtypes`: Triton's interpreter has no bf16 dot) are
    widened to fp32 in the kernel: a bf16 x bf16 product is exact in fp32, so only the order of the
    fp32 accumulation differs from a bf16 dot.
    """
    if dtype == torch.float32:
        return "", ', input_precision="ieee"'
    if _SHORT_NAMES.get(dtype) not in target.dot_dtypes:
        return ".to(tl.float32)", ', input_precision="ieee"'
    return "", ""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 values are loaded, then computed in fp32 (also what Triton's interpreter needs)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass(frozen=True)
class Value:
    """A value inside a kernel: a Triton variable (or a literal) in its compute dtype."""

    name: str
    dtype: torch.dtype
    python: object = None  # the Python number, when this value is a literal
    narrow: torch.dtype | None = None  # an fp32 value known to be exact in this narrower dtype

    @property
    def literal(self) -> bool:
        return self.python is not None
