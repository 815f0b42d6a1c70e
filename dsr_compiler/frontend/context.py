"""Frontend: `TraceContext`, the IR under construction while FX traces, and trace-time values.

Where it sits: between `registry` (whose tables it dispatches each FX node through) and the
lowerings (which receive a TraceContext and call `emit`, `tensor`, `param`, `const`, `cast`,
`reshape`, `fail`). It imports no lowering: the tables are filled when `frontend.lowerings` is
imported. `tracer` creates one TraceContext per `trace()` call and hands it every FX node.
Trace-time values: tensors are `TensorRef`s; sizes are ints or sympy expressions (`canon`).
"""
from __future__ import annotations

import builtins
import inspect
import math
import operator
import re
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import sympy
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.node import map_arg

from dsr_compiler.ir.errors import DsrError, TraceError
from dsr_compiler.ir.graph import Node, Value, canon_attr
from dsr_compiler.ir.ops import OPS, TypeRuleError
from dsr_compiler.ir.types import DType, TensorType, to_expr

from .origins import (DYNAMO_MODULE, ROOT_ATTR, USER_FRAME, class_name, fn_name, location_from_frames,
                      location_from_user_frame)
from .registry import (DERIVED_PARAMS, FUNCTION_HANDLERS, FUNCTION_LOWERINGS, LEAF_LOWERINGS, METHOD_HANDLERS,
                       INPLACE_LOWERINGS, MODULE_HANDLERS, RECOGNIZERS, Handler, Recognizer, function_op,
                       supported_hint, verdict_key)

@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor while tracing: the IR value that holds it."""

    name: str
    type: TensorType


class Device:
    """`x.device` while tracing: placement is the runtime's business, so it is only ever ignored."""

    def __repr__(self) -> str:
        return "<device>"


#: the value of `x.device` for every traced tensor
DEVICE = Device()


class ConcreteValueNeeded(TypeError):
    """Raised from Proxy dunders (__index__, __int__, __float__, __len__). A TypeError on purpose:
    torch's argument parser probes `__index__` on proxies and expects TypeError when it fails."""

    def __init__(self, what: str, where: str, hint: str) -> None:
        super().__init__(what)
        self.what, self.where, self.hint = what, where, hint


def canon(v: Any) -> Any:
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
        return tuple(canon(x) for x in v)
    return v


def is_symbolic(v: Any) -> bool:
    """Whether a trace-time value is a sympy expression (a size that depends on a dynamic dim)."""
    return isinstance(v, sympy.Basic)


def same(a: Any, b: Any) -> bool:
    """Whether two sizes (ints or sympy expressions) are provably equal."""
    return sympy.simplify(to_expr(a) - to_expr(b)) == 0


def has_tensor(v: Any) -> bool:
    """Whether a (nested) argument holds a traced tensor."""
    if isinstance(v, TensorRef):
        return True
    if isinstance(v, (tuple, list)):
        return any(has_tensor(x) for x in v)
    if isinstance(v, dict):
        return any(has_tensor(x) for x in v.values())
    if isinstance(v, slice):
        return any(has_tensor(x) for x in (v.start, v.stop, v.step))
    return False


def sanitize(name: str) -> str:
    """An IR value name for a module path or FX node name (letters, digits, `_` and `.`)."""
    out = re.sub(r"[^A-Za-z0-9_.]", "_", name)
    return out if out and out[0] != "." else "_" + out


def module_attr(obj: Any, name: str) -> Any:
    """`getattr` that bypasses FX's patched `nn.Module.__getattr__` (which returns proxies for
    parameters while tracing): lowerings read the real tensors through this."""
    if isinstance(obj, nn.Module):
        d = obj.__dict__
        for store in ("_parameters", "_buffers", "_modules"):
            if name in d.get(store, {}):
                return d[store][name]
    return getattr(obj, name)


@dataclass(frozen=True)
class SizeGuard:
    """A branch of forward on a symbolic size (transformers' `q_length > 1`), taken as the example sizes take
    it: the traced graph holds for the sizes where `expr` is `value`; dsr.compile specializes for the others."""

    expr: sympy.Basic
    value: bool
    where: str

    def holds(self, env: dict) -> bool:
        return bool(self.expr.subs(env)) == self.value

    def text(self) -> str:
        return f"`{self.expr}` is {self.value} (at {self.where})"


@dataclass(frozen=True)
class OutputStructure:
    """How forward's result is built from the graph's flat outputs: a pytree spec and its leaves (TENSOR: the
    next graph output; anything else: that constant, e.g. a ModelOutput's None field)."""

    TENSOR = "<tensor>"
    spec: Any
    leaves: tuple

    def plain(self) -> bool:
        """A bare tensor or a flat tuple/list of tensors: what a compiled module has always returned."""
        if not all(v == self.TENSOR for v in self.leaves):
            return False
        if self.spec.is_leaf():
            return True
        return self.spec.type in (tuple, list) and self.spec.num_children == self.spec.num_leaves

    def build(self, outs: Sequence[Any]) -> Any:
        from torch.utils import _pytree as pytree
        it = iter(outs)
        return pytree.tree_unflatten([next(it) if v == self.TENSOR else v for v in self.leaves], self.spec)


class TraceContext:
    """The IR under construction while FX traces. Leaf and function lowerings receive it and use
    `tensor`, `param`, `emit`, `const`, `cast`, `reshape` and `fail`."""

    def __init__(self, root: nn.Module, user: nn.Module) -> None:
        self.root = root
        self.user_class = type(user).__name__
        self.param_index = param_index(user)            # id(tensor) -> (qualified name, tensor)
        self.inputs: dict[str, TensorRef] = {}
        self.params: dict[str, TensorRef] = {}
        self.nodes: list[Node] = []
        self.env: dict[fx.Node, Any] = {}
        self.names: set[str] = set()
        self.outputs: list[str] | None = None
        self.out_structure: OutputStructure | None = None
        self._fx: fx.Node | None = None
        self._origin = ""
        self._base = "v"
        self._tmp = 0
        self.last_concrete_error: ConcreteValueNeeded | None = None   # torch may swallow it (see below)
        self.recognized: dict[int, tuple[Recognizer, Any]] = {}     # id(module) -> (recognizer, spec)
        self.pattern_notes: list[str] = []                          # modules with a pattern's shape that missed it
        self.example_sizes: dict[sympy.Symbol, int] = {}            # dim symbol -> its size in the example inputs
        self.size_guards: list[SizeGuard] | None = None             # None: a branch on a symbolic size is an error
        # functional writes (lowerings/alloc.py): tensors allocated in forward, slice views of them, and
        # values that alias a tensor written since (reading one is an error: it holds the old values)
        self.fresh: set[fx.Node] = set()
        self.views: dict[fx.Node, tuple[fx.Node, Any]] = {}
        self.stale: set[fx.Node] = set()
        self._rebound = False

    def producer(self, name: str) -> tuple[Node | None, Value | None]:
        """(IR node, value) that made the value `name` so far; (None, value) for a graph input or parameter,
        (None, None) if no such value exists. Lowerings that look back at what they are given (the
        functional writes' slice folds, the MoE experts' uncast ids, the causal mask's arange check) use this."""
        for n in reversed(self.nodes):
            for o in n.outputs:
                if o.name == name:
                    return n, o
        ref = self.inputs.get(name) or self.params.get(name)
        return None, (Value(ref.name, ref.type) if ref is not None else None)

    def current_node(self) -> fx.Node:
        if self._fx is None:
            raise TraceError("trace: no FX node is being lowered")
        return self._fx

    def rebind(self, node: fx.Node, value: TensorRef, aliasing: frozenset) -> None:
        """`node` (a tensor allocated in forward) now has `value` (after an in-place write); the values taken
        from it so far by ops that may alias it become stale."""
        self.env[node] = value
        self._rebound = True
        for u in node.users:
            if u is self._fx:
                continue
            name = u.target if isinstance(u.target, str) else getattr(u.target, "__name__", "")
            if name in aliasing:
                self.stale.add(u)

    # --- modules of other libraries lowered as a whole (registry.RECOGNIZERS), decided before the trace
    def recognize(self, user: nn.Module) -> None:
        """Run every recognizer on every submodule of `user` (eagerly, outside FX: a match may run the
        module on a probe). Modules with one `registry.verdict_key` share a verdict."""
        seen: dict[Any, tuple[Recognizer, Any] | None] = {}
        for path, m in user.named_modules():
            if getattr(type(m), "dsr_op", None) is not None:
                continue
            key = verdict_key(m)
            if key in seen:
                if seen[key] is not None:
                    self.recognized[id(m)] = seen[key]     # type: ignore[assignment]
                continue
            seen[key] = None
            for rec in RECOGNIZERS.values():
                verdict = rec.match(m)
                if verdict is None:
                    continue
                if isinstance(verdict, str):
                    where = f"`{path}`" if path else "the top-level module"
                    self.pattern_notes.append(f"{rec.kind} {where} ({class_name(type(m))}) not recognised: {verdict}")
                    break
                seen[key] = (rec, verdict)
                self.recognized[id(m)] = seen[key]
                break

    # --- where am I (for errors and origins)
    @staticmethod
    def _strip(path: str) -> str:
        if path == ROOT_ATTR:
            return ""
        if path.startswith(ROOT_ATTR + "."):
            return path[len(ROOT_ATTR) + 1:]
        return path

    def module_of(self, node: fx.Node | None) -> tuple[str, str]:
        """(module path, class name) of an FX node; ("", user class) at the top level."""
        if node is None:
            return "", self.user_class
        if DYNAMO_MODULE in node.meta:                 # traced from a TorchDynamo graph: the user's module
            return node.meta[DYNAMO_MODULE]
        if node.op == "call_module":
            return self._strip(str(node.target)), class_name(type(self._attr(str(node.target))))
        stack = node.meta.get("nn_module_stack")
        if stack:
            qual, cls = list(stack.values())[-1]
            path = self._strip(qual)
            return path, (class_name(cls) if path else self.user_class)
        return "", self.user_class

    @staticmethod
    def describe_module(path: str, cls: str) -> str:
        return f"module path `{path}` ({cls})" if path else f"top-level module ({cls})"

    def where(self, node: fx.Node | None = None) -> str:
        node = node if node is not None else self._fx
        parts = [self.describe_module(*self.module_of(node))]
        if node is not None:
            parts.append(f"node %{node.name}")
            loc = location_from_user_frame(node.meta.get(USER_FRAME))
            if loc:
                parts.append(f"at {loc}")
        return ", ".join(parts)

    def where_now(self, module_stack: dict, frames: Sequence[traceback.FrameSummary]) -> str:
        """Where, from the tracer's live module stack and a Python stack (no FX node at hand)."""
        stack = list(module_stack.values())
        path = self._strip(stack[-1][0]) if stack else ""
        cls = class_name(stack[-1][1]) if path else self.user_class
        loc = location_from_frames(frames)
        return self.describe_module(path, cls) + (f", at {loc}" if loc else "")

    def fail(self, what: str, hint: str = "") -> TraceError:
        """A TraceError for the FX node being lowered (raise it)."""
        return TraceError(f"trace: {what}", self.where(), hint)

    def _needs_concrete(self, node: fx.Node, what: str, hint: str) -> ConcreteValueNeeded:
        err = ConcreteValueNeeded(f"trace: {what}", self.where(node), hint)
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
        """Append one single-output IR node; its type comes from the op table's type rule."""
        outs = self.emit_multi(op, inputs, attrs)
        if len(outs) != 1:
            raise self.fail(f"op `{op}` has {len(outs)} outputs where one was expected")
        return outs[0]

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
        name = sanitize(f"{path}.{key}" if path else key)
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
        v = canon(v)
        if isinstance(v, (bool, int, float)):
            return v
        if is_symbolic(v):
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
        if len(shape) == t.type.rank and all(same(a, b) for a, b in zip(shape, t.type.shape)):
            return t
        return self.emit("reshape", [t], {"shape": tuple(canon(d) for d in shape)})

    def static_int(self, v: Any, what: str) -> int:
        v = canon(v)
        if isinstance(v, bool) or not isinstance(v, int):
            if is_symbolic(v):
                raise self.fail(f"{what} must be static, got the symbolic `{v}`")
            raise self.fail(f"{what} must be an int, got {v!r}")
        return v

    def static_bool(self, v: Any, what: str) -> bool:
        v = canon(v)
        if isinstance(v, sympy.Rel):       # `q_length > 1 and ...` hands on the size condition itself when it is false
            taken = self.guarded(v, self.where())
            if taken is not None:
                return taken
        if not isinstance(v, (bool, int)):
            raise self.fail(f"{what} must be a Python bool, got {v!r}")
        return bool(v)

    def size_value(self, v: Any, what: str) -> int | sympy.Expr:
        v = canon(v)
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
        v = canon(self.env.get(node))
        if isinstance(v, (bool, int)):
            return int(v)
        if isinstance(v, float) and v.is_integer():
            return int(v)
        raise self._concrete_error(node, v, "a Python int")

    def concrete_float(self, node: fx.Node) -> float:
        v = canon(self.env.get(node))
        if isinstance(v, (bool, int, float)):
            return float(v)
        raise self._concrete_error(node, v, "a Python float")

    def length(self, node: fx.Node) -> int:
        v = canon(self.env.get(node))
        if isinstance(v, (tuple, list)):
            return len(v)
        if isinstance(v, TensorRef):
            if v.type.rank == 0:
                raise self._needs_concrete(node, "len() of a 0-d tensor", "")
            d = canon(v.type.shape[0])
            if isinstance(d, int):
                return d
        raise self._concrete_error(node, v, "a length")

    def _concrete_error(self, node: fx.Node, v: Any, want: str) -> ConcreteValueNeeded:
        if isinstance(v, TensorRef):
            return self._needs_concrete(node, f"{want} is needed from tensor %{node.name} (data-dependent)",
                                        "tensor values are not known while tracing; "
                                        "keep the computation in tensor ops")
        return self._needs_concrete(node, f"{want} is needed from the symbolic size `{v}`",
                                    "only static sizes become Python numbers; keep the size symbolic "
                                    "(pass it to view/reshape) or do not mark that dim dynamic")

    def to_bool(self, node: fx.Node) -> bool:
        v = canon(self.env.get(node))
        if isinstance(v, TensorRef):
            raise TraceError("trace: control flow depends on tensor values (data-dependent)", self.where(node),
                             "rewrite with torch.where / masks, or move the decision out of forward()")
        if isinstance(v, sympy.Expr):
            v = canon(sympy.Ne(v, 0))
        if isinstance(v, sympy.Basic):
            taken = self.guarded(v, self.where(node))
            if taken is None:
                raise TraceError(f"trace: control flow depends on the symbolic size condition `{v}`", self.where(node),
                                 "make the branch independent of the dynamic size, or do not mark that dim dynamic")
            return taken
        return bool(v)

    def guarded(self, cond: sympy.Basic, where: str) -> bool | None:
        """A condition on symbolic sizes decided as the example sizes decide it, recorded as a size guard;
        None when guards are off (plain `trace`) or it names sizes the example does not fix."""
        if self.size_guards is None or not cond.free_symbols or not cond.free_symbols <= set(self.example_sizes):
            return None
        taken = bool(cond.subs(self.example_sizes))
        if not any(g.expr == cond for g in self.size_guards):
            self.size_guards.append(SizeGuard(cond, taken, where))
        return taken

    # --- lowering one FX node
    def _attr(self, target: str) -> Any:
        obj: Any = self.root
        for part in target.split("."):
            obj = module_attr(obj, part)
        return obj

    def args(self, a: Any) -> Any:
        return map_arg(a, self._read)

    def _read(self, n: fx.Node) -> Any:
        if n in self.stale:
            raise self.fail(f"%{n.name} is a view of a tensor allocated in forward taken before an in-place write "
                            "into that tensor: it would hold the old values",
                            hint="take the view after the last write")
        return self.env[n]

    def lower(self, node: fx.Node) -> None:
        self._fx = node
        self._origin = self.module_of(node)[0]
        base = sanitize(node.name)
        if base.startswith(ROOT_ATTR + "_") and len(base) > len(ROOT_ATTR) + 1:
            base = base[len(ROOT_ATTR) + 1:]       # call_module names carry the wrapper's attribute
        elif base == ROOT_ATTR:
            base = sanitize(self.user_class.lower())   # the root module itself is a leaf
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
        self._rebound = False
        val = canon(self._dispatch(node))
        if isinstance(val, TensorRef) and not self._rebound:    # an in-place write keeps its values' names:
            val = self._rename_result(val, start, base)         # another FX node is bound to them (rebind)
        self.env[node] = val
        if node.target is operator.getitem and isinstance(val, TensorRef) and node.args and node.args[0] in self.fresh:
            self.views[node] = (node.args[0], self.args(node.args[1]))

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

    def _bind(self, h: Handler, what: str, args: Sequence[Any], kwargs: dict[str, Any], *prefix: Any) -> Any:
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
        op = function_op(fn)
        if op is not None:
            lower = FUNCTION_LOWERINGS.get(op)
            if lower is None:
                raise self.fail(f"wrapped function {fn_name(fn)} maps to op `{op}`, which has no lowering",
                                hint="registered: " + ", ".join(sorted(FUNCTION_LOWERINGS)))
            out = lower(self, fn, tuple(args), kwargs)
            flat = out if isinstance(out, (tuple, list)) else (out,)
            if not flat or not all(isinstance(v, TensorRef) for v in flat):
                # the user's code sees the FX proxy of this call, never the lowering's value: a None or a
                # number here would silently become a tensor there (`mask is None` would be False)
                raise self.fail(f"the lowering of wrapped function {fn_name(fn)} returned {out!r}: a wrapped "
                                "function's call is a tensor (or a tuple of tensors) in forward",
                                hint="return tensors, or replace the function at trace time (registry.replaces)")
            return out
        if not has_tensor((args, kwargs)):
            scalar = _scalar_function(fn)
            if scalar is not None:
                try:
                    return scalar(*args, **kwargs)
                except DsrError:
                    raise
                except Exception as e:
                    raise self.fail(f"{fn_name(fn)} on trace-time values {args!r} failed: {e}") from None
        inplace = INPLACE_LOWERINGS.get(fn)
        if inplace is not None:
            return inplace(self, tuple(args), kwargs)
        h = FUNCTION_HANDLERS.get(fn)
        if h is None:
            if getattr(fn, "__name__", "").endswith("_") and not getattr(fn, "__name__", "").startswith("_"):
                raise self.fail(f"in-place op {fn_name(fn)} is not supported",
                                hint="use the out-of-place form (the IR is SSA)")
            if fn is operator.setitem:
                raise self.fail("in-place op operator.setitem (x[...] = y) is not supported",
                                hint="build the tensor with torch.cat / torch.where instead of assigning into it")
            raise self.fail(f"unsupported op {fn_name(fn)}", hint=supported_hint(fn_name(fn)))
        return self._bind(h, fn_name(fn), args, kwargs)

    def _call_method(self, name: str, args: tuple, kwargs: dict) -> Any:
        inplace = INPLACE_LOWERINGS.get(name)
        if inplace is not None:
            return inplace(self, tuple(args), kwargs)
        if name.endswith("_") and not name.startswith("_"):
            raise self.fail(f"in-place op Tensor.{name} is not supported",
                            hint=f"use the out-of-place form `.{name[:-1]}(...)` (the IR is SSA)")
        if not args or not isinstance(args[0], TensorRef):
            raise self.fail(f"method .{name}() called on the trace-time value {args[0] if args else None!r}")
        h = METHOD_HANDLERS.get(name)
        if h is None:
            raise self.fail(f"unsupported op Tensor.{name}", hint=supported_hint(f"Tensor.{name}"))
        return self._bind(h, f"Tensor.{name}", args, kwargs)

    def _call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        mod = self._attr(target)
        hit = self.recognized.get(id(mod))
        if hit is not None:
            rec, spec = hit
            return rec.lower(self, mod, spec, tuple(args), kwargs)
        op = getattr(type(mod), "dsr_op", None)
        if op is not None:
            lower = LEAF_LOWERINGS.get(op)
            if lower is None:
                raise self.fail(f"module class {type(mod).__name__} has dsr_op={op!r}, which has no leaf lowering",
                                hint="registered: " + ", ".join(sorted(LEAF_LOWERINGS)))
            return lower(self, mod, tuple(args), kwargs)
        for cls in type(mod).__mro__:
            h = MODULE_HANDLERS.get(cls)
            if h is not None:
                return self._bind(h, class_name(type(mod)), args, kwargs, mod)
        raise self.fail(f"unsupported module {class_name(type(mod))}",
                        hint="supported torch.nn modules: " + ", ".join(sorted(class_name(c) for c in MODULE_HANDLERS))
                        + "; or give the class a `dsr_op` attribute and register it in LEAF_LOWERINGS")

    def _lower_output(self, node: fx.Node) -> None:
        """The graph's outputs: the tensors of what forward returns, flattened as a pytree (tuples, lists,
        dicts, transformers' ModelOutput); `out_structure` keeps how to rebuild it (OutputStructure)."""
        from torch.utils import _pytree as pytree
        val = self.args(node.args[0])
        root_spec = getattr(self.root, "_dsr_out_spec", None)      # the user's structure (tracer._make_root)
        if root_spec is not None and isinstance(val, tuple) and root_spec.num_leaves == len(val):
            # the root returned its result's leaves; a leaf may itself hold several tensors (a topk proxy)
            val = pytree.tree_unflatten(list(val), root_spec)
        leaves, spec = pytree.tree_flatten(val)
        outs: list[str] = []
        template: list[Any] = []
        for v in leaves:
            if isinstance(v, TensorRef):
                template.append(OutputStructure.TENSOR)
                outs.append(v.name)
            elif v is None or isinstance(v, (bool, int, float, str)):
                template.append(v)
            else:
                raise self.fail(f"forward returns {type(v).__name__} {v!r} inside its result",
                                hint="return tensors in tuples, lists, dicts or ModelOutputs (None and numbers are "
                                     "kept as they are)")
        if not outs:
            raise self.fail("forward returns no tensor")
        self.outputs = outs
        self.out_structure = OutputStructure(spec, tuple(template))


def _public_sig(sig: inspect.Signature, n_prefix: int) -> str:
    params = list(sig.parameters.values())[1 + n_prefix:]
    return str(sig.replace(parameters=params))


def param_index(module: nn.Module) -> dict[int, tuple[str, torch.Tensor]]:
    """id(tensor) -> (IR name, tensor) for every parameter and buffer of `module` (first name wins)."""
    out: dict[int, tuple[str, torch.Tensor]] = {}
    for n, p in module.named_parameters(remove_duplicate=True):
        out.setdefault(id(p), (sanitize(n), p))
    for n, b in module.named_buffers(remove_duplicate=True):
        out.setdefault(id(b), (sanitize(n), b))
    return out


# ----------------------------------------------------------------------------- scalar (trace-time) functions

def _sym_or(sym_fn: Callable, py_fn: Callable) -> Callable:
    def f(*a: Any) -> Any:
        return sym_fn(*a) if any(is_symbolic(x) for x in a) else py_fn(*a)
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


# ----------------------------------------------------------------------------- for function lowerings

def bound_args(cx: TraceContext, fn: Callable, args: tuple, kwargs: dict, default: str) -> tuple[str, list[Any]]:
    """A wrapped function's name (`default` when it has none) and its arguments bound to its
    signature, defaults applied, in parameter order."""
    name = getattr(fn, "__name__", default)
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
        bound.apply_defaults()
    except (TypeError, ValueError) as e:
        raise cx.fail(f"{name}: unsupported arguments ({e})") from None
    return name, list(bound.arguments.values())

