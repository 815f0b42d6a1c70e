"""Shared hypothesis strategies: dtypes, shapes (static and symbolic), printable attribute
values, random well-typed IR graphs, and concrete inputs for them.

Graphs are drawn op by op from the op table: every output type comes from
`OPS[op].infer(...)`, so a drawn graph always verifies. They are numerically safe by
construction: each value carries a bound on its magnitude (and a lower bound when it is
known positive); `log`/`sqrt`/`rsqrt`/`reciprocal`/`div` only take values known to be
bounded away from zero (e.g. `exp(x)`, `x*x+1`), `exp` only takes small values, and no op
may produce values above `MAX_BOUND`. Inputs from `concrete_inputs` lie in [-1, 1].
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from dsr_compiler.ir import (
    OPS,
    DType,
    Graph,
    GraphBuilder,
    Node,
    TensorType,
    Value,
    sym,
)
from dsr_compiler.ir.ops import TypeRuleError
from dsr_compiler.ir.types import broadcast_shapes
from hypothesis import strategies as st

T = sym("T")
B = sym("B")
SYMBOLS = (T, B)
SYMBOL_MAX = 5            # symbols are bound to 1..SYMBOL_MAX by `symbol_envs`
MAX_BOUND = 1e4           # no drawn value may exceed this magnitude
MIN_POSITIVE = 1e-2       # log/sqrt/rsqrt/reciprocal/div need values >= this

ALL_DTYPES = tuple(DType)
FLOAT_DTYPES = (DType.f32, DType.f16, DType.bf16)   # the ones torch computes with on CPU

# ----------------------------------------------------------------------------- dtypes, dims, shapes

dtypes = st.sampled_from(ALL_DTYPES)
float_dtypes = st.sampled_from(FLOAT_DTYPES)


def dims(symbolic: bool = True) -> st.SearchStrategy[Any]:
    """A dimension: a small int, or (when symbolic) a symbol or a simple expression of one."""
    static = st.integers(1, 8)
    if not symbolic:
        return static
    return st.one_of(static, st.sampled_from([T, B, 2 * T, T + 1, B * T]))


def shapes(min_rank: int = 0, max_rank: int = 3, symbolic: bool = True) -> st.SearchStrategy[tuple]:
    return st.lists(dims(symbolic), min_size=min_rank, max_size=max_rank).map(tuple)


def tensor_types(min_rank: int = 0, max_rank: int = 3, symbolic: bool = True,
                 dtype: st.SearchStrategy[DType] = dtypes) -> st.SearchStrategy[TensorType]:
    return st.builds(TensorType, dtype, shapes(min_rank, max_rank, symbolic))


# ----------------------------------------------------------------------------- attribute values

# '\n', '\r', '\x85', '\u2028' ... split lines (str.splitlines): the text IR is line based,
# so strings carrying line breaks cannot be printed (see the report / test_ir_roundtrip).
_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=12)
_INTERESTING_TEXT = st.sampled_from(['say "hi"', 'a"b, c', "x # not a comment", "it's", "back\\slash",
                                     "paren) (x", " = ", "", "tab\tsep", "%v", "@k1", "{ }"])
strings = st.one_of(_INTERESTING_TEXT, _TEXT)
finite_or_inf_floats = st.floats(allow_nan=False)          # includes inf, -inf, -0.0, subnormals
scalar_attrs = st.one_of(
    st.integers(-(1 << 40), 1 << 40), st.sampled_from([0, -1, 1, 1 << 70]), finite_or_inf_floats,
    st.sampled_from([1e-06, 0.5, -2.5, 1e30]), strings, st.booleans(), st.none(), dtypes,
    st.sampled_from([T, B, 2 * T, T + 1, B * T, T - 1]))
attr_values = st.recursive(scalar_attrs, lambda inner: st.lists(inner, max_size=4).map(tuple), max_leaves=8)
attr_names = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
origins = st.one_of(st.just(""), st.sampled_from(["layers.0.mlp.w1", "norm", "attn.wq_a", "model.layers.11.ffn"]))


# ----------------------------------------------------------------------------- random graphs

@dataclass(frozen=True)
class Meta:
    """What the generator knows about a value's magnitude: |v| <= bound, and v >= lo > 0 if lo."""

    bound: float
    lo: float | None = None


def _upper(d: sympy.Expr) -> int:
    """An upper bound of a dimension when symbols are at most SYMBOL_MAX."""
    return int(sympy.sympify(d).subs({s: SYMBOL_MAX for s in d.free_symbols}))


class _GraphDraw:
    """The state of one random graph while it is drawn."""

    def __init__(self, draw, name: str, symbolic: bool):
        self.draw = draw
        self.b = GraphBuilder(name)
        self.types: dict[str, TensorType] = {}
        self.meta: dict[str, Meta] = {}
        self.order: list[str] = []
        self.symbolic = symbolic

    # --- building
    def add_input(self, hint: str, t: TensorType, param: bool = False) -> str:
        name = self.b.fresh(hint)
        self.b.add_input(name, t, param=param)
        self.types[name], self.meta[name] = t, Meta(1.0)
        self.order.append(name)
        return name

    def emit(self, op: str, ins: Iterable[str], attrs: Mapping[str, Any], meta: Meta | None,
             hint: str | None = None) -> str | None:
        """Add `op` if its type rule accepts the inputs and the result stays bounded; else None."""
        ins = tuple(ins)
        if meta is None or not meta.bound <= MAX_BOUND or (meta.lo is not None and meta.lo <= 0):
            return None
        try:
            (out,) = OPS[op].infer([self.types[i] for i in ins], attrs)
        except TypeRuleError:
            return None
        name = self.b.fresh(hint or op)
        origin = self.draw(origins)
        self.b.add(Node((Value(name, out),), op, ins, dict(attrs), origin))
        self.types[name], self.meta[name] = out, meta
        self.order.append(name)
        return name

    def const(self, value: float | bool, dtype: DType = DType.f32) -> str:
        lo = float(value) if not isinstance(value, bool) and value > 0 else None
        name = self.emit("const", (), {"value": value, "dtype": dtype}, Meta(abs(float(value)), lo), hint="c")
        assert name is not None
        return name

    # --- choosing operands
    def pick(self, pred=lambda n: True) -> str | None:
        cands = [n for n in self.order if pred(n)]
        return self.draw(st.sampled_from(cands)) if cands else None

    def is_float(self, n: str) -> bool:
        return self.types[n].dtype.is_float

    def is_f32(self, n: str) -> bool:
        return self.types[n].dtype is DType.f32

    def positive(self, n: str) -> bool:
        lo = self.meta[n].lo
        return lo is not None and lo >= MIN_POSITIVE

    def broadcasts_with(self, a: str):
        def ok(n: str) -> bool:
            try:
                broadcast_shapes(self.types[a].shape, self.types[n].shape)
                return True
            except ValueError:
                return False
        return ok

    def static_last(self, n: str) -> bool:
        t = self.types[n]
        return t.rank >= 1 and t.shape[-1].is_Integer

    def weight(self, shape: tuple, hint: str = "w") -> str:
        return self.add_input(hint, TensorType(DType.f32, shape), param=True)


_UNARY_META = {
    "neg": lambda m: Meta(m.bound),
    "abs": lambda m: Meta(m.bound, m.lo),
    "exp": lambda m: Meta(math.exp(m.bound), math.exp(-m.bound)) if m.bound <= 6 else None,
    "log": lambda m: Meta(max(abs(math.log(m.lo)), abs(math.log(m.bound)), 1e-3)) if m.lo and m.lo >= MIN_POSITIVE else None,
    "sqrt": lambda m: Meta(math.sqrt(m.bound), math.sqrt(m.lo)) if m.lo and m.lo >= MIN_POSITIVE else None,
    "rsqrt": lambda m: Meta(1 / math.sqrt(m.lo), 1 / math.sqrt(m.bound)) if m.lo and m.lo >= MIN_POSITIVE else None,
    "reciprocal": lambda m: Meta(1 / m.lo, 1 / m.bound) if m.lo and m.lo >= MIN_POSITIVE else None,
    "sigmoid": lambda m: Meta(1.0, 1 / (1 + math.exp(min(m.bound, 50)))),
    "silu": lambda m: Meta(m.bound),
    "tanh": lambda m: Meta(min(m.bound, 1.0), math.tanh(m.lo) if m.lo else None),
    "relu": lambda m: Meta(m.bound),
    "gelu": lambda m: Meta(m.bound),
    "cos": lambda m: Meta(1.0),
    "sin": lambda m: Meta(min(m.bound, 1.0)),
}


def _binary_meta(op: str, a: Meta, c: Meta) -> Meta | None:
    both_lo = a.lo is not None and c.lo is not None
    if op == "add":
        return Meta(a.bound + c.bound, a.lo + c.lo if both_lo else None)
    if op == "sub":
        return Meta(a.bound + c.bound)
    if op == "mul":
        return Meta(a.bound * c.bound, a.lo * c.lo if both_lo else None)
    if op == "div":
        if c.lo is None or c.lo < MIN_POSITIVE:
            return None
        return Meta(a.bound / c.lo, a.lo / c.bound if a.lo else None)
    if op == "maximum":
        los = [x for x in (a.lo, c.lo) if x is not None]
        return Meta(max(a.bound, c.bound), max(los) if los else None)
    if op == "minimum":
        return Meta(max(a.bound, c.bound), min(a.lo, c.lo) if both_lo else None)
    raise KeyError(op)


STEP_KINDS = ("unary", "unary", "binary", "binary", "binary_const", "compare_where", "cast", "reduce",
              "rms_norm", "softmax", "linear", "matmul", "reshape", "permute", "slice", "expand",
              "swiglu", "residual_norm", "cross_kernels", "duplicate", "square", "positive", "const_fold")


def _step(s: _GraphDraw, kind: str) -> None:
    draw = s.draw
    if kind == "unary":
        op = draw(st.sampled_from(sorted(_UNARY_META)))
        needs_positive = op in ("log", "sqrt", "rsqrt", "reciprocal")
        x = s.pick(lambda n: s.is_float(n) and (s.positive(n) or not needs_positive))
        if x is None:
            return
        s.emit(op, (x,), {}, _UNARY_META[op](s.meta[x]))
    elif kind == "binary":
        a = s.pick(s.is_float)
        if a is None:
            return
        op = draw(st.sampled_from(["add", "sub", "mul", "div", "maximum", "minimum"]))
        c = s.pick(lambda n: s.is_float(n) and s.broadcasts_with(a)(n) and (op != "div" or s.positive(n)))
        if c is None:
            return
        if draw(st.booleans()):
            a, c = (c, a) if op not in ("div", "sub") else (a, c)
        s.emit(op, (a, c), {}, _binary_meta(op, s.meta[a], s.meta[c]))
    elif kind == "binary_const":
        # neutral elements and 0-d constants: food for fold_constants
        a = s.pick(s.is_float)
        if a is None:
            return
        op, v = draw(st.sampled_from([("mul", 1.0), ("add", 0.0), ("sub", 0.0), ("div", 1.0), ("mul", 0.5),
                                      ("add", 1.0), ("mul", 1), ("div", 2.0), ("sub", -1.5)]))
        c = s.const(v, draw(st.sampled_from([DType.f32, s.types[a].dtype])) if isinstance(v, float) else DType.i32)
        ins = (c, a) if op in ("mul", "add") and draw(st.booleans()) else (a, c)
        s.emit(op, ins, {}, _binary_meta(op, s.meta[ins[0]], s.meta[ins[1]]))
    elif kind == "compare_where":
        a = s.pick(s.is_float)
        if a is None:
            return
        c = s.pick(lambda n: s.is_float(n) and s.broadcasts_with(a)(n))
        if c is None:
            return
        cmp = draw(st.sampled_from(["lt", "le", "gt", "ge", "eq"]))
        cond = s.emit(cmp, (a, c), {}, Meta(1.0))
        if cond is None or draw(st.booleans()):
            if cond is not None and draw(st.booleans()):
                s.emit("cast", (cond,), {"dtype": DType.f32}, Meta(1.0))
            return
        x, y = (a, c) if draw(st.booleans()) else (c, a)
        ma, mc = s.meta[x], s.meta[y]
        s.emit("where", (cond, x, y), {}, Meta(max(ma.bound, mc.bound),
                                              min(ma.lo, mc.lo) if ma.lo and mc.lo else None))
    elif kind == "cast":
        x = s.pick(s.is_float)
        if x is None:
            return
        dt = draw(st.sampled_from(FLOAT_DTYPES))
        y = s.emit("cast", (x,), {"dtype": dt}, s.meta[x])
        if y is not None and draw(st.booleans()):      # round trip (cast_roundtrip / cast_noop)
            s.emit("cast", (y,), {"dtype": s.types[x].dtype}, s.meta[x])
    elif kind == "reduce":
        x = s.pick(lambda n: s.is_float(n) and s.types[n].rank >= 1)
        if x is None:
            return
        t = s.types[x]
        op = draw(st.sampled_from(["sum", "mean", "amax"]))
        dim = draw(st.integers(-t.rank, t.rank - 1))
        m = s.meta[x]
        meta = Meta(m.bound * _upper(t.shape[dim]), m.lo) if op == "sum" else Meta(m.bound, m.lo)
        attrs: dict[str, Any] = {"dim": dim}
        keep = draw(st.sampled_from([True, False, None]))
        if keep is not None:
            attrs["keepdim"] = keep
        s.emit(op, (x,), attrs, meta)
    elif kind == "rms_norm":
        x = s.pick(lambda n: s.is_float(n) and s.static_last(n))
        if x is None:
            return
        k = s.types[x].shape[-1]
        w = s.weight((k,), "norm.weight")
        s.emit("rms_norm", (x, w), {"eps": 1e-06}, Meta(math.sqrt(int(k)) + 1))
    elif kind == "softmax":
        x = s.pick(lambda n: s.is_float(n) and s.types[n].rank >= 1)
        if x is None:
            return
        t = s.types[x]
        dim = draw(st.integers(-t.rank, t.rank - 1))
        if draw(st.booleans()):
            s.emit("softmax", (x,), {"dim": dim}, Meta(1.0))
        else:
            s.emit("log_softmax", (x,), {"dim": dim}, Meta(2 * s.meta[x].bound + math.log(_upper(t.shape[dim])) + 1))
    elif kind == "linear":
        x = s.pick(lambda n: s.is_f32(n) and s.static_last(n))
        if x is None:
            return
        k = int(s.types[x].shape[-1])
        n_out = draw(st.sampled_from([2, 3, k]))
        w = s.weight((n_out, k))
        ins: tuple[str, ...] = (x, w)
        bias = draw(st.booleans())
        if bias:
            ins += (s.weight((n_out,), "bias"),)
        s.emit("linear", ins, {}, Meta(k * s.meta[x].bound + bias))
    elif kind == "matmul":
        x = s.pick(lambda n: s.is_f32(n) and s.types[n].rank >= 2)
        if x is None:
            return
        t = s.types[x]
        y = s.pick(lambda n: s.is_f32(n) and s.types[n].rank >= 2)
        if y is None or draw(st.booleans()) or not _same_dim(s.types[y].shape[-2], t.shape[-1]):
            if not t.shape[-1].is_Integer:
                return
            y = s.weight((t.shape[-1], draw(st.sampled_from([2, 4]))))
        s.emit("matmul", (x, y), {}, Meta(_upper(t.shape[-1]) * s.meta[x].bound * s.meta[y].bound))
    elif kind == "reshape":
        x = s.pick(lambda n: s.types[n].rank >= 1)
        if x is None:
            return
        shp = list(s.types[x].shape)
        how = draw(st.sampled_from(["flatten", "split", "unsqueeze", "same", "chain"]))
        if how == "flatten" and len(shp) >= 2:
            new = shp[:-2] + [shp[-2] * shp[-1]]
        elif how == "split" and shp[-1].is_Integer and int(shp[-1]) % 2 == 0:
            new = shp[:-1] + [2, int(shp[-1]) // 2]
        elif how == "unsqueeze":
            p = draw(st.integers(0, len(shp)))
            new = shp[:p] + [1] + shp[p:]
        else:
            new = shp
        y = s.emit("reshape", (x,), {"shape": tuple(new)}, s.meta[x])
        if y is not None and how == "chain":
            s.emit("reshape", (y,), {"shape": tuple(shp[:-1] + [1, shp[-1]])}, s.meta[x])
    elif kind == "permute":
        x = s.pick(lambda n: s.types[n].rank >= 1)
        if x is None:
            return
        r = s.types[x].rank
        dims_ = tuple(draw(st.permutations(range(r))))
        y = s.emit("permute", (x,), {"dims": dims_}, s.meta[x])
        if y is not None and draw(st.booleans()):
            s.emit("permute", (y,), {"dims": tuple(draw(st.permutations(range(r))))}, s.meta[x])
    elif kind == "slice":
        x = s.pick(lambda n: s.types[n].rank >= 1)
        if x is None:
            return
        t = s.types[x]
        d = draw(st.integers(0, t.rank - 1))
        size = t.shape[d]
        attrs = {"dim": d if draw(st.booleans()) else d - t.rank}
        if size.is_Integer:
            n = int(size)
            start = draw(st.integers(0, n - 1))
            attrs["start"] = start
            end = draw(st.one_of(st.none(), st.integers(start + 1, n + 2)))
        else:   # symbolic: start at 0 so the slice is never empty
            attrs["start"] = 0
            end = draw(st.one_of(st.none(), st.integers(1, 3)))
        if end is not None or draw(st.booleans()):
            attrs["end"] = end
        step = draw(st.integers(1, 2))
        if step != 1 or draw(st.booleans()):
            attrs["step"] = step
        s.emit("slice", (x,), attrs, s.meta[x])
    elif kind == "expand":
        x = s.pick(lambda n: any(d == 1 for d in s.types[n].shape))
        if x is None:
            return
        shp = list(s.types[x].shape)
        i = draw(st.sampled_from([i for i, d in enumerate(shp) if d == 1]))
        bound_syms = sorted({x for v in s.b.inputs for x in v.type.free_symbols()}, key=str)
        shp[i] = draw(st.sampled_from([3, 2] + bound_syms))
        if draw(st.booleans()):
            shp = [2] + shp
        s.emit("expand", (x,), {"shape": tuple(shp)}, s.meta[x])
    elif kind == "swiglu":
        x = s.pick(lambda n: s.is_f32(n) and s.static_last(n))
        if x is None:
            return
        k = int(s.types[x].shape[-1])
        n_out = draw(st.sampled_from([2, 4]))
        w1, w3 = s.weight((n_out, k), "w1"), s.weight((n_out, k), "w3")
        bound = k * s.meta[x].bound
        a = s.emit("linear", (x, w1), {}, Meta(bound))
        c = s.emit("linear", (x, w3), {}, Meta(bound))
        if a is None or c is None:
            return
        g = s.emit("silu", (a,), {}, Meta(bound))
        if g is not None:
            s.emit("mul", (g, c), {}, Meta(bound * bound))
    elif kind == "residual_norm":
        x = s.pick(lambda n: s.is_f32(n) and s.static_last(n))
        if x is None:
            return
        y = s.pick(lambda n: s.is_f32(n) and s.types[n] == s.types[x])
        r = s.emit("add", (x, y), {}, _binary_meta("add", s.meta[x], s.meta[y]))
        if r is not None:
            k = s.types[x].shape[-1]
            s.emit("rms_norm", (r, s.weight((k,), "norm.weight")), {"eps": 1e-06}, Meta(math.sqrt(int(k)) + 1))
    elif kind == "cross_kernels":
        # a gemm and a reduction whose kernels would read each other's results unless the
        # fuser refuses one join (there is no node-level cycle, only a kernel-level one)
        x = s.pick(lambda n: s.is_f32(n) and s.static_last(n))
        if x is None:
            return
        k, bx = int(s.types[x].shape[-1]), s.meta[x].bound
        a = s.emit("linear", (x, s.weight((1, k))), {}, Meta(k * bx))
        if a is None:
            return
        e1 = s.emit(draw(st.sampled_from(["neg", "tanh", "abs"])), (a,), {}, Meta(k * bx))
        q = s.emit(draw(st.sampled_from(["neg", "abs", "relu"])), (x,), {}, Meta(bx))
        red = s.emit(draw(st.sampled_from(["sum", "amax", "mean"])), (q,), {"dim": -1, "keepdim": True}, Meta(k * bx))
        if e1 is None or red is None:
            return
        s.emit(draw(st.sampled_from(["add", "mul"])), (a, red), {}, Meta(k * k * bx * bx + k * bx))
        s.emit("add", (q, e1), {}, Meta(bx + k * bx))
    elif kind == "duplicate":
        # the same op on the same inputs again: food for cse
        nodes = [n for n in s.b.nodes if n.op != "call"]
        if not nodes:
            return
        n = draw(st.sampled_from(nodes))
        ins = n.inputs[::-1] if n.op in ("add", "mul", "maximum", "minimum") and draw(st.booleans()) else n.inputs
        s.emit(n.op, ins, n.attr_dict, s.meta[n.outputs[0].name], hint=n.outputs[0].name)
    elif kind == "square":
        x = s.pick(s.is_float)
        if x is None:
            return
        c = s.const(2.0 if draw(st.booleans()) else 2, DType.f32)
        m = s.meta[x]
        s.emit("pow", (x, c), {}, Meta(m.bound ** 2, m.lo ** 2 if m.lo else None))
    elif kind == "positive":
        # x*x + 1 and exp(x): values safe for log/sqrt/rsqrt/div
        x = s.pick(s.is_float)
        if x is None:
            return
        m = s.meta[x]
        sq = s.emit("mul", (x, x), {}, Meta(m.bound ** 2))
        if sq is not None:
            one = s.const(1.0, s.types[x].dtype)
            s.emit("add", (sq, one), {}, Meta(m.bound ** 2 + 1, 1.0))
    elif kind == "const_fold":
        # pointwise ops on constants only (fold_const_pointwise)
        a = s.const(draw(st.sampled_from([0.5, 2.0, -1.0, 3.0])))
        c = s.const(draw(st.sampled_from([1.0, 0.25, 4.0])))
        op = draw(st.sampled_from(["add", "mul", "sub", "maximum", "div"]))
        r = s.emit(op, (a, c), {}, _binary_meta(op, s.meta[a], s.meta[c]))
        x = s.pick(lambda n: s.is_float(n) and s.types[n].rank >= 1)
        if r is not None and x is not None:
            s.emit("mul", (x, r), {}, _binary_meta("mul", s.meta[x], s.meta[r]))
    else:
        raise KeyError(kind)


def _same_dim(a: sympy.Expr, b: sympy.Expr) -> bool:
    return sympy.simplify(a - b) == 0


@st.composite
def graphs(draw, max_steps: int = 8, symbolic: bool = True, name: str = "g") -> Graph:
    """A random well-typed graph (verifies, runs without inf/nan on `concrete_inputs`)."""
    s = _GraphDraw(draw, name, symbolic)
    k = draw(st.sampled_from([2, 4, 6]))
    t = T if symbolic else draw(st.integers(1, 4))
    base = draw(st.sampled_from([(t, k), (t, k), (k,), (2, t, k), (B if symbolic else 3, t, k)]))
    s.add_input("x", TensorType(DType.f32, base))
    if draw(st.booleans()):
        s.add_input("y", TensorType(DType.f32, base))
    extra = draw(st.sampled_from(["none", "row", "col", "bf16"]))
    if extra == "row":
        s.add_input("r", TensorType(DType.f32, (k,)))
    elif extra == "col" and len(base) >= 2:
        s.add_input("c", TensorType(DType.f32, base[:-1] + (1,)))
    elif extra == "bf16":
        s.add_input("h", TensorType(DType.bf16, base))
    for kind in draw(st.lists(st.sampled_from(STEP_KINDS), min_size=1, max_size=max_steps)):
        _step(s, kind)
    produced = [o.name for n in s.b.nodes for o in n.outputs]
    if not produced:
        s.emit("neg", ("x",), {}, Meta(1.0))
        produced = [s.b.nodes[-1].out.name]
    outs = [produced[-1]]
    outs += draw(st.lists(st.sampled_from(produced), max_size=2))
    return s.b.build(list(dict.fromkeys(outs)))


def symbol_envs(g: Graph) -> st.SearchStrategy[dict]:
    """Bindings for the graph's dimension symbols (1..SYMBOL_MAX)."""
    syms: set[sympy.Symbol] = set()
    for v in g.inputs:
        syms |= v.type.free_symbols()
    return st.fixed_dictionaries({s_: st.integers(1, SYMBOL_MAX) for s_ in sorted(syms, key=str)})


def concrete_inputs(g: Graph, env: Mapping[Any, int] | None = None, seed: int = 0,
                    positive: Iterable[str] = ()) -> list[torch.Tensor]:
    """Random tensors for `g.inputs` under symbol bindings `env` ({T: 3} or {"T": 3}).

    Floats are uniform in [-1, 1] (in [0.5, 1.5] for the inputs named in `positive`),
    bools fair coins, integers in [-3, 3]."""
    env = {sym(k) if isinstance(k, str) else k: int(v) for k, v in (env or {}).items()}
    gen = torch.Generator().manual_seed(seed)
    pos = set(positive)
    out = []
    for v in g.inputs:
        shape = v.type.concrete_shape(env)
        dt = v.type.dtype
        if dt.is_float:
            x = torch.rand(shape, generator=gen, dtype=torch.float64)
            x = x + 0.5 if v.name in pos else x * 2 - 1
            out.append(x.to(dt.torch))
        elif dt is DType.bool:
            out.append(torch.rand(shape, generator=gen) < 0.5)
        else:
            out.append(torch.randint(-3, 4, shape, generator=gen, dtype=dt.torch))
    return out


@st.composite
def graphs_with_inputs(draw, max_steps: int = 8, symbolic: bool = True) -> tuple[Graph, list[torch.Tensor]]:
    g = draw(graphs(max_steps=max_steps, symbolic=symbolic))
    env = draw(symbol_envs(g))
    return g, concrete_inputs(g, env, seed=draw(st.integers(0, 2**16)))


# ----------------------------------------------------------------------------- helpers for pass tests

def ir_text(text: str) -> str:
    """Dedented IR text with one trailing newline (the printer's layout)."""
    import textwrap
    return textwrap.dedent(text).strip("\n") + "\n"


def apply_pass(g: Graph | str, name: str, fn, ctx=None) -> Graph:
    """Run one pass through the manager (which verifies before and after) and return its result."""
    from dsr_compiler.ir import parse
    from dsr_compiler.ir.passes import run_passes
    g = parse(ir_text(g)) if isinstance(g, str) else g
    return run_passes(g, [(name, fn)], ctx)[-1].graph


def assert_same_outputs(before: Graph, after: Graph, args: list[torch.Tensor], atol: float = 1e-5,
                        rtol: float = 1e-5) -> None:
    """The interpreter gives the same outputs (dtype, shape, values) for both graphs."""
    from dsr_compiler.ir import run_graph
    want, got = run_graph(before, args), run_graph(after, args)
    assert len(want) == len(got)
    for w, g_ in zip(want, got):
        assert w.dtype == g_.dtype and w.shape == g_.shape
        torch.testing.assert_close(g_, w, atol=atol, rtol=rtol, equal_nan=True)


# ----------------------------------------------------------------------------- example budgets

# A test that compiles a module per example costs seconds per example, so under the bounded
# profiles (ci: `make test`, dev) it runs fewer examples than the profile's max_examples; under
# any other profile (fuzz: `make fuzz`) every test runs the profile's full budget. Tests never
# hard-code max_examples: they ask `examples(n)` for their bounded-profile count.
BOUNDED_PROFILES = ("ci", "dev")


def active_profile() -> str:
    """The hypothesis profile tests/conftest.py loaded (HYPOTHESIS_PROFILE, default dev)."""
    import os
    return os.environ.get("HYPOTHESIS_PROFILE", "dev")


def examples(bounded: int, fuzz: int = 0) -> int:
    """max_examples for a test: `bounded` under ci/dev; otherwise the active profile's budget, or
    `fuzz` when the test asks for more (the random-graph compile test: 10,000)."""
    from hypothesis import settings
    profile_budget = settings().max_examples
    if active_profile() in BOUNDED_PROFILES:
        return min(bounded, profile_budget)
    return max(bounded, profile_budget, fuzz)
