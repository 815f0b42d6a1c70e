"""The statement emitter shared by the lowerings: a fused IR body -> `Stmt` programs over one tile.

Sits between the per-family lowerings (codegen/families/*.py, which pick the iteration space, tiles
and template) and the templates (which render the statements through codegen/exprs.py). Body
values become fp32 (or integer/bool) register variables, body inputs become loads through index
maps (layout ops on inputs are folded into strides), outputs become stores. Everything a family
cannot express is refused with a CodegenError that names the kernel and marks the offending
statement.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import sympy
import torch
from dsr_compiler.ir.errors import CodegenError
from dsr_compiler.ir.graph import Graph, Kernel, Node, Value
from dsr_compiler.ir.types import DType, dim_str
from dsr_compiler.ir.verifier import ir_window

from .exprs import POINTWISE_EXPRS, reg_kind
from .lower_common import INDEX_MAP_OPS, TOKEN, arg_names
from .spec import Stmt, ident
from .views import Axis, IndexBuilder, ScalarPool, View, ViewError, apply_layout, broadcast_strides, same

_KIND_ORDER = {"i1": 0, "i32": 1, "i64": 2, "f32": 3}
_COMPARE = ("lt", "le", "gt", "ge", "eq")
_FLOAT_ONLY = ("exp", "log", "sqrt", "rsqrt", "reciprocal", "sigmoid", "silu", "tanh", "gelu", "pow", "div", "cos", "sin")


class Body:
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
        self.scalars: set[str] = set()        # 0-d constants and layout ops of them (broadcast at every index)
        self.var: dict[str, str] = {}
        self.vec: dict[str, bool] = {}        # register var -> is it a tile (vs a per-program scalar)
        self.kind: dict[str, str] = {}        # register var -> register kind
        self.stmts: list[Stmt] = []
        self._names: set[str] = set()
        self.arg_names = arg_names(self.g)
        self.supports: tuple[str, ...] = ()    # optional statements this family can express

    def bind_accumulator(self, var: str) -> None:
        """Declare a per-element fp32 register that the template defines (a GEMM accumulator `acc0`)."""
        self.vec[var], self.kind[var] = True, "f32"
        self._names.add(var)

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
            for tok in TOKEN.findall(expr):
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
        """Refuse layout ops on computed values up front (they are the usual fusion mistake). A layout op on a
        0-d constant (`x.new_zeros(...)` is `expand(const)`) is the same scalar at every index: allowed."""
        viewable = {v.name for v in self.g.inputs}
        for n in self.g.nodes:
            if n.op == "const" or (n.op in INDEX_MAP_OPS and n.inputs[0] in self.scalars):
                self.scalars.add(n.out.name)
                continue
            if n.op in INDEX_MAP_OPS:
                if n.inputs[0] not in viewable:
                    raise self.fail(n, f"{n.op} of %{n.inputs[0]}, a value computed inside the kernel; only kernel "
                                       "inputs can be re-indexed",
                                    "start a new kernel at the layout op (it reads from memory)")
                viewable.add(n.out.name)

    # --- loads
    def record_layout(self, n: Node) -> None:
        src = n.inputs[0]
        if src in self.scalars:                  # a broadcast constant: the same register at every index
            self.scalars.add(n.out.name)
            self.var[n.out.name] = self.use(src, n)
            return
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
        """arange(n): the coordinate of the kernel's (1-D) iteration space (ir/ops/mla.py)."""
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
        for src in n.inputs:
            size = self.values[src].type.shape[d]
            if src in self.scalars:              # a broadcast constant piece
                hi = self.pool.lit(start + size)
                pieces.append((self.convert(self.use(src, n), want), hi))
                start = start + size
                continue
            if src not in self.views:
                raise self.fail(n, f"cat of %{src}, a value computed inside the kernel; only kernel inputs can be "
                                   "concatenated in place")
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


__all__ = ["Body"]
