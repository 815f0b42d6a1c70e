"""The one table of Triton expressions: IR op -> Triton code, plus the codegen-internal ops.

Sits under the templates: every statement of a KernelSpec body program is rendered by
`render_stmt` (exposed to Jinja as the `stmts` filter), so an op's Triton spelling lives
here and nowhere else. Register convention: float values are fp32 in registers whatever
their IR dtype (loads widen, stores narrow, an explicit IR `cast` to a narrow float rounds
through that type); integers keep their width; bools are i1.
"""
from __future__ import annotations

from typing import Callable, Union

from dsr_compiler.ir.types import DType

from .spec import Stmt, comment_text

# IR dtype -> Triton element type (memory) and register kind.
TL_DTYPE = {
    DType.f32: "tl.float32", DType.f16: "tl.float16", DType.bf16: "tl.bfloat16",
    DType.fp8e4m3: "tl.float8e4nv", DType.fp8e5m2: "tl.float8e5", DType.i32: "tl.int32",
    DType.i64: "tl.int64", DType.bool: "tl.int1",
}
REG_TL = {"f32": "tl.float32", "i32": "tl.int32", "i64": "tl.int64", "i1": "tl.int1"}


def reg_kind(dt: DType) -> str:
    """The register kind that holds values of IR dtype `dt`."""
    if dt.is_float:
        return "f32"
    return {DType.i32: "i32", DType.i64: "i64", DType.bool: "i1"}[dt]


Expr = Union[str, Callable[[Stmt], str]]

# Generated code calls only Triton builtins (tl.load, tl.exp, tl.reduce, ...), never the
# @triton.jit library functions (tl.sum, tl.max, tl.zeros, tl.sigmoid, tl.cdiv): those are decorated
# once, when Triton is imported, so an interpreted kernel (TRITON_INTERPRET=1 at its own
# decoration) cannot call them in a process that also compiles. Reductions use `tl.reduce`
# with the combiners below, defined in every generated module.


def _a(s: Stmt, i: int) -> str:
    return s.args[i]


def _is_float(s: Stmt) -> bool:
    return s.dtype is not None and s.dtype.is_float


def _cast(s: Stmt) -> str:
    """IR cast: the argument is already converted to the target's register kind by lowering
    (a `convert` statement); narrow floats round through their storage type here."""
    to: DType = s.attr("to")
    x = _a(s, 0)
    if to is DType.bf16:
        return f"_dsr_round_bf16({x})"
    if to in (DType.f16, DType.fp8e4m3, DType.fp8e5m2):
        return f"{x}.to({TL_DTYPE[to]}).to(tl.float32)"
    return x


def _convert(s: Stmt) -> str:
    to = s.attr("to")
    frm = s.attr("from")
    x = _a(s, 0)
    if to == "i1":
        return f"{x} != 0"
    if frm == "f32" and to in ("i32", "i64"):
        return f"{x}.to({REG_TL[to]})"   # truncation toward zero, as torch
    return f"{x}.to({REG_TL[to]})"


def _rope(s: Stmt) -> str:
    # args: x, x at the pair partner (last-dim index i ^ 1), cos, sin, last-dim index i
    x, xp, cos, sin, i = s.args
    return f"{x} * {cos} + tl.where(({i} & 1) == 0, -{xp}, {xp}) * {sin}"


def _maxmin(fn: str) -> Callable[[Stmt], str]:
    def f(s: Stmt) -> str:
        if _is_float(s):
            return f"tl.{fn}({_a(s, 0)}, {_a(s, 1)}, propagate_nan=tl.PropagateNan.ALL)"
        return f"tl.{fn}({_a(s, 0)}, {_a(s, 1)})"
    return f


def _relu(s: Stmt) -> str:
    if _is_float(s):
        return f"tl.maximum({_a(s, 0)}, 0.0, propagate_nan=tl.PropagateNan.ALL)"
    return f"tl.maximum({_a(s, 0)}, 0)"


def _abs(s: Stmt) -> str:
    return f"tl.abs({_a(s, 0)})"


# Every POINTWISE op of the IR op table has exactly one entry (checked by a test).
POINTWISE_EXPRS: dict[str, Expr] = {
    "neg": "-{0}",
    "abs": _abs,
    "exp": "tl.exp({0})",
    "cos": "tl.cos({0})",                 # accurate (range-reduced) on CUDA, not cos.approx
    "sin": "tl.sin({0})",
    "log": "tl.log({0})",
    "sqrt": "tl.sqrt_rn({0})",
    "rsqrt": "tl.rsqrt({0})",
    "reciprocal": "1.0 / {0}",
    # tl.sigmoid is a jit'd library function, which an interpreted kernel cannot call when
    # Triton was imported in compile mode (see module doc); spell it out
    "sigmoid": "1.0 / (1.0 + tl.exp(-{0}))",
    "silu": "{0} / (1.0 + tl.exp(-{0}))",
    # libdevice.tanh does not run in the interpreter; this form is exact to ~1e-7 absolute
    "tanh": "2.0 / (1.0 + tl.exp(-2.0 * {0})) - 1.0",
    "relu": _relu,
    "gelu": "0.5 * {0} * (1.0 + tl.erf({0} * 0.7071067811865476))",
    "add": "{0} + {1}",
    "sub": "{0} - {1}",
    "mul": "{0} * {1}",
    "div": "{0} / {1}",
    "maximum": _maxmin("maximum"),
    "minimum": _maxmin("minimum"),
    "pow": "_dsr_pow({0}, {1})",
    "lt": "{0} < {1}",
    "le": "{0} <= {1}",
    "gt": "{0} > {1}",
    "ge": "{0} >= {1}",
    "eq": "{0} == {1}",
    "where": "tl.where({0}, {1}, {2})",
    "cast": _cast,
    "rope": _rope,
    "iota": lambda s: f"{s.args[0]}.to({TL_DTYPE[s.dtype]})",   # args: the 1-D coordinate (ir/ops/mla.py)
    "stop_gradient": "{0}",       # identity in value (ir/ops/loss.py); `differentiate` removes it first
}

# Codegen-internal value ops (reduction finishing steps, conversions).
INTERNAL_EXPRS: dict[str, Expr] = {
    "convert": _convert,
    "sum_finish": "{0}",                              # args: r_acc
    "mean_finish": "{0} / {1}",                       # args: r_acc, row length
    "amax_finish": "{0}",                             # args: r_max
    "rms_finish": "tl.rsqrt({0} / {1} + {2})",        # args: r_acc (sum of squares), row length, eps
    "rms_apply": "{0} * {1} * {2}",                   # args: x, 1/rms, weight
    "softmax_apply": "tl.exp({0} - {1}) / {2}",       # args: x, r_max_safe, r_sum
    "log_softmax_apply": "{0} - {1} - tl.log({2})",   # args: x, r_max_safe, r_sum
}

# Helper jit functions a rendered module defines. Every module defines the reduction
# combiners: `tl.sum`/`tl.max` are jit'd library functions that an interpreted kernel cannot
# call when the process imported Triton in compile mode, while `tl.reduce` with a combiner
# decorated next to the kernel works in both modes.
ALWAYS_HELPERS: tuple[str, ...] = ('''@triton.jit
def _dsr_add(a, b):
    return a + b
''', '''@triton.jit
def _dsr_max(a, b):
    return tl.maximum(a, b)
''', '''@triton.jit
def _dsr_round_bf16(x):
    # fp32 -> nearest bf16 value (RNE), kept in fp32. The interpreter's own conversion
    # truncates, so there it is done on the bits; compiled code uses cvt.rn.bf16.f32.
    r = x.to(tl.bfloat16).to(tl.float32)
    if _DSR_INTERPRET:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        r = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return r
''')

# Helper jit functions a rendered module defines when a statement uses them.
HELPERS: dict[str, str] = {
    "pow": '''@triton.jit
def _dsr_pow(a, b):
    # torch.pow for floats without libdevice (which the interpreter lacks)
    r = tl.exp2(b * tl.log2(tl.abs(a)))
    b_int = tl.floor(b) == b
    b_odd = b_int & ((tl.floor(b * 0.5) * 2.0) != b)
    r = tl.where(a < 0.0, tl.where(b_int, tl.where(b_odd, -r, r), float("nan")), r)
    return tl.where(b == 0.0, 1.0, r)
''',
}


def _lit(v: object) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, float):
        if v != v:
            return 'float("nan")'
        if v in (float("inf"), float("-inf")):
            return 'float("inf")' if v > 0 else 'float("-inf")'
        return repr(v)
    if isinstance(v, int):
        return str(int(v))
    raise TypeError(f"a constant in generated code must be a number or bool, got {type(v).__name__}")  # never text


def index_expr(terms: tuple, offset: str = "0") -> str:
    """`a * s + b + off` from ((var, stride), ...) with literal 0/1 strides simplified."""
    parts = []
    for var, stride in terms:
        if stride == "0":
            continue
        parts.append(var if stride == "1" else f"{var} * {stride}")
    if offset != "0":
        parts.append(offset)
    return " + ".join(parts) if parts else "0"


def _load(s: Stmt) -> str:
    ptr = s.attr("ptr")
    idx = index_expr(s.attr("terms"), s.attr("offset", "0"))
    addr = ptr if idx == "0" else f"{ptr} + ({idx})"
    mask = s.attr("mask", "")
    code = f"tl.load({addr}, mask={mask}, other=0)" if mask else f"tl.load({addr})"
    assert s.dtype is not None
    if s.dtype.is_float and s.dtype is not DType.f32:
        code += ".to(tl.float32)"
    return f"{s.out} = {code}"


def _store(s: Stmt) -> str:
    ptr = s.attr("ptr")
    idx = index_expr(s.attr("terms"), s.attr("offset", "0"))
    addr = ptr if idx == "0" else f"{ptr} + ({idx})"
    assert s.dtype is not None
    val = store_value(s.args[0], s.dtype)
    mask = s.attr("mask", "")
    return f"tl.store({addr}, {val}, mask={mask})" if mask else f"tl.store({addr}, {val})"


def store_value(var: str, dt: DType) -> str:
    """A register value converted for a store to a `dt` buffer (bf16 rounds to nearest even)."""
    if dt is DType.f32:
        return var
    if dt is DType.bf16:
        return f"_dsr_round_bf16({var}).to(tl.bfloat16)"
    return f"{var}.to({TL_DTYPE[dt]})"


def _coord(s: Stmt) -> str:
    a, inner, size = s.attr("axis"), s.attr("inner"), s.attr("size")
    x = a if inner == "1" else f"({a} // {inner})"
    return f"{s.out} = {x}" if s.attr("outer") else f"{s.out} = {x} % {size}"


def _const(s: Stmt) -> str:
    assert s.dtype is not None
    return f"{s.out} = tl.full([], {_lit(s.attr('value'))}, {REG_TL[reg_kind(s.dtype)]})"


def render_stmt(s: Stmt) -> str:
    """One statement as Triton source (no indentation)."""
    if s.op == "load":
        return _load(s)
    if s.op == "store":
        return _store(s)
    if s.op == "coord":
        return _coord(s)
    if s.op == "const":
        return _const(s)
    if s.op == "comment":
        return f"# {comment_text(s.attr('text'))}"
    e = POINTWISE_EXPRS.get(s.op) or INTERNAL_EXPRS.get(s.op)
    if e is None:
        raise KeyError(f"no Triton expression for op {s.op!r}")
    code = e(s) if callable(e) else e.format(*s.args)
    return f"{s.out} = {code}"


def helpers_for(ops: set[str]) -> list[str]:
    return list(ALWAYS_HELPERS) + [HELPERS[o] for o in sorted(ops) if o in HELPERS]


__all__ = ["HELPERS", "INTERNAL_EXPRS", "POINTWISE_EXPRS", "REG_TL", "TL_DTYPE", "index_expr", "reg_kind",
           "render_stmt"]
