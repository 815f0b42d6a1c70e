"""IR types: element dtypes and tensor types with symbolic (sympy) dimensions.

Sits at the bottom of the IR: everything else (op table, graph, printer, parser,
verifier, interpreter) describes values with these types. Dynamic sizes are named
sympy symbols (integer, positive) so shapes print as `f32[T,256]` and parse back.
"""
from __future__ import annotations

import enum
import operator
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

import sympy
import torch

from .dimexpr import parse_expr_text, symbol_name_ok


class DType(enum.Enum):
    """Element types. The value is the IR spelling."""

    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    fp8e4m3 = "fp8e4m3"
    fp8e5m2 = "fp8e5m2"
    i32 = "i32"
    i64 = "i64"
    bool = "bool"

    def __repr__(self) -> str:
        return f"DType.{self.name}"

    @property
    def torch(self) -> torch.dtype:
        return _TO_TORCH[self]

    @property
    def is_float(self) -> bool:
        return self in (DType.f32, DType.f16, DType.bf16, DType.fp8e4m3, DType.fp8e5m2)

    @property
    def itemsize(self) -> int:
        return _TO_TORCH[self].itemsize

    @staticmethod
    def from_torch(dt: torch.dtype) -> "DType":
        try:
            return _FROM_TORCH[dt]
        except KeyError:
            from .errors import TraceError
            raise TraceError(f"unsupported dtype: {dt}", hint="use one of " + ", ".join(d.value for d in DType)) from None

    @staticmethod
    def parse(text: str) -> "DType":
        return DType(text)


_TO_TORCH = {
    DType.f32: torch.float32, DType.f16: torch.float16, DType.bf16: torch.bfloat16,
    DType.fp8e4m3: torch.float8_e4m3fn, DType.fp8e5m2: torch.float8_e5m2,
    DType.i32: torch.int32, DType.i64: torch.int64, DType.bool: torch.bool,
}
_FROM_TORCH = {v: k for k, v in _TO_TORCH.items()}

Dim = sympy.Expr


@lru_cache(maxsize=None)
def sym(name: str) -> sympy.Symbol:
    """The one symbol for a named dynamic dimension (positive integer).

    Names are identifiers that the expression grammar reads back as symbols: not Python keywords,
    dunders, function names (`floor`, `Max`, ...), literals (`inf`, `None`) or dtypes (`f32`)."""
    if not isinstance(name, str) or not symbol_name_ok(name):
        raise ValueError(f"bad dimension symbol name: {name!r}")
    return sympy.Symbol(name, integer=True, positive=True)


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
    dims = [] if not inner else _split_top(inner)
    return TensorType(dt, tuple(parse_dim(d) for d in dims))


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets/parentheses/quotes."""
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
            if sympy.simplify(d - first) != 0:
                raise ValueError(f"cannot broadcast dims {first} and {d}")
        out.append(first)
    return tuple(out)
