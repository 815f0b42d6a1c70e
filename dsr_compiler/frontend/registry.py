"""Frontend: the lowering tables and the decorators that fill them.

Where it sits: below `context` (which dispatches through these tables) and the lowerings (which
register into them); it imports neither, so the lowerings modules import it without a cycle.
`frontend/lowerings/__init__.py` imports every lowering module once, in one listed order; a
target, op or key registered twice is a ValueError at import, so the order carries no meaning.

    @lowers(torch.add, "add")              # torch functions (objects) and Tensor methods (strings)
    @lowers_module(nn.Linear)              # torch.nn module classes
    @lowers_leaf("moe")                    # module classes with `dsr_op = "moe"` (not traced through)
    @lowers_function("rope")               # torch.fx.wrap'ed functions mapped to op "rope"
    fn.dsr_op = "rope"                     # a torch.fx.wrap'ed function of the zoo names its op
    wrap_function("mylib.helpers", "my_rope", "rope")   # or, for a function that cannot carry it
    derive_param("experts.w13", ParamDerivation(...))
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from dsr_compiler.ir.params import DerivedParam

from .origins import fn_name

# the first argument is the `context.TraceContext` (not imported here: context imports this module)
LeafLowering = Callable[[Any, nn.Module, tuple, dict], Any]
FunctionLowering = Callable[[Any, Callable, tuple, dict], Any]

#: dsr_op of a leaf module class -> lowering(cx, module, args, kwargs) -> TensorRef
LEAF_LOWERINGS: dict[str, LeafLowering] = {}
#: op of a torch.fx.wrap'ed function -> lowering(cx, fn, args, kwargs) -> TensorRef
FUNCTION_LOWERINGS: dict[str, FunctionLowering] = {}
#: (defining module, function name) -> op, for wrapped functions without a `dsr_op` attribute
WRAPPED_FUNCTIONS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class ParamDerivation:
    """A graph param computed at compile time from the tensors of the module that owns it (e.g. the
    routed experts' weights stacked into one `[E, 2I, H]` tensor), by a rule of the one derived-param
    table (`ir/params.py` `PARAM_RULES`). The graph input is named `<owner path>.<key>` and flagged as
    a param; `declare` gives its `ir.params.DerivedParam` (sources: `sources` under the owner's path,
    `{e}` patterns over `count_of(owner)` items), which the front door evaluates once per compile with
    the passes' declarations. Tracing reads only `type_of(owner)` (no data, so meta-device modules
    trace). `doc` says which of the owner's tensors it is made of."""

    rule: str
    sources: tuple[str, ...]
    type_of: Callable[[nn.Module], tuple[torch.dtype, tuple[int, ...]]]
    count_of: Callable[[nn.Module], int] | None = None
    doc: str = ""

    def declare(self, name: str, path: str, owner: nn.Module) -> DerivedParam:
        pre = f"{path}." if path else ""
        attrs = {"count": int(self.count_of(owner))} if self.count_of is not None else {}
        return DerivedParam((name,), self.rule, tuple(pre + s for s in self.sources), attrs, origin=self.doc)


@dataclass(frozen=True)
class Recognizer:
    """A module of another library lowered as a whole, recognised by its structure and its behaviour, not
    its class (lowerings/moe_patterns.py: transformers' MoE routers and stacked experts).
    `match(module)` runs before the trace, outside FX: None (not this kind of module), a str (this kind,
    but it behaves differently: why, kept as a trace note), or a spec that `lower(cx, module, spec, args,
    kwargs)` gets when the module is called. `io(module, spec)` gives the roles of its forward's tensor
    arguments and results, each `(is_float, last_dim or None)`, so that a TorchDynamo graph in which the
    module was inlined can be cut back to one call of it (dynamo.py); None: not done under Dynamo."""

    name: str
    kind: str                     # what it is, for notes ("MoE router")
    match: Callable[[nn.Module], Any]
    lower: Callable[..., Any]
    io: Callable[[nn.Module, Any], tuple[list, list]] | None = None


#: recognizer name -> Recognizer (tried in registration order on every submodule)
RECOGNIZERS: dict[str, Recognizer] = {}


def verdict_key(m: nn.Module) -> Any:
    """Modules with equal keys get one recognizer verdict (the probe runs once per key): the class, and for
    the module and every submodule its path, class, tensor shapes and dtypes, and its public attributes
    (numbers and strings by value; functions, configs and any other object by identity, so two modules
    that differ in an activation function or a config never share a verdict)."""
    parts = []
    for path, sub in m.named_modules():
        tensors = tuple((n, tuple(t.shape), t.dtype) for n, t in
                        list(sub._parameters.items()) + list(sub._buffers.items()) if t is not None)
        attrs = tuple(sorted((k, repr(v) if isinstance(v, (int, float, bool, str, type(None))) else ("id", id(v)))
                             for k, v in sub.__dict__.items() if not k.startswith("_")))
        parts.append((path, type(sub), tensors, attrs))
    return type(m), tuple(parts)


def recognizes(name: str, match: Callable[[nn.Module], Any], kind: str,
               io: Callable[[nn.Module, Any], tuple[list, list]] | None = None) -> Callable[[Callable], Callable]:
    """Register `lower` as the lowering of modules that `match` recognises (once per name)."""
    def deco(fn: Callable) -> Callable:
        _register(RECOGNIZERS, name, Recognizer(name, kind, match, fn, io), "recognizer")
        return fn
    return deco


#: in-place writes that the IR takes as functional updates (lowerings/alloc.py): Tensor method name or
#: function -> lowering(cx, args, kwargs); every other in-place op stays a TraceError
INPLACE_LOWERINGS: dict[Any, Callable[..., Any]] = {}


def lowers_inplace(*targets: Any) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        for t in targets:
            _register(INPLACE_LOWERINGS, t, fn, "in-place lowering")
        return fn
    return deco


#: library functions replaced, while tracing, by trace-time Python (lowerings/hf_masks.py): (defining module,
#: name) -> factory(cx) -> the replacement, which runs on proxies and returns what the original would (None
#: included: a wrapped function's FX node always gives a proxy, never None)
PY_REPLACEMENTS: dict[tuple[str, str], Callable[[Any], Callable]] = {}


def replaces(module: str, name: str) -> Callable[[Callable], Callable]:
    def deco(factory: Callable) -> Callable:
        _register(PY_REPLACEMENTS, (module, name), factory, "replacement")
        return factory
    return deco


#: key (name relative to the owning module, e.g. "experts.w13") -> how to compute the param
DERIVED_PARAMS: dict[str, ParamDerivation] = {}


def _register(table: dict, key: Any, value: Any, what: str) -> None:
    if key in table:
        raise ValueError(f"frontend: {what} {key!r} registered twice")
    table[key] = value


def lowers_leaf(op: str) -> Callable[[LeafLowering], LeafLowering]:
    """Register the leaf lowering of module classes with `dsr_op = op` (once per op)."""
    def deco(fn: LeafLowering) -> LeafLowering:
        _register(LEAF_LOWERINGS, op, fn, "leaf lowering")
        return fn
    return deco


def lowers_function(op: str) -> Callable[[FunctionLowering], FunctionLowering]:
    """Register the lowering of wrapped functions that map to `op` (once per op)."""
    def deco(fn: FunctionLowering) -> FunctionLowering:
        _register(FUNCTION_LOWERINGS, op, fn, "function lowering")
        return fn
    return deco


def wrap_function(module: str, name: str, op: str) -> None:
    """Map the wrapped function `module.name` (which has no `dsr_op` attribute) to `op`."""
    _register(WRAPPED_FUNCTIONS, (module, name), op, "wrapped function")


def derive_param(key: str, how: ParamDerivation) -> None:
    """Register a derived param (see ParamDerivation) under `key` (once per key)."""
    _register(DERIVED_PARAMS, key, how, "derived parameter")


def function_op(fn: Any) -> str | None:
    """The op a wrapped function maps to: its `dsr_op` attribute, else its WRAPPED_FUNCTIONS entry."""
    op = getattr(fn, "dsr_op", None)
    if isinstance(op, str):
        return op
    key = (getattr(fn, "__module__", None), getattr(fn, "__name__", None))
    return WRAPPED_FUNCTIONS.get(key)  # type: ignore[arg-type]


def wrapped_function_objects() -> list[Callable]:
    """WRAPPED_FUNCTIONS entries that are importable now: the tracer auto-wraps them wherever a
    traced module's globals refer to them, not only in the module that called `torch.fx.wrap`
    (functions that carry `dsr_op` are found by `tracer`, see `dsr_op_functions`)."""
    import sys
    out = []
    for (mod, name) in WRAPPED_FUNCTIONS:
        fn = getattr(sys.modules.get(mod), name, None)
        if callable(fn):
            out.append(fn)
    return out


@dataclass(frozen=True)
class Handler:
    """A registered torch-level lowering and its signature (arguments are bound to it)."""

    fn: Callable
    sig: inspect.Signature


#: call_function target -> handler
FUNCTION_HANDLERS: dict[Any, Handler] = {}
#: call_method name -> handler
METHOD_HANDLERS: dict[str, Handler] = {}
#: torch.nn leaf module class -> handler(cx, module, ...)
MODULE_HANDLERS: dict[type, Handler] = {}


def lowers(*targets: Any) -> Callable[[Callable], Callable]:
    """Register a handler for functions (objects) and Tensor methods (strings). The handler's own
    Python signature is the torch signature: arguments bind to it, unknown keywords are errors."""
    def deco(fn: Callable) -> Callable:
        h = Handler(fn, inspect.signature(fn))
        for t in targets:
            table: dict = METHOD_HANDLERS if isinstance(t, str) else FUNCTION_HANDLERS
            if t in table:
                raise ValueError(f"frontend: {fn_name(t)} registered twice")
            table[t] = h
        return fn
    return deco


def lowers_module(*classes: type) -> Callable[[Callable], Callable]:
    """Register a handler(cx, module, *args) for torch.nn module classes (and their subclasses)."""
    def deco(fn: Callable) -> Callable:
        for c in classes:
            if c in MODULE_HANDLERS:
                raise ValueError(f"frontend: module {c.__name__} registered twice")
            MODULE_HANDLERS[c] = Handler(fn, inspect.signature(fn))
        return fn
    return deco


NEAREST = 10          # supported ops an "unsupported op" hint names


def supported_names() -> list[str]:
    """Every registered function (`torch.x`, `F.x`, ...) and Tensor method (`Tensor.x`), sorted."""
    fns = {fn_name(f) for f in FUNCTION_HANDLERS if not isinstance(f, str)}
    return sorted(fns | {"Tensor." + m for m in METHOD_HANDLERS})


def supported_hint(requested: str = "") -> str:
    """The hint of an "unsupported op" error: the NEAREST supported ops to `requested` by name (the
    part after the last dot weighs most: `Tensor.cos` is near `torch.cos`), not all of them."""
    import difflib
    names = supported_names()
    short = requested.rsplit(".", 1)[-1].lower()

    def score(n: str) -> float:
        tail = n.rsplit(".", 1)[-1].lower()
        return 2 * difflib.SequenceMatcher(None, short, tail).ratio() + \
            difflib.SequenceMatcher(None, requested.lower(), n.lower()).ratio()
    near = sorted(names, key=lambda n: (-score(n), n))[:NEAREST]
    return (f"the {len(near)} nearest of the {len(names)} supported ops: " + ", ".join(near)
            + "; or wrap a helper with torch.fx.wrap and register its lowering in FUNCTION_LOWERINGS "
              "(dsr_compiler.frontend.registry.supported_names() lists them all)")


