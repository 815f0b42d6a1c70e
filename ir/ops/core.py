"""The core ops of the op table: pointwise arithmetic, reductions, GEMMs, attention, layout.

Where it sits: the first op module `ir/ops/__init__.py` imports (after `_def.py`, which holds
`OpDef` and `register`). Each op is declared once here with its type rule (shapes as sympy
expressions), its eager torch reference (what the reference interpreter runs, and what compiled
kernels are checked against), its attributes, its kind (which fusion families may take it) and
its other facts: `commutative` (cse), `flops` (codegen's cost model), `index_map` and
`last_dim_reduction` (fusion and lowering), `vjp` (the `differentiate` pass).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import sympy
import torch
import torch.nn.functional as F

from ..errors import GradError
from ..types import DType, TensorType, broadcast_shapes
from ._def import (
    ATTENTION,
    CALL,
    GEMM,
    LAYOUT,
    POINTWISE,
    REDUCTION,
    SOURCE,
    AttrSpec,
    GradBuilder,
    OpDef,
    TypeRuleError,
    Vjp,
    dims_equal,
    fit,
    norm_dim,
    register,
    single_output_vjp,
)

if TYPE_CHECKING:
    from ..graph import Node

# ----------------------------------------------------------------------------- helpers

def _meta(t: TensorType) -> torch.Tensor:
    return torch.empty((1,) * t.rank, dtype=t.dtype.torch, device="meta")


def _result_dtype(types: Sequence[TensorType]) -> DType:
    """torch's promotion (0-d tensors do not promote dimensioned ones of the same category)."""
    res = _meta(types[0])
    dt = res.dtype
    for t in types[1:]:
        dt = torch.result_type(torch.empty((1,) * res.dim(), dtype=dt, device="meta"), _meta(t))
    return DType.from_torch(dt)


# ----------------------------------------------------------------------------- derivative rules
# The `differentiate` pass (ir/passes/autodiff.py) calls `OpDef.vjp`; the rules follow torch's
# autograd formulas, including its conventions at ties, so results match eager `loss.backward()`.
# Each returns (input, gradient contribution) pairs; `fit` sums broadcast dims and casts.

def _hint(n: Node) -> str:
    return f"{n.inputs[0]}.grad" if n.inputs else "grad"


@single_output_vjp
def _add_vjp(b: GradBuilder, n: Node, g: str, zero: str) -> list:
    return [fit(b, n, 0, g), fit(b, n, 1, g)]


@single_output_vjp
def _sub_vjp(b: GradBuilder, n: Node, g: str, zero: str) -> list:
    return [fit(b, n, 0, g), fit(b, n, 1, b.emit("neg", (g,), hint=_hint(n)))]


@single_output_vjp
def _neg_vjp(b: GradBuilder, n: Node, g: str, zero: str) -> list:
    return [fit(b, n, 0, b.emit("neg", (g,), hint=_hint(n)))]


@single_output_vjp
def _mul_vjp(b: GradBuilder, n: Node, g: str, zero: str) -> list:
    x, y = n.inputs
    hint = _hint(n)
    return [fit(b, n, 0, b.emit("mul", (g, y), hint=hint)), fit(b, n, 1, b.emit("mul", (g, x), hint=hint))]


@single_output_vjp
def _div_vjp(b: GradBuilder, n: Node, g: str, zero: str) -> list:
    x, y = n.inputs
    hint = _hint(n)
    gx = b.emit("div", (g, y), hint=hint)
    q = b.emit("div", (b.emit("div", (x, y), hint=hint), y), hint=hint)
    gy = b.emit("neg", (b.emit("mul", (g, q), hint=hint),), hint=hint)
    return [fit(b, n, 0, gx), fit(b, n, 1, gy)]


@single_output_vjp
def _exp_vjp(b: GradBuilder, n: Node, g: str, zero: str) -> list:
    return [fit(b, n, 0, b.emit("mul", (g, n.out.name), hint=_hint(n)))]


@single_output_vjp
def _log_vjp(b: GradBuilder, n: Node, g: str, zero: str) -> list:
    return [fit(b, n, 0, b.emit("div", (g, n.inputs[0]), hint=_hint(n)))]


@single_output_vjp
def _sqrt_vjp(b: GradBuilder, n: Node, g: str, zero: str) -> list:
    out, hint = n.out.name, _hint(n)
    two = b.const(2.0, b.types[out].dtype)
    return [fit(b, n, 0, b.emit("div", (g, b.emit("mul", (two, out), hint=hint)), hint=hint))]


@single_output_vjp
def _reciprocal_vjp(b: GradBuilder, n: Node, g: str, zero: str) -> list:
    out, hint = n.out.name, _hint(n)
    sq = b.emit("mul", (out, out), hint=hint)
    return [fit(b, n, 0, b.emit("neg", (b.emit("mul", (g, sq), hint=hint),), hint=hint))]


@single_output_vjp
def _sigmoid_vjp(b: GradBuilder, n: Node, g: str, zero: str) -> list:
    out, hint = n.out.name, _hint(n)
    one = b.const(1.0, b.types[out].dtype)
    d = b.emit("mul", (out, b.emit("sub", (one, out), hint=hint)), hint=hint)
    return [fit(b, n, 0, b.emit("mul", (g, d), hint=hint))]


@single_output_vjp
def _cos_vjp(b: GradBuilder, n: Node, g: str, zero: str) -> list:
    hint = _hint(n)
    d = b.emit("neg", (b.emit("sin", (n.inputs[0],), hint=hint),), hint=hint)
    return [fit(b, n, 0, b.emit("mul", (g, d), hint=hint))]


@single_output_vjp
def _sin_vjp(b: GradBuilder, n: Node, g: str, zero: str) -> list:
    hint = _hint(n)
    return [fit(b, n, 0, b.emit("mul", (g, b.emit("cos", (n.inputs[0],), hint=hint)), hint=hint))]


@single_output_vjp
def _tanh_vjp(b: GradBuilder, n: Node, g: str, zero: str) -> list:
    out, hint = n.out.name, _hint(n)
    one = b.const(1.0, b.types[out].dtype)
    d = b.emit("sub", (one, b.emit("mul", (out, out), hint=hint)), hint=hint)
    return [fit(b, n, 0, b.emit("mul", (g, d), hint=hint))]


@single_output_vjp
def _pow_vjp(b: GradBuilder, n: Node, g: str, zero: str) -> list:
    x, e_name = n.inputs
    out, hint = n.out.name, _hint(n)
    c = b.prod.get(e_name)
    if c is None or c.op != "const":
        raise GradError(f"differentiate: pow(%{x}, %{e_name}) needs a constant exponent", where=f"node %{out} = pow")
    e = float(c.attr("value"))
    if e == 0.0:
        return [fit(b, n, 0, b.emit("mul", (g, zero), hint=hint))]
    pw = b.emit("pow", (x, b.const(e - 1.0, b.types[e_name].dtype)), hint=hint)
    d = b.emit("mul", (b.const(e, b.types[out].dtype), pw), hint=hint)
    return [fit(b, n, 0, b.emit("mul", (g, d), hint=hint))]


@single_output_vjp
def _maxmin_vjp(b: GradBuilder, n: Node, g: str, zero: str) -> list:
    """Ties split the gradient in halves; against a 0-d constant (what clamp, clamp_min, clamp_max
    lower to) the gradient passes where x >= lo (x <= hi), as clamp's does."""
    x, y = n.inputs
    t = b.types
    hint = f"{x}.grad"
    is_max = n.op == "maximum"
    cx, cy = b.prod.get(x), b.prod.get(y)
    const_x = cx is not None and cx.op == "const" and t[x].rank == 0
    const_y = cy is not None and cy.op == "const" and t[y].rank == 0
    if const_y or const_x:
        v, c, i = (x, y, 0) if const_y else (y, x, 1)
        keep = b.emit("ge" if is_max else "le", (v, c), hint=hint)
        return [fit(b, n, i, b.emit("where", (keep, g, zero), hint=hint))]
    half = b.emit("mul", (g, b.const(0.5, t[g].dtype)), hint=hint)
    eq = b.emit("eq", (x, y), hint=hint)
    split = b.emit("where", (eq, half, g), hint=hint)
    lose_x = b.emit("lt" if is_max else "gt", (x, y), hint=hint)
    lose_y = b.emit("gt" if is_max else "lt", (x, y), hint=hint)
    return [fit(b, n, 0, b.emit("where", (lose_x, zero, split), hint=hint)),
            fit(b, n, 1, b.emit("where", (lose_y, zero, split), hint=f"{y}.grad"))]


@single_output_vjp
def _where_vjp(b: GradBuilder, n: Node, g: str, zero: str) -> list:
    c = n.inputs[0]
    hint = _hint(n)
    return [(c, None), fit(b, n, 1, b.emit("where", (c, g, zero), hint=hint)),
            fit(b, n, 2, b.emit("where", (c, zero, g), hint=hint))]


@single_output_vjp
def _cast_vjp(b: GradBuilder, n: Node, g: str, zero: str) -> list:
    x = n.inputs[0]
    return [(x, b.emit("cast", (g,), {"dtype": b.types[x].dtype}, _hint(n)))]


@single_output_vjp
def _reshape_vjp(b: GradBuilder, n: Node, g: str, zero: str) -> list:
    x = n.inputs[0]
    return [(x, b.emit("reshape", (g,), {"shape": b.types[x].shape}, _hint(n)))]


@single_output_vjp
def _expand_vjp(b: GradBuilder, n: Node, g: str, zero: str) -> list:
    return [fit(b, n, 0, g)]


@single_output_vjp
def _permute_vjp(b: GradBuilder, n: Node, g: str, zero: str) -> list:
    dims = tuple(n.attr("dims"))
    inv = tuple(dims.index(i) for i in range(len(dims)))
    return [(n.inputs[0], b.emit("permute", (g,), {"dims": inv}, _hint(n)))]


@single_output_vjp
def _sum_mean_vjp(b: GradBuilder, n: Node, g: str, zero: str) -> list:
    """Expand the gradient back over the reduced dim (mean: divided by its static size)."""
    x, out, hint = n.inputs[0], n.out.name, _hint(n)
    xt = b.types[x]
    d = n.attr("dim") % xt.rank
    gk = g
    if not n.attr("keepdim", False):
        shape = list(xt.shape)
        shape[d] = sympy.Integer(1)
        gk = b.emit("reshape", (g,), {"shape": tuple(shape)}, hint)
    ge = b.emit("expand", (gk,), {"shape": xt.shape}, hint)
    if n.op == "mean":
        size = xt.shape[d]
        if not size.is_Integer:
            raise GradError(f"differentiate: mean over the dynamic dim {size} (%{out}) is not supported",
                            where=f"node %{out} = mean", hint="make that dim static, or use sum / count")
        ge = b.emit("div", (ge, b.const(float(int(size)), b.types[g].dtype)), hint=hint)
    return [fit(b, n, 0, ge)]


# ----------------------------------------------------------------------------- pointwise

def _unary(name: str, ref: Callable, doc: str, float_only: bool = True, flops: int = 1,
           vjp: Vjp | None = None) -> None:
    def rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
        if float_only and not ts[0].dtype.is_float:
            raise TypeRuleError(f"{name} needs a float input, got {ts[0].dtype.value}")
        return (ts[0],)
    register(OpDef(name, POINTWISE, (1, 1), rule, ref, doc=doc, flops=flops, vjp=vjp))


_unary("neg", torch.neg, "-x", float_only=False, vjp=_neg_vjp)
_unary("abs", torch.abs, "|x|", float_only=False)
_unary("exp", torch.exp, "e^x", vjp=_exp_vjp)
_unary("log", torch.log, "natural log", vjp=_log_vjp)
_unary("sqrt", torch.sqrt, "square root", vjp=_sqrt_vjp)
_unary("rsqrt", torch.rsqrt, "1/sqrt(x)")
_unary("reciprocal", torch.reciprocal, "1/x", vjp=_reciprocal_vjp)
_unary("sigmoid", torch.sigmoid, "1/(1+e^-x)", flops=3, vjp=_sigmoid_vjp)
_unary("silu", F.silu, "x*sigmoid(x)", flops=4)
_unary("tanh", torch.tanh, "tanh", flops=4, vjp=_tanh_vjp)
_unary("cos", torch.cos, "cosine (rotary embeddings computed in the graph)", flops=8, vjp=_cos_vjp)
_unary("sin", torch.sin, "sine (rotary embeddings computed in the graph)", flops=8, vjp=_sin_vjp)
_unary("relu", torch.relu, "max(x, 0)", float_only=False)
_unary("gelu", lambda x: F.gelu(x), "exact (erf) GELU", flops=8)


def _binary(name: str, ref: Callable, doc: str, out_bool: bool = False, true_div: bool = False,
            commutative: bool = False, flops: int = 1, vjp: Vjp | None = None) -> None:
    def rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
        try:
            shape = broadcast_shapes(ts[0].shape, ts[1].shape)
        except ValueError as e:
            raise TypeRuleError(f"{name}: {e} ({ts[0]} vs {ts[1]})") from None
        dt = DType.bool if out_bool else _result_dtype(ts)
        if true_div and not dt.is_float:
            dt = DType.f32  # torch.div is true division: integer (and bool) inputs give float32
        return (TensorType(dt, shape),)
    register(OpDef(name, POINTWISE, (2, 2), rule, ref, doc=doc, commutative=commutative, flops=flops, vjp=vjp))


_binary("add", torch.add, "a + b", commutative=True, vjp=_add_vjp)
_binary("sub", torch.sub, "a - b", vjp=_sub_vjp)
_binary("mul", torch.mul, "a * b", commutative=True, vjp=_mul_vjp)
_binary("div", torch.div, "a / b (true division)", true_div=True, vjp=_div_vjp)
_binary("maximum", torch.maximum, "elementwise max", commutative=True, vjp=_maxmin_vjp)
_binary("minimum", torch.minimum, "elementwise min", commutative=True, vjp=_maxmin_vjp)
_binary("pow", torch.pow, "a ** b", flops=4, vjp=_pow_vjp)
_binary("lt", torch.lt, "a < b", out_bool=True)
_binary("le", torch.le, "a <= b", out_bool=True)
_binary("gt", torch.gt, "a > b", out_bool=True)
_binary("ge", torch.ge, "a >= b", out_bool=True)
_binary("eq", torch.eq, "a == b", out_bool=True, commutative=True)


def _where_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    if ts[0].dtype is not DType.bool:
        raise TypeRuleError(f"where: condition must be bool, got {ts[0].dtype.value}")
    try:
        shape = broadcast_shapes(ts[0].shape, ts[1].shape, ts[2].shape)
    except ValueError as e:
        raise TypeRuleError(f"where: {e}") from None
    return (TensorType(_result_dtype(ts[1:]), shape),)


register(OpDef("where", POINTWISE, (3, 3), _where_rule, torch.where, doc="cond ? a : b", vjp=_where_vjp))


def _cast_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    return (ts[0].with_dtype(a["dtype"]),)


register(OpDef("cast", POINTWISE, (1, 1), _cast_rule, lambda x, dtype: x.to(dtype.torch),
               attrs={"dtype": AttrSpec((DType,))}, doc="convert element type", flops=0, vjp=_cast_vjp))


def _const_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    v, dt = a["value"], a["dtype"]
    if isinstance(v, bool) and dt is not DType.bool:
        raise TypeRuleError("const: bool value needs dtype bool")
    if isinstance(v, float) and not dt.is_float:
        raise TypeRuleError(f"const: float value {v!r} with non-float dtype {dt.value}")
    return (TensorType(dt, ()),)


register(OpDef("const", SOURCE, (0, 0), _const_rule,
               lambda value, dtype: torch.tensor(value, dtype=dtype.torch),
               attrs={"value": AttrSpec((int, float, bool)), "dtype": AttrSpec((DType,))},
               doc="a 0-d constant"))


def _rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    rot = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (xf * cos.float() + rot * sin.float()).to(x.dtype)


def _rope_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    x, cos, sin = ts
    if not x.dtype.is_float or x.rank < 1:
        raise TypeRuleError(f"rope: x must be a float tensor, got {x}")
    last = x.shape[-1]
    if last.is_Integer and int(last) % 2:
        raise TypeRuleError(f"rope: last dim must be even (interleaved pairs), got {last}")
    for nm, t in (("cos", cos), ("sin", sin)):
        if t.rank < 1 or not dims_equal(t.shape[-1], last):
            raise TypeRuleError(f"rope: {nm} last dim must equal x's ({last}), got {t}")
        try:
            if broadcast_shapes(x.shape, t.shape) != x.shape:
                raise ValueError("would grow x")
        except ValueError as e:
            raise TypeRuleError(f"rope: {nm} {t} does not broadcast to x {x}: {e}") from None
    return (x,)


register(OpDef("rope", POINTWISE, (3, 3), _rope_rule, _rope_ref,
               flops=3, doc="interleaved-pair rotary embedding in fp32: x*cos + rotate_pairs(x)*sin, cast back"))


# ----------------------------------------------------------------------------- reductions

def _reduce(name: str, ref: Callable, doc: str, vjp: Vjp | None = None) -> None:
    def rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
        x = ts[0]
        d = norm_dim(a["dim"], x.rank, name)
        if name == "mean" and not x.dtype.is_float:
            raise TypeRuleError("mean needs a float input")
        shape = list(x.shape)
        if a["keepdim"]:
            shape[d] = sympy.Integer(1)
        else:
            del shape[d]
        dt = DType.i64 if name == "sum" and not x.dtype.is_float else x.dtype  # torch.sum widens ints and bools
        return (TensorType(dt, tuple(shape)),)
    register(OpDef(name, REDUCTION, (1, 1), rule, ref, doc=doc, last_dim_reduction=True, vjp=vjp,
                   attrs={"dim": AttrSpec((int,)), "keepdim": AttrSpec((bool,), required=False, default=False)}))


_reduce("sum", lambda x, dim, keepdim: torch.sum(x, dim=dim, keepdim=keepdim), "sum over one dim", _sum_mean_vjp)
_reduce("mean", lambda x, dim, keepdim: torch.mean(x, dim=dim, keepdim=keepdim), "mean over one dim", _sum_mean_vjp)
_reduce("amax", lambda x, dim, keepdim: torch.amax(x, dim=dim, keepdim=keepdim), "max over one dim")


def _softmax_like(name: str, ref: Callable, doc: str) -> None:
    def rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
        if not ts[0].dtype.is_float:
            raise TypeRuleError(f"{name} needs a float input")
        norm_dim(a["dim"], ts[0].rank, name)
        return (ts[0],)
    register(OpDef(name, REDUCTION, (1, 1), rule, ref, doc=doc, attrs={"dim": AttrSpec((int,))},
                   last_dim_reduction=True))


_softmax_like("softmax", lambda x, dim: torch.softmax(x.float(), dim=dim).to(x.dtype),
              "softmax computed in fp32, one cast at the end")
_softmax_like("log_softmax", lambda x, dim: torch.log_softmax(x.float(), dim=dim).to(x.dtype),
              "log-softmax computed in fp32, one cast at the end")


def _rms_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def _rms_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    x, w = ts
    if not x.dtype.is_float or x.rank < 1:
        raise TypeRuleError(f"rms_norm: x must be a float tensor, got {x}")
    if w.rank != 1 or not dims_equal(w.shape[0], x.shape[-1]):
        raise TypeRuleError(f"rms_norm: weight must be [{x.shape[-1]}], got {w}")
    if a["eps"] <= 0:
        raise TypeRuleError(f"rms_norm: eps must be > 0, got {a['eps']}")
    return (x,)


register(OpDef("rms_norm", REDUCTION, (2, 2), _rms_rule, _rms_ref, attrs={"eps": AttrSpec((float,))},
               last_dim_reduction=True,
               doc="RMSNorm over the last dim in fp32 including the weight multiply; one cast at the end"))


# ----------------------------------------------------------------------------- GEMMs

def _linear_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    x, w = ts[0], ts[1]
    if x.rank < 1 or w.rank != 2:
        raise TypeRuleError(f"linear: want x[..., K] and weight [N, K], got {x} and {w}")
    if not dims_equal(x.shape[-1], w.shape[1]):
        raise TypeRuleError(f"linear: K mismatch: x {x} vs weight {w}")
    if x.dtype != w.dtype or not x.dtype.is_float:
        raise TypeRuleError(f"linear: x and weight need the same float dtype, got {x.dtype.value} and {w.dtype.value}")
    if len(ts) == 3:
        b = ts[2]
        if b.rank != 1 or not dims_equal(b.shape[0], w.shape[0]) or b.dtype != x.dtype:
            raise TypeRuleError(f"linear: bias must be {x.dtype.value}[{w.shape[0]}], got {b}")
    return (TensorType(x.dtype, x.shape[:-1] + (w.shape[0],)),)


register(OpDef("linear", GEMM, (2, 3), _linear_rule, lambda x, w, b=None: F.linear(x, w, b),
               doc="x @ weight.T (+ bias); fp32 accumulation"))


def _matmul_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    x, y = ts
    if x.rank < 2 or y.rank < 2:
        raise TypeRuleError(f"matmul: both operands need rank >= 2, got {x} and {y}")
    if not dims_equal(x.shape[-1], y.shape[-2]):
        raise TypeRuleError(f"matmul: K mismatch: {x} @ {y}")
    if x.dtype != y.dtype or not x.dtype.is_float:
        raise TypeRuleError(f"matmul: operands need the same float dtype, got {x.dtype.value} and {y.dtype.value}")
    try:
        batch = broadcast_shapes(x.shape[:-2], y.shape[:-2])
    except ValueError as e:
        raise TypeRuleError(f"matmul: batch dims: {e}") from None
    return (TensorType(x.dtype, batch + (x.shape[-2], y.shape[-1])),)


register(OpDef("matmul", GEMM, (2, 2), _matmul_rule, torch.matmul, doc="batched a @ b; fp32 accumulation"))


def _attention_ref(q, k, v, causal: bool, scale: float):
    # fp32 reference: scores, causal mask aligned to the end (decode-friendly), softmax, PV.
    qf, kf, vf = q.float(), k.float(), v.float()
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if causal:
        sq, sk = q.shape[-2], k.shape[-2]
        mask = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
        s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), vf).to(q.dtype)


def _attention_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    q, k, v = ts
    if not (q.rank == k.rank == v.rank >= 2):
        raise TypeRuleError(f"attention: q, k, v need the same rank >= 2, got {q}, {k}, {v}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_float:
        raise TypeRuleError("attention: q, k, v need one float dtype")
    if not dims_equal(q.shape[-1], k.shape[-1]):
        raise TypeRuleError(f"attention: q and k head dims differ: {q} vs {k}")
    if not dims_equal(k.shape[-2], v.shape[-2]):
        raise TypeRuleError(f"attention: k and v lengths differ: {k} vs {v}")
    for i, (dq, dk, dv) in enumerate(zip(q.shape[:-2], k.shape[:-2], v.shape[:-2])):
        if not (dims_equal(dq, dk) and dims_equal(dk, dv)):
            raise TypeRuleError(f"attention: batch dim {i} differs: {q}, {k}, {v}")
    return (TensorType(q.dtype, q.shape[:-1] + (v.shape[-1],)),)


register(OpDef("attention", ATTENTION, (3, 3), _attention_rule, _attention_ref,
               attrs={"causal": AttrSpec((bool,)), "scale": AttrSpec((float,))},
               doc="softmax(q k^T * scale [+ causal mask]) v, fp32 softmax; q[..., Sq, D], k[..., Sk, D], v[..., Sk, Dv]"))


# ----------------------------------------------------------------------------- layout

def _reshape_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    x = ts[0]
    shape = tuple(sympy.Integer(d) if isinstance(d, int) else d for d in a["shape"])
    if any(d.is_Integer and int(d) < 0 for d in shape):
        raise TypeRuleError(f"reshape: negative size in {a['shape']} (the frontend resolves -1)")
    new = TensorType(x.dtype, shape)
    if not dims_equal(new.numel, x.numel):
        raise TypeRuleError(f"reshape: {x} has {x.numel} elements, shape {a['shape']} has {new.numel}")
    return (new,)


register(OpDef("reshape", LAYOUT, (1, 1), _reshape_rule,
               lambda x, shape: x.reshape(tuple(int(d) for d in shape)),
               attrs={"shape": AttrSpec((tuple,))}, index_map=True, vjp=_reshape_vjp,
               doc="row-major reshape (free for contiguous buffers)"))


def _permute_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    x, dims = ts[0], a["dims"]
    if sorted(dims) != list(range(x.rank)):
        raise TypeRuleError(f"permute: dims {dims} are not a permutation of 0..{x.rank - 1}")
    return (x.with_shape(tuple(x.shape[d] for d in dims)),)


register(OpDef("permute", LAYOUT, (1, 1), _permute_rule, lambda x, dims: x.permute(dims).contiguous(),
               attrs={"dims": AttrSpec((tuple,))}, index_map=True, vjp=_permute_vjp,
               doc="reorder dims (materialized contiguous)"))


def _expand_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    x = ts[0]
    shape = tuple(sympy.Integer(d) if isinstance(d, int) else d for d in a["shape"])
    try:
        if broadcast_shapes(x.shape, shape) != shape:
            raise ValueError("not an expansion")
    except ValueError as e:
        raise TypeRuleError(f"expand: {x} cannot expand to {a['shape']}: {e}") from None
    return (x.with_shape(shape),)


register(OpDef("expand", LAYOUT, (1, 1), _expand_rule,
               lambda x, shape: x.expand(tuple(int(d) for d in shape)).contiguous(),
               attrs={"shape": AttrSpec((tuple,))}, index_map=True, vjp=_expand_vjp, doc="broadcast to a shape"))


def _slice_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    x = ts[0]
    d = norm_dim(a["dim"], x.rank, "slice")
    start, end, step = a["start"], a["end"], a["step"]
    if step < 1 or start < 0:
        raise TypeRuleError(f"slice: need start >= 0 and step >= 1, got start={start} step={step}")
    size = x.shape[d]
    if end is not None and end < 0:                  # from the end: x[:-1] of a symbolic dim stays symbolic
        stop = size + end
    else:
        stop = size if end is None else sympy.Min(sympy.Integer(end), size)
    n = sympy.ceiling((stop - start) / step)
    if n.is_Integer and int(n) <= 0:
        raise TypeRuleError(f"slice: empty result slicing dim {d} of {x} [{start}:{end}:{step}]")
    if end is not None and end < 0 and not n.is_Integer and (n - 1).is_nonnegative is not True:
        raise TypeRuleError(f"slice: [{start}:{end}:{step}] of dim {d} of {x} has {n} elements, which may be 0 "
                            "(the IR has no empty tensors)")
    shape = list(x.shape)
    shape[d] = sympy.simplify(n)
    return (x.with_shape(tuple(shape)),)


def _slice_ref(x, dim, start, end, step):
    idx = [slice(None)] * x.dim()
    idx[dim] = slice(start, end, step)
    return x[tuple(idx)].contiguous()


register(OpDef("slice", LAYOUT, (1, 1), _slice_rule, _slice_ref,
               attrs={"dim": AttrSpec((int,)), "start": AttrSpec((int,)),
                      "end": AttrSpec((int,), required=False, default=None),
                      "step": AttrSpec((int,), required=False, default=1)}, index_map=True,
               doc="x[start:end:step] along dim (a negative end counts from the end: the size stays symbolic)"))


def _cat_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    d = norm_dim(a["dim"], ts[0].rank, "cat")
    first = ts[0]
    total = sympy.Integer(0)
    for t in ts:
        if t.rank != first.rank or t.dtype != first.dtype:
            raise TypeRuleError(f"cat: inputs need one dtype and rank, got {first} and {t}")
        for i in range(t.rank):
            if i != d and not dims_equal(t.shape[i], first.shape[i]):
                raise TypeRuleError(f"cat: dim {i} differs: {first} vs {t}")
        total = total + t.shape[d]
    shape = list(first.shape)
    shape[d] = total
    return (first.with_shape(tuple(shape)),)


register(OpDef("cat", LAYOUT, (1, 64), _cat_rule, lambda *xs, dim: torch.cat(xs, dim=dim),
               attrs={"dim": AttrSpec((int,))}, doc="concatenate along dim"))


def _embedding_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    w, ids = ts
    if w.rank != 2 or ids.dtype not in (DType.i32, DType.i64):
        raise TypeRuleError(f"embedding: want weight [V, H] and integer ids, got {w} and {ids}")
    return (TensorType(w.dtype, ids.shape + (w.shape[1],)),)


register(OpDef("embedding", GEMM, (2, 2), _embedding_rule, lambda w, ids: F.embedding(ids, w),
               doc="rows of weight gathered by ids"))


CUMSUM = "cumsum"


def _cumsum_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    (x,) = ts
    d = norm_dim(a["dim"], x.rank, CUMSUM)
    if x.rank < 1 or d != x.rank - 1:
        raise TypeRuleError(f"cumsum: only the last dim is supported (dim={a['dim']} of {x})")
    if x.dtype in (DType.fp8e4m3, DType.fp8e5m2):
        raise TypeRuleError(f"cumsum: no cumulative sum of {x.dtype.value} codes")
    return (x if x.dtype.is_float else TensorType(DType.i64, x.shape),)


def cumsum_ref(x: torch.Tensor, *, dim: int) -> torch.Tensor:
    """torch.cumsum; bool / integer inputs sum in int64 (as torch does), floats in fp32 rounded to the input
    dtype at each position (what the kernel does; torch's bf16 cumsum on CPU does the same)."""
    if x.dtype.is_floating_point:
        return torch.cumsum(x.float(), dim).to(x.dtype)
    return torch.cumsum(x, dim, dtype=torch.int64)


register(OpDef(CUMSUM, CUMSUM, (1, 1), _cumsum_rule, cumsum_ref, attrs={"dim": AttrSpec((int,))},
               doc="inclusive cumulative sum along the last dim (bool / int -> i64, exact; float in fp32)"))


INDEX = "index"
MAX_INDEX_TENSORS = 8


def _index_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    x, idx = ts[0], ts[1:]
    if not 1 <= len(idx) <= min(x.rank, MAX_INDEX_TENSORS):
        raise TypeRuleError(f"index: {len(idx)} index tensors for {x} (1 to min(rank, {MAX_INDEX_TENSORS}))")
    for i in idx:
        if i.dtype not in (DType.i32, DType.i64) or not dims_equal(i.shape, idx[0].shape):
            raise TypeRuleError(f"index: index tensors must be i32/i64 of one shape, got {', '.join(map(str, idx))}")
    return (TensorType(x.dtype, tuple(idx[0].shape) + tuple(x.shape[len(idx):])),)


def index_ref(x: torch.Tensor, *idx: torch.Tensor) -> torch.Tensor:
    """x[i0, ..., ik-1] (torch's advanced indexing of the first k dims; negative indices count from the end)."""
    return x[tuple(i.long() for i in idx)]


register(OpDef(INDEX, INDEX, (2, 1 + MAX_INDEX_TENSORS), _index_rule, index_ref,
               doc="x[i0, ..., ik-1]: advanced indexing of the first k dims by k integer tensors of one shape"))


# `call` runs a fused kernel defined in the graph; its type rule is the kernel body's.
register(OpDef("call", CALL, (0, 1 << 16), lambda ts, a: (), lambda *a, **k: None,
               attrs={"kernel": AttrSpec((str,))}, doc="invoke a fused kernel by name"))
