"""Frontend lowerings: reductions (sum, mean, amax, max, ...) and softmax / log_softmax.

Where it sits: one of `frontend/lowerings/` (listed in its `__init__`); registers into
`frontend/registry.py` with `@lowers`; `nn` reuses `softmax_like` for the softmax modules.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dsr_compiler.ir.types import DType

from ..context import TensorRef, TraceContext
from ..registry import lowers


# --- reductions

def _reduce(cx: TraceContext, op: str, input: Any, dim: Any, keepdim: Any, dtype: Any = None) -> TensorRef:
    x = cx.tensor(input, op)
    keepdim = cx.static_bool(keepdim, f"{op}: keepdim")
    if dtype is not None:
        x = cx.cast(x, cx.dtype(dtype))
    elif op == "sum" and not x.type.dtype.is_float:
        x = cx.cast(x, DType.i64)                  # torch sums integers and bools in int64
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
