"""Frontend lowerings: pointwise arithmetic, activations, comparisons, selection and casts.

Where it sits: one of `frontend/lowerings/` (listed in its `__init__`); registers into
`frontend/registry.py` with `@lowers`. Each handler's signature is torch's; `cx` comes first.
Tensors arrive as TensorRef, sizes as ints or sympy expressions, dtypes as torch.dtype.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F

from dsr_compiler.ir.types import DType

from ..context import Device, TensorRef, TraceContext
from ..registry import lowers


# --- pointwise arithmetic

@lowers(operator.add, torch.add, "add")
def _add(cx: TraceContext, input: Any, other: Any, *, alpha: Any = 1) -> TensorRef:
    if alpha != 1:
        other = cx.binary("mul", other, alpha)
    return cx.binary("add", input, other)


@lowers(operator.sub, torch.sub, torch.subtract, "sub", "subtract")
def _sub(cx: TraceContext, input: Any, other: Any, *, alpha: Any = 1) -> TensorRef:
    if alpha != 1:
        other = cx.binary("mul", other, alpha)
    return cx.binary("sub", input, other)


@lowers(torch.rsub)
def _rsub(cx: TraceContext, input: Any, other: Any, *, alpha: Any = 1) -> TensorRef:
    if alpha != 1:
        input = cx.binary("mul", input, alpha)
    return cx.binary("sub", other, input)


@lowers(operator.mul, torch.mul, torch.multiply, "mul", "multiply")
def _mul(cx: TraceContext, input: Any, other: Any) -> TensorRef:
    return cx.binary("mul", input, other)


@lowers(operator.truediv, torch.div, torch.divide, torch.true_divide, "div", "divide", "true_divide")
def _div(cx: TraceContext, input: Any, other: Any, *, rounding_mode: Any = None) -> TensorRef:
    if rounding_mode is not None:
        raise cx.fail(f"division with rounding_mode={rounding_mode!r} is not supported",
                      hint="only true division maps to the IR's `div`")
    return cx.binary("div", input, other)


@lowers(operator.pow, torch.pow, "pow")
def _pow(cx: TraceContext, input: Any, exponent: Any) -> TensorRef:
    return cx.binary("pow", input, exponent)


@lowers(torch.square, "square")
def _square(cx: TraceContext, input: Any) -> TensorRef:
    x = cx.tensor(input, "square")
    return cx.emit("mul", [x, x])


@lowers(torch.maximum, "maximum")
def _maximum(cx: TraceContext, input: Any, other: Any) -> TensorRef:
    return cx.binary("maximum", input, other)


@lowers(torch.minimum, "minimum")
def _minimum(cx: TraceContext, input: Any, other: Any) -> TensorRef:
    return cx.binary("minimum", input, other)


@lowers(torch.clamp, torch.clip, "clamp", "clip")
def _clamp(cx: TraceContext, input: Any, min: Any = None, max: Any = None) -> TensorRef:
    x = cx.tensor(input, "clamp")
    if min is None and max is None:
        raise cx.fail("clamp needs min or max")
    if min is not None:
        x = cx.binary("maximum", x, min)
    if max is not None:
        x = cx.binary("minimum", x, max)
    return x


@lowers(torch.clamp_min, "clamp_min")
def _clamp_min(cx: TraceContext, input: Any, min: Any) -> TensorRef:
    return cx.binary("maximum", input, min)


@lowers(torch.clamp_max, "clamp_max")
def _clamp_max(cx: TraceContext, input: Any, max: Any) -> TensorRef:
    return cx.binary("minimum", input, max)


def _unary(op: str, *targets: Any) -> None:
    def handler(cx: TraceContext, input: Any) -> TensorRef:
        return cx.emit(op, [cx.tensor(input, op)])
    handler.__name__ = f"_lower_{op}"
    lowers(*targets)(handler)


_unary("neg", operator.neg, torch.neg, torch.negative, "neg", "negative")
_unary("abs", operator.abs, torch.abs, "abs")
_unary("exp", torch.exp, "exp")
_unary("log", torch.log, "log")
_unary("sqrt", torch.sqrt, "sqrt")
_unary("rsqrt", torch.rsqrt, "rsqrt")
_unary("reciprocal", torch.reciprocal, "reciprocal")
_unary("sigmoid", torch.sigmoid, F.sigmoid, "sigmoid")
_unary("tanh", torch.tanh, F.tanh, "tanh")
_unary("relu", torch.relu, "relu")
_unary("cos", torch.cos, "cos")
_unary("sin", torch.sin, "sin")


@lowers(operator.pos, "contiguous", "clone", torch.clone)
def _identity(cx: TraceContext, input: Any, *, memory_format: Any = None) -> TensorRef:
    return cx.tensor(input, "identity")


def _no_inplace(cx: TraceContext, what: str, inplace: Any) -> None:
    if inplace:
        raise cx.fail(f"{what}(inplace=True) is an in-place op", hint="use inplace=False (the IR is SSA)")


@lowers(F.relu)
def _f_relu(cx: TraceContext, input: Any, inplace: bool = False) -> TensorRef:
    _no_inplace(cx, "F.relu", inplace)
    return cx.emit("relu", [cx.tensor(input, "relu")])


@lowers(F.silu)
def _f_silu(cx: TraceContext, input: Any, inplace: bool = False) -> TensorRef:
    _no_inplace(cx, "F.silu", inplace)
    return cx.emit("silu", [cx.tensor(input, "silu")])


@lowers(F.gelu)
def f_gelu(cx: TraceContext, input: Any, approximate: str = "none") -> TensorRef:
    """`F.gelu`: the exact (erf) form is the IR's `gelu`; approximate='tanh' is its formula in existing ops,
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), computed in fp32 for a 16-bit input. Also lowers `nn.GELU`."""
    if approximate == "none":
        return cx.emit("gelu", [cx.tensor(input, "gelu")])
    if approximate != "tanh":
        raise cx.fail(f"F.gelu(approximate={approximate!r}) is not a GELU form", hint="use 'none' or 'tanh'")
    x = cx.tensor(input, "gelu")
    if not x.type.dtype.is_float:
        raise cx.fail(f"gelu: input must be float, got {x.type}")
    xf = cx.cast(x, DType.f32)
    cube = cx.binary("mul", cx.binary("mul", xf, xf), xf)
    inner = cx.binary("mul", cx.binary("add", xf, cx.binary("mul", cube, 0.044715)), math.sqrt(2.0 / math.pi))
    y = cx.binary("mul", cx.binary("mul", xf, 0.5), cx.binary("add", cx.emit("tanh", [inner]), 1.0))
    return cx.cast(y, x.type.dtype)


@lowers(F.dropout)
def f_dropout(cx: TraceContext, input: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> TensorRef:
    """`F.dropout`: an identity when inactive; also lowers the `nn.Dropout` module."""
    if training and p > 0:
        raise cx.fail(f"F.dropout(p={p}, training=True) is random",
                      hint="trace in eval mode: call module.eval() and pass training=self.training")
    return cx.tensor(input, "dropout")


# --- comparisons and selection

def _compare(op: str, *targets: Any) -> None:
    def handler(cx: TraceContext, input: Any, other: Any) -> TensorRef:
        return cx.binary(op, input, other)
    handler.__name__ = f"_lower_{op}"
    lowers(*targets)(handler)


_compare("lt", operator.lt, torch.lt, torch.less, "lt", "less")
_compare("le", operator.le, torch.le, torch.less_equal, "le", "less_equal")
_compare("gt", operator.gt, torch.gt, torch.greater, "gt", "greater")
_compare("ge", operator.ge, torch.ge, torch.greater_equal, "ge", "greater_equal")
_compare("eq", operator.eq, torch.eq, "eq")


def _not(cx: TraceContext, b: TensorRef) -> TensorRef:
    return cx.emit("where", [b, cx.const(False, DType.bool), cx.const(True, DType.bool)])


def _as_bool(cx: TraceContext, v: Any, what: str) -> TensorRef:
    return cx.cast(cx.tensor(v, what), DType.bool)


@lowers(operator.ne, torch.ne, torch.not_equal, "ne", "not_equal")
def ne(cx: TraceContext, input: Any, other: Any) -> TensorRef:
    """`input != other` (also used by the `cross_entropy` lowering for its ignore mask)."""
    return _not(cx, cx.binary("eq", input, other))


@lowers(torch.logical_not, "logical_not")
def logical_not(cx: TraceContext, input: Any) -> TensorRef:
    return _not(cx, _as_bool(cx, input, "logical_not"))


@lowers(operator.invert, torch.bitwise_not, "bitwise_not")
def _invert(cx: TraceContext, input: Any) -> TensorRef:
    x = cx.tensor(input, "~")
    if x.type.dtype is not DType.bool:
        raise cx.fail(f"~ / bitwise_not on {x.type.dtype.value} is not supported", hint="only bool tensors")
    return _not(cx, x)


@lowers(torch.logical_and, "logical_and")
def logical_and(cx: TraceContext, input: Any, other: Any) -> TensorRef:
    return cx.emit("where", [_as_bool(cx, input, "and"), _as_bool(cx, other, "and"), cx.const(False, DType.bool)])


@lowers(torch.logical_or, "logical_or")
def logical_or(cx: TraceContext, input: Any, other: Any) -> TensorRef:
    return cx.emit("where", [_as_bool(cx, input, "or"), cx.const(True, DType.bool), _as_bool(cx, other, "or")])


@lowers(operator.and_, torch.bitwise_and, "bitwise_and")
def _and(cx: TraceContext, input: Any, other: Any) -> TensorRef:
    if not all(isinstance(v, TensorRef) and v.type.dtype is DType.bool for v in (input, other)):
        raise cx.fail("& / bitwise_and is only supported between bool tensors")
    return logical_and(cx, input, other)


@lowers(operator.or_, torch.bitwise_or, "bitwise_or")
def _or(cx: TraceContext, input: Any, other: Any) -> TensorRef:
    if not all(isinstance(v, TensorRef) and v.type.dtype is DType.bool for v in (input, other)):
        raise cx.fail("| / bitwise_or is only supported between bool tensors")
    return logical_or(cx, input, other)


@lowers(torch.where)
def _where(cx: TraceContext, condition: Any, input: Any = None, other: Any = None) -> TensorRef:
    cond = cx.tensor(condition, "where: condition")
    if input is None or other is None:
        raise cx.fail("torch.where(condition) (nonzero) has a data-dependent shape",
                      hint="use the three-argument form torch.where(cond, a, b)")
    like = input.type if isinstance(input, TensorRef) else other.type if isinstance(other, TensorRef) else None
    if like is None:
        raise cx.fail("torch.where with two scalars is not supported", hint="make one branch a tensor")
    return cx.emit("where", [cond, cx.operand(input, like), cx.operand(other, like)])


@lowers(torch.masked_fill, "masked_fill")
def _masked_fill(cx: TraceContext, input: Any, mask: Any, value: Any) -> TensorRef:
    x = cx.tensor(input, "masked_fill")
    return cx.emit("where", [cx.tensor(mask, "masked_fill: mask"), cx.operand(value, x.type), x])


# --- casts

def _cast_method(name: str, dtype: torch.dtype) -> None:
    def handler(cx: TraceContext, input: Any, memory_format: Any = None) -> TensorRef:
        return cx.cast(cx.tensor(input, name), cx.dtype(dtype))
    handler.__name__ = f"_lower_{name}"
    lowers(name)(handler)


for _m, _dt in {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64,
                "int": torch.int32, "long": torch.int64, "bool": torch.bool}.items():
    _cast_method(_m, _dt)


@lowers("to")
def _to(cx: TraceContext, input: Any, *args: Any, dtype: Any = None, device: Any = None, non_blocking: bool = False,
        copy: bool = False, memory_format: Any = None) -> TensorRef:
    x = cx.tensor(input, "to")
    target = dtype
    for a in args:
        if isinstance(a, torch.dtype):
            target = a
        elif isinstance(a, TensorRef):
            target = a.type.dtype
        elif isinstance(a, (str, torch.device, Device)) or a is None or isinstance(a, bool):
            continue                               # device placement / non_blocking / copy
        else:
            raise cx.fail(f"Tensor.to: unsupported argument {a!r}")
    return x if target is None else cx.cast(x, cx.dtype(target))


@lowers("type_as")
def _type_as(cx: TraceContext, input: Any, other: Any) -> TensorRef:
    return cx.cast(cx.tensor(input, "type_as"), cx.tensor(other, "type_as: other").type.dtype)


@lowers("type")
def _type(cx: TraceContext, input: Any, dtype: Any = None, non_blocking: bool = False) -> TensorRef:
    if not isinstance(dtype, torch.dtype):
        raise cx.fail(f"Tensor.type({dtype!r}) is not supported", hint="use .to(dtype)")
    return cx.cast(cx.tensor(input, "type"), cx.dtype(dtype))
