"""Strided views and index maps: how a fused kernel addresses its (contiguous) inputs.

Used by lowering. A body input is a contiguous row-major buffer; the layout ops
`permute`, `expand`, `slice`, `reshape` applied to it become a `View` (shape, strides,
offset, all sympy), and broadcasting a view into a kernel's iteration shape gives one
stride per iteration dim (0 where broadcast). `IndexBuilder` turns those strides into
index terms over a family's coordinate axes (e.g. the flat `offs` of a pointwise kernel,
or `row` and `cols` of a reduction), flattening dims when strides allow and emitting
div/mod coordinate statements when they do not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import sympy
from dsr_compiler.ir.types import to_expr

from .spec import ArgSpec, Stmt

Expr = sympy.Expr
ONE, ZERO = sympy.Integer(1), sympy.Integer(0)


class ViewError(ValueError):
    """A layout op cannot be expressed as a strided view (lowering explains it)."""


def same(a: Expr, b: Expr) -> bool:
    """Symbolic equality; cheap structural checks first (simplify is slow)."""
    a, b = to_expr(a), to_expr(b)
    if a == b:
        return True
    d = sympy.expand(a - b)
    if d == 0:
        return True
    if d.is_number or d.is_polynomial():
        return False          # expand() is canonical for polynomials: a nonzero one stays nonzero
    return sympy.simplify(d) == 0


def prod(xs: Sequence[Expr]) -> Expr:
    out: Expr = ONE
    for x in xs:
        out = out * x
    return out


def contiguous_strides(shape: Sequence[Expr]) -> tuple[Expr, ...]:
    out: list[Expr] = []
    acc: Expr = ONE
    for d in reversed(shape):
        out.append(acc)
        acc = acc * d
    return tuple(reversed(out))


@dataclass(frozen=True)
class View:
    shape: tuple[Expr, ...]
    strides: tuple[Expr, ...]
    offset: Expr = ZERO

    @staticmethod
    def contiguous(shape: Sequence[Expr]) -> "View":
        shape = tuple(to_expr(d) for d in shape)
        return View(shape, contiguous_strides(shape), ZERO)

    def is_contiguous(self) -> bool:
        want = contiguous_strides(self.shape)
        return all(same(d, 1) or same(s, w) for d, s, w in zip(self.shape, self.strides, want))


def _divides(a: Expr, b: Expr) -> bool:
    """Does `a` divide `b` as a polynomial in the dim symbols (b / a has no denominator)?"""
    _, den = sympy.fraction(sympy.cancel(to_expr(b) / a))
    return den == 1


def _reshape_strides(v: View, new: tuple[Expr, ...]) -> tuple[Expr, ...]:
    """Strides of `v` reshaped to `new` without copying, or ViewError.

    Old and new non-unit dims are split into chunks with equal products (matched greedily
    by divisibility, so symbolic sizes work); inside a chunk the old dims must be mutually
    contiguous, and the new dims get contiguous strides scaled by the chunk's innermost stride.
    """
    if v.is_contiguous():
        return contiguous_strides(new)
    old = [(d, s) for d, s in zip(v.shape, v.strides) if not same(d, 1)]
    new_idx = [j for j, d in enumerate(new) if not same(d, 1)]
    out: list[Expr] = [ZERO] * len(new)
    i = j = 0
    while i < len(old) or j < len(new_idx):
        if i >= len(old) or j >= len(new_idx):
            raise ViewError(f"reshape {list(v.shape)} -> {list(new)}: sizes do not match")
        chunk_old, chunk_new = [i], [j]
        po, pn = old[i][0], new[new_idx[j]]
        while not same(po, pn):
            if _divides(pn, po) and j + 1 < len(new_idx):
                j += 1
                chunk_new.append(j)
                pn = pn * new[new_idx[j]]
            elif _divides(po, pn) and i + 1 < len(old):
                i += 1
                chunk_old.append(i)
                po = po * old[i][0]
            else:
                raise ViewError(f"reshape {list(v.shape)} -> {list(new)}: cannot match dims {po} and {pn}")
        for a, b in zip(chunk_old, chunk_old[1:]):
            if not same(old[a][1], old[b][1] * old[b][0]):
                raise ViewError(f"reshape of a strided view {list(v.shape)} (strides {list(v.strides)}) to "
                                f"{list(new)} merges dims that are not contiguous")
        stride = old[chunk_old[-1]][1]
        for jj in reversed(chunk_new):
            out[new_idx[jj]] = stride
            stride = stride * new[new_idx[jj]]
        i += 1
        j += 1
    return tuple(out)


def apply_layout(v: View, op: str, attrs: dict[str, Any], out_shape: tuple[Expr, ...]) -> View:
    """The view after layout op `op` (its IR output shape is `out_shape`)."""
    if op == "permute":
        dims = attrs["dims"]
        return View(tuple(v.shape[d] for d in dims), tuple(v.strides[d] for d in dims), v.offset)
    if op == "expand":
        lead = len(out_shape) - len(v.shape)
        strides = [ZERO] * lead
        for i, (d, s) in enumerate(zip(v.shape, v.strides)):
            strides.append(ZERO if same(d, 1) and not same(out_shape[lead + i], 1) else s)
        return View(tuple(out_shape), tuple(strides), v.offset)
    if op == "slice":
        d = attrs["dim"] % len(v.shape)
        start, step = attrs["start"], attrs.get("step", 1) or 1
        strides = list(v.strides)
        strides[d] = v.strides[d] * step
        return View(tuple(out_shape), tuple(strides), v.offset + start * v.strides[d])
    if op == "reshape":
        return View(tuple(out_shape), _reshape_strides(v, tuple(out_shape)), v.offset)
    raise ViewError(f"{op} is not an index-map layout op")


def broadcast_strides(v: View, shape: Sequence[Expr]) -> tuple[Expr, ...]:
    """Strides of `v` broadcast (right-aligned) into iteration `shape`; 0 where broadcast."""
    if len(v.shape) > len(shape):
        raise ViewError(f"{list(v.shape)} has more dims than the iteration shape {list(shape)}")
    lead = len(shape) - len(v.shape)
    out: list[Expr] = [ZERO] * lead
    for i, (d, s) in enumerate(zip(v.shape, v.strides)):
        target = shape[lead + i]
        if same(d, target):
            out.append(ZERO if same(d, 1) else s)
        elif same(d, 1):
            out.append(ZERO)
        else:
            raise ViewError(f"{list(v.shape)} does not broadcast to {list(shape)}")
    return tuple(out)


# ----------------------------------------------------------------------------- scalars

class ScalarPool:
    """Turns sympy sizes into code: integer literals, or int scalar arguments (deduplicated).

    A dim symbol `T` becomes argument `s_T`; any other symbolic expression `szN`. The
    runtime evaluates each argument's `expr` at launch.
    """

    def __init__(self, i64: bool = False) -> None:
        self._by_expr: dict[str, str] = {}
        self.args: list[ArgSpec] = []
        self.i64 = i64

    def lit(self, e: Expr | int) -> str:
        e = to_expr(e)
        if not (e.is_Integer or e.is_Symbol):
            e = sympy.expand(e)
        if e.is_Integer:
            return str(int(e))
        key = str(e).replace(" ", "")
        if key in self._by_expr:
            return self._by_expr[key]
        name = f"s_{e.name}" if e.is_Symbol else f"sz{sum(1 for a in self.args if not a.name.startswith('s_'))}"
        self._by_expr[key] = name
        self.args.append(ArgSpec(name=name, kind="scalar", expr=key, scalar_dtype="i64" if self.i64 else "i32"))
        return name


# ----------------------------------------------------------------------------- index terms

@dataclass(frozen=True)
class Axis:
    """A coordinate variable of the template spanning consecutive iteration dims.

    `var` is the flat coordinate (e.g. `offs`, `row`, `offs_m`); `bcast` the suffix that
    lifts a 1-D coordinate into the tile (e.g. `[:, None]`), "" for 1-D kernels/scalars.
    """

    var: str
    dims: tuple[int, ...]
    bcast: str = ""


@dataclass
class IndexBuilder:
    shape: tuple[Expr, ...]
    axes: tuple[Axis, ...]
    pool: ScalarPool
    coords: list[Stmt] = field(default_factory=list)
    _coord_names: dict[tuple[str, int], str] = field(default_factory=dict)

    def _inner(self, ax: Axis, d: int) -> Expr:
        return prod([self.shape[e] for e in ax.dims if e > d])

    def coord(self, d: int) -> str:
        """The variable holding the coordinate of iteration dim `d` (emitting it once)."""
        ax = next(a for a in self.axes if d in a.dims)
        if len(ax.dims) == 1:
            return ax.var
        key = (ax.var, d)
        if key not in self._coord_names:
            name = f"{ax.var}_d{d}"
            self._coord_names[key] = name
            outer = d == ax.dims[0]
            self.coords.append(Stmt("coord", name, (), (
                ("axis", ax.var), ("inner", self.pool.lit(self._inner(ax, d))),
                ("size", self.pool.lit(self.shape[d])), ("outer", outer))))
        return self._coord_names[key]

    def terms(self, strides: Sequence[Expr]) -> tuple[tuple[str, str], ...]:
        """Index terms ((coordinate expr, stride literal), ...) for per-dim `strides`."""
        out: list[tuple[str, str]] = []
        for ax in self.axes:
            live = [d for d in ax.dims if not same(self.shape[d], 1)]
            nz = [d for d in live if not same(strides[d], 0)]
            if not nz:
                continue
            k = strides[live[-1]] if live else ZERO
            if len(nz) == len(live) and all(same(strides[d], k * self._inner(ax, d)) for d in live):
                out.append((ax.var + ax.bcast, self.pool.lit(k)))
                continue
            for d in nz:
                c = self.coord(d)
                out.append((c + ax.bcast if c != ax.var else ax.var + ax.bcast, self.pool.lit(strides[d])))
        return tuple(out)

    def coord_expr(self, d: int) -> str:
        ax = next(a for a in self.axes if d in a.dims)
        return self.coord(d) + ax.bcast


__all__ = ["Axis", "IndexBuilder", "ScalarPool", "View", "ViewError", "apply_layout", "broadcast_strides",
           "contiguous_strides", "prod", "same"]
