"""Frontend lowerings for losses: `per_token_logps` (wrapped), `gather`, `F.cross_entropy`, `detach`.

Where it sits: one of `frontend/lowerings/` (listed in its `__init__`), registering into `frontend/registry.py`.

- The zoo's `per_token_logps` (wrapped with `torch.fx.wrap`, `dsr_op = "token_logprobs"`) becomes
  one `token_logprobs` node (ir/ops/loss.py) with two results: the per-token log-probs, and the
  per-token logsumexp that the backward reuses.
- `torch.gather` / `Tensor.gather` along the last dim become `gather`.
- `F.cross_entropy(logits [N, C], target [N])` is decomposed into ops the rest of the pipeline
  knows: `log_softmax`, `gather` at the target (ignored targets read class 0 and are selected
  away with `where`), and the reduction (`mean` divides by the count of non-ignored targets, as
  torch does). The `rewrite_vocab_loss` pass then turns `log_softmax(hidden @ W.T)` gathered at
  the targets into `token_logprobs`, so the logits are never materialized.
- `detach` becomes `stop_gradient` (the value passes; `differentiate` gives it no derivative).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from dsr_compiler.ir.types import DType

from ..context import TensorRef, TraceContext, bound_args, canon
from ..registry import lowers, lowers_function
from .arith import ne


def _temperature(cx: TraceContext, v: Any, what: str) -> float:
    v = canon(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) or float(v) <= 0:
        raise cx.fail(f"{what}: temperature must be a Python number > 0, got {v!r}",
                      hint="the temperature is baked into the kernel; pass a float, not a tensor")
    return float(v)


@lowers_function("token_logprobs")
def _function_token_logprobs(cx: TraceContext, fn: Callable, args: tuple, kwargs: dict) -> TensorRef:
    name, vals = bound_args(cx, fn, args, kwargs, "per_token_logps")
    if len(vals) != 4:
        raise cx.fail(f"{name}: token_logprobs takes (hidden, lm_head_weight, ids, temperature), got {len(vals)} arguments")
    hidden, weight, ids = (cx.tensor(v, f"{name}: {n}") for v, n in zip(vals[:3], ("hidden", "lm_head_weight", "ids")))
    t = _temperature(cx, vals[3], name)
    if ids.type.dtype not in (DType.i32, DType.i64):
        ids = cx.cast(ids, DType.i64)
    logp, _lse = cx.emit_multi("token_logprobs", [hidden, weight, ids], {"temperature": t})
    return logp


@lowers(torch.gather, "gather")
def _gather(cx: TraceContext, input: Any, dim: Any, index: Any, *, sparse_grad: bool = False) -> TensorRef:
    x = cx.tensor(input, "gather")
    idx = cx.tensor(index, "gather: index")
    d = cx.norm_dim(dim, x.type.rank, "gather")
    if d != x.type.rank - 1:
        raise cx.fail(f"gather along dim {d} of {x.type}: only the last dim is supported",
                      hint="permute the gathered dim last (x.movedim(d, -1)) before gather")
    return cx.emit("gather", [x, idx], {"dim": -1})


@lowers(F.cross_entropy)
def _f_cross_entropy(cx: TraceContext, input: Any, target: Any, weight: Any = None, size_average: Any = None,
                     ignore_index: Any = -100, reduce: Any = None, reduction: str = "mean",
                     label_smoothing: float = 0.0) -> TensorRef:
    what = "F.cross_entropy"
    x = cx.tensor(input, f"{what}: input")
    y = cx.tensor(target, f"{what}: target")
    if weight is not None:
        raise cx.fail(f"{what}: class weights are not supported", hint="weight the per-token losses (reduction='none')")
    if size_average is not None or reduce is not None:
        raise cx.fail(f"{what}: the deprecated size_average/reduce arguments are not supported", hint="use reduction=")
    if cx.number(label_smoothing, f"{what}: label_smoothing") != 0:
        raise cx.fail(f"{what}: label_smoothing is not supported", hint="use label_smoothing=0.0")
    if reduction not in ("mean", "sum", "none"):
        raise cx.fail(f"{what}: unknown reduction {reduction!r}", hint="use 'mean', 'sum' or 'none'")
    if x.type.rank != 2 or not x.type.dtype.is_float:
        raise cx.fail(f"{what}: input must be float logits [N, C], got {x.type}",
                      hint="flatten to [tokens, vocab] first (logits.reshape(-1, V)) and the target to [tokens]")
    if y.type.dtype not in (DType.i32, DType.i64) or y.type.rank != 1:
        raise cx.fail(f"{what}: target must be integer class indices [N], got {y.type}",
                      hint="class probabilities (float targets) are not supported")
    ign = cx.static_int(ignore_index, f"{what}: ignore_index")
    n = x.type.shape[0]
    valid = ne(cx, y, ign)                                  # y != ignore_index
    safe = cx.emit("where", [valid, y, cx.const(0, y.type.dtype)])
    lsm = cx.emit("log_softmax", [x], {"dim": -1})
    picked = cx.reshape(cx.emit("gather", [lsm, cx.reshape(safe, (n, 1))], {"dim": -1}), (n,))
    zero = cx.const(0.0, DType.f32)
    nll = cx.emit("where", [valid, cx.emit("neg", [picked]), zero])
    if nll.type.dtype != x.type.dtype:
        nll = cx.cast(nll, x.type.dtype)
    if reduction == "none":
        return nll
    total = cx.emit("sum", [nll], {"dim": 0, "keepdim": False})
    if reduction == "sum":
        return total
    count = cx.emit("sum", [cx.cast(valid, x.type.dtype)], {"dim": 0, "keepdim": False})
    return cx.emit("div", [total, count])


@lowers(torch.detach, "detach")
def _detach(cx: TraceContext, input: Any) -> TensorRef:
    return cx.emit("stop_gradient", [cx.tensor(input, "detach")])
