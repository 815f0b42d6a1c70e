"""The one op table: every IR op declared once.

Each :class:`OpDef` carries the op's type rule (shapes as sympy expressions), its eager
torch reference (what the reference interpreter runs, and what compiled kernels are
checked against), its attribute schema, and its kind (which fusion families may take
it). The verifier, the interpreter, the printer/parser and the fusion pass all read it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import sympy
import torch
import torch.nn.functional as F

from .types import DType, TensorType, broadcast_shapes

POINTWISE = "pointwise"
REDUCTION = "reduction"
GEMM = "gemm"
ATTENTION = "attention"
LAYOUT = "layout"
SOURCE = "source"
CALL = "call"


class TypeRuleError(Exception):
    """A type rule rejected its inputs; the verifier wraps it with the IR window."""


@dataclass(frozen=True)
class AttrSpec:
    types: tuple[type, ...]
    required: bool = True
    default: Any = None
    doc: str = ""


@dataclass(frozen=True)
class OpDef:
    name: str
    kind: str
    arity: tuple[int, int]                       # (min inputs, max inputs)
    type_rule: Callable[[Sequence[TensorType], Mapping[str, Any]], tuple[TensorType, ...]]
    reference: Callable[..., Any]
    attrs: Mapping[str, AttrSpec] = field(default_factory=dict)
    doc: str = ""
    n_outputs: int = 1

    def infer(self, in_types: Sequence[TensorType], attrs: Mapping[str, Any]) -> tuple[TensorType, ...]:
        lo, hi = self.arity
        if not lo <= len(in_types) <= hi:
            want = str(lo) if lo == hi else f"{lo}..{hi}"
            raise TypeRuleError(f"{self.name} takes {want} inputs, got {len(in_types)}")
        for k in attrs:
            if k not in self.attrs:
                raise TypeRuleError(f"{self.name} has no attribute {k!r} (known: {', '.join(self.attrs) or 'none'})")
        full = self.with_defaults(attrs)
        for k, spec in self.attrs.items():
            if k not in full:
                raise TypeRuleError(f"{self.name} needs attribute {k!r}")
            v = full[k]
            if not (v is None and not spec.required) and not isinstance(v, spec.types):
                raise TypeRuleError(f"{self.name}: attribute {k}={v!r} should be {'/'.join(t.__name__ for t in spec.types)}")
        return self.type_rule(in_types, full)

    def with_defaults(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        full = {k: s.default for k, s in self.attrs.items() if not s.required}
        full.update(attrs)
        return full


OPS: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    if op.name in OPS:
        raise ValueError(f"op {op.name!r} registered twice")
    OPS[op.name] = op
    return op


def get_op(name: str) -> OpDef:
    return OPS[name]


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


def _norm_dim(dim: int, rank: int, op: str) -> int:
    if not -rank <= dim < max(rank, 1):
        raise TypeRuleError(f"{op}: dim {dim} out of range for rank {rank}")
    return dim % rank if rank else 0


def _same(a: sympy.Expr, b: sympy.Expr) -> bool:
    return sympy.simplify(a - b) == 0


# ----------------------------------------------------------------------------- pointwise

def _unary(name: str, ref: Callable, doc: str, float_only: bool = True) -> None:
    def rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
        if float_only and not ts[0].dtype.is_float:
            raise TypeRuleError(f"{name} needs a float input, got {ts[0].dtype.value}")
        return (ts[0],)
    register(OpDef(name, POINTWISE, (1, 1), rule, ref, doc=doc))


_unary("neg", torch.neg, "-x", float_only=False)
_unary("abs", torch.abs, "|x|", float_only=False)
_unary("exp", torch.exp, "e^x")
_unary("log", torch.log, "natural log")
_unary("sqrt", torch.sqrt, "square root")
_unary("rsqrt", torch.rsqrt, "1/sqrt(x)")
_unary("reciprocal", torch.reciprocal, "1/x")
_unary("sigmoid", torch.sigmoid, "1/(1+e^-x)")
_unary("silu", F.silu, "x*sigmoid(x)")
_unary("tanh", torch.tanh, "tanh")
_unary("relu", torch.relu, "max(x, 0)", float_only=False)
_unary("gelu", lambda x: F.gelu(x), "exact (erf) GELU")


def _binary(name: str, ref: Callable, doc: str, out_bool: bool = False, true_div: bool = False) -> None:
    def rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
        try:
            shape = broadcast_shapes(ts[0].shape, ts[1].shape)
        except ValueError as e:
            raise TypeRuleError(f"{name}: {e} ({ts[0]} vs {ts[1]})") from None
        dt = DType.bool if out_bool else _result_dtype(ts)
        if true_div and not dt.is_float:
            dt = DType.f32  # torch.div is true division: integer (and bool) inputs give float32
        return (TensorType(dt, shape),)
    register(OpDef(name, POINTWISE, (2, 2), rule, ref, doc=doc))


_binary("add", torch.add, "a + b")
_binary("sub", torch.sub, "a - b")
_binary("mul", torch.mul, "a * b")
_binary("div", torch.div, "a / b (true division)", true_div=True)
_binary("maximum", torch.maximum, "elementwise max")
_binary("minimum", torch.minimum, "elementwise min")
_binary("pow", torch.pow, "a ** b")
_binary("lt", torch.lt, "a < b", out_bool=True)
_binary("le", torch.le, "a <= b", out_bool=True)
_binary("gt", torch.gt, "a > b", out_bool=True)
_binary("ge", torch.ge, "a >= b", out_bool=True)
_binary("eq", torch.eq, "a == b", out_bool=True)


def _where_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    if ts[0].dtype is not DType.bool:
        raise TypeRuleError(f"where: condition must be bool, got {ts[0].dtype.value}")
    try:
        shape = broadcast_shapes(ts[0].shape, ts[1].shape, ts[2].shape)
    except ValueError as e:
        raise TypeRuleError(f"where: {e}") from None
    return (TensorType(_result_dtype(ts[1:]), shape),)


register(OpDef("where", POINTWISE, (3, 3), _where_rule, torch.where, doc="cond ? a : b"))


def _cast_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    return (ts[0].with_dtype(a["dtype"]),)


register(OpDef("cast", POINTWISE, (1, 1), _cast_rule, lambda x, dtype: x.to(dtype.torch),
               attrs={"dtype": AttrSpec((DType,))}, doc="convert element type"))


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
        if t.rank < 1 or not _same(t.shape[-1], last):
            raise TypeRuleError(f"rope: {nm} last dim must equal x's ({last}), got {t}")
        try:
            if broadcast_shapes(x.shape, t.shape) != x.shape:
                raise ValueError("would grow x")
        except ValueError as e:
            raise TypeRuleError(f"rope: {nm} {t} does not broadcast to x {x}: {e}") from None
    return (x,)


register(OpDef("rope", POINTWISE, (3, 3), _rope_rule, _rope_ref,
               doc="interleaved-pair rotary embedding in fp32: x*cos + rotate_pairs(x)*sin, cast back"))


# ----------------------------------------------------------------------------- reductions

def _reduce(name: str, ref: Callable, doc: str) -> None:
    def rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
        x = ts[0]
        d = _norm_dim(a["dim"], x.rank, name)
        if name == "mean" and not x.dtype.is_float:
            raise TypeRuleError("mean needs a float input")
        shape = list(x.shape)
        if a["keepdim"]:
            shape[d] = sympy.Integer(1)
        else:
            del shape[d]
        dt = DType.i64 if name == "sum" and not x.dtype.is_float else x.dtype  # torch.sum widens ints and bools
        return (TensorType(dt, tuple(shape)),)
    register(OpDef(name, REDUCTION, (1, 1), rule, ref, doc=doc,
                   attrs={"dim": AttrSpec((int,)), "keepdim": AttrSpec((bool,), required=False, default=False)}))


_reduce("sum", lambda x, dim, keepdim: torch.sum(x, dim=dim, keepdim=keepdim), "sum over one dim")
_reduce("mean", lambda x, dim, keepdim: torch.mean(x, dim=dim, keepdim=keepdim), "mean over one dim")
_reduce("amax", lambda x, dim, keepdim: torch.amax(x, dim=dim, keepdim=keepdim), "max over one dim")


def _softmax_like(name: str, ref: Callable, doc: str) -> None:
    def rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
        if not ts[0].dtype.is_float:
            raise TypeRuleError(f"{name} needs a float input")
        _norm_dim(a["dim"], ts[0].rank, name)
        return (ts[0],)
    register(OpDef(name, REDUCTION, (1, 1), rule, ref, doc=doc, attrs={"dim": AttrSpec((int,))}))


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
    if w.rank != 1 or not _same(w.shape[0], x.shape[-1]):
        raise TypeRuleError(f"rms_norm: weight must be [{x.shape[-1]}], got {w}")
    if a["eps"] <= 0:
        raise TypeRuleError(f"rms_norm: eps must be > 0, got {a['eps']}")
    return (x,)


register(OpDef("rms_norm", REDUCTION, (2, 2), _rms_rule, _rms_ref, attrs={"eps": AttrSpec((float,))},
               doc="RMSNorm over the last dim in fp32 including the weight multiply; one cast at the end"))


# ----------------------------------------------------------------------------- GEMMs

def _linear_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    x, w = ts[0], ts[1]
    if x.rank < 1 or w.rank != 2:
        raise TypeRuleError(f"linear: want x[..., K] and weight [N, K], got {x} and {w}")
    if not _same(x.shape[-1], w.shape[1]):
        raise TypeRuleError(f"linear: K mismatch: x {x} vs weight {w}")
    if x.dtype != w.dtype or not x.dtype.is_float:
        raise TypeRuleError(f"linear: x and weight need the same float dtype, got {x.dtype.value} and {w.dtype.value}")
    if len(ts) == 3:
        b = ts[2]
        if b.rank != 1 or not _same(b.shape[0], w.shape[0]) or b.dtype != x.dtype:
            raise TypeRuleError(f"linear: bias must be {x.dtype.value}[{w.shape[0]}], got {b}")
    return (TensorType(x.dtype, x.shape[:-1] + (w.shape[0],)),)


register(OpDef("linear", GEMM, (2, 3), _linear_rule, lambda x, w, b=None: F.linear(x, w, b),
               doc="x @ weight.T (+ bias); fp32 accumulation"))


def _matmul_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    x, y = ts
    if x.rank < 2 or y.rank < 2:
        raise TypeRuleError(f"matmul: both operands need rank >= 2, got {x} and {y}")
    if not _same(x.shape[-1], y.shape[-2]):
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
    if not _same(q.shape[-1], k.shape[-1]):
        raise TypeRuleError(f"attention: q and k head dims differ: {q} vs {k}")
    if not _same(k.shape[-2], v.shape[-2]):
        raise TypeRuleError(f"attention: k and v lengths differ: {k} vs {v}")
    for i, (dq, dk, dv) in enumerate(zip(q.shape[:-2], k.shape[:-2], v.shape[:-2])):
        if not (_same(dq, dk) and _same(dk, dv)):
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
    if sympy.simplify(new.numel - x.numel) != 0:
        raise TypeRuleError(f"reshape: {x} has {x.numel} elements, shape {a['shape']} has {new.numel}")
    return (new,)


register(OpDef("reshape", LAYOUT, (1, 1), _reshape_rule,
               lambda x, shape: x.reshape(tuple(int(d) for d in shape)),
               attrs={"shape": AttrSpec((tuple,))}, doc="row-major reshape (free for contiguous buffers)"))


def _permute_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    x, dims = ts[0], a["dims"]
    if sorted(dims) != list(range(x.rank)):
        raise TypeRuleError(f"permute: dims {dims} are not a permutation of 0..{x.rank - 1}")
    return (x.with_shape(tuple(x.shape[d] for d in dims)),)


register(OpDef("permute", LAYOUT, (1, 1), _permute_rule, lambda x, dims: x.permute(dims).contiguous(),
               attrs={"dims": AttrSpec((tuple,))}, doc="reorder dims (materialized contiguous)"))


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
               attrs={"shape": AttrSpec((tuple,))}, doc="broadcast to a shape"))


def _slice_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    x = ts[0]
    d = _norm_dim(a["dim"], x.rank, "slice")
    start, end, step = a["start"], a["end"], a["step"]
    if step < 1 or start < 0:
        raise TypeRuleError(f"slice: need start >= 0 and step >= 1, got start={start} step={step}")
    size = x.shape[d]
    stop = size if end is None else sympy.Min(sympy.Integer(end), size)
    n = sympy.ceiling((stop - start) / step)
    if n.is_Integer and int(n) <= 0:
        raise TypeRuleError(f"slice: empty result slicing dim {d} of {x} [{start}:{end}:{step}]")
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
                      "step": AttrSpec((int,), required=False, default=1)},
               doc="x[start:end:step] along dim"))


def _cat_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    d = _norm_dim(a["dim"], ts[0].rank, "cat")
    first = ts[0]
    total = sympy.Integer(0)
    for t in ts:
        if t.rank != first.rank or t.dtype != first.dtype:
            raise TypeRuleError(f"cat: inputs need one dtype and rank, got {first} and {t}")
        for i in range(t.rank):
            if i != d and not _same(t.shape[i], first.shape[i]):
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


# `call` runs a fused kernel defined in the graph; its type rule is the kernel body's.
register(OpDef("call", CALL, (0, 1 << 16), lambda ts, a: (), lambda *a, **k: None,
               attrs={"kernel": AttrSpec((str,))}, doc="invoke a fused kernel by name"))


def is_commutative(op: str) -> bool:
    return op in ("add", "mul", "maximum", "minimum", "eq")


def float_repr(v: float) -> str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return repr(v)


from . import ops_fp8  # noqa: E402,F401
from . import ops_loss  # noqa: E402,F401
from . import ops_moe  # noqa: E402,F401
from . import ops_mla  # noqa: E402,F401
from . import ops_moe_fp8  # noqa: E402,F401
