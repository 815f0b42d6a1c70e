"""Frontend lowerings: GEMMs, embedding, attention, norms, torch.nn leaf modules, and the zoo's
`rms_norm` leaf and wrapped `apply_rope` (`dsr_op = "rope"`).

Where it sits: one of `frontend/lowerings/` (listed in its `__init__`); registers into
`frontend/registry.py` with `@lowers`, `@lowers_module`, `@lowers_leaf` and `@lowers_function`.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsr_compiler.ir.types import DType, dims_equal, to_expr
from ..context import TensorRef, TraceContext, bound_args, canon, module_attr, same
from ..registry import lowers, lowers_function, lowers_leaf, lowers_module
from .arith import f_dropout, f_gelu
from .reduce import softmax_like


# --- GEMMs, gathers, attention, norms

@lowers(operator.matmul, torch.matmul, torch.bmm, torch.mm, "matmul", "bmm", "mm")
def _matmul(cx: TraceContext, input: Any, other: Any) -> TensorRef:
    return cx.emit("matmul", [cx.tensor(input, "matmul"), cx.tensor(other, "matmul")])


def _linear(cx: TraceContext, x: Any, w: Any, b: Any) -> TensorRef:
    ins = [cx.tensor(x, "linear: input"), cx.tensor(w, "linear: weight")]
    if b is not None:
        ins.append(cx.tensor(b, "linear: bias"))
    return cx.emit("linear", ins)


@lowers(F.linear)
def _f_linear(cx: TraceContext, input: Any, weight: Any, bias: Any = None) -> TensorRef:
    return _linear(cx, input, weight, bias)


def _embedding(cx: TraceContext, ids: Any, weight: TensorRef, max_norm: Any) -> TensorRef:
    if max_norm is not None:
        raise cx.fail("embedding with max_norm renormalizes the weight in place", hint="use max_norm=None")
    return cx.emit("embedding", [weight, cx.tensor(ids, "embedding: ids")])


@lowers(F.embedding)
def _f_embedding(cx: TraceContext, input: Any, weight: Any, padding_idx: Any = None, max_norm: Any = None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False) -> TensorRef:
    return _embedding(cx, input, cx.tensor(weight, "embedding: weight"), max_norm)


def _masked_attention(cx: TraceContext, q: TensorRef, k: TensorRef, v: TensorRef, mask: TensorRef, scale: float,
                      what: str) -> TensorRef:
    """SDPA with attn_mask, as its definition in existing ops: softmax(q k^T * scale [masked]) v. A boolean mask
    keeps the True positions (the others get -inf), a float mask is added to the scores; it broadcasts."""
    if not (mask.type.dtype is DType.bool or mask.type.dtype.is_float):
        raise cx.fail(f"{what}: attn_mask must be bool or float, got {mask.type}")
    r = k.type.rank
    kt = cx.emit("permute", [k], {"dims": tuple(range(r - 2)) + (r - 1, r - 2)})
    s = cx.binary("mul", cx.emit("matmul", [q, kt]), scale)
    if mask.type.dtype is DType.bool:
        s = cx.emit("where", [mask, s, cx.operand(float("-inf"), s.type)])
    else:
        s = cx.binary("add", s, cx.cast(mask, s.type.dtype))
    return cx.emit("matmul", [cx.emit("softmax", [s], {"dim": s.type.rank - 1}), v])


def _repeat_kv_heads(cx: TraceContext, q: TensorRef, kv: TensorRef, what: str) -> TensorRef:
    """enable_gqa: query head h reads key/value head h // (Hq / Hkv) (repeat_interleave), as expand + reshape."""
    if q.type.rank < 3 or kv.type.rank != q.type.rank:
        raise cx.fail(f"{what}: enable_gqa needs [..., heads, L, D] query and key/value, got {q.type} and {kv.type}")
    hq, hkv = canon(q.type.shape[-3]), canon(kv.type.shape[-3])
    if not (isinstance(hq, int) and isinstance(hkv, int)) or hkv < 1 or hq % hkv:
        raise cx.fail(f"{what}: enable_gqa needs static head counts with the query's a multiple of the key's, "
                      f"got {hq} and {hkv}")
    if hq == hkv:
        return kv
    g = hq // hkv
    lead, (length, d) = kv.type.shape[:-3], kv.type.shape[-2:]
    x = cx.reshape(kv, (*lead, hkv, 1, length, d))
    x = cx.emit("expand", [x], {"shape": tuple(canon(s) for s in (*lead, hkv, g, length, d))})
    return cx.reshape(x, (*lead, hq, length, d))


@lowers(F.scaled_dot_product_attention)
def _sdpa(cx: TraceContext, query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: Any = 0.0,
          is_causal: Any = False, scale: Any = None, enable_gqa: Any = False) -> TensorRef:
    what = "F.scaled_dot_product_attention"
    if cx.number(dropout_p, f"{what}: dropout_p") != 0:
        raise cx.fail(f"{what}: dropout_p={dropout_p} is random", hint="trace in eval mode with dropout_p=0.0")
    gqa = cx.static_bool(enable_gqa, f"{what}: enable_gqa")
    q, k, v = (cx.tensor(t, f"{what}: {n}") for t, n in ((query, "query"), (key, "key"), (value, "value")))
    if gqa:
        k, v = _repeat_kv_heads(cx, q, k, what), _repeat_kv_heads(cx, q, v, what)
    causal = cx.static_bool(is_causal, f"{what}: is_causal")
    if q.type.rank < 2 or k.type.rank < 2:
        raise cx.fail(f"{what}: query and key need rank >= 2, got {q.type} and {k.type}")
    if scale is None:
        d = canon(q.type.shape[-1])
        if not isinstance(d, int):
            raise cx.fail(f"{what}: the default scale needs a static head dim, got {d}", hint="pass scale=")
        scale = 1.0 / math.sqrt(d)
    if attn_mask is not None:
        if causal:
            raise cx.fail(f"{what}: attn_mask together with is_causal=True is an error in PyTorch too",
                          hint="fold the causal mask into attn_mask")
        return _masked_attention(cx, q, k, v, cx.tensor(attn_mask, f"{what}: attn_mask"),
                                 float(cx.number(scale, f"{what}: scale")), what)
    if causal and not same(q.type.shape[-2], k.type.shape[-2]):
        raise cx.fail(f"{what}: is_causal=True with query length {q.type.shape[-2]} != key length "
                      f"{k.type.shape[-2]}: SDPA's causal mask is top-left aligned, the IR's `attention` "
                      "is bottom-right aligned; they agree only when the lengths are equal",
                      hint="use equal lengths (prefill) or is_causal=False (decode of the last position)")
    return cx.emit("attention", [q, k, v], {"causal": causal, "scale": float(cx.number(scale, f"{what}: scale"))})


def _rms_norm(cx: TraceContext, x: Any, weight: Any, eps: Any, normalized_shape: Any, what: str) -> TensorRef:
    x = cx.tensor(x, what)
    if weight is None:
        raise cx.fail(f"{what} without a weight (elementwise_affine=False) is not supported",
                      hint="the IR's rms_norm always multiplies by a weight; use elementwise_affine=True")
    if eps is None:
        raise cx.fail(f"{what} with eps=None is not supported",
                      hint="set eps explicitly, e.g. nn.RMSNorm(dim, eps=1e-6); torch's default depends on the dtype")
    if normalized_shape is not None:
        ns = tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list, torch.Size)) else (normalized_shape,)
        if len(ns) != 1:
            raise cx.fail(f"{what} over {len(ns)} trailing dims is not supported", hint="normalize the last dim only")
    return cx.emit("rms_norm", [x, cx.tensor(weight, f"{what}: weight")], {"eps": float(eps)})


@lowers(F.rms_norm, torch.rms_norm)     # torch.rms_norm: what TorchDynamo records for nn.RMSNorm
def _f_rms_norm(cx: TraceContext, input: Any, normalized_shape: Any, weight: Any = None, eps: Any = None) -> TensorRef:
    return _rms_norm(cx, input, weight, eps, normalized_shape, "F.rms_norm")


def _layer_norm(cx: TraceContext, x: Any, normalized_shape: Any, weight: Any, bias: Any, eps: Any,
                what: str) -> TensorRef:
    """LayerNorm over the last dim, as existing ops: mean, centred square mean, rsqrt, affine; in fp32 for a
    16-bit input (as torch computes it), one cast back at the end."""
    x = cx.tensor(x, what)
    ns = tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list, torch.Size)) else (normalized_shape,)
    if len(ns) != 1 or x.type.rank < 1 or not dims_equal(to_expr(cx.number(ns[0], f"{what}: normalized_shape")),
                                                       x.type.shape[-1]):
        raise cx.fail(f"{what} over normalized_shape={list(ns)} of a {x.type} input is not supported",
                      hint="normalize the last dim only: normalized_shape=(x.shape[-1],)")
    if not x.type.dtype.is_float:
        raise cx.fail(f"{what}: input must be float, got {x.type}")
    dt = x.type.dtype
    xf = cx.cast(x, DType.f32)
    d = x.type.rank - 1
    mean = cx.emit("mean", [xf], {"dim": d, "keepdim": True})
    xc = cx.binary("sub", xf, mean)
    var = cx.emit("mean", [cx.binary("mul", xc, xc)], {"dim": d, "keepdim": True})
    y = cx.binary("mul", xc, cx.emit("rsqrt", [cx.binary("add", var, float(cx.number(eps, f"{what}: eps")))]))
    if weight is not None:
        y = cx.binary("mul", y, cx.cast(cx.tensor(weight, f"{what}: weight"), DType.f32))
    if bias is not None:
        y = cx.binary("add", y, cx.cast(cx.tensor(bias, f"{what}: bias"), DType.f32))
    return cx.cast(y, dt)


@lowers(F.layer_norm, torch.layer_norm)
def _f_layer_norm(cx: TraceContext, input: Any, normalized_shape: Any, weight: Any = None, bias: Any = None,
                  eps: Any = 1e-5) -> TensorRef:
    return _layer_norm(cx, input, normalized_shape, weight, bias, eps, "F.layer_norm")


@lowers(torch.addmm, "addmm")
def _addmm(cx: TraceContext, input: Any, mat1: Any, mat2: Any, *, beta: Any = 1, alpha: Any = 1) -> TensorRef:
    """beta * input + alpha * (mat1 @ mat2) (GPT-2's Conv1D), as matmul, scales and add."""
    prod = cx.emit("matmul", [cx.tensor(mat1, "addmm: mat1"), cx.tensor(mat2, "addmm: mat2")])
    a, b = cx.number(alpha, "addmm: alpha"), cx.number(beta, "addmm: beta")
    if a != 1:
        prod = cx.binary("mul", prod, float(a))
    if b == 0:
        return prod
    base = cx.tensor(input, "addmm: input")
    return cx.binary("add", prod, base if b == 1 else cx.binary("mul", base, float(b)))


# --- torch.nn leaf modules

@lowers_module(nn.Linear)
def _m_linear(cx: TraceContext, m: nn.Linear, input: Any) -> TensorRef:
    bias = module_attr(m, "bias")
    return _linear(cx, input, cx.param(module_attr(m, "weight")), None if bias is None else cx.param(bias))


@lowers_module(nn.Embedding)
def _m_embedding(cx: TraceContext, m: nn.Embedding, input: Any) -> TensorRef:
    return _embedding(cx, input, cx.param(module_attr(m, "weight")), m.max_norm)


@lowers_module(nn.RMSNorm)
def _m_rms_norm(cx: TraceContext, m: nn.RMSNorm, input: Any) -> TensorRef:
    w = module_attr(m, "weight")
    w = None if w is None else cx.param(w)
    return _rms_norm(cx, input, w, m.eps, m.normalized_shape, "nn.RMSNorm")


@lowers_module(nn.LayerNorm)
def _m_layer_norm(cx: TraceContext, m: nn.LayerNorm, input: Any) -> TensorRef:
    w, b = module_attr(m, "weight"), module_attr(m, "bias")
    return _layer_norm(cx, input, m.normalized_shape, None if w is None else cx.param(w),
                       None if b is None else cx.param(b), m.eps, "nn.LayerNorm")


def _module_unary(cls: type, op: str) -> None:
    def handler(cx: TraceContext, m: nn.Module, input: Any) -> TensorRef:
        return cx.emit(op, [cx.tensor(input, cls.__name__)])
    handler.__name__ = f"_m_{op}"
    lowers_module(cls)(handler)


_module_unary(nn.SiLU, "silu")
_module_unary(nn.ReLU, "relu")
_module_unary(nn.Sigmoid, "sigmoid")
_module_unary(nn.Tanh, "tanh")


@lowers_module(nn.GELU)
def _m_gelu(cx: TraceContext, m: nn.GELU, input: Any) -> TensorRef:
    return f_gelu(cx, input, m.approximate)


@lowers_module(nn.Softmax)
def _m_softmax(cx: TraceContext, m: nn.Softmax, input: Any) -> TensorRef:
    return softmax_like(cx, "softmax", input, m.dim, None)


@lowers_module(nn.LogSoftmax)
def _m_log_softmax(cx: TraceContext, m: nn.LogSoftmax, input: Any) -> TensorRef:
    return softmax_like(cx, "log_softmax", input, m.dim, None)


@lowers_module(nn.Identity)
def _m_identity(cx: TraceContext, m: nn.Identity, input: Any) -> TensorRef:
    return cx.tensor(input, "Identity")


@lowers_module(nn.Dropout)
def _m_dropout(cx: TraceContext, m: nn.Dropout, input: Any) -> TensorRef:
    return f_dropout(cx, input, m.p, m.training)


# --- leaf modules and wrapped functions of the zoo (registries)

@lowers_leaf("rms_norm")
def _leaf_rms_norm(cx: TraceContext, module: nn.Module, args: tuple, kwargs: dict) -> TensorRef:
    if len(args) + len(kwargs) != 1:
        raise cx.fail(f"{type(module).__name__} (rms_norm leaf) takes one input, got {len(args) + len(kwargs)}")
    x = args[0] if args else next(iter(kwargs.values()))
    try:
        weight = module_attr(module, "weight")
    except AttributeError:
        weight = None
    return _rms_norm(cx, x, None if weight is None else cx.param(weight), getattr(module, "eps", None), None,
                     type(module).__name__)

@lowers_function("rope")
def _function_rope(cx: TraceContext, fn: Callable, args: tuple, kwargs: dict) -> TensorRef:
    name, vals = bound_args(cx, fn, args, kwargs, "rope")
    if len(vals) != 3:
        raise cx.fail(f"{name}: the rope op takes (x, cos, sin), got {len(vals)} arguments")
    x, cos, sin = (cx.tensor(v, f"{name}: {n}") for v, n in zip(vals, ("x", "cos", "sin")))
    return cx.emit("rope", [x, cos, sin])
