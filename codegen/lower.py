"""Lowering: one fused IR kernel (`ir.Kernel`) -> one frozen `KernelSpec`.

Sits after the fusion pass and before rendering. Each family has its own lowering here;
they share the statement emitter (`_Body`): body values become fp32 (or integer/bool)
register variables, body inputs become loads through index maps (layout ops on inputs
are folded into strides), outputs become stores. Everything a family cannot express is
refused with a CodegenError that names the kernel and marks the offending statement.

Calling convention (see spec.py): tensor args are the body inputs in order, then the body
outputs in order; then int scalars (sizes the runtime evaluates from the dim symbols).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Sequence

import sympy
import torch
from dsr_compiler.ir.errors import CodegenError
from dsr_compiler.ir.graph import Graph, Kernel, Node, Value
from dsr_compiler.ir.ops import ATTENTION, OPS, POINTWISE, REDUCTION, SOURCE
from dsr_compiler.ir.types import DType, dim_str, to_expr
from dsr_compiler.ir.verifier import ir_window

from .exprs import POINTWISE_EXPRS, reg_kind
from .spec import ArgSpec, KernelSpec, Stmt, comment_text, ident
from .views import Axis, IndexBuilder, ScalarPool, View, ViewError, apply_layout, broadcast_strides, prod, same

INDEX_MAP_OPS = ("permute", "expand", "slice", "reshape")
LAST_DIM_REDUCTIONS = ("rms_norm", "softmax", "log_softmax", "sum", "mean", "amax")
_KIND_ORDER = {"i1": 0, "i32": 1, "i64": 2, "f32": 3}
_COMPARE = ("lt", "le", "gt", "ge", "eq")
_FLOAT_ONLY = ("exp", "log", "sqrt", "rsqrt", "reciprocal", "sigmoid", "silu", "tanh", "gelu", "pow", "div")
_FLOPS = {"rope": 3, "silu": 4, "sigmoid": 3, "gelu": 8, "tanh": 4, "pow": 4, "cast": 0}
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME_RE = re.compile(r"^k\d+_[a-z]+_[A-Za-z0-9_]+$")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _static(e: sympy.Expr) -> int | None:
    e = to_expr(e)
    return int(e) if e.is_Integer else None


class _Body:
    """Emits the statements of a fused body for one family's iteration space."""

    def __init__(self, kernel: Kernel, pool: ScalarPool, shape: Sequence[sympy.Expr], axes: Sequence[Axis],
                 mask: str, tile: dict[str, str]):
        self.k = kernel
        self.g: Graph = kernel.body
        self.pool = pool
        self.shape = tuple(shape)
        self.ix = IndexBuilder(self.shape, tuple(axes), pool)
        self.mask = mask                       # the full tile mask (stores)
        self.tile = dict(tile)                 # tile axis var -> its own mask (e.g. offs_n -> nmask[None, :])
        self.axes = tuple(axes)
        self.values = self.g.values()
        self.inputs = {v.name: i for i, v in enumerate(self.g.inputs)}
        self.producer_index = {o.name: i for i, n in enumerate(self.g.nodes) for o in n.outputs}
        self.views: dict[str, tuple[str, View]] = {
            v.name: (v.name, View.contiguous(v.type.shape)) for v in self.g.inputs}
        self.var: dict[str, str] = {}
        self.vec: dict[str, bool] = {}        # register var -> is it a tile (vs a per-program scalar)
        self.kind: dict[str, str] = {}        # register var -> register kind
        self.stmts: list[Stmt] = []
        self._names: set[str] = set()
        self.arg_names = arg_names(self.g)
        self.supports: tuple[str, ...] = ()    # optional statements this family can express

    # --- errors
    def fail(self, node: Node | None, what: str, hint: str = "") -> CodegenError:
        where = ""
        if node is not None:
            idx = self.g.nodes.index(node)
            where = ir_window(self.g, idx)
        return CodegenError(f"codegen: kernel @{self.k.name} ({self.k.family}): {what}", where, hint)

    # --- names
    def fresh(self, hint: str) -> str:
        base = "v_" + ident(hint)
        name, n = base, 0
        while name in self._names:
            n += 1
            name = f"{base}_{n}"
        self._names.add(name)
        return name

    def define(self, s: Stmt, vec: bool, kind: str) -> str:
        self.stmts.append(s)
        self.vec[s.out] = vec
        self.kind[s.out] = kind
        return s.out

    def tile_axes_in(self, terms: Iterable[tuple[str, str]]) -> list[str]:
        """The tile axes an index uses (in tile order); none means a per-program scalar access."""
        used = set()
        for expr, _ in terms:
            for tok in _TOKEN.findall(expr):
                for a in self.tile:
                    if tok == a or tok.startswith(a + "_d"):
                        used.add(a)
        return [a for a in self.tile if a in used]

    def cover(self, terms: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        """Terms that span the whole tile (a store's pointer must have the value's shape)."""
        have = set(self.tile_axes_in(terms))
        missing = [ax for ax in self.axes if ax.var in self.tile and ax.var not in have]
        return terms + tuple((f"{ax.var}{ax.bcast} * 0", "1") for ax in missing)

    def check_layouts(self) -> None:
        """Refuse layout ops on computed values up front (they are the usual fusion mistake)."""
        viewable = {v.name for v in self.g.inputs}
        for n in self.g.nodes:
            if n.op in INDEX_MAP_OPS:
                if n.inputs[0] not in viewable:
                    raise self.fail(n, f"{n.op} of %{n.inputs[0]}, a value computed inside the kernel; only kernel "
                                       "inputs can be re-indexed",
                                    "start a new kernel at the layout op (it reads from memory)")
                viewable.add(n.out.name)

    # --- loads
    def record_layout(self, n: Node) -> None:
        src = n.inputs[0]
        if src not in self.views:
            raise self.fail(n, f"{n.op} of %{src}, a value computed inside the kernel; only kernel inputs can "
                               "be re-indexed", "start a new kernel at the layout op (it reads from memory)")
        base, view = self.views[src]
        try:
            self.views[n.out.name] = (base, apply_layout(view, n.op, n.attr_dict, n.out.type.shape))
        except ViewError as e:
            raise self.fail(n, f"{n.op} cannot be an index map: {e}") from None

    def strides_for(self, name: str, node: Node | None, shape: Sequence[sympy.Expr] | None = None) -> tuple:
        _, view = self.views[name]
        try:
            return broadcast_strides(view, self.shape if shape is None else shape)
        except ViewError as e:
            space = list(map(dim_str, self.shape))
            raise self.fail(node, f"%{name} cannot be read in the iteration space {space}: {e}") from None

    def load(self, name: str, node: Node | None, strides: tuple | None = None, extra_terms: tuple = (),
             offset: sympy.Expr | None = None, mask: str | None = None, hint: str | None = None,
             deps: tuple[str, ...] = ()) -> str:
        base, view = self.views[name]
        st = self.strides_for(name, node) if strides is None else strides
        terms = self.ix.terms(st) + tuple(extra_terms)
        used = self.tile_axes_in(terms)
        vec = bool(used) or any(self.vec.get(d) for d in deps)
        dt = self.values[base].type.dtype
        out = self.fresh(hint or name)
        if mask is None:   # a load masks only along the tile axes it spans (a bias row loads [1, BN])
            mask = " & ".join(self.tile[a] for a in used) if used else (self.mask if vec else "")
        m = mask if vec else ""
        s = Stmt("load", out, tuple(deps), (("ptr", self.arg_names[("in", base)]), ("terms", terms),
                                           ("offset", self.pool.lit(view.offset if offset is None else offset)),
                                           ("mask", m)), dt)
        return self.define(s, vec, reg_kind(dt))

    def use(self, name: str, node: Node | None) -> str:
        """The register variable holding value `name` (loading a kernel input on first use)."""
        if name in self.var:
            return self.var[name]
        if name in self.views:
            v = self.load(name, node)
            self.var[name] = v
            return v
        raise self.fail(node, f"%{name} is used before the kernel computes it")

    # --- conversions
    def convert(self, v: str, to: str) -> str:
        frm = self.kind[v]
        if frm == to:
            return v
        out = self.fresh(v[2:] + "_" + to)
        return self.define(Stmt("convert", out, (v,), (("to", to), ("from", frm))), self.vec[v], to)

    # --- statements
    def const(self, n: Node) -> None:
        dt: DType = n.attr("dtype")
        v = n.attr("value")
        if dt.is_float:
            v = float(torch.tensor(float(v), dtype=dt.torch).float())  # the constant eager would use
        elif dt is DType.bool:
            v = bool(v)
        else:
            v = int(v)
        out = self.fresh(n.out.name)
        self.var[n.out.name] = self.define(Stmt("const", out, (), (("value", v),), dt), False, reg_kind(dt))

    def pointwise(self, n: Node) -> None:
        op, dt = n.op, n.out.type.dtype
        if op not in POINTWISE_EXPRS:
            raise self.fail(n, f"no Triton expression for {op}")
        if op == "rope":
            return self.rope(n)
        if op == "iota":
            return self.iota(n)
        args = [self.use(x, n) for x in n.inputs]
        kinds = [self.kind[a] for a in args]
        want = reg_kind(dt)
        if op in _FLOAT_ONLY and not dt.is_float:
            raise self.fail(n, f"{op} on {dt.value} values is not supported (float only)")
        if op in _COMPARE:
            top = max(kinds, key=_KIND_ORDER.__getitem__)
            args = [self.convert(a, top) for a in args]
        elif op == "where":
            if kinds[0] != "i1":
                raise self.fail(n, "where needs a bool condition")
            args = [args[0]] + [self.convert(a, want) for a in args[1:]]
        elif op == "cast":
            args = [self.convert(args[0], want)]
        else:
            args = [self.convert(a, want) for a in args]
        attrs: tuple = (("to", n.attr("dtype")),) if op == "cast" else ()
        out = self.fresh(n.out.name)
        vec = any(self.vec[a] for a in args)
        self.var[n.out.name] = self.define(Stmt(op, out, tuple(args), attrs, dt), vec, want)

    def iota(self, n: Node) -> None:
        """arange(n): the coordinate of the kernel's (1-D) iteration space (ir/ops_mla.py)."""
        if len(self.shape) != 1 or not same(n.out.type.shape[0], self.shape[0]):
            raise self.fail(n, f"iota {n.out.type} must span the kernel's 1-D iteration shape "
                               f"[{', '.join(map(dim_str, self.shape))}]")
        out = self.fresh(n.out.name)
        self.var[n.out.name] = self.define(Stmt("iota", out, (self.ix.coord_expr(0),), (), n.out.type.dtype),
                                           True, reg_kind(n.out.type.dtype))

    def rope(self, n: Node) -> None:
        x = n.inputs[0]
        if x not in self.views:
            raise self.fail(n, "rope reads its input's pair partner, so x must be a kernel input",
                            "start a new kernel at the rope (the fusion pass does)")
        if "rope" not in self.supports:
            raise self.fail(n, f"rope is not supported in a {self.k.family} kernel")
        last = len(self.shape) - 1
        st = self.strides_for(x, n)
        xv = self.use(x, n)
        i = self.ix.coord_expr(last)
        partner = self.load(x, n, strides=st, extra_terms=((f"(({i} ^ 1) - {i})", self.pool.lit(st[last])),),
                            hint=x + "_pair")
        cos, sin = (self.convert(self.use(a, n), "f32") for a in n.inputs[1:])
        out = self.fresh(n.out.name)
        self.var[n.out.name] = self.define(Stmt("rope", out, (xv, partner, cos, sin, i), (), n.out.type.dtype),
                                           True, "f32")

    def cat(self, n: Node) -> None:
        d = n.attr("dim") % n.out.type.rank
        if n.out.type.rank != len(self.shape) or not all(same(a, b) for a, b in zip(n.out.type.shape, self.shape)):
            raise self.fail(n, "cat must produce the kernel's iteration shape")
        c = self.ix.coord_expr(d)
        start: sympy.Expr = sympy.Integer(0)
        pieces: list[tuple[str, str]] = []
        want = reg_kind(n.out.type.dtype)
        for j, src in enumerate(n.inputs):
            if src not in self.views:
                raise self.fail(n, f"cat of %{src}, a value computed inside the kernel; only kernel inputs can be "
                                   "concatenated in place")
            size = self.values[src].type.shape[d]
            _, view = self.views[src]
            try:
                st = broadcast_strides(view, tuple(size if k == d else s for k, s in enumerate(self.shape)))
            except ViewError as e:
                raise self.fail(n, f"cat piece %{src}: {e}") from None
            lo, hi = self.pool.lit(start), self.pool.lit(start + size)
            m = f"{self.mask} & ({c} >= {lo}) & ({c} < {hi})"
            v = self.load(src, n, strides=st, offset=view.offset - start * st[d], mask=m, hint=src)
            pieces.append((self.convert(v, want), hi))
            start = start + size
        acc = pieces[-1][0]
        for v, hi in reversed(pieces[:-1]):
            cond = self.define(Stmt("lt", self.fresh(n.out.name + "_in"), (c, hi), (), DType.bool), True, "i1")
            acc = self.define(Stmt("where", self.fresh(n.out.name), (cond, v, acc), (), n.out.type.dtype), True, want)
        self.var[n.out.name] = acc

    def embedding(self, n: Node) -> None:
        w, ids = n.inputs
        if w not in self.views or ids not in self.views:
            raise self.fail(n, "embedding needs its weight and ids to be kernel inputs")
        r = len(self.shape)
        if n.out.type.rank != r:
            raise self.fail(n, "embedding must produce the kernel's iteration shape")
        idv = self.use(ids, n) if ids in self.var else self.load(ids, n, strides=self.strides_for(
            ids, n, shape=self.shape[:-1]) + (sympy.Integer(0),), hint=ids)
        self.var.setdefault(ids, idv)
        idv = self.convert(idv, "i64")
        _, wview = self.views[w]
        h = self.ix.coord_expr(r - 1)
        terms = ((idv, self.pool.lit(wview.strides[0])), (h, self.pool.lit(wview.strides[1])))
        zero = (sympy.Integer(0),) * r
        self.var[n.out.name] = self.load(w, n, strides=zero, extra_terms=terms, hint=n.out.name, deps=(idv,))
        self.vec[self.var[n.out.name]] = True

    def store(self, o: Value, index: int, node: Node | None, mask: str | None = None,
              strides: tuple | None = None) -> None:
        v = self.var.get(o.name)
        if v is None:
            v = self.use(o.name, node)
        st = strides if strides is not None else broadcast_strides(View.contiguous(o.type.shape), self.shape)
        terms = self.ix.terms(st)
        vec = self.vec[v] or bool(self.tile_axes_in(terms))
        if vec:
            terms = self.cover(terms)
        m = (self.mask if mask is None else mask) if vec else ""
        self.stmts.append(Stmt("store", "", (v,), (("ptr", self.arg_names[("out", index)]), ("terms", terms),
                                                   ("offset", "0"), ("mask", m)), o.type.dtype))


# ----------------------------------------------------------------------------- shared helpers

def arg_names(g: Graph) -> dict[tuple[str, Any], str]:
    """Pointer argument names: ("in", value name) and ("out", output index) -> identifier."""
    names: dict[tuple[str, Any], str] = {}
    used: set[str] = set()

    def pick(base: str) -> str:
        name, n = base, 0
        while name in used:
            n += 1
            name = f"{base}{n}"
        used.add(name)
        return name
    for v in g.inputs:
        names[("in", v.name)] = pick(ident(v.name) + "_ptr")
    for i, o in enumerate(g.outputs):
        names[("out", i)] = pick(ident(o) + "_out")
    return names


def tensor_args(g: Graph) -> list[ArgSpec]:
    names = arg_names(g)
    vals = g.values()
    out = [ArgSpec(names[("in", v.name)], "tensor", value=v.name, dtype=v.type.dtype, role="in", index=i,
                   shape=tuple(dim_str(d) for d in v.type.shape)) for i, v in enumerate(g.inputs)]
    for i, o in enumerate(g.outputs):
        t = vals[o].type
        out.append(ArgSpec(names[("out", i)], "tensor", value=o, dtype=t.dtype, role="out", index=i,
                           shape=tuple(dim_str(d) for d in t.shape)))
    return out


def source_nodes(g: Graph) -> tuple[str, ...]:
    out = []
    for n in g.nodes:
        if OPS[n.op].kind == SOURCE:
            continue
        lhs = ", ".join("%" + o.name for o in n.outputs)
        out.append(comment_text(f"{lhs} = {n.op}" + (f" @ {n.origin}" if n.origin else "")))
    return tuple(out)


def _bytes(g: Graph) -> tuple[str, str]:
    vals = g.values()
    r = sum((v.type.nbytes for v in g.inputs), sympy.Integer(0))
    w = sum((vals[o].type.nbytes for o in g.outputs), sympy.Integer(0))
    return dim_str(sympy.simplify(r)), dim_str(sympy.simplify(w))


def _pointwise_flops(g: Graph, numel: sympy.Expr, skip: Iterable[Node] = ()) -> sympy.Expr:
    skip_ids = {id(n) for n in skip}
    n_ops = sum(_FLOPS.get(n.op, 1) for n in g.nodes if OPS[n.op].kind == POINTWISE and id(n) not in skip_ids)
    return numel * n_ops


def _kernel_name(k: Kernel, index: int) -> str:
    if _NAME_RE.match(k.name):
        return k.name
    return f"k{index}_{k.family}_{ident(k.name)}"


def _fail(k: Kernel, what: str, node: Node | None = None, hint: str = "") -> CodegenError:
    where = ir_window(k.body, k.body.nodes.index(node)) if node is not None else f"  kernel @{k.name}"
    return CodegenError(f"codegen: kernel @{k.name} ({k.family}): {what}", where, hint)


def _check_outputs_unique(k: Kernel) -> None:
    if len(set(k.body.outputs)) != len(k.body.outputs):
        raise _fail(k, f"returns a value twice: {list(k.body.outputs)}")


def _attr_int(k: Kernel, key: str, default: int) -> int:
    v = k.attr(key)
    return int(v) if v is not None else default


# ----------------------------------------------------------------------------- pointwise

def _lower_pointwise(k: Kernel, index: int, family_label: str = "pointwise") -> KernelSpec:
    g = k.body
    vals = g.values()
    outs = [vals[o] for o in g.outputs]
    shape = outs[0].type.shape
    for o in outs[1:]:
        if o.type.rank != len(shape) or not all(same(a, b) for a, b in zip(o.type.shape, shape)):
            raise _fail(k, f"outputs need one shape: %{outs[0].name} is {outs[0].type}, %{o.name} is {o.type}",
                        hint="the fusion pass groups only same-shape values into one pointwise kernel")
    numel = prod(shape)
    big = _static(numel) is not None and _static(numel) >= 2**31
    i64 = bool(k.attr("index_i64", False)) or big
    pool = ScalarPool(i64=i64)
    body = _Body(k, pool, shape, [Axis("offs", tuple(range(len(shape))))], "mask", {"offs": "mask"})
    body.supports = ("rope",)
    body.check_layouts()
    for n in g.nodes:
        kind = OPS[n.op].kind
        if n.op == "const":
            body.const(n)
        elif n.op in INDEX_MAP_OPS:
            body.record_layout(n)
        elif n.op == "cat":
            body.cat(n)
        elif n.op == "embedding":
            body.embedding(n)
        elif kind == POINTWISE:
            body.pointwise(n)
        else:
            raise body.fail(n, f"{n.op} ({kind}) cannot be part of a pointwise kernel",
                            "pointwise kernels take pointwise ops, constants, embedding, and layout ops on inputs")
    for i, o in enumerate(outs):
        body.store(o, i, None)
    static = _static(numel)
    block = _attr_int(k, "block", min(1024, max(128, _next_pow2(static))) if static is not None else 1024)
    num_warps = _attr_int(k, "num_warps", max(1, min(4, block // 256)))
    n_lit = pool.lit(numel)
    params = (("BLOCK", block), ("NUMEL", n_lit), ("I64", i64))
    rd, wr = _bytes(g)
    return KernelSpec(
        name=_kernel_name(k, index), family="pointwise", template="pointwise.py.j2",
        args=tuple(tensor_args(g)) + tuple(pool.args), grid=(dim_str(sympy.ceiling(numel / block)),),
        num_warps=num_warps, num_stages=1, params=params,
        body=(("coords", tuple(body.ix.coords)), ("main", tuple(body.stmts))),
        source_nodes=source_nodes(g), flops=dim_str(_pointwise_flops(g, numel)), bytes_read=rd, bytes_written=wr)


# ----------------------------------------------------------------------------- reduction

def _closure(stmts: Sequence[Stmt], roots: Iterable[int], have: set[str]) -> list[int]:
    """Indices of the statements needed for `roots` (in program order), skipping vars in `have`."""
    defs = {s.out: i for i, s in enumerate(stmts) if s.out}
    need: set[int] = set()
    stack = list(roots)
    while stack:
        i = stack.pop()
        if i in need:
            continue
        need.add(i)
        for a in stmts[i].args:
            j = defs.get(a)
            if j is not None and a not in have:
                stack.append(j)
    return sorted(need)


def _lower_reduction(k: Kernel, index: int) -> KernelSpec:
    g = k.body
    reds = [n for n in g.nodes if OPS[n.op].kind == REDUCTION]
    if len(reds) != 1:
        raise _fail(k, f"needs exactly one reduction op, found {len(reds)}",
                    reds[1] if len(reds) > 1 else None)
    red = reds[0]
    if red.op not in LAST_DIM_REDUCTIONS:
        raise _fail(k, f"{red.op} is not a supported reduction", red)
    xt = g.values()[red.inputs[0]].type
    if xt.rank < 1 or red.attr("dim", -1) % xt.rank != xt.rank - 1:
        raise _fail(k, f"{red.op} reduces dim {red.attr('dim')} of {xt}; only the last dim is supported", red,
                    "permute the reduced dim last before the reduction")
    if not xt.dtype.is_float:
        raise _fail(k, f"{red.op} over {xt.dtype.value} values is not supported (float only)", red)
    shape = xt.shape
    lead, ncols = shape[:-1], shape[-1]
    pool = ScalarPool(i64=bool(k.attr("index_i64", False)))
    axes = [Axis("row", tuple(range(len(lead)))), Axis("cols", (len(lead),))]
    body = _Body(k, pool, shape, axes, "cmask", {"cols": "cmask"})
    body.check_layouts()
    n_lit = pool.lit(ncols)
    keepdim = bool(red.attr("keepdim", False))
    # which values depend on the reduction (epilogue) and which use the no-keepdim layout
    post: set[str] = set()
    lstyle: set[str] = set()
    red_kind = {"sum": "sum", "mean": "sum", "amax": "max", "rms_norm": "sumsq",
                "softmax": "softmax", "log_softmax": "softmax"}[red.op]
    red_src = ""
    for n in g.nodes:
        kind = OPS[n.op].kind
        if n is red:
            src = body.use(red.inputs[0], n)
            # a row-constant value (a size-1 row) still sums / maxes: the templates spread it over the
            # row tile with tl.where(cmask, src, neutral); row-shaped results need a varying value
            if not body.vec[src] and red.op not in ("sum", "mean", "amax"):
                raise body.fail(n, "the reduced value does not vary along the row")
            red_src = body.convert(src, "f32")
            o = n.out.name
            if red.op in ("sum", "mean", "amax"):
                fin = {"sum": ("sum_finish", ("r_acc",)), "mean": ("mean_finish", ("r_acc", n_lit)),
                       "amax": ("amax_finish", ("r_max",))}[red.op]
                body.var[o] = body.define(Stmt(fin[0], body.fresh(o), fin[1], (), n.out.type.dtype), False, "f32")
                if not keepdim and len(lead):
                    lstyle.add(o)
            elif red.op == "rms_norm":
                w = body.convert(body.use(red.inputs[1], n), "f32")
                rinv = body.define(Stmt("rms_finish", body.fresh(o + "_rinv"),
                                        ("r_acc", n_lit, repr(float(red.attr("eps")))), (), DType.f32), False, "f32")
                body.var[o] = body.define(Stmt("rms_apply", body.fresh(o), (red_src, rinv, w), (), n.out.type.dtype),
                                          True, "f32")
            else:
                body.var[o] = body.define(Stmt(f"{red.op}_apply", body.fresh(o), (red_src, "r_max", "r_sum"), (),
                                               n.out.type.dtype), True, "f32")
            post.add(o)
            continue
        if kind == REDUCTION:
            raise body.fail(n, "a second reduction in one kernel")
        is_post = any(x in post for x in n.inputs)
        if n.op == "const":
            body.const(n)
        elif n.op in INDEX_MAP_OPS:
            body.record_layout(n)
        elif kind == POINTWISE:
            ot = n.out.type
            per_row = (not keepdim and len(lead) > 0 and ot.rank == len(lead)
                       and all(same(a, b) for a, b in zip(ot.shape, lead)))
            if per_row or any(x in lstyle for x in n.inputs):
                for x in n.inputs:
                    xt_ = g.values()[x].type
                    if x in lstyle or xt_.rank == 0:
                        continue
                    if x in body.views and x not in body.var and xt_.rank == len(lead) \
                            and all(same(a, b) for a, b in zip(xt_.shape, lead)):
                        # a per-row kernel input (e.g. an upstream gradient [rows]): read it per row,
                        # not broadcast against the row elements (numpy would align it with the last dim)
                        st = broadcast_strides(body.views[x][1], lead) + (sympy.Integer(0),)
                        body.var[x] = body.load(x, n, strides=st, hint=x)
                        lstyle.add(x)
                        continue
                    raise body.fail(n, f"mixes the keepdim=False result of {red.op} with row values; numpy "
                                       "broadcasting would align it with the wrong dims", "use keepdim=True")
                lstyle.add(n.out.name)
            body.pointwise(n)
        else:
            raise body.fail(n, f"{n.op} ({kind}) cannot be part of a reduction kernel")
        if is_post:
            post.add(n.out.name)
    # stores: E outputs (row shape) go with their phase, R outputs (per row) after the reduction
    vals = g.values()
    row_shapes = (tuple(lead), tuple(lead) + (sympy.Integer(1),))
    e_roots: list[int] = []    # store statement indices, by phase
    pre_roots: list[int] = []
    r_roots: list[int] = []
    for i, oname in enumerate(g.outputs):
        o = vals[oname]
        var = body.var.get(oname) or body.use(oname, None)
        full = o.type.rank == len(shape) and all(same(a, b) for a, b in zip(o.type.shape, shape))
        if full and body.vec[var]:
            body.store(o, i, None)
            (e_roots if oname in post else pre_roots).append(len(body.stmts) - 1)
        elif not body.vec[var] and any(o.type.rank == len(rs) and all(same(a, b) for a, b in zip(o.type.shape, rs))
                                       for rs in row_shapes):
            flat = View.contiguous(lead).strides
            body.store(o, i, None, mask="", strides=tuple(flat) + (sympy.Integer(0),))
            r_roots.append(len(body.stmts) - 1)
        else:
            raise _fail(k, f"output %{oname} : {o.type} is neither a row value {xt} nor a per-row value "
                           f"[{', '.join(map(dim_str, row_shapes[1]))}]")
    stmts = body.stmts
    src_idx = next(i for i, s in enumerate(stmts) if s.out == red_src)
    static_n = _static(ncols)
    looped = static_n is None or static_n > _attr_int(k, "max_single_block", 8192)
    if looped:
        block_n = _attr_int(k, "block_n", 1024 if static_n is None else 4096)
    else:
        block_n = _attr_int(k, "block_n", max(32, _next_pow2(static_n)))
    # Phases: pass1 (row chunks: prologue + accumulate), finish (per-row scalars, top level),
    # pass2 (row chunks: epilogue). Per-row values never depend on row elements except through
    # the accumulators, so everything pass2 needs that is scalar is hoisted into finish.
    pass1 = _closure(stmts, [src_idx] + pre_roots, set())
    c2 = _closure(stmts, e_roots, set())
    finish = _closure(stmts, r_roots + [i for i in c2 if stmts[i].out and not body.vec[stmts[i].out]], set())
    have = {stmts[i].out for i in finish if stmts[i].out}
    if not looped:
        finish = [i for i in finish if i not in pass1]
        have |= {stmts[i].out for i in pass1 if stmts[i].out}
    skip = set(finish) | (set() if looped else set(pass1))
    pass2 = [i for i in _closure(stmts, e_roots, have) if i not in skip]
    blocks = (("pass1", pass1), ("finish", finish), ("pass2", pass2))
    num_warps = _attr_int(k, "num_warps", max(1, min(8, block_n // 256)))
    rows = prod(lead)
    params = (("BLOCK_N", block_n), ("N", n_lit), ("ROWS", pool.lit(rows)), ("LOOPED", looped),
              ("RED", red_kind), ("RED_SRC", red_src))
    rd, wr = _bytes(g)
    numel = prod(shape)
    flops = _pointwise_flops(g, numel) + numel * (3 if red.op in ("rms_norm", "softmax", "log_softmax") else 1)
    return KernelSpec(
        name=_kernel_name(k, index), family="reduction", template="reduction.py.j2",
        args=tuple(tensor_args(g)) + tuple(pool.args), grid=(dim_str(rows),), num_warps=num_warps,
        num_stages=1, params=params,
        body=(("coords", tuple(body.ix.coords)),) + tuple((nm, tuple(stmts[i] for i in ix)) for nm, ix in blocks),
        source_nodes=source_nodes(g), flops=dim_str(flops), bytes_read=rd, bytes_written=wr)


# ----------------------------------------------------------------------------- gemm

def _lower_gemm(k: Kernel, index: int) -> KernelSpec:
    g = k.body
    vals = g.values()
    mms = [n for n in g.nodes if n.op in ("linear", "matmul")]
    if any(n.op == "embedding" for n in g.nodes) and not mms:
        return _lower_pointwise(k, index)
    if not mms:
        raise _fail(k, "has no linear or matmul op")
    if len(mms) > 2 or (len(mms) == 2 and not _dual(mms)):
        raise _fail(k, "takes one linear/matmul, or two bias-free linears sharing x with same-shaped weights",
                    mms[-1])
    first = mms[0]
    dual = len(mms) == 2
    pool = ScalarPool(i64=bool(k.attr("index_i64", False)))
    names = arg_names(g)
    out_t = first.out.type
    is_mm = first.op == "matmul"
    x_name, w_name = first.inputs[0], first.inputs[1]
    dt = vals[x_name].type.dtype
    # views of the operands (inputs, possibly through index-map layout ops)
    views: dict[str, tuple[str, View]] = {v.name: (v.name, View.contiguous(v.type.shape)) for v in g.inputs}
    epi_nodes: list[Node] = []
    for n in g.nodes:
        if n.op in INDEX_MAP_OPS and n.inputs[0] in views:
            base, v = views[n.inputs[0]]
            try:
                views[n.out.name] = (base, apply_layout(v, n.op, n.attr_dict, n.out.type.shape))
            except ViewError as e:
                raise _fail(k, f"{n.op} cannot be an index map: {e}", n) from None
            epi_nodes.append(n)
        elif n.op in ("linear", "matmul"):
            for x in n.inputs[:2]:
                if x not in views:
                    raise _fail(k, f"GEMM operand %{x} is computed inside the kernel; operands must be kernel inputs",
                                n, "a prologue must be its own kernel")
        else:
            kind = OPS[n.op].kind
            if kind not in (POINTWISE, SOURCE) and n.op not in INDEX_MAP_OPS:
                raise _fail(k, f"{n.op} ({kind}) cannot be part of a GEMM epilogue", n)
            if n.op in INDEX_MAP_OPS:
                raise _fail(k, f"{n.op} of a value computed inside the kernel", n)
            if n.op == "rope":
                raise _fail(k, "rope is not supported in a GEMM epilogue", n)
            epi_nodes.append(n)
    if is_mm:
        at, bt = vals[x_name].type, vals[w_name].type
        batch = out_t.shape[:-2]
        m_e, k_e, n_e = at.shape[-2], at.shape[-1], bt.shape[-1]
        a_shape = batch + (m_e, k_e)
        b_shape = batch + (k_e, n_e)
        a_axes = [Axis("pid_b", tuple(range(len(batch)))), Axis("offs_m", (len(batch),), "[:, None]"),
                  Axis("offs_k", (len(batch) + 1,), "[None, :]")]
        b_axes = [Axis("pid_b", tuple(range(len(batch)))), Axis("offs_k", (len(batch),), "[:, None]"),
                  Axis("offs_n", (len(batch) + 1,), "[None, :]")]
        o_axes = [Axis("pid_b", tuple(range(len(batch)))), Axis("offs_m", (len(batch),), "[:, None]"),
                  Axis("offs_n", (len(batch) + 1,), "[None, :]")]
        try:
            a_st = broadcast_strides(views[x_name][1], a_shape)
            b_views = [broadcast_strides(views[w_name][1], b_shape)]
        except ViewError as e:
            raise _fail(k, f"matmul operands: {e}", first) from None
    else:
        xt = vals[x_name].type
        lead = xt.shape[:-1]
        batch = ()
        m_e, k_e, n_e = prod(lead), xt.shape[-1], vals[w_name].type.shape[0]
        a_shape = tuple(lead) + (k_e,)
        b_shape = (k_e, n_e)
        a_axes = [Axis("offs_m", tuple(range(len(lead))), "[:, None]"), Axis("offs_k", (len(lead),), "[None, :]")]
        b_axes = [Axis("offs_k", (0,), "[:, None]"), Axis("offs_n", (1,), "[None, :]")]
        o_axes = [Axis("offs_m", tuple(range(len(lead))), "[:, None]"), Axis("offs_n", (len(lead),), "[None, :]")]
        try:
            a_st = broadcast_strides(views[x_name][1], a_shape)
            b_views = []
            for mm in mms:
                wv = views[mm.inputs[1]][1]
                b_views.append(broadcast_strides(View(tuple(reversed(wv.shape)), tuple(reversed(wv.strides)),
                                                      wv.offset), b_shape))
        except ViewError as e:
            raise _fail(k, f"linear operands: {e}", first) from None
    # operand address terms (the K term is advanced by the template's loop)
    a_ix = IndexBuilder(a_shape, tuple(a_axes), pool)
    a_terms = _cover_tile(a_ix.terms(a_st), a_axes[-2:])
    b_ix = IndexBuilder(b_shape, tuple(b_axes), pool)
    b_terms = [_cover_tile(b_ix.terms(st), b_axes[-2:]) for st in b_views]
    kdim_a, kdim_b = len(a_shape) - 1, len(b_shape) - 2
    sak = pool.lit(a_st[kdim_a])
    sbk = [pool.lit(st[kdim_b]) for st in b_views]
    a_off = pool.lit(views[x_name][1].offset)
    b_off = [pool.lit(views[mm.inputs[1]][1].offset) for mm in mms]
    # epilogue over the output tile
    o_shape = out_t.shape
    body = _Body(k, pool, o_shape, o_axes, "omask", {"offs_m": "mmask[:, None]", "offs_n": "nmask[None, :]"})
    body.views = views
    for j, mm in enumerate(mms):
        acc = f"acc{j}"
        body.vec[acc], body.kind[acc] = True, "f32"
        body._names.add(acc)
        if len(mm.inputs) == 3:
            bias = body.convert(body.use(mm.inputs[2], mm), "f32")
            out = body.fresh(mm.out.name)
            body.define(Stmt("add", out, (acc, bias), (), mm.out.type.dtype), True, "f32")
            body.var[mm.out.name] = out
        else:
            body.var[mm.out.name] = acc
    for n in epi_nodes:
        if n.op == "const":
            body.const(n)
        elif n.op in INDEX_MAP_OPS:
            continue
        else:
            body.pointwise(n)
    for i, oname in enumerate(g.outputs):
        o = vals[oname]
        if o.type.rank != len(o_shape) or not all(same(a, b) for a, b in zip(o.type.shape, o_shape)):
            raise _fail(k, f"output %{oname} : {o.type} does not have the GEMM output shape {out_t}")
        body.store(o, i, None)
    # tiles
    static_m, static_n, static_k = _static(m_e), _static(n_e), _static(k_e)
    f32 = dt is DType.f32
    # Tiles (checked with ptxas for sm_90a: no spills). bf16: 128x128x64 on 8 warps (wgmma,
    # 3-stage cp.async pipeline); f32 uses exact FMA dots ("ieee"), so smaller tiles. A small
    # static M (decode) shrinks BLOCK_M to the next power of two >= 16 (tl.dot's minimum).
    bm_default = 32 if f32 else 128
    if static_m is not None:
        bm_default = min(bm_default, max(16, _next_pow2(static_m)))
    bm = _attr_int(k, "block_m", bm_default)
    bn = _attr_int(k, "block_n", 64 if f32 else 128)
    if static_n is not None:
        bn = min(bn, max(16, _next_pow2(static_n)))
    bk = _attr_int(k, "block_k", 32 if f32 else 64)
    if static_k is not None:
        bk = min(bk, max(16, _next_pow2(static_k)))
    even_k = static_k is not None and static_k % bk == 0
    num_warps = _attr_int(k, "num_warps", 8 if bm * bn >= 128 * 128 else 4)
    num_stages = _attr_int(k, "num_stages", 3)
    m_lit, n_lit, k_lit = pool.lit(m_e), pool.lit(n_e), pool.lit(k_e)
    nbatch = prod(batch)
    grid = [dim_str(sympy.ceiling(m_e / bm) * sympy.ceiling(n_e / bn) * nbatch)]
    params = (
        ("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK_K", bk), ("GROUP_M", 8), ("M", m_lit), ("N", n_lit), ("K", k_lit),
        ("EVEN_K", even_k), ("DUAL", dual), ("BATCHED", bool(batch)),
        ("PRECISION", "ieee" if f32 else ""),
        ("A_PTR", names[("in", views[x_name][0])]), ("A_TERMS", a_terms), ("A_OFF", a_off), ("A_SK", sak),
        ("B_PTRS", tuple(names[("in", views[mm.inputs[1]][0])] for mm in mms)), ("B_TERMS", tuple(b_terms)),
        ("B_OFFS", tuple(b_off)), ("B_SK", tuple(sbk)),
    )
    rd, wr = _bytes(g)
    numel = prod(o_shape)
    flops = 2 * len(mms) * nbatch * m_e * n_e * k_e + _pointwise_flops(g, numel)
    coords = tuple(a_ix.coords) + tuple(b_ix.coords)
    return KernelSpec(
        name=_kernel_name(k, index), family="gemm", template="gemm.py.j2",
        args=tuple(tensor_args(g)) + tuple(pool.args), grid=tuple(grid), num_warps=num_warps,
        num_stages=num_stages, params=params,
        body=(("operand_coords", _dedupe(coords)), ("coords", tuple(body.ix.coords)), ("epilogue", tuple(body.stmts))),
        source_nodes=source_nodes(g), flops=dim_str(sympy.expand(flops)), bytes_read=rd, bytes_written=wr)


def _cover_tile(terms: tuple[tuple[str, str], ...], axes: Sequence[Axis]) -> tuple[tuple[str, str], ...]:
    """Add `axis * 0` terms so an operand pointer spans the whole 2-D tile (size-1 dims drop out)."""
    have = {tok for expr, _ in terms for tok in _TOKEN.findall(expr)}
    extra = tuple((f"{a.var}{a.bcast} * 0", "1") for a in axes
                  if not any(t == a.var or t.startswith(a.var + "_d") for t in have))
    return terms + extra


def _dedupe(stmts: Iterable[Stmt]) -> tuple[Stmt, ...]:
    seen: set[str] = set()
    out = []
    for s in stmts:
        if s.out not in seen:
            seen.add(s.out)
            out.append(s)
    return tuple(out)


def _dual(mms: list[Node]) -> bool:
    a, b = mms
    return (a.op == b.op == "linear" and len(a.inputs) == len(b.inputs) == 2 and a.inputs[0] == b.inputs[0]
            and a.out.type.rank == b.out.type.rank
            and all(same(x, y) for x, y in zip(a.out.type.shape, b.out.type.shape)))


# ----------------------------------------------------------------------------- attention

def flash_tiles(k: Kernel, sq: sympy.Expr, f32: bool) -> tuple[int, int, int]:
    """BLOCK_M, BLOCK_N and num_warps of a flash-attention kernel (`attention`, `mla_attention`).

    Defaults (ptxas for sm_90a, no spills at D=192/Dv=128 and at MLA's nope 128 + rope 64 / v 128):
    bf16 128x64 on 8 warps; f32 (exact FMA dots) 32x32 on 4 warps; a small static Sq (decode)
    shrinks BLOCK_M to >= 16. Kernel attributes block_m, block_n, num_warps override them."""
    bm_default = 32 if f32 else 128
    static_sq = _static(sq)
    if static_sq is not None:
        bm_default = min(bm_default, max(16, _next_pow2(static_sq)))
    bm = _attr_int(k, "block_m", bm_default)
    bn = _attr_int(k, "block_n", 32 if f32 else 64)
    return bm, bn, _attr_int(k, "num_warps", 8 if bm >= 128 else 4)


def flash_pairs(sq: sympy.Expr, sk: sympy.Expr, causal: bool) -> sympy.Expr:
    """(query, key) pairs one (batch, head) scores: all Sq x Sk, or causally (the queries being the
    last Sq of Sk positions) Sq(Sk - Sq) + Sq(Sq + 1)/2."""
    return sq * sk if not causal else sq * (sk - sq) + sq * (sq + 1) / 2


def _lower_attention(k: Kernel, index: int) -> KernelSpec:
    g = k.body
    vals = g.values()
    atts = [n for n in g.nodes if OPS[n.op].kind == ATTENTION]
    others = [n for n in g.nodes if OPS[n.op].kind != ATTENTION and n.op not in INDEX_MAP_OPS]
    if len(atts) != 1 or others:
        bad = others[0] if others else (atts[1] if len(atts) > 1 else None)
        raise _fail(k, "an attention kernel holds exactly one attention op (and layout ops on its inputs)", bad)
    att = atts[0]
    if list(g.outputs) != [att.out.name]:
        raise _fail(k, f"must return only the attention output %{att.out.name}, returns {list(g.outputs)}")
    pool = ScalarPool(i64=bool(k.attr("index_i64", False)))
    names = arg_names(g)
    views: dict[str, tuple[str, View]] = {v.name: (v.name, View.contiguous(v.type.shape)) for v in g.inputs}
    for n in g.nodes:
        if n.op in INDEX_MAP_OPS:
            if n.inputs[0] not in views:
                raise _fail(k, f"{n.op} of a computed value", n)
            base, v = views[n.inputs[0]]
            try:
                views[n.out.name] = (base, apply_layout(v, n.op, n.attr_dict, n.out.type.shape))
            except ViewError as e:
                raise _fail(k, f"{n.op} cannot be an index map: {e}", n) from None
    q, kk, v = att.inputs
    qt, kt, vt = vals[q].type, vals[kk].type, vals[v].type
    batch = qt.shape[:-2]
    sq, sk, d, dv = qt.shape[-2], kt.shape[-2], qt.shape[-1], vt.shape[-1]
    sd, sdv = _static(d), _static(dv)
    if sd is None or sdv is None:
        raise _fail(k, f"head dims must be static, got D={d} Dv={dv}", att)
    nbd = len(batch)
    # batch offsets only: seq and head-dim strides are applied by the template
    ix = IndexBuilder(tuple(batch) + (sympy.Integer(1), sympy.Integer(1)),
                      (Axis("pid_b", tuple(range(nbd))), Axis("seq", (nbd,)), Axis("hd", (nbd + 1,))), pool)
    zero2 = (sympy.Integer(0), sympy.Integer(0))

    def operand(name: str, shape: tuple) -> tuple[str, tuple, str, str, str]:
        base, view = views[name]
        try:
            st = broadcast_strides(view, shape)
        except ViewError as e:
            raise _fail(k, f"attention operand %{name}: {e}", att) from None
        return (names[("in", base)], ix.terms(st[:-2] + zero2), pool.lit(view.offset), pool.lit(st[-2]),
                pool.lit(st[-1]))
    qo = operand(q, tuple(batch) + (sq, d))
    ko = operand(kk, tuple(batch) + (sk, d))
    vo = operand(v, tuple(batch) + (sk, dv))
    ot = att.out.type
    ost = View.contiguous(ot.shape).strides
    oterms = ix.terms(tuple(ost[:-2]) + zero2)
    d0 = max(16, 1 << (sd.bit_length() - 1)) if sd >= 16 else 16
    rest = sd - d0 if sd > d0 else 0
    d1 = max(16, _next_pow2(rest)) if rest > 0 else 0
    dv_pad = max(16, _next_pow2(sdv))
    f32 = qt.dtype is DType.f32
    bm, bn, num_warps = flash_tiles(k, sq, f32)
    scale = float(att.attr("scale"))
    params = (
        ("BLOCK_M", bm), ("BLOCK_N", bn), ("D", sd), ("D0", d0), ("D1", d1), ("DV", sdv), ("DV_PAD", dv_pad),
        ("SQ", pool.lit(sq)), ("SK", pool.lit(sk)), ("CAUSAL", bool(att.attr("causal"))),
        ("QK_SCALE", repr(scale * 1.4426950408889634)), ("PRECISION", "ieee" if f32 else ""),
        ("P_DTYPE", {DType.bf16: "tl.bfloat16", DType.f16: "tl.float16"}.get(qt.dtype, "tl.float32")),
        ("Q", qo), ("K", ko), ("V", vo),
        ("O", (names[("out", 0)], oterms, "0", pool.lit(ost[-2]), pool.lit(ost[-1]))),
    )
    nb = prod(batch)
    flops = 2 * nb * flash_pairs(sq, sk, bool(att.attr("causal"))) * (sd + sdv)
    rd, wr = _bytes(g)
    return KernelSpec(
        name=_kernel_name(k, index), family="attention", template="attention.py.j2",
        args=tuple(tensor_args(g)) + tuple(pool.args),
        grid=(dim_str(sympy.ceiling(sq / bm) * nb),), num_warps=num_warps,
        num_stages=_attr_int(k, "num_stages", 2), params=params, body=(("coords", tuple(ix.coords)),),
        source_nodes=source_nodes(g), flops=dim_str(sympy.expand(flops)), bytes_read=rd, bytes_written=wr)


# ----------------------------------------------------------------------------- entry point

LOWERINGS: dict[str, Callable[[Kernel, int], KernelSpec]] = {
    "pointwise": _lower_pointwise,
    "reduction": _lower_reduction,
    "gemm": _lower_gemm,
    "attention": _lower_attention,
}


def lower_kernel(kernel: Kernel, index: int) -> KernelSpec:
    """Lower a fused IR kernel to a KernelSpec; `index` numbers it (k{index}_...) if unnamed."""
    fn = LOWERINGS.get(kernel.family)
    if fn is None:
        raise CodegenError(f"codegen: kernel @{kernel.name}: unknown family {kernel.family!r}",
                           hint=f"families: {', '.join(LOWERINGS)}")
    if not kernel.body.outputs:
        raise _fail(kernel, "returns nothing")
    _check_outputs_unique(kernel)
    for o in kernel.body.outputs:
        if o in {v.name for v in kernel.body.inputs} and kernel.family != "pointwise":
            raise _fail(kernel, f"returns its input %{o} unchanged")
    return fn(kernel, index)


__all__ = ["LOWERINGS", "lower_kernel"]
