"""Frontend: selection ops along a static last dim (topk, sort, scatter, one_hot) as existing IR ops, and cumsum.

Where it sits: one of `frontend/lowerings/` (listed in its `__init__`). These are what a router that
`moe_patterns` does not recognise is made of (transformers' routers: `topk`, `gather`, `scatter_` into a
`zeros_like`, `masked_fill`; the experts' `one_hot`): they lower correctly, slower than the MoE kernels,
and always along a dim of static size (the expert or group count), the last one:

* `topk(x, k)`: k rounds of `amax` -> the lowest index holding it (`-amax(-where(hit, iota, n))`) -> mark it
  taken (`where(taken, -inf, x)`); values and int64 indices in descending order (ties: lower index first,
  as the zoo's router; `sorted=False` gets the same order). k <= 64 and the dim <= 65,536 (the graph has
  ~8 ops per round). NaN compares as nothing here (torch ranks it first): a NaN row gives index n;
* (`gather` along the last dim is its own op, lowerings/loss.py);
* `scatter(x, -1, index, value | src)` (and `scatter_` into a tensor allocated in forward): positions hit
  by `index` take the value (with `src`: the source element; indices must not repeat along the dim, as
  torch leaves that case unspecified);
* `sort` / `argsort` (n <= 64, floats) are topk of all n: ties keep their order (what `stable=True` gives);
* `F.one_hot(index, n)`: `(index[..., None] == iota(n))` as int64 (n given: the IR needs a static size);
* `cumsum` along the last dim (any size, symbolic too) is an op with a scan kernel of its own
  (codegen/families/scan.py): bool / integers -> int64, exact; floats accumulate in fp32.
"""
from __future__ import annotations

from typing import Any

from dsr_compiler.ir.types import DType

import torch
import torch.nn.functional as F

from ..context import TensorRef, TraceContext
from ..registry import lowers, lowers_inplace
from .alloc import ALIASING
from .arith import logical_and, logical_not, logical_or, ne
from .shape import expand_to

MAX_TOPK = 64
MAX_WIDTH = 1 << 16


def _last_dim(cx: TraceContext, x: TensorRef, dim: Any, what: str) -> int:
    d = cx.norm_dim(dim, x.type.rank, what)
    if d != x.type.rank - 1:
        raise cx.fail(f"{what} along dim {dim} of {x.type}: only the last dim is supported",
                      hint="transpose the dim last first")
    n = x.type.shape[d]
    if n.free_symbols:
        raise cx.fail(f"{what} along the symbolic dim {n} of {x.type}", hint="select along a static dim")
    if int(n) > MAX_WIDTH:
        raise cx.fail(f"{what} along a dim of {int(n)} elements (at most {MAX_WIDTH:,})")
    return int(n)


def _iota(cx: TraceContext, n: int, rank: int, dtype: DType) -> TensorRef:
    """arange(n) shaped [1, ..., 1, n] (rank dims), as `dtype`."""
    i = cx.cast(cx.emit("iota", [], {"n": n, "dtype": DType.i64}), dtype)
    return cx.reshape(i, (1,) * (rank - 1) + (n,))


def _unsqueeze_last(cx: TraceContext, x: TensorRef) -> TensorRef:
    return cx.reshape(x, tuple(x.type.shape) + (1,))


def _amax_last(cx: TraceContext, x: TensorRef) -> TensorRef:
    return cx.emit("amax", [x], {"dim": x.type.rank - 1, "keepdim": True})


@lowers(torch.topk, "topk")
def _topk(cx: TraceContext, input: Any, k: Any, dim: Any = -1, largest: Any = True, sorted: Any = True, *,
          out: Any = None) -> tuple[TensorRef, TensorRef]:
    x = cx.tensor(input, "topk")
    if out is not None:
        raise cx.fail("topk(out=...) is not supported")
    if not x.type.dtype.is_float:
        raise cx.fail(f"topk of a {x.type.dtype.value} tensor is not supported", hint="topk of float scores")
    n = _last_dim(cx, x, dim, "topk")
    kk = cx.static_int(k, "topk: k")
    if not 1 <= kk <= min(n, MAX_TOPK):
        raise cx.fail(f"topk: k={kk} must be in 1..{min(n, MAX_TOPK)}")
    cx.static_bool(sorted, "topk: sorted")
    r = x.type.rank
    work = x if cx.static_bool(largest, "topk: largest") else cx.emit("neg", [x])
    pos = _iota(cx, n, r, DType.f32)
    big = cx.const(float(n), DType.f32)
    ninf = cx.const(float("-inf"), DType.f32)
    taken: TensorRef | None = None
    vals, idxs = [], []
    for _ in range(kk):
        cur = work if taken is None else cx.emit("where", [taken, cx.cast(ninf, work.type.dtype), work])
        m = _amax_last(cx, cur)
        hit = cx.emit("eq", [cur, m])
        if taken is not None:
            hit = logical_and(cx, hit, logical_not(cx, taken))
        cand = cx.emit("where", [hit, pos, big])
        i = cx.emit("neg", [_amax_last(cx, cx.emit("neg", [cand]))])          # the lowest index holding the max
        mark = cx.emit("eq", [pos, i])
        taken = mark if taken is None else logical_or(cx, taken, mark)
        vals.append(m)
        idxs.append(i)
    values = vals[0] if kk == 1 else cx.emit("cat", vals, {"dim": r - 1})
    if not cx.static_bool(largest, "topk: largest"):
        values = cx.emit("neg", [values])
    index = idxs[0] if kk == 1 else cx.emit("cat", idxs, {"dim": r - 1})
    return values, cx.cast(index, DType.i64)


@lowers(torch.sort, "sort")
def _sort(cx: TraceContext, input: Any, dim: Any = -1, descending: Any = False, stable: Any = False, *,
          out: Any = None) -> tuple[TensorRef, TensorRef]:
    """All n elements by topk's rounds (n <= 64): ties keep their order, as `stable=True` gives them."""
    x = cx.tensor(input, "sort")
    if out is not None:
        raise cx.fail("sort(out=...) is not supported")
    n = _last_dim(cx, x, dim, "sort")
    if n > MAX_TOPK:
        raise cx.fail(f"sort along a dim of {n} elements: at most {MAX_TOPK} (sorting is k rounds of max here)")
    cx.static_bool(stable, "sort: stable")
    return _topk(cx, x, n, -1, largest=cx.static_bool(descending, "sort: descending"))


@lowers(torch.argsort, "argsort")
def _argsort(cx: TraceContext, input: Any, dim: Any = -1, descending: Any = False, stable: Any = False) -> TensorRef:
    return _sort(cx, input, dim, descending, stable)[1]


def _onehot(cx: TraceContext, index: TensorRef, n: int) -> TensorRef:
    """bool [..., k, n]: index[..., j] == e."""
    return cx.emit("eq", [_unsqueeze_last(cx, cx.cast(index, DType.i64)), _iota(cx, n, index.type.rank + 1, DType.i64)])


def _scatter_value(cx: TraceContext, x: TensorRef, dim: Any, index: Any, value: Any, src: Any, what: str) -> TensorRef:
    idx = cx.tensor(index, f"{what}: index")
    n = _last_dim(cx, x, dim, what)
    if idx.type.rank != x.type.rank or idx.type.dtype.is_float:
        raise cx.fail(f"{what}: index must be an integer tensor of rank {x.type.rank}, got {idx.type}")
    hit = _onehot(cx, idx, n)                                              # [..., k, n]
    kdim = hit.type.rank - 2
    any_hit = cx.emit("amax", [cx.cast(hit, DType.f32)], {"dim": kdim, "keepdim": False})
    any_hit = ne(cx, any_hit, 0.0)                                          # [..., n]
    if src is not None:
        s = cx.cast(cx.tensor(src, f"{what}: src"), x.type.dtype)
        if s.type.rank != idx.type.rank:
            raise cx.fail(f"{what}: src must have index's rank, got {s.type}")
        zero = cx.cast(cx.const(0.0, DType.f32), x.type.dtype) if x.type.dtype.is_float else cx.const(0, x.type.dtype)
        spread = cx.emit("where", [hit, _unsqueeze_last(cx, s), zero])
        new = cx.emit("sum", [spread], {"dim": kdim, "keepdim": False})
    else:
        new = cx.cast(cx.operand(value, x.type, f"{what}: value"), x.type.dtype)
    return cx.emit("where", [any_hit, expand_to(cx, new, x.type.shape) if new.type.rank else new, x])


@lowers(torch.scatter, "scatter")
def _scatter(cx: TraceContext, input: Any, dim: Any, index: Any, src: Any = None, *, value: Any = None,
             reduce: Any = None) -> TensorRef:
    if reduce is not None:
        raise cx.fail("scatter(reduce=...) is not supported")
    x = cx.tensor(input, "scatter")
    if not isinstance(src, TensorRef):
        src, value = None, src if value is None else value
    return _scatter_value(cx, x, dim, index, value, src, "scatter")


@lowers_inplace("scatter_")
def _scatter_(cx: TraceContext, args: tuple, kwargs: dict) -> TensorRef:
    if len(args) < 3 or len(args) > 4 or set(kwargs) - {"value", "src"}:
        raise cx.fail("Tensor.scatter_ takes (dim, index, src | value)")
    node = cx.current_node().args[0]
    if node not in cx.fresh:
        raise cx.fail("Tensor.scatter_: in-place write into a tensor that forward did not allocate",
                      hint="scatter into x.new_zeros(...) / torch.zeros_like(x), or use the out-of-place scatter")
    x = cx.tensor(args[0], "scatter_")
    third = args[3] if len(args) == 4 else kwargs.get("src", kwargs.get("value"))
    src = third if isinstance(third, TensorRef) else None
    out = _scatter_value(cx, x, args[1], args[2], None if src is not None else third, src, "Tensor.scatter_")
    cx.rebind(node, out, ALIASING)
    return out


@lowers(F.one_hot)
def _one_hot(cx: TraceContext, tensor: Any, num_classes: Any = -1) -> TensorRef:
    idx = cx.tensor(tensor, "one_hot")
    n = cx.static_int(num_classes, "one_hot: num_classes")
    if n < 1:
        raise cx.fail("one_hot needs num_classes (the IR needs a static size; -1 would read the values)")
    if n > MAX_WIDTH:
        raise cx.fail(f"one_hot with {n} classes (at most {MAX_WIDTH:,})")
    if idx.type.dtype.is_float:
        raise cx.fail(f"one_hot of a {idx.type.dtype.value} tensor", hint="one_hot of integer indices")
    return cx.cast(_onehot(cx, idx, n), DType.i64)


@lowers(torch.cumsum, "cumsum")
def _cumsum(cx: TraceContext, input: Any, dim: Any, *, dtype: Any = None, out: Any = None) -> TensorRef:
    x = cx.tensor(input, "cumsum")
    if out is not None:
        raise cx.fail("cumsum(out=...) writes into a tensor", hint="use the returned tensor")
    d = cx.norm_dim(dim, x.type.rank, "cumsum")
    if x.type.rank == 0:
        return cx.cast(x, cx.dtype(dtype)) if dtype is not None else \
            (x if x.type.dtype.is_float else cx.cast(x, DType.i64))
    if d != x.type.rank - 1:
        raise cx.fail(f"cumsum along dim {dim} of {x.type}: only the last dim is supported",
                      hint="move the dim last first (x.movedim(d, -1).cumsum(-1).movedim(-1, d))")
    if dtype is not None:
        x = cx.cast(x, cx.dtype(dtype))
    return cx.emit("cumsum", [x], {"dim": -1})


__all__ = ["MAX_TOPK"]
