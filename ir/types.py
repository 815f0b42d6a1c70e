"""IR types: tensor types with symbolic (sympy) dimensions, over the element dtypes of ir/dtype.py.

Sits near the bottom of the IR (above `dtype.py` and the dim grammar `dimexpr.py`, whose `DType`
and `sym` it re-exports): everything else (op table, graph, printer, parser, verifier,
interpreter) describes values with these types. Dynamic sizes are named sympy symbols (integer,
positive) so shapes print as `f32[T,256]` and parse back.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import sympy

from .dimexpr import parse_expr_text, sym  # noqa: F401  (re-exported: `types.sym`)
from .dtype import DType


Dim = sympy.Expr


def as_dim(d: int | str | sympy.Expr) -> Dim:
    """A dimension from an int, a sympy expression, or text in the dim grammar (ir/dimexpr.py)."""
    if isinstance(d, bool):
        raise TypeError("a bool is not a dimension")
    if isinstance(d, int):
        return sympy.Integer(d)
    if isinstance(d, str):
        return parse_dim(d)
    if isinstance(d, sympy.Expr):
        return d
    raise TypeError(f"not a dimension: {d!r}")


def to_expr(v: int | float | str | sympy.Basic) -> sympy.Expr:
    """A sympy expression from a Python number, a sympy object, or text in the dim grammar.

    The typed replacement for `sympy.sympify`, which evaluates strings as Python: text goes through
    our own grammar only, and any other type is a TypeError."""
    if isinstance(v, bool):
        raise TypeError("a bool is not a size expression")
    if isinstance(v, sympy.Basic):
        return v
    if isinstance(v, int):
        return sympy.Integer(v)
    if isinstance(v, float):
        return sympy.Float(v)
    if isinstance(v, str):
        return parse_dim(v)
    if hasattr(type(v), "__index__"):         # numpy / torch integer scalars
        return sympy.Integer(operator.index(v))
    raise TypeError(f"not a size expression: {type(v).__name__} {v!r}")


def parse_dim(text: str) -> Dim:
    """Text -> dim, through the bounded grammar of ir/dimexpr.py (never `sympify`/`eval`)."""
    return parse_expr_text(text)


def dim_str(d: Dim) -> str:
    return str(d).replace(" ", "")


@dataclass(frozen=True, slots=True)
class TensorType:
    """A tensor's dtype and shape; dims are sympy expressions (ints are sympy.Integer)."""

    dtype: DType
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(as_dim(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def numel(self) -> Dim:
        n: Dim = sympy.Integer(1)
        for d in self.shape:
            n = n * d
        return n

    @property
    def nbytes(self) -> Dim:
        return self.numel * self.dtype.itemsize

    def free_symbols(self) -> set[sympy.Symbol]:
        out: set[sympy.Symbol] = set()
        for d in self.shape:
            out |= d.free_symbols
        return out

    def is_static(self) -> bool:
        return not self.free_symbols()

    def with_dtype(self, dtype: DType) -> "TensorType":
        return TensorType(dtype, self.shape)

    def with_shape(self, shape: Iterable[Dim | int]) -> "TensorType":
        return TensorType(self.dtype, tuple(shape))

    def __str__(self) -> str:
        return f"{self.dtype.value}[{','.join(dim_str(d) for d in self.shape)}]"

    def concrete_shape(self, env: dict[sympy.Symbol, int]) -> tuple[int, ...]:
        return tuple(int(d.subs(env)) if d.free_symbols else int(d) for d in self.shape)


def parse_type(text: str) -> TensorType:
    m = re.fullmatch(r"\s*([a-z0-9]+)\[(.*)\]\s*", text)
    if not m:
        raise ValueError(f"not a tensor type: {text!r}")
    dt = DType.parse(m.group(1))
    inner = m.group(2).strip()
    dims = [] if not inner else split_top(inner)
    return TensorType(dt, tuple(parse_dim(d) for d in dims))


def split_top(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets/parentheses/quotes (types, signatures and argument lists of the text IR)."""
    out, depth, cur, quote, escaped = [], 0, [], None, False
    for ch in text:
        if quote:
            cur.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True  # the printer escapes quotes inside strings as \"
            elif ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if cur or out:
        out.append("".join(cur).strip())
    return out


_SIMPLIFY_OPS = 48      # dims of real graphs have a handful of operations


def _dim_equal(x: int | Dim, y: int | Dim) -> bool:
    if x == y:
        return True
    d = to_expr(x) - to_expr(y)
    if d.is_polynomial():
        return sympy.expand(d) == 0
    syms = sorted(d.free_symbols, key=str)
    for k in range(3):
        v = d.xreplace({s: sympy.Integer(2 + 3 * i + 7 * k) for i, s in enumerate(syms)})
        if v.is_number and v != 0:
            return False
    return sympy.count_ops(d) <= _SIMPLIFY_OPS and sympy.simplify(d) == 0


def dims_equal(a: int | Dim | Sequence[int | Dim], b: int | Dim | Sequence[int | Dim]) -> bool:
    """Are two dims (ints or sympy expressions), or two shapes (sequences of dims), equal for every
    value of their symbols? The one "same dims" test of the IR (type rules, verifier, passes).

    Structural equality first (parsed IR matches what the type rules build), then a polynomial
    check. Dims with floor/ceiling/Max/Min/Mod are first evaluated at a few positive integer points
    (a difference anywhere settles it cheaply); `simplify`, which can take minutes on large
    expressions from hostile text, only confirms equality of small ones."""
    seq_a, seq_b = isinstance(a, (tuple, list)), isinstance(b, (tuple, list))
    if seq_a or seq_b:
        return seq_a and seq_b and len(a) == len(b) and all(_dim_equal(x, y) for x, y in zip(a, b))
    return _dim_equal(a, b)


def broadcast_shapes(*shapes: tuple[Dim, ...]) -> tuple[Dim, ...]:
    """Numpy broadcasting over symbolic shapes; raises ValueError when sizes disagree."""
    rank = max((len(s) for s in shapes), default=0)
    out: list[Dim] = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        non1 = [d for d in dims if d != 1]
        if not non1:
            out.append(sympy.Integer(1))
            continue
        first = non1[0]
        for d in non1[1:]:
            if not dims_equal(d, first):
                raise ValueError(f"cannot broadcast dims {first} and {d}")
        out.append(first)
    return tuple(out)
