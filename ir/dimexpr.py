"""Size and attribute expressions of the text IR: a tokenizer and a precedence-climbing parser.

Sits under the IR parser and types (it imports only `dtype.py` and `errors.py`): `types.parse_dim`
reads dims (`T*k + 16128`, `ceiling(T/128)`) and `parser.parse_attr_value` reads attribute values
(`1e-06`, `"reduction"`, `(2, T, 4)`) here. `sym`, the one symbol of a named dynamic dimension,
lives here too (types re-exports it), since the grammar decides which names can be symbols.
Text IR comes from files (dumps, bug reports), so reading it must never run code: the grammar
below builds sympy objects from tokens (`sympy.Integer`, `sym`, `+`, `sympy.floor`, ...) and never
hands text to `sympify`/`eval`, which evaluate Python. Everything is bounded: input length,
nesting depth, digits of an integer literal, bits of every intermediate number, and exponents,
so no input hangs, exhausts memory or overflows the stack.

Grammar (what `dim_str` / `format_attr` print, plus `//` and `%` as Python spells them):

    value := expr                               # attributes only: atoms also include literals
    expr  := term (('+' | '-') term)*
    term  := unary (('*' | '/' | '//' | '%') unary)*
    unary := ('-' | '+') unary | power
    power := atom ['**' unary]                  # exponent: an integer, |e| <= MAX_EXPONENT
    atom  := INT | SYMBOL | FUNC '(' expr (',' expr)* ')' | '(' expr ')'
           | FLOAT | inf | nan | STRING | True | False | None | DTYPE          # attributes only
           | '(' ')' | '(' value ',' [value (',' value)*] [','] ')'         # tuple (attributes)
           | '[' [value (',' value)* [',']] ']'                               # list -> tuple
    FUNC  := ceiling | ceil | floor | Max | Min | Mod
"""
from __future__ import annotations

import keyword
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, NoReturn

import sympy

from .dtype import DType
from .errors import ParseError

MAX_CHARS = 4096          # one dim or one attribute value
MAX_DEPTH = 64            # nested parentheses, calls, signs, tuples
MAX_INT_DIGITS = 64       # an integer literal (attributes hold at most 64-bit values in practice)
MAX_BITS = 1024           # every intermediate integer/rational numerator and denominator
MAX_EXPONENT = 64         # `x ** e`: |e| at most this (and an integer)
MAX_ARGS = 4              # arguments of Max/Min
MAX_SYMBOLS = 6           # distinct dim symbols in one expression (graphs use T, B, S, ...)
MAX_DEGREE = 6            # polynomial degree (T*S*B is 3): keeps expand/simplify of a dim cheap
MAX_CALLS = 8             # function calls in one expression (sympy evaluates each; some are slow)

# Names the grammar gives a meaning other than "dim symbol"; `sym` refuses them as symbol
# names so that every printed expression reads back as itself.
FUNCTIONS: dict[str, Callable[..., sympy.Expr]] = {
    "ceiling": sympy.ceiling, "ceil": sympy.ceiling, "floor": sympy.floor,
    "Max": sympy.Max, "Min": sympy.Min, "Mod": sympy.Mod,
}
_ARITY = {"ceiling": (1, 1), "ceil": (1, 1), "floor": (1, 1), "Mod": (2, 2), "Max": (1, MAX_ARGS),
          "Min": (1, MAX_ARGS)}
LITERAL_NAMES = ("True", "False", "None", "inf", "nan")


class ExprError(ParseError, ValueError):
    """A dim or attribute expression is not in the grammar (a ParseError; also a ValueError so
    that callers which validate sizes with `except ValueError` keep working)."""


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str      # int, float, name, str, op, end
    text: str
    pos: int


_TOKEN_RE = re.compile(r"""
    (?P<ws>[ \t]+)
  | (?P<float>(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+)
  | (?P<int>[0-9]+)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<op>\*\*|//|[-+*/%(),\[\]])
""", re.VERBOSE | re.DOTALL)


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            ch = text[pos]
            what = "an unterminated string" if ch == '"' else f"unexpected character {ch!r}"
            raise ExprError(f"{what} at column {pos + 1} of {_show(text)}",
                            hint="expressions use integers, dim symbols, + - * / // % **, "
                                 + ", ".join(sorted(set(FUNCTIONS))) + " and parentheses")
        kind = m.lastgroup or ""
        if kind != "ws":
            out.append(_Tok(kind, m.group(), pos))
        pos = m.end()
    out.append(_Tok("end", "", len(text)))
    return out


def _show(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


class _Parser:
    """Recursive descent over the token list; `attrs` admits the attribute literals."""

    def __init__(self, text: str, attrs: bool) -> None:
        if not isinstance(text, str):
            raise TypeError(f"an IR expression must be a str, got {type(text).__name__}")
        if len(text) > MAX_CHARS:
            raise ExprError(f"expression of {len(text)} characters is longer than the limit of {MAX_CHARS}",
                            hint="dims and attribute values of the text IR are short")
        self.text = text
        self.attrs = attrs
        self.toks = _tokens(text)
        self.i = 0
        self.depth = 0
        self.calls = 0

    # --- helpers
    def peek(self, k: int = 0) -> _Tok:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i = min(self.i + 1, len(self.toks) - 1)
        return t

    def accept(self, op: str) -> bool:
        t = self.peek()
        if t.kind == "op" and t.text == op:
            self.take()
            return True
        return False

    def expect(self, op: str) -> None:
        if not self.accept(op):
            self.fail(f"expected {op!r}", self.peek())

    def fail(self, what: str, tok: _Tok | None = None) -> NoReturn:
        at = tok if tok is not None else self.peek()
        got = "the end" if at.kind == "end" else repr(at.text)
        raise ExprError(f"{what} at column {at.pos + 1} (got {got}) in {_show(self.text)}")

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExprError(f"expression nests deeper than {MAX_DEPTH} levels: {_show(self.text)}")

    def count_call(self, t: _Tok) -> None:
        self.calls += 1
        if self.calls > MAX_CALLS:
            self.fail(f"more than {MAX_CALLS} function calls (floor, Mod, //, % ...) in one expression", t)

    # --- grammar
    def parse(self) -> Any:
        v = self.expr()
        if self.peek().kind != "end":
            self.fail("unexpected token")
        return v

    def expr(self) -> Any:
        # Terms are gathered and summed once: sympy's Add canonicalizes the same way as a chain
        # of `+`, but a chain re-flattens the growing sum at every step (quadratic).
        first = self.term()
        terms: list[Any] = [first]
        while self.peek().kind == "op" and self.peek().text in ("+", "-"):
            op = self.take()
            rhs = self.term()
            self.need_expr(terms[0], op)
            self.need_expr(rhs, op)
            terms.append(rhs if op.text == "+" else -rhs)
        return first if len(terms) == 1 else _bounded(sympy.Add(*terms), self.text)

    def term(self) -> Any:
        first = self.unary()
        factors: list[Any] = [first]
        while self.peek().kind == "op" and self.peek().text in ("*", "/", "//", "%"):
            op = self.take()
            rhs = self.unary()
            self.need_expr(factors[0], op)
            self.need_expr(rhs, op)
            if op.text != "*" and rhs == 0:
                self.fail("division by zero", op)
            if op.text == "*":
                factors.append(rhs)
            elif op.text == "/":
                factors.append(sympy.Pow(rhs, -1))
            else:                           # // and % apply to everything on their left
                self.count_call(op)
                left = _bounded(sympy.Mul(*factors), self.text)
                factors = [_apply("floor", [left / rhs]) if op.text == "//" else _apply("Mod", [left, rhs])]
        return factors[0] if len(factors) == 1 else _bounded(sympy.Mul(*factors), self.text)

    def unary(self) -> Any:
        t = self.peek()
        if t.kind == "op" and t.text in ("-", "+"):
            self.take()
            self.enter()
            v = self.unary()
            self.depth -= 1
            if isinstance(v, float) and self.attrs:      # -2.5, -inf, -0.0 (attribute floats)
                return -v if t.text == "-" else v
            self.need_expr(v, t)
            return _bounded(-v if t.text == "-" else v, self.text)
        return self.power()

    def power(self) -> Any:
        base = self.atom()
        t = self.peek()
        if not (t.kind == "op" and t.text == "**"):
            return base
        self.take()
        self.enter()
        exp = self.unary()
        self.depth -= 1
        self.need_expr(base, t)
        if not (isinstance(exp, sympy.Integer) and abs(int(exp)) <= MAX_EXPONENT):
            self.fail(f"an exponent must be an integer between -{MAX_EXPONENT} and {MAX_EXPONENT}", t)
        if base == 0 and int(exp) < 0:
            self.fail("zero to a negative power", t)
        return _bounded(base ** exp, self.text)

    def atom(self) -> Any:
        t = self.take()
        if t.kind == "int":
            if len(t.text) > MAX_INT_DIGITS:
                self.fail(f"an integer literal has more than {MAX_INT_DIGITS} digits", t)
            return sympy.Integer(int(t.text))
        if t.kind == "op" and t.text in ("(", "["):
            return self.group(t)
        if t.kind == "name":
            return self.name(t)
        if self.attrs:
            if t.kind == "float":
                return float(t.text)
            if t.kind == "str":
                return re.sub(r"\\(.)", r"\1", t.text[1:-1], flags=re.DOTALL)
        self.fail("expected a number, a dim symbol or '('" + (" or a literal" if self.attrs else ""), t)

    def group(self, open_tok: _Tok) -> Any:
        """`( expr )`, or in attributes a tuple `()`, `(a,)`, `(a, b)` or a list `[a, b]`."""
        self.enter()
        close = ")" if open_tok.text == "(" else "]"
        if open_tok.text == "[" and not self.attrs:
            self.fail("a list is not a size expression", open_tok)
        items: list[Any] = []
        is_tuple = open_tok.text == "["
        while not self.accept(close):
            if items and not is_tuple:
                self.fail(f"expected {close!r}")
            items.append(self.expr())
            if self.accept(","):
                if not self.attrs:
                    self.fail("a tuple is not a size expression", self.toks[self.i - 1])
                is_tuple = True
            elif self.peek().kind != "op" or self.peek().text != close:
                self.fail(f"expected ',' or {close!r}")
        self.depth -= 1
        if not items and open_tok.text == "(":
            if not self.attrs:
                self.fail("empty parentheses", open_tok)
            is_tuple = True
        return tuple(items) if is_tuple else items[0]

    def name(self, t: _Tok) -> Any:
        n = t.text
        if n in FUNCTIONS and self.peek().kind == "op" and self.peek().text == "(":
            return self.call(t)
        if self.attrs:
            if n in ("True", "False"):
                return n == "True"
            if n == "None":
                return None
            if n in ("inf", "nan"):
                return float(n)
            if n in _dtype_names():
                return DType(n)
        return self.symbol(t)

    def symbol(self, t: _Tok) -> sympy.Symbol:
        if not symbol_name_ok(t.text):
            self.fail(f"{t.text!r} is not a dim symbol (reserved name)", t)
        nxt = self.peek()
        if nxt.kind == "op" and nxt.text == "(":
            self.fail(f"{t.text!r} is not a function (functions: {', '.join(sorted(set(FUNCTIONS)))})", t)
        return sym(t.text)

    def call(self, t: _Tok) -> sympy.Expr:
        self.count_call(t)
        self.expect("(")
        self.enter()
        args: list[Any] = []
        while True:
            a = self.expr()
            self.need_expr(a, t)
            args.append(a)
            if not self.accept(","):
                break
            if len(args) >= MAX_ARGS:
                self.fail(f"more than {MAX_ARGS} arguments", t)
        self.expect(")")
        self.depth -= 1
        lo, hi = _ARITY[t.text]
        if not lo <= len(args) <= hi:
            self.fail(f"{t.text} takes {lo if lo == hi else f'{lo} to {hi}'} argument(s), got {len(args)}", t)
        if t.text == "Mod" and args[1] == 0:
            self.fail("Mod by zero", t)
        return _bounded(_apply(t.text, args), self.text)

    # --- typing
    def need_expr(self, v: Any, at: _Tok) -> None:
        if not isinstance(v, sympy.Expr):
            what = "a float" if isinstance(v, float) else f"the {type(v).__name__} {v!r}"
            self.fail(f"{what} cannot take part in a size expression", at)


def _apply(fn: str, args: list[sympy.Expr]) -> sympy.Expr:
    """Max, Min and Mod over symbolic arguments stay unevaluated: sympy's simplification of them
    compares argument pairs through the assumption system (Max/Min) or factors polynomials (Mod),
    which takes seconds on a few nested calls. The printer emits only evaluated (canonical) forms,
    and an unevaluated call with the same arguments is equal to the evaluated one, so printed
    text still reads back as the same expression."""
    if fn in ("Max", "Min", "Mod") and not all(a.is_number for a in args):
        if fn == "Mod":
            return sympy.Mod(*args, evaluate=False)
        uniq = list(dict.fromkeys(args))
        return uniq[0] if len(uniq) == 1 else FUNCTIONS[fn](*uniq, evaluate=False)
    return FUNCTIONS[fn](*args)


def _bounded(v: sympy.Expr, text: str, depth: int = 3) -> sympy.Expr:
    """Refuse numbers beyond MAX_BITS (so products and powers of literals cannot grow without bound)
    and infinities (a size is finite). Operands were checked when they were built, and sympy folds
    new numbers only into the top levels (a Mul's coefficient, an Add's constant, a Pow distributed
    over a product), so a shallow walk suffices."""
    if isinstance(v, sympy.Rational):
        if max(abs(v.p).bit_length(), v.q.bit_length()) > MAX_BITS:
            raise ExprError(f"a number in {_show(text)} exceeds {MAX_BITS} bits")
    elif v in (sympy.zoo, sympy.oo, -sympy.oo, sympy.nan):
        raise ExprError(f"{_show(text)} is not finite")
    elif depth > 0:
        for a in v.args:
            _bounded(a, text, depth - 1)
    return v


@lru_cache(maxsize=1)
def _dtype_names() -> frozenset[str]:
    return frozenset(d.value for d in DType)


def symbol_name_ok(name: str) -> bool:
    """A dim symbol: an identifier that is not a Python keyword, not a dunder, and not a name the
    grammar reads otherwise (functions, literals, dtypes)."""
    return (bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)) and not keyword.iskeyword(name)
            and not name.startswith("__") and name not in FUNCTIONS and name not in LITERAL_NAMES
            and name not in _dtype_names())



@lru_cache(maxsize=None)
def sym(name: str) -> sympy.Symbol:
    """The one symbol for a named dynamic dimension (positive integer).

    Names are identifiers that the expression grammar reads back as symbols: not Python keywords,
    dunders, function names (`floor`, `Max`, ...), literals (`inf`, `None`) or dtypes (`f32`)."""
    if not isinstance(name, str) or not symbol_name_ok(name):
        raise ValueError(f"bad dimension symbol name: {name!r}")
    return sympy.Symbol(name, integer=True, positive=True)


def _degree(e: sympy.Expr) -> int:
    """An upper bound of the polynomial degree (functions count as their arguments' degree)."""
    if e.is_Symbol:
        return 1
    if e.is_Number or not e.args:
        return 0
    if isinstance(e, sympy.Mul):
        return sum(_degree(a) for a in e.args)
    if isinstance(e, sympy.Pow):
        return _degree(e.base) * abs(int(e.exp)) if e.exp.is_Integer else MAX_DEGREE + 1
    return max(_degree(a) for a in e.args)


def _check_size(v: Any, text: str) -> Any:
    """Later stages expand and simplify dims (the verifier compares types); a dim of many symbols or
    a high degree would make that slow, so such text is refused here."""
    if isinstance(v, tuple):
        for x in v:
            _check_size(x, text)
    elif isinstance(v, sympy.Expr) and not v.is_Atom:
        if len(v.free_symbols) > MAX_SYMBOLS:
            raise ExprError(f"{_show(text)} uses more than {MAX_SYMBOLS} dim symbols")
        if _degree(v) > MAX_DEGREE:
            raise ExprError(f"{_show(text)} has a polynomial degree above {MAX_DEGREE}")
    return v


def _read(text: str, attrs: bool) -> Any:
    parser = _Parser(text, attrs)          # TypeError for a non-str, before anything else
    try:
        return _check_size(parser.parse(), text)
    except ExprError:
        raise
    except (ArithmeticError, ValueError, TypeError, AttributeError, RecursionError) as e:
        # sympy refusing an operation on values the grammar admitted: still bad input, not a crash
        raise ExprError(f"cannot build {_show(text)}: {type(e).__name__}: {e}") from None


def parse_expr_text(text: str) -> sympy.Expr:
    """A dim / size expression -> sympy (integers, dim symbols, arithmetic, whitelisted functions)."""
    v = _read(text, attrs=False)
    if not isinstance(v, sympy.Expr):
        raise ExprError(f"{_show(text)} is not a size expression")
    return v


def parse_value_text(text: str) -> Any:
    """An attribute value -> int, float, str, bool, None, DType, sympy expression, or tuple of those."""
    return _canon(_read(text, attrs=True))


def _canon(v: Any) -> Any:
    if isinstance(v, tuple):
        return tuple(_canon(x) for x in v)
    if isinstance(v, sympy.Integer):
        return int(v)
    return v


__all__ = ["ExprError", "FUNCTIONS", "LITERAL_NAMES", "MAX_CHARS", "MAX_DEGREE", "MAX_DEPTH", "MAX_EXPONENT",
           "MAX_INT_DIGITS", "MAX_SYMBOLS",
           "parse_expr_text", "parse_value_text", "symbol_name_ok"]
