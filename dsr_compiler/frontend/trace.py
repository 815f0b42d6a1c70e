"""Frontend: a PyTorch `nn.Module` becomes a typed IR graph (the first arrow of the pipeline).

    g = trace(module, (x,), dynamic={"x": {0: "T"}})     # -> ir.Graph, verified

Why `torch.fx` symbolic tracing (a custom `torch.fx.Tracer`) and not `torch.export`:
- FX keeps the torch-level calls the model author wrote (F.linear, F.silu, softmax,
  scaled_dot_product_attention, Tensor methods); they map one-to-one onto our op table.
  `torch.export` decomposes them into ATen ops that we would have to pattern-match back.
- The `Tracer` hooks used here (is_leaf_module, create_node, proxy, to_bool, iter, create_arg)
  are backward-compatible FX API, stable across torch 2.11-2.13.
- Shapes never come from torch: every output type is computed by our own sympy type rules
  (`OPS[op].infer`), so a dynamic dim stays the symbol `T` by construction. `torch.export`
  would specialize on the example sizes (0/1 especially) and attach guards.

How it works. The tracer lowers each FX node to IR the moment FX creates it (`create_node`), so
Python that inspects trace-time values just works: `x.size(-1)`, `x.shape[0]`, `B, T, _ = x.shape`,
`x.dim()`, `math.sqrt(head_dim)`, `assert x.size(-1) == self.dim` and `if x.size(-1) % 2:` are
evaluated to ints or sympy expressions (never IR nodes). Control flow on a dynamic size is
decided when the type rules' assumptions decide it (`T >= 1` is true) and is a TraceError
otherwise; control flow on tensor values is always a TraceError.

Inputs: the forward's positional parameters that receive tensors (named after the parameters),
then every parameter and buffer the graph uses, named by qualified name and flagged as params, in
order of first use. A leaf lowering may also add *derived* params (`DERIVED_PARAMS`, e.g. the MoE's
stacked expert weights `ffn.experts.w13`), which `param_tensors` computes from the owner's tensors. Example inputs that are Python scalars/None are baked in (specialized).

Leaf modules and functions keep DeepSeek building blocks first-class: a module class with a
`dsr_op` class attribute is not traced through but lowered by `LEAF_LOWERINGS[dsr_op]`; a function
wrapped with `torch.fx.wrap` lowers by `FUNCTION_LOWERINGS[op]` when it carries `fn.dsr_op = op`
or is listed in `WRAPPED_FUNCTIONS` (`apply_rope` of the zoo -> `rope`).

Conventions (documented choices):
- `x ** 2` / `x.pow(2)` becomes `pow(x, const 2.0)` (not `mul(x, x)`); `torch.square(x)` is `mul(x, x)`.
- Python float scalars become f32 consts; Python ints next to a float tensor become float consts,
  next to an int tensor consts of that tensor's dtype (0-d consts never promote a tensor's dtype).
- No-op casts, `contiguous`, `clone`, identity reshapes/permutes emit nothing; `detach` emits
  `stop_gradient` (an identity in value that the `differentiate` pass gives no derivative).
- Multi-dim and all-dim reductions are chains of single-dim reductions (all-dim: reshape to 1-D).
- `squeeze` never removes a symbolic dim (its rank would depend on the runtime size): TraceError.
- Slices need static bounds (`x[:, :64]` on a dynamic dim is fine; `x[:, :T]` on a static dim
  or `x[:, -1]` on a dynamic dim is not): the IR's `slice` takes int attributes.
"""
from __future__ import annotations

import builtins
import contextlib
import inspect
import keyword
import math
import operator
import os
import re
import sys
import traceback
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import sympy
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import map_arg

from dsr_compiler.interrupts import watch_interrupts
from dsr_compiler.ir.errors import DsrError, TraceError
from dsr_compiler.ir.graph import Graph, Node, Value, canon_attr
from dsr_compiler.ir.ops import OPS, TypeRuleError
from dsr_compiler.ir.types import DType, TensorType, sym, to_expr
from dsr_compiler.ir.verifier import verify

__all__ = ["FUNCTION_LOWERINGS", "LEAF_LOWERINGS", "WRAPPED_FUNCTIONS", "TensorRef", "TraceContext",
           "module_attr", "param_tensors", "trace"]

_ROOT_ATTR = "_dsr_root"                    # the user's module inside the generated root wrapper
_ROOT_FILE = "<dsr_compiler.frontend root>"
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_THIS_FILE = os.path.abspath(__file__)


# ----------------------------------------------------------------------------- trace-time values

@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor while tracing: the IR value that holds it."""

    name: str
    type: TensorType


class _Device:
    """`x.device` while tracing: placement is the runtime's business, so it is only ever ignored."""

    def __repr__(self) -> str:
        return "<device>"


_DEVICE = _Device()


class _ConcreteValueNeeded(TypeError):
    """Raised from Proxy dunders (__index__, __int__, __float__, __len__). A TypeError on purpose:
    torch's argument parser probes `__index__` on proxies and expects TypeError when it fails."""

    def __init__(self, what: str, where: str, hint: str) -> None:
        super().__init__(what)
        self.what, self.where, self.hint = what, where, hint


def _canon(v: Any) -> Any:
    """Static sympy numbers become Python numbers; symbolic expressions stay sympy."""
    if isinstance(v, sympy.logic.boolalg.BooleanAtom):
        return bool(v)
    if isinstance(v, sympy.Expr) and not v.free_symbols:
        if v.is_Integer:
            return int(v)
        if v.is_number and v.is_real:
            return float(v)
        return v
    if type(v) is tuple:
        return tuple(_canon(x) for x in v)
    return v


def _is_symbolic(v: Any) -> bool:
    return isinstance(v, sympy.Basic)


def _same(a: Any, b: Any) -> bool:
    return sympy.simplify(to_expr(a) - to_expr(b)) == 0


def _has_tensor(v: Any) -> bool:
    if isinstance(v, TensorRef):
        return True
    if isinstance(v, (tuple, list)):
        return any(_has_tensor(x) for x in v)
    if isinstance(v, dict):
        return any(_has_tensor(x) for x in v.values())
    if isinstance(v, slice):
        return any(_has_tensor(x) for x in (v.start, v.stop, v.step))
    return False


def _sanitize(name: str) -> str:
    out = re.sub(r"[^A-Za-z0-9_.]", "_", name)
    return out if out and out[0] != "." else "_" + out


def _fn_name(fn: Any) -> str:
    if isinstance(fn, str):
        return f"Tensor.{fn}"
    try:
        name = fx.node._get_qualified_name(fn)
    except Exception:
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    for old, new in (("_operator.", "operator."), ("torch._C._nn.", "torch.nn.functional."),
                     ("torch._C._VariableFunctions.", "torch."), ("builtins.", "")):
        if name.startswith(old):
            name = new + name[len(old):]
    return name


def module_attr(obj: Any, name: str) -> Any:
    """`getattr` that bypasses FX's patched `nn.Module.__getattr__` (which returns proxies for
    parameters while tracing): lowerings read the real tensors through this."""
    if isinstance(obj, nn.Module):
        d = obj.__dict__
        for store in ("_parameters", "_buffers", "_modules"):
            if name in d.get(store, {}):
                return d[store][name]
    return getattr(obj, name)


def _class_name(cls: Any) -> str:
    if not isinstance(cls, type):
        return str(cls)
    if cls.__module__.startswith("torch.nn.") and getattr(nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    return cls.__name__


def _is_user_file(path: str) -> bool:
    return not (os.path.abspath(path).startswith(_TORCH_DIR) or os.path.abspath(path) == _THIS_FILE
                or path == _ROOT_FILE or path.startswith("<"))


def _short_path(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if not rel.startswith("..") else path


_FRAME_RE = re.compile(r'File "([^"]+)", line (\d+), in ([^\n]+)\n[ \t]*([^\n]*)')


def _location_from_stack_trace(stack_trace: str | None) -> str:
    frames = [f for f in _FRAME_RE.findall(stack_trace or "") if _is_user_file(f[0])]
    if not frames:
        return ""
    path, line, fn, code = frames[-1]
    return f"{_short_path(path)}:{line} in {fn}: `{code.strip()}`"


def _location_from_frames(frames: Sequence[traceback.FrameSummary]) -> str:
    user = [f for f in frames if _is_user_file(f.filename)]
    if not user:
        return ""
    f = user[-1]
    return f"{_short_path(f.filename)}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`"


# ----------------------------------------------------------------------------- registries

LeafLowering = Callable[["TraceContext", nn.Module, tuple, dict], Any]
FunctionLowering = Callable[["TraceContext", Callable, tuple, dict], Any]

#: dsr_op of a leaf module class -> lowering(cx, module, args, kwargs) -> TensorRef
LEAF_LOWERINGS: dict[str, LeafLowering] = {}
#: op of a torch.fx.wrap'ed function -> lowering(cx, fn, args, kwargs) -> TensorRef
FUNCTION_LOWERINGS: dict[str, FunctionLowering] = {}
#: (defining module, function name) -> op, for wrapped functions without a `dsr_op` attribute
WRAPPED_FUNCTIONS: dict[tuple[str, str], str] = {
    ("dsr_compiler.models.layers", "apply_rope"): "rope",
    ("dsr_compiler.models.grpo", "per_token_logps"): "token_logprobs",
}


@dataclass(frozen=True)
class ParamDerivation:
    """A graph param computed at compile time from the tensors of the module that owns it (e.g. the
    routed experts' weights stacked into one `[E, 2I, H]` tensor). The graph input is named
    `<owner path>.<key>` and flagged as a param; `param_tensors` calls `compute(owner)`, tracing
    only `type_of(owner)` (no data is read, so meta-device modules trace). `doc` says which of the
    owner's tensors it is made of (the lowering also names them in the using node's origin)."""

    compute: Callable[[nn.Module], torch.Tensor]
    type_of: Callable[[nn.Module], tuple[torch.dtype, tuple[int, ...]]]
    doc: str = ""


#: key (name relative to the owning module, e.g. "experts.w13") -> how to compute the param
DERIVED_PARAMS: dict[str, ParamDerivation] = {}


def _function_op(fn: Any) -> str | None:
    op = getattr(fn, "dsr_op", None)
    if isinstance(op, str):
        return op
    key = (getattr(fn, "__module__", None), getattr(fn, "__name__", None))
    return WRAPPED_FUNCTIONS.get(key)  # type: ignore[arg-type]


def _wrapped_function_objects() -> list[Callable]:
    """Registered wrapped functions that are importable now: the tracer auto-wraps them wherever a
    traced module's globals refer to them (e.g. `from dsr_compiler.models.layers import apply_rope`
    in user code), not only in the module that called `torch.fx.wrap`."""
    import sys
    out = []
    for (mod, name) in WRAPPED_FUNCTIONS:
        fn = getattr(sys.modules.get(mod), name, None)
        if callable(fn):
            out.append(fn)
    return out


@dataclass(frozen=True)
class _Handler:
    fn: Callable
    sig: inspect.Signature


_FUNCTIONS: dict[Any, _Handler] = {}       # call_function target -> handler
_METHODS: dict[str, _Handler] = {}         # call_method name -> handler
_MODULES: dict[type, _Handler] = {}        # torch.nn leaf module class -> handler(cx, module, ...)


def _lowers(*targets: Any) -> Callable[[Callable], Callable]:
    """Register a handler for functions (objects) and Tensor methods (strings). The handler's own
    Python signature is the torch signature: arguments bind to it, unknown keywords are errors."""
    def deco(fn: Callable) -> Callable:
        h = _Handler(fn, inspect.signature(fn))
        for t in targets:
            table: dict = _METHODS if isinstance(t, str) else _FUNCTIONS
            if t in table:
                raise ValueError(f"frontend: {_fn_name(t)} registered twice")
            table[t] = h
        return fn
    return deco


def _lowers_module(*classes: type) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        for c in classes:
            if c in _MODULES:
                raise ValueError(f"frontend: module {c.__name__} registered twice")
            _MODULES[c] = _Handler(fn, inspect.signature(fn))
        return fn
    return deco


def _supported_hint() -> str:
    fns = sorted({_fn_name(f) for f in _FUNCTIONS if not isinstance(f, str)})
    meths = sorted(_METHODS)
    return ("supported ops: " + ", ".join(fns) + "; Tensor methods: " + ", ".join("." + m for m in meths)
            + "; or wrap a helper with torch.fx.wrap and register its lowering in FUNCTION_LOWERINGS")


# ----------------------------------------------------------------------------- lowering context

class TraceContext:
    """The IR under construction while FX traces. Leaf and function lowerings receive it and use
    `tensor`, `param`, `emit`, `const`, `cast`, `reshape` and `fail`."""

    def __init__(self, root: nn.Module, user: nn.Module) -> None:
        self.root = root
        self.user_class = type(user).__name__
        self.param_index = _param_index(user)            # id(tensor) -> (qualified name, tensor)
        self.inputs: dict[str, TensorRef] = {}
        self.params: dict[str, TensorRef] = {}
        self.nodes: list[Node] = []
        self.env: dict[fx.Node, Any] = {}
        self.names: set[str] = set()
        self.outputs: list[str] | None = None
        self._fx: fx.Node | None = None
        self._origin = ""
        self._base = "v"
        self._tmp = 0
        self.last_concrete_error: _ConcreteValueNeeded | None = None   # torch may swallow it (see below)

    # --- where am I (for errors and origins)
    @staticmethod
    def _strip(path: str) -> str:
        if path == _ROOT_ATTR:
            return ""
        if path.startswith(_ROOT_ATTR + "."):
            return path[len(_ROOT_ATTR) + 1:]
        return path

    def module_of(self, node: fx.Node | None) -> tuple[str, str]:
        """(module path, class name) of an FX node; ("", user class) at the top level."""
        if node is None:
            return "", self.user_class
        if node.op == "call_module":
            return self._strip(str(node.target)), _class_name(type(self._attr(str(node.target))))
        stack = node.meta.get("nn_module_stack")
        if stack:
            qual, cls = list(stack.values())[-1]
            path = self._strip(qual)
            return path, (_class_name(cls) if path else self.user_class)
        return "", self.user_class

    @staticmethod
    def describe_module(path: str, cls: str) -> str:
        return f"module path `{path}` ({cls})" if path else f"top-level module ({cls})"

    def where(self, node: fx.Node | None = None) -> str:
        node = node if node is not None else self._fx
        parts = [self.describe_module(*self.module_of(node))]
        if node is not None:
            parts.append(f"node %{node.name}")
            loc = _location_from_stack_trace(node.stack_trace)
            if loc:
                parts.append(f"at {loc}")
        return ", ".join(parts)

    def where_now(self, module_stack: dict, frames: Sequence[traceback.FrameSummary]) -> str:
        """Where, from the tracer's live module stack and a Python stack (no FX node at hand)."""
        stack = list(module_stack.values())
        path = self._strip(stack[-1][0]) if stack else ""
        cls = _class_name(stack[-1][1]) if path else self.user_class
        loc = _location_from_frames(frames)
        return self.describe_module(path, cls) + (f", at {loc}" if loc else "")

    def fail(self, what: str, hint: str = "") -> TraceError:
        """A TraceError for the FX node being lowered (raise it)."""
        return TraceError(f"trace: {what}", self.where(), hint)

    def _needs_concrete(self, node: fx.Node, what: str, hint: str) -> _ConcreteValueNeeded:
        err = _ConcreteValueNeeded(f"trace: {what}", self.where(node), hint)
        self.last_concrete_error = err
        return err

    # --- names
    def _tmp_name(self) -> str:
        while True:
            self._tmp += 1
            name = f"{self._base}.{self._tmp}"
            if name not in self.names:
                self.names.add(name)
                return name

    # --- building blocks for lowerings
    def tensor(self, v: Any, what: str = "argument") -> TensorRef:
        if not isinstance(v, TensorRef):
            raise self.fail(f"{what}: expected a tensor, got {v!r}")
        return v

    def emit(self, op: str, inputs: Sequence[TensorRef], attrs: dict[str, Any] | None = None) -> TensorRef:
        """Append one IR node; its type comes from the op table's type rule."""
        attrs = {k: canon_attr(v) for k, v in (attrs or {}).items()}
        try:
            outs = OPS[op].infer([t.type for t in inputs], attrs)
        except TypeRuleError as e:
            raise self.fail(f"op `{op}` rejects its inputs: {e}",
                            hint="inputs: " + ", ".join(f"%{t.name} : {t.type}" for t in inputs)) from None
        name = self._tmp_name()
        self.nodes.append(Node((Value(name, outs[0]),), op, tuple(t.name for t in inputs), attrs, self._origin))
        return TensorRef(name, outs[0])

    def emit_multi(self, op: str, inputs: Sequence[TensorRef], attrs: dict[str, Any] | None = None,
                   origin: str | None = None) -> tuple[TensorRef, ...]:
        """Append one IR node with any number of outputs (e.g. `moe_router` -> weights, ids);
        `origin` overrides the module path recorded on the node."""
        attrs = {k: canon_attr(v) for k, v in (attrs or {}).items()}
        try:
            outs = OPS[op].infer([t.type for t in inputs], attrs)
        except TypeRuleError as e:
            raise self.fail(f"op `{op}` rejects its inputs: {e}",
                            hint="inputs: " + ", ".join(f"%{t.name} : {t.type}" for t in inputs)) from None
        vals = tuple(Value(self._tmp_name(), t) for t in outs)
        self.nodes.append(Node(vals, op, tuple(t.name for t in inputs), attrs,
                               self._origin if origin is None else origin))
        return tuple(TensorRef(v.name, v.type) for v in vals)

    def derived_param(self, owner: nn.Module, key: str) -> TensorRef:
        """The graph input for `DERIVED_PARAMS[key]` of submodule `owner` (registered on first use)."""
        how = DERIVED_PARAMS.get(key)
        if how is None:
            raise self.fail(f"no derived parameter {key!r}", hint="registered: " + ", ".join(sorted(DERIVED_PARAMS)))
        path = next((self._strip(n) for n, m in self.root.named_modules() if m is owner), None)
        if path is None:
            raise self.fail(f"derived parameter {key!r}: its owner is not a submodule of the traced module")
        name = _sanitize(f"{path}.{key}" if path else key)
        ref = self.params.get(name)
        if ref is not None:
            return ref
        if name in self.inputs or any(n == name for n, _ in self.param_index.values()):
            raise self.fail(f"derived parameter `{name}` has the same name as a parameter or input")
        dtype, shape = how.type_of(owner)
        try:
            dt = DType.from_torch(dtype)
        except TraceError as e:
            raise self.fail(f"derived parameter `{name}` has unsupported dtype {dtype}", hint=e.hint) from None
        ref = TensorRef(name, TensorType(dt, tuple(int(s) for s in shape)))
        self.params[name] = ref
        self.names.add(name)
        return ref

    def const(self, value: int | float | bool, dtype: DType) -> TensorRef:
        return self.emit("const", [], {"value": value, "dtype": dtype})

    def number(self, v: Any, what: str = "scalar") -> int | float | bool:
        v = _canon(v)
        if isinstance(v, (bool, int, float)):
            return v
        if _is_symbolic(v):
            raise self.fail(f"{what}: the symbolic size `{v}` is used as a tensor value",
                            hint="IR constants are static; keep dynamic sizes in shapes, or make the dim static")
        raise self.fail(f"{what}: expected a tensor or a Python number, got {v!r}")

    def operand(self, v: Any, like: TensorType, what: str = "operand") -> TensorRef:
        """A tensor operand, or a Python scalar turned into a 0-d const that follows `like`."""
        if isinstance(v, TensorRef):
            return v
        v = self.number(v, what)
        if isinstance(v, bool):
            return self.const(v, DType.bool)
        if isinstance(v, int):
            if like.dtype.is_float:
                return self.const(float(v), DType.f32)
            return self.const(v, DType.i64 if like.dtype is DType.bool else like.dtype)
        return self.const(float(v), DType.f32)

    def binary(self, op: str, a: Any, b: Any) -> TensorRef:
        if isinstance(a, TensorRef):
            like = a.type
        elif isinstance(b, TensorRef):
            like = b.type
        else:
            raise self.fail(f"{op}: needs at least one tensor operand, got {a!r} and {b!r}")
        return self.emit(op, [self.operand(a, like), self.operand(b, like)])

    def dtype(self, v: Any) -> DType:
        if isinstance(v, DType):
            return v
        if isinstance(v, torch.dtype):
            try:
                return DType.from_torch(v)
            except TraceError as e:
                raise self.fail(f"unsupported dtype {v}", hint=e.hint) from None
        raise self.fail(f"expected a dtype, got {v!r}")

    def cast(self, t: TensorRef, dtype: DType) -> TensorRef:
        return t if t.type.dtype is dtype else self.emit("cast", [t], {"dtype": dtype})

    def reshape(self, t: TensorRef, shape: Sequence[Any]) -> TensorRef:
        shape = tuple(to_expr(d) for d in shape)
        if len(shape) == t.type.rank and all(_same(a, b) for a, b in zip(shape, t.type.shape)):
            return t
        return self.emit("reshape", [t], {"shape": tuple(_canon(d) for d in shape)})

    def static_int(self, v: Any, what: str) -> int:
        v = _canon(v)
        if isinstance(v, bool) or not isinstance(v, int):
            if _is_symbolic(v):
                raise self.fail(f"{what} must be static, got the symbolic `{v}`")
            raise self.fail(f"{what} must be an int, got {v!r}")
        return v

    def static_bool(self, v: Any, what: str) -> bool:
        v = _canon(v)
        if not isinstance(v, (bool, int)):
            raise self.fail(f"{what} must be a Python bool, got {v!r}")
        return bool(v)

    def size_value(self, v: Any, what: str) -> int | sympy.Expr:
        v = _canon(v)
        if isinstance(v, TensorRef):
            raise self.fail(f"{what}: a tensor is used as a size (data-dependent shape)")
        if isinstance(v, bool) or not isinstance(v, (int, sympy.Expr)):
            raise self.fail(f"{what}: sizes must be ints or sizes of tensors, got {v!r}")
        return v

    def norm_dim(self, d: Any, rank: int, what: str) -> int:
        d = self.static_int(d, f"{what}: dim")
        lo, hi = -max(rank, 1), max(rank, 1)
        if not lo <= d < hi:
            raise self.fail(f"{what}: dim {d} out of range for rank {rank}")
        return d % rank if rank else 0

    def param(self, tensor: torch.Tensor, what: str = "") -> TensorRef:
        """The graph input for a parameter or buffer of the traced module (registered on first use)."""
        entry = self.param_index.get(id(tensor))
        if entry is None:
            raise self.fail(f"tensor {what + ' ' if what else ''}is not a parameter or buffer of the traced module",
                            hint="register it with `self.register_buffer(name, tensor)` (or nn.Parameter)")
        name, _ = entry
        ref = self.params.get(name)
        if ref is not None:
            return ref
        if name in self.inputs:
            raise self.fail(f"parameter `{name}` has the same name as a forward input",
                            hint="rename the forward argument")
        try:
            dt = DType.from_torch(tensor.dtype)
        except TraceError as e:
            raise self.fail(f"parameter `{name}` has unsupported dtype {tensor.dtype}", hint=e.hint) from None
        ref = TensorRef(name, TensorType(dt, tuple(int(s) for s in tensor.shape)))
        self.params[name] = ref
        self.names.add(name)
        return ref

    # --- trace-time values behind proxies
    def concrete_int(self, node: fx.Node) -> int:
        v = _canon(self.env.get(node))
        if isinstance(v, (bool, int)):
            return int(v)
        if isinstance(v, float) and v.is_integer():
            return int(v)
        raise self._concrete_error(node, v, "a Python int")

    def concrete_float(self, node: fx.Node) -> float:
        v = _canon(self.env.get(node))
        if isinstance(v, (bool, int, float)):
            return float(v)
        raise self._concrete_error(node, v, "a Python float")

    def length(self, node: fx.Node) -> int:
        v = _canon(self.env.get(node))
        if isinstance(v, (tuple, list)):
            return len(v)
        if isinstance(v, TensorRef):
            if v.type.rank == 0:
                raise self._needs_concrete(node, "len() of a 0-d tensor", "")
            d = _canon(v.type.shape[0])
            if isinstance(d, int):
                return d
        raise self._concrete_error(node, v, "a length")

    def _concrete_error(self, node: fx.Node, v: Any, want: str) -> _ConcreteValueNeeded:
        if isinstance(v, TensorRef):
            return self._needs_concrete(node, f"{want} is needed from tensor %{node.name} (data-dependent)",
                                        "tensor values are not known while tracing; "
                                        "keep the computation in tensor ops")
        return self._needs_concrete(node, f"{want} is needed from the symbolic size `{v}`",
                                    "only static sizes become Python numbers; keep the size symbolic "
                                    "(pass it to view/reshape) or do not mark that dim dynamic")

    def to_bool(self, node: fx.Node) -> bool:
        v = _canon(self.env.get(node))
        if isinstance(v, TensorRef):
            raise TraceError("trace: control flow depends on tensor values (data-dependent)", self.where(node),
                             "rewrite with torch.where / masks, or move the decision out of forward()")
        if isinstance(v, sympy.Expr):
            v = _canon(sympy.Ne(v, 0))
        if isinstance(v, sympy.Basic):
            raise TraceError(f"trace: control flow depends on the symbolic size condition `{v}`", self.where(node),
                             "make the branch independent of the dynamic size, or do not mark that dim dynamic")
        return bool(v)

    # --- lowering one FX node
    def _attr(self, target: str) -> Any:
        obj: Any = self.root
        for part in target.split("."):
            obj = module_attr(obj, part)
        return obj

    def args(self, a: Any) -> Any:
        return map_arg(a, lambda n: self.env[n])

    def lower(self, node: fx.Node) -> None:
        self._fx = node
        self._origin = self.module_of(node)[0]
        base = _sanitize(node.name)
        if base.startswith(_ROOT_ATTR + "_") and len(base) > len(_ROOT_ATTR) + 1:
            base = base[len(_ROOT_ATTR) + 1:]       # call_module names carry the wrapper's attribute
        elif base == _ROOT_ATTR:
            base = _sanitize(self.user_class.lower())   # the root module itself is a leaf
        if base in self.names:
            k = 1
            while f"{base}_{k}" in self.names:
                k += 1
            base = f"{base}_{k}"
        self._base, self._tmp = base, 0
        start = len(self.nodes)
        if node.op == "output":
            self._lower_output(node)
            return
        val = _canon(self._dispatch(node))
        if isinstance(val, TensorRef):
            val = self._rename_result(val, start, base)
        self.env[node] = val

    def _rename_result(self, val: TensorRef, start: int, base: str) -> TensorRef:
        """The last IR node made for an FX node takes the FX node's name; helpers get `name.k`."""
        for i in range(len(self.nodes) - 1, start - 1, -1):
            n = self.nodes[i]
            if n.outputs[0].name == val.name:
                if any(val.name in m.inputs for m in self.nodes[i + 1:]):
                    return val
                self.nodes[i] = n.replace(outputs=(Value(base, val.type),) + n.outputs[1:])
                self.names.add(base)
                return TensorRef(base, val.type)
        return val

    def _dispatch(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            ref = self.inputs.get(str(node.target))
            if ref is None:
                raise self.fail(f"forward argument `{node.target}` has no example input",
                                hint="give one example input per positional forward argument")
            return ref
        if node.op == "get_attr":
            obj = self._attr(str(node.target))
            if not isinstance(obj, torch.Tensor):
                raise self.fail(f"attribute `{self._strip(str(node.target))}` ({type(obj).__name__}) "
                                "cannot be used as a value")
            return self.param(obj, f"`{self._strip(str(node.target))}`")
        args = self.args(node.args)
        kwargs = dict(self.args(node.kwargs))
        if node.op == "call_module":
            return self._call_module(str(node.target), args, kwargs)
        if node.op == "call_method":
            return self._call_method(str(node.target), args, kwargs)
        if node.op == "call_function":
            return self._call_function(node.target, args, kwargs)
        raise self.fail(f"unexpected FX node kind {node.op}")

    def _bind(self, h: _Handler, what: str, args: Sequence[Any], kwargs: dict[str, Any], *prefix: Any) -> Any:
        if "out" in kwargs:
            raise self.fail(f"{what}: out= writes in place, which the IR cannot express",
                            hint="use the returned value instead")
        try:
            bound = h.sig.bind(self, *prefix, *args, **kwargs)
        except TypeError as e:
            raise self.fail(f"{what}: unsupported arguments ({e})",
                            hint=f"supported signature: {what}{_public_sig(h.sig, len(prefix))}") from None
        return h.fn(*bound.args, **bound.kwargs)

    def _call_function(self, fn: Any, args: tuple, kwargs: dict) -> Any:
        op = _function_op(fn)
        if op is not None:
            lower = FUNCTION_LOWERINGS.get(op)
            if lower is None:
                raise self.fail(f"wrapped function {_fn_name(fn)} maps to op `{op}`, which has no lowering",
                                hint="registered: " + ", ".join(sorted(FUNCTION_LOWERINGS)))
            return lower(self, fn, tuple(args), kwargs)
        if not _has_tensor((args, kwargs)):
            scalar = _scalar_function(fn)
            if scalar is not None:
                try:
                    return scalar(*args, **kwargs)
                except DsrError:
                    raise
                except Exception as e:
                    raise self.fail(f"{_fn_name(fn)} on trace-time values {args!r} failed: {e}") from None
        h = _FUNCTIONS.get(fn)
        if h is None:
            if getattr(fn, "__name__", "").endswith("_") and not getattr(fn, "__name__", "").startswith("_"):
                raise self.fail(f"in-place op {_fn_name(fn)} is not supported",
                                hint="use the out-of-place form (the IR is SSA)")
            if fn is operator.setitem:
                raise self.fail("in-place op operator.setitem (x[...] = y) is not supported",
                                hint="build the tensor with torch.cat / torch.where instead of assigning into it")
            raise self.fail(f"unsupported op {_fn_name(fn)}", hint=_supported_hint())
        return self._bind(h, _fn_name(fn), args, kwargs)

    def _call_method(self, name: str, args: tuple, kwargs: dict) -> Any:
        if name.endswith("_") and not name.startswith("_"):
            raise self.fail(f"in-place op Tensor.{name} is not supported",
                            hint=f"use the out-of-place form `.{name[:-1]}(...)` (the IR is SSA)")
        if not args or not isinstance(args[0], TensorRef):
            raise self.fail(f"method .{name}() called on the trace-time value {args[0] if args else None!r}")
        h = _METHODS.get(name)
        if h is None:
            raise self.fail(f"unsupported op Tensor.{name}", hint=_supported_hint())
        return self._bind(h, f"Tensor.{name}", args, kwargs)

    def _call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        mod = self._attr(target)
        op = getattr(type(mod), "dsr_op", None)
        if op is not None:
            lower = LEAF_LOWERINGS.get(op)
            if lower is None:
                raise self.fail(f"module class {type(mod).__name__} has dsr_op={op!r}, which has no leaf lowering",
                                hint="registered: " + ", ".join(sorted(LEAF_LOWERINGS)))
            return lower(self, mod, tuple(args), kwargs)
        for cls in type(mod).__mro__:
            h = _MODULES.get(cls)
            if h is not None:
                return self._bind(h, _class_name(type(mod)), args, kwargs, mod)
        raise self.fail(f"unsupported module {_class_name(type(mod))}",
                        hint="supported torch.nn modules: " + ", ".join(sorted(_class_name(c) for c in _MODULES))
                        + "; or give the class a `dsr_op` attribute and register it in LEAF_LOWERINGS")

    def _lower_output(self, node: fx.Node) -> None:
        val = self.args(node.args[0])
        outs: list[str] = []

        def collect(v: Any) -> None:
            if isinstance(v, TensorRef):
                outs.append(v.name)
            elif isinstance(v, (tuple, list)):
                for x in v:
                    collect(x)
            else:
                raise self.fail(f"forward must return tensors (or tuples/lists of them), got {v!r}")
        collect(val)
        if not outs:
            raise self.fail("forward returns no tensor")
        self.outputs = outs


def _public_sig(sig: inspect.Signature, n_prefix: int) -> str:
    params = list(sig.parameters.values())[1 + n_prefix:]
    return str(sig.replace(parameters=params))


def _param_index(module: nn.Module) -> dict[int, tuple[str, torch.Tensor]]:
    out: dict[int, tuple[str, torch.Tensor]] = {}
    for n, p in module.named_parameters(remove_duplicate=True):
        out.setdefault(id(p), (_sanitize(n), p))
    for n, b in module.named_buffers(remove_duplicate=True):
        out.setdefault(id(b), (_sanitize(n), b))
    return out


# ----------------------------------------------------------------------------- scalar (trace-time) functions

def _sym_or(sym_fn: Callable, py_fn: Callable) -> Callable:
    def f(*a: Any) -> Any:
        return sym_fn(*a) if any(_is_symbolic(x) for x in a) else py_fn(*a)
    return f


_SCALAR_FUNCTIONS: dict[Any, Callable] = {
    operator.add: operator.add, operator.sub: operator.sub, operator.mul: operator.mul,
    operator.truediv: operator.truediv, operator.floordiv: operator.floordiv, operator.mod: operator.mod,
    operator.pow: operator.pow, operator.neg: operator.neg, operator.pos: operator.pos, operator.abs: operator.abs,
    operator.lt: operator.lt, operator.le: operator.le, operator.gt: operator.gt, operator.ge: operator.ge,
    operator.eq: _sym_or(sympy.Eq, operator.eq), operator.ne: _sym_or(sympy.Ne, operator.ne),
    operator.not_: operator.not_, operator.getitem: operator.getitem, builtins.getattr: builtins.getattr,
}
_MATH_SYMBOLIC: dict[str, Callable] = {"sqrt": sympy.sqrt, "floor": sympy.floor, "ceil": sympy.ceiling,
                                       "log": sympy.log, "exp": sympy.exp, "prod": sympy.prod}


def _scalar_function(fn: Any) -> Callable | None:
    if fn in _SCALAR_FUNCTIONS:
        return _SCALAR_FUNCTIONS[fn]
    if getattr(fn, "__module__", None) == "math" or fn is getattr(math, getattr(fn, "__name__", ""), None):
        sym_fn = _MATH_SYMBOLIC.get(fn.__name__)
        return _sym_or(sym_fn, fn) if sym_fn is not None else fn
    return None


# ----------------------------------------------------------------------------- the tracer

class _DsrProxy(fx.Proxy):
    """FX proxy whose trace-time value is known: sizes become Python numbers where static."""

    def __index__(self) -> int:
        return self.tracer.cx.concrete_int(self.node)  # type: ignore[attr-defined]

    def __int__(self) -> int:
        return self.tracer.cx.concrete_int(self.node)  # type: ignore[attr-defined]

    def __float__(self) -> float:
        return self.tracer.cx.concrete_float(self.node)  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return self.tracer.cx.length(self.node)  # type: ignore[attr-defined]


class _DsrTracer(fx.Tracer):
    def __init__(self, cx: TraceContext) -> None:
        super().__init__(autowrap_modules=(math,), autowrap_functions=tuple(_wrapped_function_objects()))
        self.cx = cx
        self.record_stack_traces = True
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if getattr(type(m), "dsr_op", None) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_node(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                    type_expr: Any | None = None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        self.cx.lower(node)
        return node

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _DsrProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        return self.cx.to_bool(obj.node)

    def iter(self, obj: fx.Proxy) -> Iterator:
        return iter([obj[i] for i in range(self.cx.length(obj.node))])

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor) and id(a) not in self.cx.param_index:
            raise TraceError(f"trace: a tensor constant {tuple(a.shape)} {a.dtype} is used in forward()",
                             self.cx.where_now(self.module_stack, traceback.extract_stack()),
                             "register module state with `self.register_buffer(name, tensor)`; tensors "
                             "created inside forward from Python numbers (torch.ones(4), torch.arange(8), ...) are "
                             "not supported; sizes of traced tensors are (torch.arange(x.size(1)))")
        return super().create_arg(a)


# ----------------------------------------------------------------------------- public API

def trace(module: nn.Module, example_inputs: tuple, dynamic: dict[str, dict[int, str]] | None = None,
          name: str | None = None, notes: list[str] | None = None) -> Graph:
    """Trace `module` on `example_inputs` into a verified IR graph.

    `dynamic={"x": {0: "T"}}` makes dim 0 of input `x` the symbol `T` (shared by every input dim
    marked `T`; their example sizes must agree). Inputs are the forward's tensor arguments followed
    by the used parameters and buffers (`graph.params`, see `param_tensors`). Raises TraceError.
    Trace notes (e.g. a `print()` in forward, which runs only now) are appended to `notes`.
    """
    if not isinstance(module, nn.Module):
        raise TraceError(f"trace: expected an nn.Module, got {type(module).__name__}")
    cls = type(module).__name__
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise TraceError(f"trace: example_inputs must be a tuple, got {type(example_inputs).__name__}",
                         f"top-level module ({cls})", "pass e.g. (x,)")
    example_inputs = tuple(example_inputs)
    arg_names, call_exprs, consts, tensor_inputs = _bind_example_inputs(module, example_inputs)
    in_types = _input_types(tensor_inputs, dynamic or {}, cls)

    root = _make_root(module, [n for n, _ in tensor_inputs], call_exprs, consts)
    cx = TraceContext(root, module)
    for n, t in in_types.items():
        cx.inputs[n] = TensorRef(n, t)
        cx.names.add(n)
    tracer = _DsrTracer(cx)
    found: list[str] = []
    try:
        # a Ctrl-C swallowed inside torch is KeyboardInterrupt, not a TraceError
        with watch_interrupts(), _trace_time_prints(found):
            tracer.trace(root)
    except DsrError:
        raise
    except _ConcreteValueNeeded as e:
        raise TraceError(e.what, e.where, e.hint) from None
    except Exception as e:
        where = cx.where_now(tracer.module_stack, traceback.extract_tb(e.__traceback__))
        what = f"trace: forward() raised {type(e).__name__} under symbolic tracing: {e}"
        hint = ("torch.fx runs forward() on proxies: code that needs concrete tensor values cannot be traced; "
                "see the module docstring of dsr_compiler.frontend.trace for what is supported")
        if cx.last_concrete_error is not None:     # torch's arg parser probed a proxy and hid why
            c = cx.last_concrete_error
            what += f" (earlier: {c.what.removeprefix('trace: ')}, at {c.where})"
            hint = c.hint
        if isinstance(e, TypeError) and "item assignment" in str(e):
            what = "trace: in-place op operator.setitem (x[...] = y) is not supported"
            hint = "build the tensor with torch.cat / torch.where instead of assigning into it"
        raise TraceError(what, where, hint) from e
    if cx.outputs is None:
        raise TraceError("trace: forward produced no output", f"top-level module ({cls})")
    g = verify(_build_graph(cx, _sanitize(name or cls)))
    _report_notes(found, notes)
    return g


@contextlib.contextmanager
def _trace_time_prints(found: list[str]) -> Iterator[None]:
    """Record every `print()` that forward runs while FX traces it: the compiled module never runs
    Python, so the print happens once now and never again. builtins.print is patched for the
    duration of the trace only (process-wide: another thread printing meanwhile is recorded too,
    a harmless note) and restored in `finally`."""
    real = builtins.print

    def print_at_trace_time(*args: Any, **kwargs: Any) -> None:
        f = sys._getframe(1)
        if _is_user_file(f.f_code.co_filename):
            note = (f"print() at {_short_path(f.f_code.co_filename)}:{f.f_lineno} ran at trace time only; "
                    "the compiled module does not print")
            if note not in found:
                found.append(note)
        real(*args, **kwargs)
    builtins.print = print_at_trace_time
    try:
        yield
    finally:
        builtins.print = real


def _report_notes(found: list[str], notes: list[str] | None) -> None:
    from dsr_compiler import knobs
    if notes is not None:
        notes.extend(found)
    if found and knobs.get("DSR_DEBUG") >= 1:
        for n in found:
            sys.stderr.write(f"[dsr] trace note: {n}\n")


def param_tensors(module: nn.Module, graph: Graph) -> list[torch.Tensor]:
    """The module's tensors for `graph.params`, in graph order (what the runtime binds); derived
    params (`DERIVED_PARAMS`) are computed from their owner submodule's tensors here."""
    by_name = {name: t for name, t in _param_index(module).values()}
    found = {p: by_name[p] if p in by_name else _derived_tensor(module, p) for p in graph.params}
    missing = [p for p, t in found.items() if t is None]
    if missing:
        raise TraceError(f"trace: graph {graph.name} needs parameters the module does not have: {missing}",
                         hint="trace and run with the same module")
    return [found[p] for p in graph.params]


def _derived_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """`<owner path>.<key>` -> DERIVED_PARAMS[key].compute(owner), or None if `name` is not one."""
    for key, how in DERIVED_PARAMS.items():
        if name != key and not name.endswith("." + key):
            continue
        path = name[: len(name) - len(key)].rstrip(".")
        try:
            owner = module.get_submodule(path) if path else module
        except AttributeError:
            continue
        try:
            with torch.no_grad():
                return how.compute(owner).detach()
        except (TypeError, ValueError, RuntimeError) as e:
            raise TraceError(f"trace: cannot compute derived parameter `{name}` ({how.doc}): {e}",
                             hint="trace and run with the same module") from None
    return None


# ----------------------------------------------------------------------------- trace() helpers

def _bind_example_inputs(module: nn.Module, ex: tuple
                         ) -> tuple[list[str], list[str], list[Any], list[tuple[str, torch.Tensor]]]:
    cls = type(module).__name__
    where = f"top-level module ({cls}), {cls}.forward"
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError) as e:
        raise TraceError(f"trace: cannot read the signature of {cls}.forward: {e}", where) from None
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in positional]
    if len(ex) > len(positional):
        raise TraceError(f"trace: {cls}.forward takes {len(positional)} positional input(s) ({', '.join(names)}), "
                         f"got {len(ex)} example inputs", where,
                         "pass one example input per forward argument (*args is not supported)")
    missing = [p.name for p in positional[len(ex):] if p.default is p.empty]
    missing += [p.name for p in params if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
    if missing:
        raise TraceError(f"trace: {cls}.forward needs input(s) {', '.join(missing)} but got {len(ex)} example "
                         f"input(s) for ({', '.join(names)})", where,
                         "pass one example input per forward argument without a default")
    call_exprs: list[str] = []
    consts: list[Any] = []
    tensors: list[tuple[str, torch.Tensor]] = []
    for p, v in zip(positional, ex):
        if isinstance(v, torch.Tensor):
            tensors.append((p.name, v))
            call_exprs.append(p.name)
        elif v is None or isinstance(v, (bool, int, float, str)):
            call_exprs.append(f"self._dsr_consts[{len(consts)}]")
            consts.append(v)
        else:
            raise TraceError(f"trace: example input `{p.name}` is a {type(v).__name__}", where,
                             "example inputs are tensors, or Python scalars/None (which are baked in)")
    return names, call_exprs, consts, tensors


def _input_types(tensors: list[tuple[str, torch.Tensor]], dynamic: dict, cls: str) -> dict[str, TensorType]:
    where = f"top-level module ({cls}), example inputs"
    if not isinstance(dynamic, dict):
        raise TraceError(f"trace: dynamic must be a dict like {{'x': {{0: 'T'}}}}, got {dynamic!r}", where)
    by_name = dict(tensors)
    unknown = [k for k in dynamic if k not in by_name]
    if unknown:
        raise TraceError(f"trace: dynamic names unknown input(s) {unknown}", where,
                         f"tensor inputs are: {', '.join(by_name) or 'none'}")
    seen: dict[str, tuple[int, str]] = {}
    out: dict[str, TensorType] = {}
    for n, t in tensors:
        try:
            dt = DType.from_torch(t.dtype)
        except TraceError as e:
            raise TraceError(f"trace: input `{n}` has unsupported dtype {t.dtype}", where, e.hint) from None
        shape: list[Any] = [int(s) for s in t.shape]
        spec = dynamic.get(n, {})
        if not isinstance(spec, dict):
            raise TraceError(f"trace: dynamic[{n!r}] must map dim -> symbol name, got {spec!r}", where)
        for d, sname in spec.items():
            if isinstance(d, bool) or not isinstance(d, int) or not -t.dim() <= d < t.dim():
                raise TraceError(f"trace: dynamic[{n!r}] names dim {d!r}, but `{n}` has rank {t.dim()}", where)
            try:
                s = sym(sname)
            except (ValueError, TypeError):
                raise TraceError(f"trace: bad dimension symbol {sname!r} for input `{n}`", where,
                                 "symbols are identifiers such as T or S") from None
            size = int(t.shape[d])
            if size < 1:
                raise TraceError(f"trace: dim {d} of `{n}` is marked {sname} but has size {size}", where,
                                 "dynamic dims must have size >= 1 in the example")
            if sname in seen and seen[sname][0] != size:
                raise TraceError(f"trace: symbol {sname} is {seen[sname][0]} in {seen[sname][1]} but {size} in "
                                 f"`{n}` dim {d}", where, "dims that share a symbol must agree in the example inputs")
            seen.setdefault(sname, (size, f"`{n}` dim {d}"))
            shape[d % t.dim()] = s
        out[n] = TensorType(dt, tuple(shape))
    return out


def _make_root(module: nn.Module, tensor_names: list[str], call_exprs: list[str], consts: list[Any]) -> nn.Module:
    """A wrapper whose forward takes exactly the tensor inputs and calls the user's module.

    Tracing through it makes the user's module a submodule, so a root that is itself a leaf
    (e.g. an RMSNorm with `dsr_op`, or nn.Linear) lowers to its op, and scalar example inputs and
    omitted defaults are bound by plain Python instead of FX's `concrete_args` (which adds guards).
    No source is generated: `call_exprs` lists, per positional parameter, either a tensor input's
    name or the next baked-in constant, and the wrapper's parameter names come from
    `_named_signature`."""
    plan: list[tuple[bool, int]] = []          # (is_tensor, index into the tensor args / consts)
    n_const = 0
    for e in call_exprs:
        if e in tensor_names:
            plan.append((True, tensor_names.index(e)))
        else:
            plan.append((False, n_const))
            n_const += 1

    def forward(self: nn.Module, *tensors: Any) -> Any:
        args = [tensors[i] if is_tensor else self._dsr_consts[i] for is_tensor, i in plan]
        return getattr(self, _ROOT_ATTR)(*args)
    forward.__wrapped__ = _named_signature(tensor_names)   # type: ignore[attr-defined]
    cls = type("DsrTraceRoot", (nn.Module,), {"forward": forward})
    root = cls()
    root.add_module(_ROOT_ATTR, module)
    root._dsr_consts = list(consts)
    return root


def _signature_template(self):  # noqa: ANN001, ANN202 -- only its code object is used
    return None


def _named_signature(names: list[str]) -> Callable[..., None]:
    """A never-called function whose parameters are `(self, *names)`.

    torch.fx names the graph's placeholders after the root forward's code object
    (`inspect.unwrap(forward).__code__.co_varnames`), so the wrapper's `__wrapped__` points here. Only
    the names of a fixed code object change (`CodeType.replace`, as torch.fx does itself); its
    bytecode stays `return None`, and nothing is compiled from text."""
    for n in names:
        if not n.isidentifier() or keyword.iskeyword(n):
            raise TraceError(f"trace: input name {n!r} is not a Python identifier")
    varnames = ("self", *names)
    code = _signature_template.__code__.replace(co_argcount=len(varnames), co_nlocals=len(varnames),
                                                co_varnames=varnames, co_name="forward", co_qualname="forward")
    return types.FunctionType(code, {}, "forward")


def _build_graph(cx: TraceContext, name: str) -> Graph:
    assert cx.outputs is not None
    live = set(cx.outputs)
    keep: list[Node] = []
    for n in reversed(cx.nodes):                      # dead code (unused helpers, asserts) goes
        if any(o.name in live for o in n.outputs):
            keep.append(n)
            live.update(n.inputs)
    keep.reverse()
    used: list[str] = []
    for n in keep:
        for i in n.inputs:
            if i in cx.params and i not in used:
                used.append(i)
    for o in cx.outputs:
        if o in cx.params and o not in used:
            used.append(o)
    inputs = [Value(r.name, r.type) for r in cx.inputs.values()] + [Value(p, cx.params[p].type) for p in used]
    return Graph(name, tuple(inputs), tuple(keep), tuple(cx.outputs), tuple(used))


# ============================================================================= op lowerings
# Each handler's signature is torch's; `cx` comes first. Tensors arrive as TensorRef, sizes as
# ints or sympy expressions, dtypes as torch.dtype.

def _varargs(args: tuple, kw: dict, key: str) -> tuple:
    if kw:
        extra = [k for k in kw if k != key]
        if extra or args:
            raise TypeError(f"unexpected keyword arguments {sorted(kw)}")
        args = (kw[key],)
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return tuple(args[0])
    return tuple(args)


# --- pointwise arithmetic

@_lowers(operator.add, torch.add, "add")
def _add(cx: TraceContext, input: Any, other: Any, *, alpha: Any = 1) -> TensorRef:
    if alpha != 1:
        other = cx.binary("mul", other, alpha)
    return cx.binary("add", input, other)


@_lowers(operator.sub, torch.sub, torch.subtract, "sub", "subtract")
def _sub(cx: TraceContext, input: Any, other: Any, *, alpha: Any = 1) -> TensorRef:
    if alpha != 1:
        other = cx.binary("mul", other, alpha)
    return cx.binary("sub", input, other)


@_lowers(torch.rsub)
def _rsub(cx: TraceContext, input: Any, other: Any, *, alpha: Any = 1) -> TensorRef:
    if alpha != 1:
        input = cx.binary("mul", input, alpha)
    return cx.binary("sub", other, input)


@_lowers(operator.mul, torch.mul, torch.multiply, "mul", "multiply")
def _mul(cx: TraceContext, input: Any, other: Any) -> TensorRef:
    return cx.binary("mul", input, other)


@_lowers(operator.truediv, torch.div, torch.divide, torch.true_divide, "div", "divide", "true_divide")
def _div(cx: TraceContext, input: Any, other: Any, *, rounding_mode: Any = None) -> TensorRef:
    if rounding_mode is not None:
        raise cx.fail(f"division with rounding_mode={rounding_mode!r} is not supported",
                      hint="only true division maps to the IR's `div`")
    return cx.binary("div", input, other)


@_lowers(operator.pow, torch.pow, "pow")
def _pow(cx: TraceContext, input: Any, exponent: Any) -> TensorRef:
    return cx.binary("pow", input, exponent)


@_lowers(torch.square, "square")
def _square(cx: TraceContext, input: Any) -> TensorRef:
    x = cx.tensor(input, "square")
    return cx.emit("mul", [x, x])


@_lowers(torch.maximum, "maximum")
def _maximum(cx: TraceContext, input: Any, other: Any) -> TensorRef:
    return cx.binary("maximum", input, other)


@_lowers(torch.minimum, "minimum")
def _minimum(cx: TraceContext, input: Any, other: Any) -> TensorRef:
    return cx.binary("minimum", input, other)


@_lowers(torch.clamp, torch.clip, "clamp", "clip")
def _clamp(cx: TraceContext, input: Any, min: Any = None, max: Any = None) -> TensorRef:
    x = cx.tensor(input, "clamp")
    if min is None and max is None:
        raise cx.fail("clamp needs min or max")
    if min is not None:
        x = cx.binary("maximum", x, min)
    if max is not None:
        x = cx.binary("minimum", x, max)
    return x


@_lowers(torch.clamp_min, "clamp_min")
def _clamp_min(cx: TraceContext, input: Any, min: Any) -> TensorRef:
    return cx.binary("maximum", input, min)


@_lowers(torch.clamp_max, "clamp_max")
def _clamp_max(cx: TraceContext, input: Any, max: Any) -> TensorRef:
    return cx.binary("minimum", input, max)


def _unary(op: str, *targets: Any) -> None:
    def handler(cx: TraceContext, input: Any) -> TensorRef:
        return cx.emit(op, [cx.tensor(input, op)])
    handler.__name__ = f"_lower_{op}"
    _lowers(*targets)(handler)


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


@_lowers(operator.pos, "contiguous", "clone", torch.clone)
def _identity(cx: TraceContext, input: Any, *, memory_format: Any = None) -> TensorRef:
    return cx.tensor(input, "identity")


def _no_inplace(cx: TraceContext, what: str, inplace: Any) -> None:
    if inplace:
        raise cx.fail(f"{what}(inplace=True) is an in-place op", hint="use inplace=False (the IR is SSA)")


@_lowers(F.relu)
def _f_relu(cx: TraceContext, input: Any, inplace: bool = False) -> TensorRef:
    _no_inplace(cx, "F.relu", inplace)
    return cx.emit("relu", [cx.tensor(input, "relu")])


@_lowers(F.silu)
def _f_silu(cx: TraceContext, input: Any, inplace: bool = False) -> TensorRef:
    _no_inplace(cx, "F.silu", inplace)
    return cx.emit("silu", [cx.tensor(input, "silu")])


@_lowers(F.gelu)
def _f_gelu(cx: TraceContext, input: Any, approximate: str = "none") -> TensorRef:
    if approximate != "none":
        raise cx.fail(f"F.gelu(approximate={approximate!r}) is not supported",
                      hint="the IR's `gelu` is the exact (erf) GELU; use approximate='none'")
    return cx.emit("gelu", [cx.tensor(input, "gelu")])


@_lowers(F.dropout)
def _f_dropout(cx: TraceContext, input: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> TensorRef:
    if training and p > 0:
        raise cx.fail(f"F.dropout(p={p}, training=True) is random",
                      hint="trace in eval mode: call module.eval() and pass training=self.training")
    return cx.tensor(input, "dropout")


# --- comparisons and selection

def _compare(op: str, *targets: Any) -> None:
    def handler(cx: TraceContext, input: Any, other: Any) -> TensorRef:
        return cx.binary(op, input, other)
    handler.__name__ = f"_lower_{op}"
    _lowers(*targets)(handler)


_compare("lt", operator.lt, torch.lt, torch.less, "lt", "less")
_compare("le", operator.le, torch.le, torch.less_equal, "le", "less_equal")
_compare("gt", operator.gt, torch.gt, torch.greater, "gt", "greater")
_compare("ge", operator.ge, torch.ge, torch.greater_equal, "ge", "greater_equal")
_compare("eq", operator.eq, torch.eq, "eq")


def _not(cx: TraceContext, b: TensorRef) -> TensorRef:
    return cx.emit("where", [b, cx.const(False, DType.bool), cx.const(True, DType.bool)])


def _as_bool(cx: TraceContext, v: Any, what: str) -> TensorRef:
    return cx.cast(cx.tensor(v, what), DType.bool)


@_lowers(operator.ne, torch.ne, torch.not_equal, "ne", "not_equal")
def _ne(cx: TraceContext, input: Any, other: Any) -> TensorRef:
    return _not(cx, cx.binary("eq", input, other))


@_lowers(torch.logical_not, "logical_not")
def _logical_not(cx: TraceContext, input: Any) -> TensorRef:
    return _not(cx, _as_bool(cx, input, "logical_not"))


@_lowers(operator.invert, torch.bitwise_not, "bitwise_not")
def _invert(cx: TraceContext, input: Any) -> TensorRef:
    x = cx.tensor(input, "~")
    if x.type.dtype is not DType.bool:
        raise cx.fail(f"~ / bitwise_not on {x.type.dtype.value} is not supported", hint="only bool tensors")
    return _not(cx, x)


@_lowers(torch.logical_and, "logical_and")
def _logical_and(cx: TraceContext, input: Any, other: Any) -> TensorRef:
    return cx.emit("where", [_as_bool(cx, input, "and"), _as_bool(cx, other, "and"), cx.const(False, DType.bool)])


@_lowers(torch.logical_or, "logical_or")
def _logical_or(cx: TraceContext, input: Any, other: Any) -> TensorRef:
    return cx.emit("where", [_as_bool(cx, input, "or"), cx.const(True, DType.bool), _as_bool(cx, other, "or")])


@_lowers(operator.and_, torch.bitwise_and, "bitwise_and")
def _and(cx: TraceContext, input: Any, other: Any) -> TensorRef:
    if not all(isinstance(v, TensorRef) and v.type.dtype is DType.bool for v in (input, other)):
        raise cx.fail("& / bitwise_and is only supported between bool tensors")
    return _logical_and(cx, input, other)


@_lowers(operator.or_, torch.bitwise_or, "bitwise_or")
def _or(cx: TraceContext, input: Any, other: Any) -> TensorRef:
    if not all(isinstance(v, TensorRef) and v.type.dtype is DType.bool for v in (input, other)):
        raise cx.fail("| / bitwise_or is only supported between bool tensors")
    return _logical_or(cx, input, other)


@_lowers(torch.where)
def _where(cx: TraceContext, condition: Any, input: Any = None, other: Any = None) -> TensorRef:
    cond = cx.tensor(condition, "where: condition")
    if input is None or other is None:
        raise cx.fail("torch.where(condition) (nonzero) has a data-dependent shape",
                      hint="use the three-argument form torch.where(cond, a, b)")
    like = input.type if isinstance(input, TensorRef) else other.type if isinstance(other, TensorRef) else None
    if like is None:
        raise cx.fail("torch.where with two scalars is not supported", hint="make one branch a tensor")
    return cx.emit("where", [cond, cx.operand(input, like), cx.operand(other, like)])


@_lowers(torch.masked_fill, "masked_fill")
def _masked_fill(cx: TraceContext, input: Any, mask: Any, value: Any) -> TensorRef:
    x = cx.tensor(input, "masked_fill")
    return cx.emit("where", [cx.tensor(mask, "masked_fill: mask"), cx.operand(value, x.type), x])


# --- casts

def _cast_method(name: str, dtype: torch.dtype) -> None:
    def handler(cx: TraceContext, input: Any, memory_format: Any = None) -> TensorRef:
        return cx.cast(cx.tensor(input, name), cx.dtype(dtype))
    handler.__name__ = f"_lower_{name}"
    _lowers(name)(handler)


for _m, _dt in {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64,
                "int": torch.int32, "long": torch.int64, "bool": torch.bool}.items():
    _cast_method(_m, _dt)


@_lowers("to")
def _to(cx: TraceContext, input: Any, *args: Any, dtype: Any = None, device: Any = None, non_blocking: bool = False,
        copy: bool = False, memory_format: Any = None) -> TensorRef:
    x = cx.tensor(input, "to")
    target = dtype
    for a in args:
        if isinstance(a, torch.dtype):
            target = a
        elif isinstance(a, TensorRef):
            target = a.type.dtype
        elif isinstance(a, (str, torch.device, _Device)) or a is None or isinstance(a, bool):
            continue                               # device placement / non_blocking / copy
        else:
            raise cx.fail(f"Tensor.to: unsupported argument {a!r}")
    return x if target is None else cx.cast(x, cx.dtype(target))


@_lowers("type_as")
def _type_as(cx: TraceContext, input: Any, other: Any) -> TensorRef:
    return cx.cast(cx.tensor(input, "type_as"), cx.tensor(other, "type_as: other").type.dtype)


@_lowers("type")
def _type(cx: TraceContext, input: Any, dtype: Any = None, non_blocking: bool = False) -> TensorRef:
    if not isinstance(dtype, torch.dtype):
        raise cx.fail(f"Tensor.type({dtype!r}) is not supported", hint="use .to(dtype)")
    return cx.cast(cx.tensor(input, "type"), cx.dtype(dtype))


# --- reductions

def _reduce(cx: TraceContext, op: str, input: Any, dim: Any, keepdim: Any, dtype: Any = None) -> TensorRef:
    x = cx.tensor(input, op)
    keepdim = cx.static_bool(keepdim, f"{op}: keepdim")
    if dtype is not None:
        x = cx.cast(x, cx.dtype(dtype))
    elif op == "sum" and not x.type.dtype.is_float:
        x = cx.cast(x, DType.i64)                  # torch sums integers and bools in int64
    rank = x.type.rank
    dims = [] if dim is None else list(dim) if isinstance(dim, (tuple, list)) else [dim]
    if not dims:                                    # all dims
        if rank == 0:
            return x
        if not keepdim:
            x = cx.reshape(x, (x.type.numel,))
            return cx.emit(op, [x], {"dim": 0, "keepdim": False})
        dims = list(range(rank))
    norm = sorted({cx.norm_dim(d, rank, op) for d in dims}, reverse=True)
    for d in norm:                                  # high dims first, so lower indices stay valid
        x = cx.emit(op, [x], {"dim": d, "keepdim": keepdim})
    return x


@_lowers(torch.sum, "sum")
def _sum(cx: TraceContext, input: Any, dim: Any = None, keepdim: Any = False, *, dtype: Any = None) -> TensorRef:
    return _reduce(cx, "sum", input, dim, keepdim, dtype)


@_lowers(torch.mean, "mean")
def _mean(cx: TraceContext, input: Any, dim: Any = None, keepdim: Any = False, *, dtype: Any = None) -> TensorRef:
    return _reduce(cx, "mean", input, dim, keepdim, dtype)


@_lowers(torch.amax, "amax")
def _amax(cx: TraceContext, input: Any, dim: Any = (), keepdim: Any = False) -> TensorRef:
    return _reduce(cx, "amax", input, dim, keepdim)


@_lowers(torch.amin, "amin")
def _amin(cx: TraceContext, input: Any, dim: Any = (), keepdim: Any = False) -> TensorRef:
    x = cx.tensor(input, "amin")
    return cx.emit("neg", [_reduce(cx, "amax", cx.emit("neg", [x]), dim, keepdim)])


def _max_min(cx: TraceContext, which: str, input: Any, other: Any, keepdim: Any, dim: Any) -> TensorRef:
    if isinstance(other, TensorRef):
        return cx.binary("maximum" if which == "max" else "minimum", input, other)
    if other is not None or dim is not None:
        raise cx.fail(f"torch.{which}(x, dim) returns (values, indices), which the IR does not have",
                      hint=f"use x.a{which}(dim) for the values")
    x = cx.tensor(input, which)
    if which == "max":
        return _reduce(cx, "amax", x, None, keepdim)
    return cx.emit("neg", [_reduce(cx, "amax", cx.emit("neg", [x]), None, keepdim)])


@_lowers(torch.max, "max")
def _max(cx: TraceContext, input: Any, other: Any = None, keepdim: Any = False, *, dim: Any = None) -> TensorRef:
    return _max_min(cx, "max", input, other, keepdim, dim)


@_lowers(torch.min, "min")
def _min(cx: TraceContext, input: Any, other: Any = None, keepdim: Any = False, *, dim: Any = None) -> TensorRef:
    return _max_min(cx, "min", input, other, keepdim, dim)


def _softmax_like(cx: TraceContext, op: str, input: Any, dim: Any, dtype: Any) -> TensorRef:
    x = cx.tensor(input, op)
    if dim is None:
        raise cx.fail(f"{op} without dim", hint=f"pass dim explicitly, e.g. {op}(x, dim=-1)")
    if dtype is not None:
        x = cx.cast(x, cx.dtype(dtype))
    return cx.emit(op, [x], {"dim": cx.norm_dim(dim, x.type.rank, op)})


@_lowers(torch.softmax, "softmax")
def _softmax(cx: TraceContext, input: Any, dim: Any, dtype: Any = None) -> TensorRef:
    return _softmax_like(cx, "softmax", input, dim, dtype)


@_lowers(F.softmax)
def _f_softmax(cx: TraceContext, input: Any, dim: Any = None, _stacklevel: int = 3, dtype: Any = None) -> TensorRef:
    return _softmax_like(cx, "softmax", input, dim, dtype)


@_lowers(torch.log_softmax, "log_softmax")
def _log_softmax(cx: TraceContext, input: Any, dim: Any, dtype: Any = None) -> TensorRef:
    return _softmax_like(cx, "log_softmax", input, dim, dtype)


@_lowers(F.log_softmax)
def _f_log_softmax(cx: TraceContext, input: Any, dim: Any = None, _stacklevel: int = 3, dtype: Any = None) -> TensorRef:
    return _softmax_like(cx, "log_softmax", input, dim, dtype)


# --- shapes as trace-time values

@_lowers("size")
def _size(cx: TraceContext, input: Any, dim: Any = None) -> Any:
    t = cx.tensor(input, "size").type
    if dim is None:
        return tuple(_canon(d) for d in t.shape)
    return _canon(t.shape[cx.norm_dim(dim, t.rank, "size")])


@_lowers("dim", "ndimension")
def _ndim(cx: TraceContext, input: Any) -> int:
    return cx.tensor(input, "dim").type.rank


@_lowers("numel")
def _numel(cx: TraceContext, input: Any) -> Any:
    return _canon(cx.tensor(input, "numel").type.numel)


@_lowers(builtins.getattr)
def _getattr(cx: TraceContext, obj: Any, name: str, *default: Any) -> Any:
    if not isinstance(obj, TensorRef):
        return getattr(obj, name, *default)
    t = obj.type
    if name == "shape":
        return tuple(_canon(d) for d in t.shape)
    if name == "ndim":
        return t.rank
    if name == "dtype":
        return t.dtype.torch
    if name == "device":
        return _DEVICE
    if name == "is_floating_point":
        return t.dtype.is_float
    if name == "T":
        return _permute_to(cx, obj, tuple(reversed(range(t.rank))))
    if name == "mT":
        if t.rank < 2:
            raise cx.fail(f".mT needs rank >= 2, got {t}")
        return _permute_to(cx, obj, tuple(range(t.rank - 2)) + (t.rank - 1, t.rank - 2))
    raise cx.fail(f"unsupported op Tensor.{name} (attribute)",
                  hint="supported tensor attributes: shape, ndim, dtype, device, T, mT")


# --- layout

def _resolve_sizes(cx: TraceContext, x: TensorRef, sizes: Sequence[Any], what: str) -> tuple:
    vals = [cx.size_value(s, what) for s in sizes]
    neg = [i for i, s in enumerate(vals) if isinstance(s, int) and s == -1]
    if len(neg) > 1:
        raise cx.fail(f"{what}: only one size may be -1, got {tuple(vals)}")
    if any(isinstance(s, int) and s < -1 for s in vals):
        raise cx.fail(f"{what}: negative size in {tuple(vals)}")
    if neg:
        known: Any = sympy.Integer(1)
        for i, s in enumerate(vals):
            if i != neg[0]:
                known = known * s
        if known == 0:
            raise cx.fail(f"{what}: cannot infer -1 next to a zero size in {tuple(vals)}")
        q = sympy.cancel(to_expr(x.type.numel) / known)
        num, den = sympy.fraction(q)
        if den != 1:
            raise cx.fail(f"{what}: cannot infer -1: {x.type} has {x.type.numel} elements, not a multiple of {known}",
                          hint="give the sizes explicitly")
        vals[neg[0]] = _canon(q)
    return tuple(vals)


@_lowers("view", "reshape")
def _view(cx: TraceContext, input: Any, *shape: Any, **kw: Any) -> TensorRef:
    x = cx.tensor(input, "view")
    try:
        sizes = _varargs(shape, kw, "shape" if "shape" in kw else "size")
    except TypeError as e:
        raise cx.fail(f"view/reshape: {e}") from None
    if len(sizes) == 1 and isinstance(sizes[0], torch.dtype):
        raise cx.fail("Tensor.view(dtype) (bit reinterpretation) is not supported", hint="use .to(dtype)")
    return cx.reshape(x, _resolve_sizes(cx, x, sizes, "reshape"))


@_lowers(torch.reshape)
def _torch_reshape(cx: TraceContext, input: Any, shape: Any) -> TensorRef:
    x = cx.tensor(input, "reshape")
    return cx.reshape(x, _resolve_sizes(cx, x, tuple(shape), "reshape"))


@_lowers(torch.flatten, "flatten")
def _flatten(cx: TraceContext, input: Any, start_dim: Any = 0, end_dim: Any = -1) -> TensorRef:
    x = cx.tensor(input, "flatten")
    shape = x.type.shape
    if x.type.rank == 0:
        return cx.reshape(x, (1,))
    s = cx.norm_dim(start_dim, len(shape), "flatten")
    e = cx.norm_dim(end_dim, len(shape), "flatten")
    if s > e:
        raise cx.fail(f"flatten: start_dim {start_dim} comes after end_dim {end_dim}")
    n: Any = sympy.Integer(1)
    for d in shape[s:e + 1]:
        n = n * d
    return cx.reshape(x, shape[:s] + (n,) + shape[e + 1:])


@_lowers(torch.unflatten, "unflatten")
def _unflatten(cx: TraceContext, input: Any, dim: Any, sizes: Any) -> TensorRef:
    x = cx.tensor(input, "unflatten")
    d = cx.norm_dim(dim, x.type.rank, "unflatten")
    part = TensorRef(x.name, TensorType(x.type.dtype, (x.type.shape[d],)))
    new = _resolve_sizes(cx, part, tuple(sizes), "unflatten")
    return cx.reshape(x, x.type.shape[:d] + tuple(to_expr(s) for s in new) + x.type.shape[d + 1:])


@_lowers(torch.unsqueeze, "unsqueeze")
def _unsqueeze(cx: TraceContext, input: Any, dim: Any) -> TensorRef:
    x = cx.tensor(input, "unsqueeze")
    d = cx.norm_dim(dim, x.type.rank + 1, "unsqueeze")
    shape = list(x.type.shape)
    shape.insert(d, sympy.Integer(1))
    return cx.reshape(x, shape)


@_lowers(torch.squeeze, "squeeze")
def _squeeze(cx: TraceContext, input: Any, dim: Any = None) -> TensorRef:
    x = cx.tensor(input, "squeeze")
    shape = x.type.shape
    if dim is None:
        dims = [i for i, s in enumerate(shape) if s == 1]
    else:
        raw = list(dim) if isinstance(dim, (tuple, list)) else [dim]
        dims = []
        for r in raw:
            d = cx.norm_dim(r, x.type.rank, "squeeze")
            if shape[d].free_symbols:
                raise cx.fail(f"squeeze({r}) on the symbolic dim {shape[d]}: the result rank would depend on "
                              "its runtime size", hint="reshape to the intended shape explicitly")
            if shape[d] == 1:
                dims.append(d)
    return cx.reshape(x, [s for i, s in enumerate(shape) if i not in dims])


def _permute_to(cx: TraceContext, x: TensorRef, dims: tuple[int, ...]) -> TensorRef:
    if dims == tuple(range(x.type.rank)):
        return x
    return cx.emit("permute", [x], {"dims": dims})


@_lowers("permute")
def _permute(cx: TraceContext, input: Any, *dims: Any, **kw: Any) -> TensorRef:
    x = cx.tensor(input, "permute")
    try:
        raw = _varargs(dims, kw, "dims")
    except TypeError as e:
        raise cx.fail(f"permute: {e}") from None
    if len(raw) != x.type.rank:
        raise cx.fail(f"permute: {len(raw)} dims for a rank-{x.type.rank} tensor")
    return _permute_to(cx, x, tuple(cx.norm_dim(d, x.type.rank, "permute") for d in raw))


@_lowers(torch.permute)
def _torch_permute(cx: TraceContext, input: Any, dims: Any) -> TensorRef:
    return _permute(cx, input, *tuple(dims))


@_lowers(torch.transpose, torch.swapaxes, torch.swapdims, "transpose", "swapaxes", "swapdims")
def _transpose(cx: TraceContext, input: Any, dim0: Any, dim1: Any) -> TensorRef:
    x = cx.tensor(input, "transpose")
    r = x.type.rank
    a, b = cx.norm_dim(dim0, r, "transpose"), cx.norm_dim(dim1, r, "transpose")
    perm = list(range(r))
    perm[a], perm[b] = perm[b], perm[a]
    return _permute_to(cx, x, tuple(perm))


@_lowers(torch.t, "t")
def _t(cx: TraceContext, input: Any) -> TensorRef:
    x = cx.tensor(input, "t")
    if x.type.rank > 2:
        raise cx.fail(f"t() needs rank <= 2, got {x.type}", hint="use transpose(-2, -1)")
    return _permute_to(cx, x, tuple(reversed(range(x.type.rank))))


def _expand_to(cx: TraceContext, x: TensorRef, sizes: Sequence[Any]) -> TensorRef:
    vals = [cx.size_value(s, "expand") for s in sizes]
    lead = len(vals) - x.type.rank
    if lead < 0:
        raise cx.fail(f"expand: {len(vals)} sizes for a rank-{x.type.rank} tensor")
    shape = []
    for i, s in enumerate(vals):
        if isinstance(s, int) and s == -1:
            if i < lead:
                raise cx.fail("expand: -1 is not allowed for new leading dims")
            shape.append(x.type.shape[i - lead])
        else:
            shape.append(to_expr(s))
    if lead == 0 and all(_same(a, b) for a, b in zip(shape, x.type.shape)):
        return x
    return cx.emit("expand", [x], {"shape": tuple(_canon(s) for s in shape)})


@_lowers("expand")
def _expand(cx: TraceContext, input: Any, *sizes: Any, **kw: Any) -> TensorRef:
    try:
        vals = _varargs(sizes, kw, "size")
    except TypeError as e:
        raise cx.fail(f"expand: {e}") from None
    return _expand_to(cx, cx.tensor(input, "expand"), vals)


@_lowers("expand_as")
def _expand_as(cx: TraceContext, input: Any, other: Any) -> TensorRef:
    return _expand_to(cx, cx.tensor(input, "expand_as"), cx.tensor(other, "expand_as").type.shape)


@_lowers(torch.broadcast_to)
def _broadcast_to(cx: TraceContext, input: Any, size: Any) -> TensorRef:
    return _expand_to(cx, cx.tensor(input, "broadcast_to"), tuple(size))


def _slice_bound(cx: TraceContext, v: Any, size: Any, what: str) -> Any:
    v = _canon(v)
    if isinstance(v, bool) or not isinstance(v, (int, sympy.Expr)):
        raise cx.fail(f"slice {what} must be an int, got {v!r}")
    if isinstance(v, int) and v < 0:
        if size.free_symbols:
            raise cx.fail(f"negative slice {what} {v} on the symbolic dim {size}",
                          hint="the IR's slice takes static bounds; count from the start, or make the dim static")
        return max(int(size) + v, 0)
    if isinstance(v, int):
        return v
    if _same(v, size):
        return v
    raise cx.fail(f"slice {what} `{v}` is symbolic",
                  hint="the IR's slice takes static bounds; pass the sliced tensor as a forward input instead")


def _norm_slice(cx: TraceContext, s: slice, size: Any) -> tuple[int, int | None, int] | None:
    step = 1 if s.step is None else cx.static_int(s.step, "slice step")
    if step < 1:
        raise cx.fail(f"slice step must be positive, got {step}")
    start = 0 if s.start is None else _slice_bound(cx, s.start, size, "start")
    stop = None if s.stop is None else _slice_bound(cx, s.stop, size, "stop")
    if not isinstance(start, int):
        raise cx.fail(f"slice start `{start}` equals the whole dim: the result is empty")
    if stop is not None and (not isinstance(stop, int) or (not size.free_symbols and stop >= int(size))):
        stop = None                                        # runs to the end
    if not size.free_symbols and start > int(size):
        start = int(size)
    if start == 0 and stop is None and step == 1:
        return None
    return start, stop, step


def _index_tensor(cx: TraceContext, x: TensorRef, idx: Any) -> TensorRef:
    items = list(idx) if isinstance(idx, tuple) else [idx]
    for it in items:
        if _has_tensor(it) or isinstance(it, list):
            raise cx.fail("advanced indexing (tensor or list index) is not supported",
                          hint="use basic slicing; gather rows with F.embedding")
    items = [_canon(it) for it in items]
    if sum(it is Ellipsis for it in items) > 1:
        raise cx.fail("an index can only have one ellipsis")
    consume = sum(1 for it in items if it is not None and it is not Ellipsis)
    rank = x.type.rank
    if consume > rank:
        raise cx.fail(f"too many indices ({consume}) for a rank-{rank} tensor {x.type}")
    fill = [slice(None)] * (rank - consume)
    if Ellipsis in items:
        i = items.index(Ellipsis)
        items[i:i + 1] = fill
    else:
        items += fill
    out, plan, d = x, [], 0
    for it in items:
        if it is None:
            plan.append(None)
            continue
        size = out.type.shape[d]
        if isinstance(it, slice):
            s = _norm_slice(cx, it, size)
            if s is not None:
                out = cx.emit("slice", [out], {"dim": d, "start": s[0], "end": s[1], "step": s[2]})
            plan.append(d)
        else:
            i = _canon(it)
            if isinstance(i, bool) or not isinstance(i, int):
                if _is_symbolic(i):
                    raise cx.fail(f"index `{i}` is symbolic", hint="the IR's slice takes static bounds")
                raise cx.fail(f"unsupported index {i!r}")
            if i < 0:
                if size.free_symbols:
                    raise cx.fail(f"negative index {i} on the symbolic dim {size}",
                                  hint="the IR's slice takes static bounds; index from the start, "
                                       "or make the dim static")
                i += int(size)
            if i < 0 or (not size.free_symbols and i >= int(size)):
                raise cx.fail(f"index {it} out of range for dim {d} of {x.type}")
            out = cx.emit("slice", [out], {"dim": d, "start": i, "end": i + 1, "step": 1})
        d += 1
    shape = [sympy.Integer(1) if p is None else out.type.shape[p] for p in plan]
    return cx.reshape(out, shape)


@_lowers(operator.getitem)
def _getitem(cx: TraceContext, obj: Any, idx: Any) -> Any:
    if isinstance(obj, TensorRef):
        return _index_tensor(cx, obj, idx)
    if _has_tensor(idx):
        raise cx.fail("indexing a Python container with a tensor is data-dependent")
    i = _canon(idx)
    if _is_symbolic(i):
        raise cx.fail(f"indexing a Python container with the symbolic `{i}`")
    return obj[i]


@_lowers(torch.cat, torch.concat, torch.concatenate)
def _cat(cx: TraceContext, tensors: Any, dim: Any = 0) -> TensorRef:
    ts = [cx.tensor(t, "cat") for t in tensors]
    if not ts:
        raise cx.fail("cat of no tensors")
    if len(ts) == 1:
        return ts[0]
    return cx.emit("cat", ts, {"dim": cx.norm_dim(dim, ts[0].type.rank, "cat")})


@_lowers(torch.stack)
def _stack(cx: TraceContext, tensors: Any, dim: Any = 0) -> TensorRef:
    ts = [cx.tensor(t, "stack") for t in tensors]
    if not ts:
        raise cx.fail("stack of no tensors")
    return _cat(cx, [_unsqueeze(cx, t, dim) for t in ts], dim)


def _pieces(cx: TraceContext, x: TensorRef, sizes: Sequence[int], d: int) -> tuple[TensorRef, ...]:
    out, start = [], 0
    for i, n in enumerate(sizes):
        last = i == len(sizes) - 1
        s = _norm_slice(cx, slice(start, None if last else start + n), x.type.shape[d])
        out.append(x if s is None else cx.emit("slice", [x], {"dim": d, "start": s[0], "end": s[1], "step": 1}))
        start += n
    return tuple(out)


@_lowers(torch.split, "split")
def _split(cx: TraceContext, tensor: Any, split_size_or_sections: Any = None, dim: Any = 0, *,
           split_size: Any = None) -> tuple[TensorRef, ...]:
    x = cx.tensor(tensor, "split")
    spec = split_size if split_size_or_sections is None else split_size_or_sections
    d = cx.norm_dim(dim, x.type.rank, "split")
    size = x.type.shape[d]
    if isinstance(spec, (tuple, list)):
        sizes = [cx.static_int(s, "split size") for s in spec]
        if not _same(sum(sizes), size):
            raise cx.fail(f"split sizes {sizes} do not add up to dim {d} of {x.type}")
    else:
        n = cx.static_int(spec, "split size")
        total = cx.static_int(size, f"split: dim {d}")
        sizes = [n] * (total // n) + ([total % n] if total % n else [])
    return _pieces(cx, x, sizes, d)


@_lowers(torch.chunk, "chunk")
def _chunk(cx: TraceContext, input: Any, chunks: Any, dim: Any = 0) -> tuple[TensorRef, ...]:
    x = cx.tensor(input, "chunk")
    d = cx.norm_dim(dim, x.type.rank, "chunk")
    n = cx.static_int(chunks, "chunks")
    total = cx.static_int(x.type.shape[d], f"chunk: dim {d}")
    step = -(-total // n)
    sizes = [min(step, total - i) for i in range(0, total, step)]
    return _pieces(cx, x, sizes, d)


# --- GEMMs, gathers, attention, norms

@_lowers(operator.matmul, torch.matmul, torch.bmm, torch.mm, "matmul", "bmm", "mm")
def _matmul(cx: TraceContext, input: Any, other: Any) -> TensorRef:
    return cx.emit("matmul", [cx.tensor(input, "matmul"), cx.tensor(other, "matmul")])


def _linear(cx: TraceContext, x: Any, w: Any, b: Any) -> TensorRef:
    ins = [cx.tensor(x, "linear: input"), cx.tensor(w, "linear: weight")]
    if b is not None:
        ins.append(cx.tensor(b, "linear: bias"))
    return cx.emit("linear", ins)


@_lowers(F.linear)
def _f_linear(cx: TraceContext, input: Any, weight: Any, bias: Any = None) -> TensorRef:
    return _linear(cx, input, weight, bias)


def _embedding(cx: TraceContext, ids: Any, weight: TensorRef, max_norm: Any) -> TensorRef:
    if max_norm is not None:
        raise cx.fail("embedding with max_norm renormalizes the weight in place", hint="use max_norm=None")
    return cx.emit("embedding", [weight, cx.tensor(ids, "embedding: ids")])


@_lowers(F.embedding)
def _f_embedding(cx: TraceContext, input: Any, weight: Any, padding_idx: Any = None, max_norm: Any = None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False) -> TensorRef:
    return _embedding(cx, input, cx.tensor(weight, "embedding: weight"), max_norm)


@_lowers(F.scaled_dot_product_attention)
def _sdpa(cx: TraceContext, query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: Any = 0.0,
          is_causal: Any = False, scale: Any = None, enable_gqa: Any = False) -> TensorRef:
    what = "F.scaled_dot_product_attention"
    if attn_mask is not None:
        raise cx.fail(f"{what}: attn_mask is not supported",
                      hint="use is_causal=True for causal masking, or write the masked softmax with torch.where")
    if cx.number(dropout_p, f"{what}: dropout_p") != 0:
        raise cx.fail(f"{what}: dropout_p={dropout_p} is random", hint="trace in eval mode with dropout_p=0.0")
    if cx.static_bool(enable_gqa, f"{what}: enable_gqa"):
        raise cx.fail(f"{what}: enable_gqa=True is not supported",
                      hint="repeat the key/value heads explicitly (expand + reshape) before attention")
    q, k, v = (cx.tensor(t, f"{what}: {n}") for t, n in ((query, "query"), (key, "key"), (value, "value")))
    causal = cx.static_bool(is_causal, f"{what}: is_causal")
    if q.type.rank < 2 or k.type.rank < 2:
        raise cx.fail(f"{what}: query and key need rank >= 2, got {q.type} and {k.type}")
    if scale is None:
        d = _canon(q.type.shape[-1])
        if not isinstance(d, int):
            raise cx.fail(f"{what}: the default scale needs a static head dim, got {d}", hint="pass scale=")
        scale = 1.0 / math.sqrt(d)
    if causal and not _same(q.type.shape[-2], k.type.shape[-2]):
        raise cx.fail(f"{what}: is_causal=True with query length {q.type.shape[-2]} != key length "
                      f"{k.type.shape[-2]}: SDPA's causal mask is top-left aligned, the IR's `attention` "
                      "is bottom-right aligned; they agree only when the lengths are equal",
                      hint="use equal lengths (prefill) or is_causal=False (decode of the last position)")
    return cx.emit("attention", [q, k, v], {"causal": causal, "scale": float(cx.number(scale, f"{what}: scale"))})


def _rms_norm(cx: TraceContext, x: Any, weight: Any, eps: Any, normalized_shape: Any, what: str) -> TensorRef:
    x = cx.tensor(x, what)
    if weight is None:
        raise cx.fail(f"{what} without a weight (elementwise_affine=False) is not supported",
                      hint="the IR's rms_norm always multiplies by a weight; use elementwise_affine=True")
    if eps is None:
        raise cx.fail(f"{what} with eps=None is not supported",
                      hint="set eps explicitly, e.g. nn.RMSNorm(dim, eps=1e-6); torch's default depends on the dtype")
    if normalized_shape is not None:
        ns = tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list, torch.Size)) else (normalized_shape,)
        if len(ns) != 1:
            raise cx.fail(f"{what} over {len(ns)} trailing dims is not supported", hint="normalize the last dim only")
    return cx.emit("rms_norm", [x, cx.tensor(weight, f"{what}: weight")], {"eps": float(eps)})


@_lowers(F.rms_norm)
def _f_rms_norm(cx: TraceContext, input: Any, normalized_shape: Any, weight: Any = None, eps: Any = None) -> TensorRef:
    return _rms_norm(cx, input, weight, eps, normalized_shape, "F.rms_norm")


# --- torch.nn leaf modules

@_lowers_module(nn.Linear)
def _m_linear(cx: TraceContext, m: nn.Linear, input: Any) -> TensorRef:
    bias = module_attr(m, "bias")
    return _linear(cx, input, cx.param(module_attr(m, "weight")), None if bias is None else cx.param(bias))


@_lowers_module(nn.Embedding)
def _m_embedding(cx: TraceContext, m: nn.Embedding, input: Any) -> TensorRef:
    return _embedding(cx, input, cx.param(module_attr(m, "weight")), m.max_norm)


@_lowers_module(nn.RMSNorm)
def _m_rms_norm(cx: TraceContext, m: nn.RMSNorm, input: Any) -> TensorRef:
    w = module_attr(m, "weight")
    w = None if w is None else cx.param(w)
    return _rms_norm(cx, input, w, m.eps, m.normalized_shape, "nn.RMSNorm")


def _module_unary(cls: type, op: str) -> None:
    def handler(cx: TraceContext, m: nn.Module, input: Any) -> TensorRef:
        return cx.emit(op, [cx.tensor(input, cls.__name__)])
    handler.__name__ = f"_m_{op}"
    _lowers_module(cls)(handler)


_module_unary(nn.SiLU, "silu")
_module_unary(nn.ReLU, "relu")
_module_unary(nn.Sigmoid, "sigmoid")
_module_unary(nn.Tanh, "tanh")


@_lowers_module(nn.GELU)
def _m_gelu(cx: TraceContext, m: nn.GELU, input: Any) -> TensorRef:
    return _f_gelu(cx, input, m.approximate)


@_lowers_module(nn.Softmax)
def _m_softmax(cx: TraceContext, m: nn.Softmax, input: Any) -> TensorRef:
    return _softmax_like(cx, "softmax", input, m.dim, None)


@_lowers_module(nn.LogSoftmax)
def _m_log_softmax(cx: TraceContext, m: nn.LogSoftmax, input: Any) -> TensorRef:
    return _softmax_like(cx, "log_softmax", input, m.dim, None)


@_lowers_module(nn.Identity)
def _m_identity(cx: TraceContext, m: nn.Identity, input: Any) -> TensorRef:
    return cx.tensor(input, "Identity")


@_lowers_module(nn.Dropout)
def _m_dropout(cx: TraceContext, m: nn.Dropout, input: Any) -> TensorRef:
    return _f_dropout(cx, input, m.p, m.training)


# --- leaf modules and wrapped functions of the zoo (registries)

def _leaf_rms_norm(cx: TraceContext, module: nn.Module, args: tuple, kwargs: dict) -> TensorRef:
    if len(args) + len(kwargs) != 1:
        raise cx.fail(f"{type(module).__name__} (rms_norm leaf) takes one input, got {len(args) + len(kwargs)}")
    x = args[0] if args else next(iter(kwargs.values()))
    try:
        weight = module_attr(module, "weight")
    except AttributeError:
        weight = None
    return _rms_norm(cx, x, None if weight is None else cx.param(weight), getattr(module, "eps", None), None,
                     type(module).__name__)


def _bound_args(cx: TraceContext, fn: Callable, args: tuple, kwargs: dict, default: str) -> tuple[str, list[Any]]:
    """A wrapped function's name (`default` when it has none) and its arguments bound to its
    signature, defaults applied, in parameter order."""
    name = getattr(fn, "__name__", default)
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
        bound.apply_defaults()
    except (TypeError, ValueError) as e:
        raise cx.fail(f"{name}: unsupported arguments ({e})") from None
    return name, list(bound.arguments.values())


def _function_rope(cx: TraceContext, fn: Callable, args: tuple, kwargs: dict) -> TensorRef:
    name, vals = _bound_args(cx, fn, args, kwargs, "rope")
    if len(vals) != 3:
        raise cx.fail(f"{name}: the rope op takes (x, cos, sin), got {len(vals)} arguments")
    x, cos, sin = (cx.tensor(v, f"{name}: {n}") for v, n in zip(vals, ("x", "cos", "sin")))
    return cx.emit("rope", [x, cos, sin])


LEAF_LOWERINGS["rms_norm"] = _leaf_rms_norm
FUNCTION_LOWERINGS["rope"] = _function_rope


from . import loss as _loss_lowerings  # noqa: E402,F401  (token_logprobs, gather, cross_entropy, detach)
from . import moe as _moe_lowerings  # noqa: E402,F401  (the MoE leaf and its derived expert weights)
from . import mla as _mla_lowerings  # noqa: E402,F401  (torch.arange, index_copy, RoPE tables, MLA attention)
