"""IR element types: the `DType` enum, its IR spelling and its torch dtype.

Sits at the very bottom of the IR (it imports only `ir/errors.py`): the dim and attribute grammar
(`ir/dimexpr.py`) reads dtype names with it, and `ir/types.py` builds tensor types on it (and
re-exports it, so `from dsr_compiler.ir.types import DType` is the usual spelling).
"""
from __future__ import annotations

import enum

import torch

from .errors import TraceError


class DType(enum.Enum):
    """Element types. The value is the IR spelling."""

    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    fp8e4m3 = "fp8e4m3"
    fp8e5m2 = "fp8e5m2"
    i32 = "i32"
    i64 = "i64"
    bool = "bool"

    def __repr__(self) -> str:
        return f"DType.{self.name}"

    @property
    def torch(self) -> torch.dtype:
        return _TO_TORCH[self]

    @property
    def is_float(self) -> bool:
        return self in (DType.f32, DType.f16, DType.bf16, DType.fp8e4m3, DType.fp8e5m2)

    @property
    def itemsize(self) -> int:
        return _TO_TORCH[self].itemsize

    @staticmethod
    def from_torch(dt: torch.dtype) -> "DType":
        try:
            return _FROM_TORCH[dt]
        except KeyError:
            raise TraceError(f"unsupported dtype: {dt}", hint="use one of " + ", ".join(d.value for d in DType)) from None

    @staticmethod
    def parse(text: str) -> "DType":
        return DType(text)


_TO_TORCH = {
    DType.f32: torch.float32, DType.f16: torch.float16, DType.bf16: torch.bfloat16,
    DType.fp8e4m3: torch.float8_e4m3fn, DType.fp8e5m2: torch.float8_e5m2,
    DType.i32: torch.int32, DType.i64: torch.int64, DType.bool: torch.bool,
}
_FROM_TORCH = {v: k for k, v in _TO_TORCH.items()}
