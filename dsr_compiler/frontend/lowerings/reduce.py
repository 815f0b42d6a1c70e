"""Frontend lowerings: reductions (sum, mean, amax, max, ...) and softmax / log_softmax.

Where it sits: one of `frontend/lowerings/` (listed in its `__init__`); registers into
`frontend/registry.py` with `@lowers`; `nn` reuses `softmax_like` for the softmax modules.
"""
from __future__ import annotations

from typing import Any

import sympy
import torch
import torch.nn.functional as F

from dsr_compiler.ir.types import DType

from ..context import TensorRef, TraceContext
from ..registry import lowers


# --- reductions

MAX_EXACT_COUNT = 1 << 24        # a count of bools summed in fp32 is exact up to here


def _reduce(cx: TraceContext, op: str, input: Any, dim: Any, keepdim: Any, dtype: Any = None) -> TensorRef:
    x = cx.tensor(input, op)
    keepdim = cx.static_bool(keepdim, f"{op}: keepdim")
    if dtype is not None:
        x = cx.cast(x, cx.dtype(dtype))
    elif not x.type.dtype.is_float and x.type.rank:
        return _integer_reduce(cx, op, x, dim, keepdim)
    rank = x.type.rank
    dims = [] if dim is None else list(dim) if isinstance(dim, (tuple, list)) else [dim]
    if not dims:                                    # all dims
        if rank == 0:
            return x
        if not keepdim:
            x = cx.reshape(x, (x.type.numel,))
            return cx.emit(op, [x], {"dim": 0, "keepdim": False})
        dims = list(range(rank))
    norm = sorted({cx.norm_dim(d, rank, op) for d in dims}, reverse=True)
    for d in norm:                                  # high dims first, so lower indices stay valid
        x = cx.emit(op, [x], {"dim": d, "keepdim": keepdim})
    return x


def _integer_reduce(cx: TraceContext, op: str, x: TensorRef, dim: Any, keepdim: bool) -> TensorRef:
    """The reduction kernels accumulate in fp32: a sum of bools (a count) is exact there when at most
    MAX_EXACT_COUNT elements are summed, a static number, and comes back as int64 as torch gives it; any
    other integer reduction (values the fp32 sum or max could round) is refused with the line."""
    what = f"{op} of a {x.type.dtype.value} tensor"
    if op != "sum" or x.type.dtype is not DType.bool:
        raise cx.fail(f"{what}: the reduction kernels accumulate in fp32, exact for integer values only up to "
                      "2^24; only counts of bools are reduced as integers",
                      hint="reduce a bool mask, or cast to float first (x.float().sum()) where the values are small")
    rank = x.type.rank
    dims = list(range(rank)) if dim is None else list(dim) if isinstance(dim, (tuple, list)) else [dim]
    count = sympy.Integer(1)
    for d in {cx.norm_dim(d, rank, op) for d in dims} or range(rank):
        count = count * x.type.shape[d]
    bound = sympy.Le(count, MAX_EXACT_COUNT)
    if count.free_symbols:       # a size guard: a call past the bound respecializes, and that trace refuses
        ok = cx.guarded(bound, cx.where())
        if ok is None:
            raise cx.fail(f"{what} over {count} elements: the count is summed in fp32, exact only up to "
                          f"{MAX_EXACT_COUNT:,}, and a graph without size guards (dsr.trace) cannot bound {count}",
                          hint="dsr.compile guards the size; or count over static dims")
    else:
        ok = bool(bound)
    if not ok:
        raise cx.fail(f"{what} of {count} elements: fp32 counts are exact only up to {MAX_EXACT_COUNT:,}",
                      hint="split the count (sum partial counts as float), or cast to float and accept rounding")
    return cx.cast(_reduce(cx, "sum", cx.cast(x, DType.f32), dim, keepdim), DType.i64)


@lowers(torch.sum, "sum")
def _sum(cx: TraceContext, input: Any, dim: Any = None, keepdim: Any = False, *, dtype: Any = None) -> TensorRef:
    return _reduce(cx, "sum", input, dim, keepdim, dtype)


@lowers(torch.mean, "mean")
def _mean(cx: TraceContext, input: Any, dim: Any = None, keepdim: Any = False, *, dtype: Any = None) -> TensorRef:
    return _reduce(cx, "mean", input, dim, keepdim, dtype)


@lowers(torch.amax, "amax")
def _amax(cx: TraceContext, input: Any, dim: Any = (), keepdim: Any = False) -> TensorRef:
    return _reduce(cx, "amax", input, dim, keepdim)


@lowers(torch.amin, "amin")
def _amin(cx: TraceContext, input: Any, dim: Any = (), keepdim: Any = False) -> TensorRef:
    x = cx.tensor(input, "amin")
    return cx.emit("neg", [_reduce(cx, "amax", cx.emit("neg", [x]), dim, keepdim)])


def _max_min(cx: TraceContext, which: str, input: Any, other: Any, keepdim: Any, dim: Any) -> TensorRef:
    if isinstance(other, TensorRef):
        return cx.binary("maximum" if which == "max" else "minimum", input, other)
    if other is not None or dim is not None:
        raise cx.fail(f"torch.{which}(x, dim) returns (values, indices), which the IR does not have",
                      hint=f"use x.a{which}(dim) for the values")
    x = cx.tensor(input, which)
    if which == "max":
        return _reduce(cx, "amax", x, None, keepdim)
    return cx.emit("neg", [_reduce(cx, "amax", cx.emit("neg", [x]), None, keepdim)])


@lowers(torch.max, "max")
def _max(cx: TraceContext, input: Any, other: Any = None, keepdim: Any = False, *, dim: Any = None) -> TensorRef:
    return _max_min(cx, "max", input, other, keepdim, dim)


@lowers(torch.min, "min")
def _min(cx: TraceContext, input: Any, other: Any = None, keepdim: Any = False, *, dim: Any = None) -> TensorRef:
    return _max_min(cx, "min", input, other, keepdim, dim)


def softmax_like(cx: TraceContext, op: str, input: Any, dim: Any, dtype: Any) -> TensorRef:
    x = cx.tensor(input, op)
    if dim is None:
        raise cx.fail(f"{op} without dim", hint=f"pass dim explicitly, e.g. {op}(x, dim=-1)")
    if dtype is not None:
        x = cx.cast(x, cx.dtype(dtype))
    return cx.emit(op, [x], {"dim": cx.norm_dim(dim, x.type.rank, op)})


@lowers(torch.softmax, "softmax")
def _softmax(cx: TraceContext, input: Any, dim: Any, dtype: Any = None) -> TensorRef:
    return softmax_like(cx, "softmax", input, dim, dtype)


@lowers(F.softmax)
def _f_softmax(cx: TraceContext, input: Any, dim: Any = None, _stacklevel: int = 3, dtype: Any = None) -> TensorRef:
    return softmax_like(cx, "softmax", input, dim, dtype)


@lowers(torch.log_softmax, "log_softmax")
def _log_softmax(cx: TraceContext, input: Any, dim: Any, dtype: Any = None) -> TensorRef:
    return softmax_like(cx, "log_softmax", input, dim, dtype)


@lowers(F.log_softmax)
def _f_log_softmax(cx: TraceContext, input: Any, dim: Any = None, _stacklevel: int = 3, dtype: Any = None) -> TensorRef:
    return softmax_like(cx, "log_softmax", input, dim, dtype)
