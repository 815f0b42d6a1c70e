"""Cleanup passes: common-subexpression elimination, dead-code elimination, and
constant folding / algebraic simplification as named rewrite rules run to a fixed point."""
from __future__ import annotations

from typing import Callable

import torch

from ..graph import Graph, Node, Value
from ..ops import OPS, POINTWISE, REDUCTION, is_commutative
from ..types import DType, TensorType
from .manager import PassContext

MAX_REWRITE_STEPS = 10_000


def _rename(g: Graph, nodes: list[Node], subst: dict[str, str]) -> Graph:
    def r(x: str) -> str:
        while x in subst:
            x = subst[x]
        return x
    new_nodes = [n.replace(inputs=tuple(r(i) for i in n.inputs)) for n in nodes]
    return g.replace(nodes=tuple(new_nodes), outputs=tuple(r(o) for o in g.outputs))


def _attr_key(v: object) -> object:
    """An attribute value as a CSE key: 0.0 == -0.0 (and 1 == 1.0 == True) in Python, but they are
    different attributes (const -0.0 and const 0.0 give different results under div)."""
    if isinstance(v, tuple):
        return tuple(_attr_key(x) for x in v)
    if isinstance(v, float):
        return ("float", repr(v))
    return (type(v).__name__, v)


def cse(g: Graph, ctx: PassContext) -> Graph:
    """Merge nodes computing the same op on the same inputs with the same attributes."""
    seen: dict[tuple, Node] = {}
    subst: dict[str, str] = {}
    kept: list[Node] = []
    outputs = set(g.outputs)
    for n in g.nodes:
        ins = tuple(subst.get(i, i) for i in n.inputs)
        key_ins = tuple(sorted(ins)) if is_commutative(n.op) else ins
        key = (n.op, key_ins, tuple((k, _attr_key(v)) for k, v in n.attrs), tuple(o.type for o in n.outputs))
        prev = seen.get(key)
        if prev is not None and not any(o.name in outputs for o in n.outputs):
            for a, b in zip(n.outputs, prev.outputs):
                subst[a.name] = b.name
            ctx.count("cse.merged")
            continue
        n2 = n.replace(inputs=ins)
        seen.setdefault(key, n2)
        kept.append(n2)
    return _rename(g, kept, subst)


def dce(g: Graph, ctx: PassContext) -> Graph:
    """Drop nodes (all ops are pure) and kernels whose results nobody uses."""
    live = set(g.outputs)
    kept: list[Node] = []
    for n in reversed(g.nodes):
        if any(o.name in live for o in n.outputs):
            kept.append(n)
            live.update(n.inputs)
        else:
            ctx.count("dce.removed")
    kept.reverse()
    used_k = {n.attr("kernel") for n in kept if n.op == "call"}
    kernels = tuple(k for k in g.kernels if k.name in used_k)
    return g.replace(nodes=tuple(kept), kernels=kernels)


# ----------------------------------------------------------------------------- rewrite rules
# A rule looks at one node (with lookups into the graph built so far) and returns either
# None (no match) or ("alias", value_name) to replace the node's single output by an
# existing value, or ("node", new_node) to replace the node.

Lookup = dict[str, Node]
Rule = Callable[[Node, Lookup, dict[str, TensorType]], tuple[str, object] | None]

_LOSSLESS = {  # (narrow, wide): every `narrow` value is exact in `wide`
    (DType.bf16, DType.f32), (DType.f16, DType.f32), (DType.fp8e4m3, DType.f32), (DType.fp8e5m2, DType.f32),
    (DType.fp8e4m3, DType.bf16), (DType.fp8e5m2, DType.bf16), (DType.fp8e4m3, DType.f16), (DType.fp8e5m2, DType.f16),
    (DType.i32, DType.i64), (DType.bool, DType.i32), (DType.bool, DType.i64), (DType.bool, DType.f32),
}


def _const_value(name: str, prod: Lookup) -> float | int | bool | None:
    n = prod.get(name)
    if n is not None and n.op == "const":
        return n.attr("value")
    return None


def rule_fold_const_pointwise(n: Node, prod: Lookup, types: dict[str, TensorType]):
    """A pointwise op on constants only (0-d) becomes a constant."""
    if OPS[n.op].kind != POINTWISE or not n.inputs or len(n.outputs) != 1:
        return None
    vals = [_const_value(i, prod) for i in n.inputs]
    if any(v is None for v in vals) or n.out.type.rank != 0:
        return None
    ins = [torch.tensor(v, dtype=types[i].dtype.torch) for v, i in zip(vals, n.inputs)]
    op = OPS[n.op]
    res = op.reference(*ins, **op.with_defaults(n.attr_dict))
    dt = n.out.type.dtype
    v = res.item()
    v = bool(v) if dt is DType.bool else (float(v) if dt.is_float else int(v))
    return ("node", Node(n.outputs, "const", (), {"value": v, "dtype": dt}, n.origin))


def rule_cast_noop(n: Node, prod: Lookup, types: dict[str, TensorType]):
    """cast(x, dtype) where x already has that dtype is x."""
    if n.op == "cast" and types[n.inputs[0]].dtype == n.attr("dtype"):
        return ("alias", n.inputs[0])
    return None


def rule_cast_roundtrip(n: Node, prod: Lookup, types: dict[str, TensorType]):
    """cast(cast(x, wide), x.dtype) is x when `wide` holds every value of x's dtype exactly."""
    if n.op != "cast":
        return None
    p = prod.get(n.inputs[0])
    if p is None or p.op != "cast":
        return None
    x = p.inputs[0]
    if types[x].dtype == n.attr("dtype") and (types[x].dtype, p.attr("dtype")) in _LOSSLESS:
        return ("alias", x)
    return None


def _identity_operand(n: Node, prod: Lookup, types: dict[str, TensorType], neutral: float, sides: tuple[int, ...]):
    for side in sides:
        c = _const_value(n.inputs[side], prod)
        other = n.inputs[1 - side]
        if c is not None and not isinstance(c, bool) and c == neutral and types[other] == n.out.type:
            return ("alias", other)
    return None


def rule_neutral_element(n: Node, prod: Lookup, types: dict[str, TensorType]):
    """x*1, 1*x, x/1, x+0, 0+x, x-0 are x (when the result type equals x's type)."""
    if n.op == "mul":
        return _identity_operand(n, prod, types, 1, (0, 1))
    if n.op == "add":
        return _identity_operand(n, prod, types, 0, (0, 1))
    if n.op in ("div", "sub"):
        return _identity_operand(n, prod, types, 1 if n.op == "div" else 0, (1,))
    return None


def rule_square(n: Node, prod: Lookup, types: dict[str, TensorType]):
    """pow(x, 2) is mul(x, x) (exact, and keeps kernels free of a libdevice pow)."""
    if n.op == "pow" and _const_value(n.inputs[1], prod) == 2 and types[n.inputs[0]] == n.out.type:
        return ("node", Node(n.outputs, "mul", (n.inputs[0], n.inputs[0]), {}, n.origin))
    return None


def rule_reshape_noop(n: Node, prod: Lookup, types: dict[str, TensorType]):
    """reshape to the same shape is x; reshape of a reshape is one reshape."""
    if n.op != "reshape":
        return None
    x = n.inputs[0]
    if types[x] == n.out.type:
        return ("alias", x)
    p = prod.get(x)
    if p is not None and p.op == "reshape":
        return ("node", n.replace(inputs=(p.inputs[0],)))
    return None


def rule_permute(n: Node, prod: Lookup, types: dict[str, TensorType]):
    """identity permutes vanish; permute of a permute composes."""
    if n.op != "permute":
        return None
    dims = n.attr("dims")
    if tuple(dims) == tuple(range(len(dims))):
        return ("alias", n.inputs[0])
    p = prod.get(n.inputs[0])
    if p is not None and p.op == "permute":
        inner = p.attr("dims")
        return ("node", n.replace(inputs=(p.inputs[0],), attrs={"dims": tuple(inner[d] for d in dims)}))
    return None


class _Reuse:
    """Stands in a rule's node list for an existing value that is reused, not re-emitted."""

    def __init__(self, name: str):
        self.name = name


def rule_reduce_last_dim(n: Node, prod: Lookup, types: dict[str, TensorType]):
    """A reduction over a dim other than the last runs on a permuted copy with that dim last
    (kernels reduce rows); softmax-like results are permuted back."""
    if OPS[n.op].kind != REDUCTION or n.op == "rms_norm" or len(n.inputs) != 1:
        return None
    x = types[n.inputs[0]]
    d = n.attr("dim") % x.rank
    if d == x.rank - 1:
        return None
    perm = tuple(i for i in range(x.rank) if i != d) + (d,)
    xp_name = f"{n.inputs[0]}.to_last"
    xp_type = x.with_shape(tuple(x.shape[i] for i in perm))
    xp: Node | _Reuse = Node((Value(xp_name, xp_type),), "permute", (n.inputs[0],), {"dims": perm}, n.origin)
    attrs = dict(n.attrs)
    attrs["dim"] = x.rank - 1
    prev = prod.get(xp_name)
    if prev is not None:  # an earlier reduction of the same value already made the permuted copy
        if prev.op != "permute" or prev.inputs != (n.inputs[0],) or prev.attr("dims") != perm:
            return None
        xp = _Reuse(xp_name)
    if n.op in ("softmax", "log_softmax"):
        r_type = xp_type.with_dtype(n.out.type.dtype)
        r = Node((Value(f"{n.out.name}.last", r_type),), n.op, (xp_name,), attrs, n.origin)
        inv = tuple(perm.index(i) for i in range(x.rank))
        back = Node(n.outputs, "permute", (r.out.name,), {"dims": inv}, n.origin)
        return ("nodes", [xp, r, back])
    keep = attrs.get("keepdim", False)
    if keep:  # reduce to [..., 1] in permuted order, then reshape to the original keepdim shape
        r_shape = xp_type.shape[:-1] + (1,)
        r = Node((Value(f"{n.out.name}.last", n.out.type.with_shape(r_shape)),), n.op, (xp_name,), attrs, n.origin)
        back = Node(n.outputs, "reshape", (r.out.name,), {"shape": n.out.type.shape}, n.origin)
        return ("nodes", [xp, r, back])
    return ("nodes", [xp, Node(n.outputs, n.op, (xp_name,), attrs, n.origin)])


def rule_softmax_single(n: Node, prod: Lookup, types: dict[str, TensorType]):
    """softmax / log_softmax over a dim of size 1 (attention over one key: transformers' masked SDPA at one
    token) is `(x - x) + 1` / `x - x`: 1 / 0 for a finite x, NaN for an infinite or NaN one, as torch gives;
    a row kernel has nothing to reduce there."""
    if n.op not in ("softmax", "log_softmax") or len(n.inputs) != 1:
        return None
    x = types[n.inputs[0]]
    if x.rank < 1 or x != n.out.type or x.shape[n.attr("dim") % x.rank] != 1:
        return None
    zero = Node((Value(f"{n.out.name}.zero", x),), "sub", (n.inputs[0], n.inputs[0]), {}, n.origin)
    if n.op == "log_softmax":
        return ("nodes", [zero.replace(outputs=n.outputs)])
    one = Node((Value(f"{n.out.name}.one", TensorType(x.dtype, ())),), "const", (), {"value": 1.0, "dtype": x.dtype},
               n.origin)
    return ("nodes", [zero, one, Node(n.outputs, "add", (zero.out.name, one.out.name), {}, n.origin)])


FOLD_RULES: tuple[tuple[str, Rule], ...] = (
    ("fold_const_pointwise", rule_fold_const_pointwise),
    ("cast_noop", rule_cast_noop),
    ("cast_roundtrip", rule_cast_roundtrip),
    ("neutral_element", rule_neutral_element),
    ("square", rule_square),
    ("reshape_noop", rule_reshape_noop),
    ("permute_compose", rule_permute),
    ("reduce_last_dim", rule_reduce_last_dim),
    ("softmax_single", rule_softmax_single),
)


def _rewrite_once(g: Graph, ctx: PassContext, rules) -> tuple[Graph, int]:
    prod: Lookup = {}
    types = {v.name: v.type for v in g.inputs}
    subst: dict[str, str] = {}
    out_nodes: list[Node] = []
    outputs = set(g.outputs)
    matches = 0
    for n in g.nodes:
        n = n.replace(inputs=tuple(subst.get(i, i) for i in n.inputs))
        for rname, rule in rules:
            if n.op == "call":
                break
            res = rule(n, prod, types)
            if res is None:
                continue
            kind, payload = res
            if kind == "nodes":  # several new nodes; the last one defines the original outputs
                payload = [x for x in payload if not isinstance(x, _Reuse)]
                taken = set(types) | {o.name for x in out_nodes for o in x.outputs}
                if any(o.name in taken for x in payload[:-1] for o in x.outputs):
                    continue  # a helper name is taken: leave the node as it is
                for extra in payload[:-1]:
                    out_nodes.append(extra)
                    for o in extra.outputs:
                        prod[o.name] = extra
                        types[o.name] = o.type
                n = payload[-1]
                ctx.count(f"fold.{rname}")
                matches += 1
                continue
            if kind == "alias":
                if n.out.name in outputs:
                    continue  # keep graph output names stable
                subst[n.out.name] = payload  # type: ignore[assignment]
                ctx.count(f"fold.{rname}")
                matches += 1
                n = None  # type: ignore[assignment]
                break
            n = payload  # type: ignore[assignment]
            ctx.count(f"fold.{rname}")
            matches += 1
        if n is None:
            continue
        out_nodes.append(n)
        for o in n.outputs:
            prod[o.name] = n
            types[o.name] = o.type
    return _rename(g, out_nodes, subst), matches


def fold_constants(g: Graph, ctx: PassContext) -> Graph:
    """Apply FOLD_RULES to a fixed point (capped at MAX_REWRITE_STEPS matches), then DCE."""
    total = 0
    while True:
        g, m = _rewrite_once(g, ctx, FOLD_RULES)
        total += m
        if m == 0:
            break
        if total > MAX_REWRITE_STEPS:
            ctx.note(f"fold_constants: stopped after {total} rewrites (step cap)")
            break
    return dce(g, PassContext())
