"""KernelSpec: the frozen, plain-data description of one generated kernel.

Sits between lowering (`codegen/lower.py` and the family lowerings in `codegen/families/`, which
build specs from fused IR kernels) and everything after it: the Jinja templates render a spec into
Triton source, `compile.py` compiles that source, and the runtime launches it. A spec holds only plain values
(str, int, float, bool, None, tuples, IR DTypes), so it prints, hashes and round-trips
through JSON; its sha256 (`spec.hash()`) keys the artifact cache.

Runtime calling convention (the same for every family):
  * kernel arguments are `spec.args` in order: every body input (role "in", in
    `kernel.body.inputs` order), then every body output (role "out", in
    `kernel.body.outputs` order), then any workspaces (role "scratch": uninitialized buffers of
    `shape` that the runtime allocates for that launch only), then any runtime-check flags (role
    "check": an int64 [2] buffer (code, bad value) that the runtime owns across calls and only
    `LaunchPlan.check()` reads; the kernel writes it when a runtime check fails, `expr` is the
    checked range's upper bound), then int scalars (kind "scalar")
    whose `expr` is a sympy expression over the graph's dim symbols, evaluated at launch;
  * tensors are contiguous row-major buffers of the arg's dtype and shape, 16-byte aligned
    (the sm_90a compile assumes it); outputs are written completely, never read;
  * the grid is `spec.grid` (1-D for every current family): sympy expressions over the
    same symbols; `launch_values(spec, env)` / `launch_args(spec, buffers, env)` evaluate
    grid and scalars exactly (integer arithmetic), `env` binding symbol names to ints;
  * a grid dim that evaluates to 0 (an empty tensor) means: skip the launch.
"""
from __future__ import annotations

import fractions
import hashlib
import json
import math
import operator
import re
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, Callable, Mapping

import sympy
from dsr_compiler.ir.errors import CodegenError
from dsr_compiler.ir.types import DType, parse_dim
from dsr_compiler.ir.verifier import KERNEL_FAMILIES

# Triton pointer element spellings for each IR dtype (signature of triton.compile).
TRITON_PTR = {
    DType.f32: "*fp32", DType.f16: "*fp16", DType.bf16: "*bf16", DType.fp8e4m3: "*fp8e4nv",
    DType.fp8e5m2: "*fp8e5", DType.i32: "*i32", DType.i64: "*i64", DType.bool: "*i1",
}


@dataclass(frozen=True)
class ArgSpec:
    """One kernel argument: a tensor pointer or an int scalar.

    tensor: `value` is the body value it binds to, `index` its position in
    `body.inputs` (role "in") or `body.outputs` (role "out"), `shape` its dims as sympy
    strings. scalar: `expr` is a sympy expression over dim symbols; `dtype` i32 or i64.
    """

    name: str
    kind: str                       # "tensor" | "scalar"
    value: str = ""
    dtype: DType | None = None
    role: str = ""                  # "in" | "out" | "scratch" (tensors; scratch: an uninitialized
                                    # workspace of `shape` the runtime allocates for the launch only)
                                    # | "check" (a runtime-owned error flag, see the module docstring)
    index: int = -1
    shape: tuple[str, ...] = ()
    expr: str = ""
    scalar_dtype: str = "i32"       # scalars: "i32" | "i64"

    def __post_init__(self) -> None:
        if self.kind not in ("tensor", "scalar"):
            raise ValueError(f"ArgSpec {self.name}: kind must be tensor or scalar, got {self.kind!r}")
        if self.kind == "tensor" and (self.dtype is None or self.role not in ("in", "out", "scratch", "check")):
            raise ValueError(f"ArgSpec {self.name}: a tensor needs a dtype and role in/out/scratch/check")
        if self.kind == "scalar" and not self.expr:
            raise ValueError(f"ArgSpec {self.name}: a scalar needs an expr")

    @property
    def triton_type(self) -> str:
        if self.kind == "scalar":
            return self.scalar_dtype
        assert self.dtype is not None
        return TRITON_PTR[self.dtype]


@dataclass(frozen=True)
class Stmt:
    """One statement of a fused body program, rendered by `codegen/exprs.py`.

    `op` is an IR op name (pointwise math) or a codegen-internal op (load, store, coord,
    rope, reduce steps). `out` names the register variable it defines, `args` the
    variables it reads; `dtype` is the value's IR dtype (registers hold fp32 for floats).
    """

    op: str
    out: str = ""
    args: tuple[str, ...] = ()
    attrs: tuple[tuple[str, Any], ...] = ()
    dtype: DType | None = None

    def attr(self, key: str, default: Any = None) -> Any:
        for k, v in self.attrs:
            if k == key:
                return v
        return default


Block = tuple[str, tuple[Stmt, ...]]


@dataclass(frozen=True)
class KernelSpec:
    name: str
    family: str
    template: str
    args: tuple[ArgSpec, ...]
    grid: tuple[str, ...]
    num_warps: int
    num_stages: int
    params: tuple[tuple[str, Any], ...]       # template parameters, rendered as literals
    body: tuple[Block, ...]                   # the fused body program: named statement blocks
    source_nodes: tuple[str, ...]
    flops: str = "0"
    bytes_read: str = "0"
    bytes_written: str = "0"

    def __post_init__(self) -> None:
        if self.family not in KERNEL_FAMILIES:   # each has one record in codegen/families/
            raise ValueError(f"KernelSpec {self.name}: unknown family {self.family!r}")
        if not 1 <= len(self.grid) <= 3:
            raise ValueError(f"KernelSpec {self.name}: grid needs 1-3 dims, got {self.grid}")
        names = [a.name for a in self.args]
        if len(set(names)) != len(names):
            raise ValueError(f"KernelSpec {self.name}: duplicate argument names {names}")

    # --- accessors used by templates (pure)
    def param(self, key: str, default: Any = ...) -> Any:
        for k, v in self.params:
            if k == key:
                return v
        if default is ...:
            raise KeyError(f"KernelSpec {self.name} has no template parameter {key!r}")
        return default

    def block(self, name: str) -> tuple[Stmt, ...]:
        for k, v in self.body:
            if k == name:
                return v
        return ()

    @property
    def tensor_args(self) -> tuple[ArgSpec, ...]:
        return tuple(a for a in self.args if a.kind == "tensor")

    @property
    def scalar_args(self) -> tuple[ArgSpec, ...]:
        return tuple(a for a in self.args if a.kind == "scalar")

    def signature(self) -> dict[str, str]:
        """The `triton.compile` signature: argument name -> Triton type."""
        return {a.name: a.triton_type for a in self.args}

    # --- identity
    def to_json(self) -> str:
        return json.dumps(_plain(self), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> "KernelSpec":
        return _unplain(json.loads(text))

    def hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


# ----------------------------------------------------------------------------- JSON

def _plain(v: Any) -> Any:
    if isinstance(v, DType):
        return {"$dtype": v.value}
    if isinstance(v, float):
        return {"$float": repr(v)}      # exact and deterministic, inf/nan included
    if isinstance(v, (KernelSpec, ArgSpec, Stmt)):
        return {"$" + type(v).__name__: {f.name: _plain(getattr(v, f.name)) for f in fields(v)}}
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if v is None or isinstance(v, (bool, int, str)):
        return v
    raise TypeError(f"KernelSpec holds a non-plain value {v!r} ({type(v).__name__})")


_CLASSES = {"$KernelSpec": KernelSpec, "$ArgSpec": ArgSpec, "$Stmt": Stmt}


def _unplain(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_unplain(x) for x in v)
    if isinstance(v, dict):
        (k, inner), = v.items()
        if k == "$dtype":
            return DType(inner)
        if k == "$float":
            return float(inner)
        return _CLASSES[k](**{f: _unplain(x) for f, x in inner.items()})
    return v


# ----------------------------------------------------------------------------- launch-time evaluation

Env = Mapping[str, int]
Evaluator = Callable[[Env], "int | fractions.Fraction"]
_FUNCS: dict[str, Callable[..., Any]] = {"ceiling": math.ceil, "floor": math.floor, "Max": max, "Min": min}


def _const(v: "int | fractions.Fraction") -> Evaluator:
    return lambda env: v


def _symbol(name: str) -> Evaluator:
    return lambda env: env[name]


def _fold(op: Callable[[Any, Any], Any], parts: list[Evaluator]) -> Evaluator:
    def run(env: Env) -> Any:
        acc = parts[0](env)
        for p in parts[1:]:
            acc = op(acc, p(env))
        return acc
    return run


def _power(base: Evaluator, n: int) -> Evaluator:
    if n >= 0:
        return lambda env: base(env) ** n
    return lambda env: fractions.Fraction(1) / (base(env) ** -n)


def _call(fn: Callable[..., Any], parts: list[Evaluator]) -> Evaluator:
    return lambda env: fn(*(p(env) for p in parts))


def _to_fn(e: sympy.Expr) -> Evaluator:
    """An exact evaluator (ints and Fractions, no floats) for an integer-valued sympy expression,
    built as closures over the expression tree: no source text is generated or evaluated."""
    if e.is_Integer:
        return _const(int(e))
    if e.is_Rational:
        return _const(fractions.Fraction(int(e.p), int(e.q)))
    if e.is_Symbol:
        return _symbol(e.name)
    if isinstance(e, sympy.Add):
        return _fold(operator.add, [_to_fn(a) for a in e.args])
    if isinstance(e, sympy.Mul):
        return _fold(operator.mul, [_to_fn(a) for a in e.args])
    if isinstance(e, sympy.Pow) and e.exp.is_Integer:
        return _power(_to_fn(e.base), int(e.exp))
    if isinstance(e, sympy.Mod):
        return _fold(operator.mod, [_to_fn(a) for a in e.args])
    name = type(e).__name__
    if name in _FUNCS:
        return _call(_FUNCS[name], [_to_fn(a) for a in e.args])
    raise CodegenError(f"codegen: cannot evaluate size expression {e}",
                       hint="sizes may use + - * /, ceiling, floor, Max, Min, Mod over dim symbols")


@lru_cache(maxsize=4096)
def expr_fn(text: str) -> Callable[[Mapping[str, int]], int]:
    """Compile a size expression (dim grammar text) into an exact evaluator `f(env_by_name) -> int`."""
    fn = _to_fn(parse_dim(text))

    def run(env: Mapping[str, int]) -> int:
        try:
            r = fn(env)
        except KeyError as e:
            raise CodegenError(f"codegen: size expression {text} needs symbol {e.args[0]}",
                               hint="bind every dim symbol of the graph's inputs") from None
        if isinstance(r, fractions.Fraction):
            if r.denominator != 1:
                raise CodegenError(f"codegen: size expression {text} is not an integer ({r}) for {dict(env)}")
            r = r.numerator
        return int(r)
    return run


def eval_expr(text: str, env: Mapping[Any, int]) -> int:
    """Evaluate a size expression; `env` maps symbol names (or sympy symbols) to ints."""
    return expr_fn(text)({str(k): int(v) for k, v in env.items()})


def launch_values(spec: KernelSpec, env: Mapping[Any, int]) -> tuple[tuple[int, ...], dict[str, int]]:
    """(grid, {scalar arg name: value}) for the bound dim symbols `env`."""
    named = {str(k): int(v) for k, v in env.items()}
    grid = tuple(max(expr_fn(g)(named), 0) for g in spec.grid)
    scalars = {a.name: expr_fn(a.expr)(named) for a in spec.scalar_args}
    for a in spec.scalar_args:
        if a.scalar_dtype == "i32" and not -(1 << 31) <= scalars[a.name] < (1 << 31):
            raise CodegenError(f"codegen: kernel {spec.name} scalar {a.name} = {a.expr} = {scalars[a.name]} "
                               "overflows i32", hint="lower the kernel with attrs index_i64=True")
    return grid, scalars


def launch_args(spec: KernelSpec, tensors: Mapping[str, Any],
                env: Mapping[Any, int]) -> tuple[tuple[int, ...], list[Any]]:
    """(grid, positional args) for a launch: `tensors` maps body value names to buffers."""
    grid, scalars = launch_values(spec, env)
    out: list[Any] = []
    for a in spec.args:
        if a.kind == "scalar":
            out.append(scalars[a.name])
        else:
            if a.value not in tensors:
                raise CodegenError(f"codegen: launching {spec.name}: no buffer for %{a.value}")
            out.append(tensors[a.value])
    return grid, out


_IDENT = re.compile(r"[^A-Za-z0-9_]")


def comment_text(text: str) -> str:
    """`text` made safe to write into a one-line comment of generated Python or PTX: every character
    outside printable ASCII (newlines, carriage returns, NUL, non-ASCII) is written as an escape, so
    names and origins taken from the IR or the user's module can never end the comment and become
    code."""
    return "".join(ch if " " <= ch <= "~" else ch.encode("unicode_escape").decode("ascii") for ch in str(text))


def ident(text: str) -> str:
    """A Python identifier derived from an IR name (`x.q` -> `x_q`)."""
    s = _IDENT.sub("_", text)
    return s if s and not s[0].isdigit() else "v" + s


__all__ = ["ArgSpec", "Block", "KernelSpec", "Stmt", "TRITON_PTR", "comment_text", "eval_expr", "expr_fn",
           "ident", "launch_args", "launch_values"]
