"""Frontend: what DeepSeek's Multi-head Latent Attention (`models.deepseek.MLA`) needs to trace.

Where it sits: one of `frontend/lowerings/` (listed in its `__init__`); registers lowerings for

    torch.arange(n) [+ start]              -> iota (n may be symbolic) [+ add]
    Tensor.index_copy / torch.index_copy   -> index_copy (the decode's KV-cache write, a copy in SSA)
    layers.rope_cos_sin (wrapped)          -> rope_table (cos, sin)
    deepseek.mla_attention (wrapped)       -> mla_attention
    deepseek.mla_attention_absorbed (wrapped) -> linear(latent, wkv_b) + slices + mla_attention

Why wrapped functions rather than tracing the eager code: MLA's attention core is einsums, a
position mask and a softmax whose meaning (two dots, a head-shared k_pe, a position mask) a flash
kernel needs as one op; recovering it from einsums would be pattern matching on our own zoo. The
zoo keeps the exact eager code inside the wrapped functions (bit-identical), and the IR op's
reference repeats it. The absorbed eager form lowers to the *naive* IR (one canonical form): the
`absorb_mla` pass decides where the absorbed form runs (decode), whatever form the module used.

Masks: the op's mask is "key t allowed iff k_pos[t] <= q_pos[s]". When the query and key
positions are one value made by `arange(S) [+ start]` (prefill), that is the causal mask, and
the op is emitted without positions (5 inputs: end-aligned causal), so the flash kernel skips
key blocks past the diagonal.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import sympy
import torch

from dsr_compiler.ir.ops.mla import INT_DTYPES
from dsr_compiler.ir.types import DType, to_expr

from ..context import TensorRef, TraceContext, canon
from ..registry import lowers, lowers_function


# ----------------------------------------------------------------------------- torch.arange

def _arange_bound(cx: TraceContext, v: Any, what: str) -> int | sympy.Expr:
    v = canon(v)
    if isinstance(v, float):
        if not v.is_integer():
            raise cx.fail(f"torch.arange: float {what} {v!r} is not supported",
                          hint="arange over integers (the IR's iota); cast the result to a float dtype")
        v = int(v)
    return cx.size_value(v, f"torch.arange: {what}")


@lowers(torch.arange)
def _arange(cx: TraceContext, start: Any, end: Any = None, step: Any = 1, *, dtype: Any = None, layout: Any = None,
            device: Any = None, pin_memory: Any = False, requires_grad: Any = False) -> TensorRef:
    if requires_grad:
        raise cx.fail("torch.arange(requires_grad=True) is not supported", hint="positions need no gradient")
    lo: int | sympy.Expr = 0
    if end is None:
        hi = _arange_bound(cx, start, "end")
    else:
        lo = _arange_bound(cx, start, "start")
        hi = _arange_bound(cx, end, "end")
    st = cx.static_int(step, "torch.arange: step")
    if st < 1:
        raise cx.fail(f"torch.arange: step must be positive, got {st}")
    if not isinstance(lo, int):
        raise cx.fail(f"torch.arange: a symbolic start `{lo}` is not supported",
                      hint="write torch.arange(n) + start")
    n = sympy.ceiling((to_expr(hi) - lo) / st)
    if n.is_Integer and int(n) < 1:
        raise cx.fail(f"torch.arange({lo}, {hi}, {st}) is empty", hint="the IR has no empty tensors")
    out = cx.emit("iota", [], {"n": canon(sympy.simplify(n)), "dtype": DType.i64})
    if st != 1:
        out = cx.binary("mul", out, st)
    if lo != 0:
        out = cx.binary("add", out, lo)
    if dtype is not None:
        out = cx.cast(out, cx.dtype(dtype))
    return out


# ----------------------------------------------------------------------------- index_copy

@lowers("index_copy", torch.index_copy)
def _index_copy(cx: TraceContext, input: Any, dim: Any, index: Any, source: Any) -> TensorRef:
    x = cx.tensor(input, "index_copy")
    idx = cx.tensor(index, "index_copy: index")
    src = cx.tensor(source, "index_copy: source")
    if idx.type.dtype not in INT_DTYPES:
        raise cx.fail(f"index_copy: index must be an i32/i64 tensor, got {idx.type}")
    d = cx.norm_dim(dim, x.type.rank, "index_copy")
    return cx.emit("index_copy", [x, idx, src], {"dim": d})


# ----------------------------------------------------------------------------- wrapped functions

def _bind(cx: TraceContext, fn: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    name = getattr(fn, "__name__", "function")
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise cx.fail(f"{name}: unsupported arguments ({e})") from None
    bound.apply_defaults()
    return dict(bound.arguments)


@lowers_function("rope_table")
def _function_rope_table(cx: TraceContext, fn: Callable, args: tuple, kwargs: dict) -> tuple[TensorRef, TensorRef]:
    a = _bind(cx, fn, args, kwargs)
    name = getattr(fn, "__name__", "rope_cos_sin")
    vals = list(a.values())
    if len(vals) != 3:
        raise cx.fail(f"{name}: the rope_table op takes (positions, inv_freq, attn_factor), got {list(a)}")
    pos = cx.tensor(vals[0], f"{name}: positions")
    freq = cx.tensor(vals[1], f"{name}: inv_freq")
    factor = cx.number(vals[2], f"{name}: attn_factor")
    if isinstance(factor, bool):
        raise cx.fail(f"{name}: attn_factor must be a number, got {factor!r}")
    freq = cx.cast(freq, DType.f32)
    cos, sin = cx.emit_multi("rope_table", [pos, freq], {"attn_factor": float(factor)})
    return cos, sin


def _arange_positions(cx: TraceContext, ref: TensorRef) -> bool:
    """Is `ref` made by `iota` or `iota + (0-d value)`: strictly increasing positions?"""
    prod = {o.name: n for n in cx.nodes for o in n.outputs}
    types = {r.name: r.type for r in (*cx.inputs.values(), *cx.params.values())}
    types.update({o.name: o.type for n in cx.nodes for o in n.outputs})
    n = prod.get(ref.name)
    if n is None:
        return False
    if n.op == "iota":
        return True
    if n.op == "add" and len(n.inputs) == 2:
        for a, b in (n.inputs, n.inputs[::-1]):
            pa = prod.get(a)
            if pa is not None and pa.op == "iota" and b in types and types[b].rank == 0:
                return True
    return False


def _emit_mla_attention(cx: TraceContext, what: str, q_nope: TensorRef, q_pe: TensorRef, k_nope: TensorRef,
                        k_pe: TensorRef, v: TensorRef, q_pos: TensorRef, k_pos: TensorRef, scale: Any,
                        out_dtype: Any) -> TensorRef:
    s = float(cx.number(scale, f"{what}: scale"))
    dt = cx.dtype(out_dtype)
    if q_pos.name == k_pos.name and _arange_positions(cx, q_pos):
        return cx.emit("mla_attention", [q_nope, q_pe, k_nope, k_pe, v], {"scale": s, "dtype": dt})
    return cx.emit("mla_attention", [q_nope, q_pe, k_nope, k_pe, v, q_pos, k_pos], {"scale": s, "dtype": dt})


@lowers_function("mla_attention")
def _function_mla_attention(cx: TraceContext, fn: Callable, args: tuple, kwargs: dict) -> TensorRef:
    a = _bind(cx, fn, args, kwargs)
    what = getattr(fn, "__name__", "mla_attention")
    names = ("q_nope", "q_pe", "k_nope", "k_pe", "v", "q_pos", "k_pos")
    t = [cx.tensor(a.get(n), f"{what}: {n}") for n in names]
    return _emit_mla_attention(cx, what, *t, a.get("scale"), a.get("out_dtype"))


@lowers_function("mla_attention_absorbed")
def _function_mla_attention_absorbed(cx: TraceContext, fn: Callable, args: tuple, kwargs: dict) -> TensorRef:
    """The absorbed core as the expanded form it equals: kv = wkv_b(latent) per head, then attention."""
    a = _bind(cx, fn, args, kwargs)
    what = getattr(fn, "__name__", "mla_attention_absorbed")
    q_nope, q_pe, latent, k_pe, w, q_pos, k_pos = (
        cx.tensor(a.get(n), f"{what}: {n}") for n in ("q_nope", "q_pe", "latent", "k_pe", "wkv_b", "q_pos", "k_pos"))
    if q_nope.type.rank != 4 or latent.type.rank != 3 or w.type.rank != 2:
        raise cx.fail(f"{what}: want q_nope [B, S, H, nope], latent [B, T, kv_lora], wkv_b [H*(nope+v), kv_lora]; "
                      f"got {q_nope.type}, {latent.type}, {w.type}")
    b, t = latent.type.shape[:2]
    heads, nope = q_nope.type.shape[2], q_nope.type.shape[3]
    per_head = sympy.simplify(w.type.shape[0] / heads)
    if not per_head.is_Integer or int(per_head) <= int(nope):
        raise cx.fail(f"{what}: wkv_b {w.type} does not hold {heads} heads of nope {nope} + v rows")
    kvb = cx.reshape(cx.emit("linear", [latent, w]), (b, t, heads, per_head))
    k_nope = cx.emit("slice", [kvb], {"dim": 3, "start": 0, "end": int(nope), "step": 1})
    v = cx.emit("slice", [kvb], {"dim": 3, "start": int(nope), "end": None, "step": 1})
    return _emit_mla_attention(cx, what, q_nope, q_pe, k_nope, k_pe, v, q_pos, k_pos, a.get("scale"),
                               a.get("out_dtype"))
