"""Frontend: a PyTorch `nn.Module` becomes a typed IR graph (the first arrow of the pipeline).

    g = trace(module, (x,), dynamic={"x": {0: "T"}})     # -> ir.Graph, verified

Where it sits: the entry of `dsr_compiler.frontend` (re-exported by its `__init__`). This module
holds the FX tracer and `trace()`/`param_tensors()`; `context.TraceContext` lowers each FX node
through the tables of `registry`, which the modules of `lowerings/` fill when this module
imports that package; `origins` names source locations. docs/architecture.md has the map.

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
stacked expert weights `ffn.experts.w13`), which `param_tensors` computes from the owner's tensors.
Example inputs that are Python scalars/None are baked in (specialized).

Leaf modules and functions keep DeepSeek building blocks first-class: a module class with a
`dsr_op` class attribute is not traced through but lowered by `LEAF_LOWERINGS[dsr_op]`; a function
wrapped with `torch.fx.wrap` lowers by `FUNCTION_LOWERINGS[op]` when it carries `fn.dsr_op = op`
(`apply_rope` of the zoo has `dsr_op = "rope"`) or is listed in `WRAPPED_FUNCTIONS`.

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
import dataclasses
import inspect
import keyword
import math
import operator
import sys
import traceback
import types
from typing import Any, Callable, Iterator

import sympy
import torch
import torch.fx as fx
import torch.nn as nn

from dsr_compiler.interrupts import watch_interrupts
from dsr_compiler.ir.errors import DsrError, TraceError
from dsr_compiler.ir.graph import Graph, Node, Value
from dsr_compiler.ir.params import DerivedParam, evaluate
from dsr_compiler.ir.types import DType, TensorType, sym
from dsr_compiler.ir.verifier import verify

from . import lowerings  # noqa: F401  (fills the registry's tables: every supported op)
from .context import ConcreteValueNeeded, TensorRef, TraceContext, sanitize
from .origins import DYNAMO_MODULE, DYNAMO_NODE, ROOT_ATTR, USER_FRAME, dynamo_origin, is_user_file, short_path, user_frame
from .registry import DERIVED_PARAMS, PY_REPLACEMENTS, wrapped_function_objects

__all__ = ["derived_declaration", "derived_declarations", "dsr_op_functions", "evaluate_declaration", "named_tensors",
           "param_tensors", "trace"]


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

    def __getattr__(self, k: str) -> fx.proxy.Attribute:
        return _DsrAttribute(self, k)

    def __setitem__(self, key: Any, value: Any) -> None:
        # `x[..., a:b] = y`: recorded as operator.setitem, a functional write (lowerings/alloc.py)
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


class _DsrAttribute(fx.proxy.Attribute):
    """`x.shape` and other attribute proxies, with the same trace-time values as _DsrProxy (so that
    `x.view(*x.shape)`, whose argument unpacking asks for a length, traces)."""

    __index__ = _DsrProxy.__index__
    __int__ = _DsrProxy.__int__
    __float__ = _DsrProxy.__float__
    __len__ = _DsrProxy.__len__

    def __getattr__(self, k: str) -> fx.proxy.Attribute:
        return _DsrAttribute(self, k)


def dsr_op_functions(module: nn.Module) -> list[Callable]:
    """Functions with a `dsr_op` attribute in the globals of `module`'s (and its submodules') forward:
    FX auto-wraps them wherever those globals refer to them (e.g. `from dsr_compiler.models.layers
    import apply_rope` in user code), not only in the module that called `torch.fx.wrap`. FX looks
    for auto-wrapped functions in exactly these globals."""
    found: dict[int, Callable] = {}
    seen: set[int] = set()                  # each module file's globals once (256 experts share one)
    for m in module.modules():
        fwd = getattr(type(m), "forward", None)
        g = getattr(inspect.unwrap(fwd) if fwd is not None else None, "__globals__", None)
        if not isinstance(g, dict) or id(g) in seen:
            continue
        seen.add(id(g))
        for v in g.values():
            if isinstance(v, types.FunctionType) and isinstance(v.__dict__.get("dsr_op"), str):
                found.setdefault(id(v), v)
    return list(found.values())


def _autowrap_unwrapped(tracer: "_DsrTracer", m: nn.Module) -> None:
    """FX patches the functions it auto-wraps in the globals of `m.forward`; a decorated forward (transformers'
    `@capture_outputs`, `@merge_with_config_defaults`) has the decorator module's globals, so patch those of the
    undecorated function too. The same globals get the trace-time replacements of `PY_REPLACEMENTS` (e.g.
    transformers' `create_causal_mask`, lowerings/hf_masks.py). Uses FX's own patcher
    (`_symbolic_trace.CURRENT_PATCHER`, `_autowrap_check`), which reverts every patch after the trace; where a
    torch version lacks them this is skipped and such calls are traced through as before."""
    from torch.fx import _symbolic_trace as st
    patcher, check = getattr(st, "CURRENT_PATCHER", None), getattr(st, "_autowrap_check", None)
    fwd = getattr(type(m), "forward", None)
    if patcher is None or check is None or fwd is None:
        return
    inner = inspect.unwrap(fwd)
    for f in {id(fwd): fwd, id(inner): inner}.values():
        g = getattr(f, "__globals__", None)
        if not isinstance(g, dict):
            continue
        if f is inner and inner is not fwd:
            check(patcher, g, tracer._autowrap_function_ids)
        for (mod, name), factory in PY_REPLACEMENTS.items():
            original = getattr(sys.modules.get(mod), name, None)
            if original is not None and g.get(name) is original:
                patcher.patch(g, name, factory(tracer.cx, original))


class _DsrTracer(fx.Tracer):
    def __init__(self, cx: TraceContext) -> None:
        wrapped = tuple(wrapped_function_objects()) + tuple(dsr_op_functions(cx.root))
        super().__init__(autowrap_modules=(math,), autowrap_functions=wrapped)
        self.cx = cx
        self.record_stack_traces = False    # create_node records the one user frame messages need
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if getattr(type(m), "dsr_op", None) is not None or id(m) in self.cx.recognized:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        """A module that is not a submodule of the traced one (a function that a library turned into a
        module object, e.g. transformers' hub-kernel `apply_rotary_pos_emb`) is traced through: it has no
        path to name it by. Tensors it holds are then constants, refused like any other."""
        _autowrap_unwrapped(self, m)
        try:
            self.path_of_module(m)
        except NameError:
            if id(m) in self.cx.recognized or getattr(type(m), "dsr_op", None) is not None:
                raise
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def create_node(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                    type_expr: Any | None = None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        dyn = DYNAMO_NODE[0]
        frame, mod = dynamo_origin(dyn) if dyn is not None else (None, None)
        node.meta[USER_FRAME] = frame or user_frame()
        if mod is not None and mod[0]:
            node.meta[DYNAMO_MODULE] = mod
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
        if isinstance(a, (tuple, list, dict)):
            return super().create_arg(a)
        if dataclasses.is_dataclass(a) and not isinstance(a, type):
            # a configuration object handed to a wrapped function (transformers' create_causal_mask(config,
            # ...)): kept as the object itself; FX would rebuild a dataclass as a call of its class, which the
            # lowering would meet as an op. The FX graph is never turned back into code, so this is safe.
            return a
        return super().create_arg(a)


# ----------------------------------------------------------------------------- public API

def trace(module: nn.Module, example_inputs: tuple, dynamic: dict[str, dict[int, str]] | None = None,
          name: str | None = None, notes: list[str] | None = None, guards: list | None = None,
          structure: list | None = None) -> Graph:
    """Trace `module` on `example_inputs` into a verified IR graph.

    `dynamic={"x": {0: "T"}}` makes dim 0 of input `x` the symbol `T` (shared by every input dim
    marked `T`; their example sizes must agree). Inputs are the forward's tensor arguments followed
    by the used parameters and buffers (`graph.params`, see `param_tensors`). Raises TraceError.
    Trace notes (e.g. a `print()` in forward, which runs only now) are appended to `notes`.
    With `guards` (a list), a branch on a symbolic size (`if T > 1:`) is taken as the example sizes take it
    and recorded there (`context.SizeGuard`): the graph then holds only where every guard holds (dsr.compile
    specializes for the other sizes). Without it, such a branch is a TraceError.
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
    for n, t in tensor_inputs:
        for d, dim in enumerate(in_types[n].shape):
            if isinstance(dim, sympy.Symbol):
                cx.example_sizes[dim] = int(t.shape[d])
    cx.size_guards = guards
    cx.recognize(module)
    tracer = _DsrTracer(cx)
    found: list[str] = list(cx.pattern_notes)
    try:
        # a Ctrl-C swallowed inside torch is KeyboardInterrupt, not a TraceError
        with watch_interrupts(), _trace_time_prints(found):
            tracer.trace(root)
    except TraceError as e:
        raise _with_pattern_notes(e, cx) from None
    except DsrError:
        raise
    except ConcreteValueNeeded as e:
        raise _with_pattern_notes(TraceError(e.what, e.where, e.hint), cx) from None
    except Exception as e:
        where = cx.where_now(tracer.module_stack, traceback.extract_tb(e.__traceback__))
        what = f"trace: forward() raised {type(e).__name__} under symbolic tracing: {e}"
        hint = ("torch.fx runs forward() on proxies: code that needs concrete tensor values cannot be traced; "
                "see the module docstring of dsr_compiler.frontend.tracer for what is supported")
        if cx.last_concrete_error is not None:     # torch's arg parser probed a proxy and hid why
            c = cx.last_concrete_error
            what += f" (earlier: {c.what.removeprefix('trace: ')}, at {c.where})"
            hint = c.hint
        if isinstance(e, TypeError) and "item assignment" in str(e):
            what = "trace: in-place op operator.setitem (x[...] = y) is not supported"
            hint = "build the tensor with torch.cat / torch.where instead of assigning into it"
        raise _with_pattern_notes(TraceError(what, where, hint), cx) from e
    if cx.outputs is None:
        raise TraceError("trace: forward produced no output", f"top-level module ({cls})")
    g = verify(_build_graph(cx, sanitize(name or cls)))
    if structure is not None:
        structure.append(cx.out_structure)          # how to rebuild forward's result (context.OutputStructure)
    _report_notes(found, notes)
    return g


def _with_pattern_notes(e: TraceError, cx: TraceContext) -> TraceError:
    """`e` with the modules that had a pattern's structure but missed it (why the MoE rewrite did not fire)
    added to its hint: they are usually why the trace reached an op it cannot take."""
    if not cx.pattern_notes:
        return e
    notes = "; ".join(cx.pattern_notes)
    return TraceError(e.what, e.where, f"{e.hint}; {notes}" if e.hint else notes)


@contextlib.contextmanager
def _trace_time_prints(found: list[str]) -> Iterator[None]:
    """Record every `print()` that forward runs while FX traces it: the compiled module never runs
    Python, so the print happens once now and never again. builtins.print is patched for the
    duration of the trace only (process-wide: another thread printing meanwhile is recorded too,
    a harmless note) and restored in `finally`."""
    real = builtins.print

    def print_at_trace_time(*args: Any, **kwargs: Any) -> None:
        f = sys._getframe(1)
        if is_user_file(f.f_code.co_filename):
            note = (f"print() at {short_path(f.f_code.co_filename)}:{f.f_lineno} ran at trace time only; "
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


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `module` by IR name (shared tensors under each of their names)."""
    out = {sanitize(n): b for n, b in module.named_buffers(remove_duplicate=False)}
    out.update((sanitize(n), p) for n, p in module.named_parameters(remove_duplicate=False))
    return out


def param_tensors(module: nn.Module, graph: Graph, meta: bool = False) -> list[torch.Tensor]:
    """The module's tensors for `graph.params`, in graph order (what the runtime binds); a derived
    param of the frontend (`DERIVED_PARAMS`) is evaluated from its declaration (`derived_declaration`,
    rule of ir/params.py) here. `meta=True` gives derived params as meta tensors of the right dtype and
    shape (nothing is computed: for binding symbolic sizes). The compile path evaluates every derived
    param once, in `dsr_compiler/params.py`."""
    by_name = named_tensors(module)
    found: dict[str, torch.Tensor | None] = {}
    for p in graph.params:
        if p in by_name:
            found[p] = by_name[p]
            continue
        d = derived_declaration(module, p)
        if d is None:
            found[p] = None
        elif meta:
            dtype, shape = _derived_type(module, p)
            found[p] = torch.empty(shape, dtype=dtype, device="meta")
        else:
            found[p] = evaluate_declaration(module, d, by_name)
    missing = [p for p, t in found.items() if t is None]
    if missing:
        raise TraceError(f"trace: graph {graph.name} needs parameters the module does not have: {missing}",
                         hint="trace and run with the same module")
    return [found[p] for p in graph.params]   # type: ignore[misc]


def _derived_owner(module: nn.Module, name: str) -> tuple[str, Any, nn.Module] | None:
    """(owner path, ParamDerivation, owner) of `<owner path>.<key>`, or None if `name` is not one."""
    for key, how in DERIVED_PARAMS.items():
        if name != key and not name.endswith("." + key):
            continue
        path = name[: len(name) - len(key)].rstrip(".")
        try:
            return path, how, (module.get_submodule(path) if path else module)
        except AttributeError:
            continue
    return None


def _derived_type(module: nn.Module, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
    path, how, owner = _derived_owner(module, name)   # type: ignore[misc]
    try:
        return how.type_of(owner)
    except (TypeError, ValueError) as e:
        raise TraceError(f"trace: derived parameter `{name}` ({how.doc}): {e}",
                         hint="trace and run with the same module") from None


def derived_declaration(module: nn.Module, name: str) -> DerivedParam | None:
    """The `ir.params.DerivedParam` of graph param `name` if it is a frontend derived param, else None."""
    found = _derived_owner(module, name)
    if found is None:
        return None
    path, how, owner = found
    try:
        return how.declare(name, path, owner)
    except (TypeError, ValueError) as e:
        raise TraceError(f"trace: derived parameter `{name}` ({how.doc}): {e}",
                         hint="trace and run with the same module") from None


def derived_declarations(module: nn.Module, graph: Graph) -> list[DerivedParam]:
    """The frontend's derived-param declarations among `graph.params`, in graph order."""
    return [d for d in (derived_declaration(module, p) for p in graph.params) if d is not None]


def evaluate_declaration(module: nn.Module, d: DerivedParam,
                         by_name: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Evaluate a one-output declaration whose sources are all module tensors."""
    by_name = named_tensors(module) if by_name is None else by_name
    try:
        srcs = [by_name[s] if isinstance(s, str) else [by_name[n] for n in s] for s in d.expanded_sources()]
        return evaluate(d, srcs)[0]
    except KeyError as e:
        raise TraceError(f"trace: derived parameter `{d.outputs[0]}` ({d.origin}): the module has no tensor {e}",
                         hint="trace and run with the same module") from None
    except (TypeError, ValueError, RuntimeError) as e:
        raise TraceError(f"trace: cannot compute derived parameter `{d.outputs[0]}` ({d.origin}): {e}",
                         hint="trace and run with the same module") from None


# ----------------------------------------------------------------------------- trace() helpers

def _bind_example_inputs(module: nn.Module, ex: tuple
                         ) -> tuple[list[str], list[Any], list[Any], list[tuple[str, torch.Tensor]]]:
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
    call_exprs: list[Any] = []
    consts: list[Any] = []
    tensors: list[tuple[str, torch.Tensor]] = []
    taken = {p.name for p in params}

    def bind(name: str, x: Any, what: str) -> str:
        """The call expression of one value: a tensor input named `name`, or the next baked-in constant."""
        if isinstance(x, torch.Tensor):
            tensors.append((name, x))
            return name
        if x is None or isinstance(x, (bool, int, float, str)):
            consts.append(x)
            return f"self._dsr_consts[{len(consts) - 1}]"
        raise TraceError(f"trace: example input {what} is a {type(x).__name__}", where,
                         "example inputs are tensors, or Python scalars/None (which are baked in), or "
                         "tuples/lists/dicts of those")
    from torch.utils import _pytree as pytree
    from dsr_compiler.signature import tree_leaves
    for p, v in zip(positional, ex):
        tree = tree_leaves(p.name, v)
        if tree is None:
            call_exprs.append(bind(p.name, v, f"`{p.name}`"))
            continue
        spec, leaves = tree                  # a tuple/list/dict of tensors: one graph input per tensor leaf
        for kind, leaf in leaves:
            if kind == "tensor" and leaf in taken:
                raise TraceError(f"trace: leaf input `{leaf}` of `{p.name}` has the name of a forward parameter",
                                 where, "rename the parameter")
            taken.add(leaf)
        sub = [bind(leaf if kind == "tensor" else "", x, f"`{p.name}` leaf {i}")
               for i, ((kind, leaf), x) in enumerate(zip(leaves, pytree.tree_leaves(v)))]
        call_exprs.append(("tree", spec, sub))
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


def _make_root(module: nn.Module, tensor_names: list[str], call_exprs: list[Any], consts: list[Any]) -> nn.Module:
    """A wrapper whose forward takes exactly the tensor inputs and calls the user's module.

    Tracing through it makes the user's module a submodule, so a root that is itself a leaf
    (e.g. an RMSNorm with `dsr_op`, or nn.Linear) lowers to its op, and scalar example inputs and
    omitted defaults are bound by plain Python instead of FX's `concrete_args` (which adds guards).
    No source is generated: `call_exprs` lists, per positional parameter, a tensor input's name, the
    next baked-in constant, or ("tree", pytree spec, [those, per leaf]) for a tuple/list/dict argument,
    and the wrapper's parameter names come from `_named_signature`."""
    n_const = 0

    def entry(e: Any) -> Any:
        """(True, tensor index) | (False, const index) | ("tree", spec, [entries]) for one call expression."""
        nonlocal n_const
        if isinstance(e, tuple) and e and e[0] == "tree":
            return ("tree", e[1], [entry(x) for x in e[2]])
        if e in tensor_names:
            return (True, tensor_names.index(e))
        n_const += 1
        return (False, n_const - 1)
    plan = [entry(e) for e in call_exprs]

    def value(self: nn.Module, tensors: tuple, p: Any) -> Any:
        if p[0] == "tree":
            from torch.utils import _pytree as pytree
            return pytree.tree_unflatten([value(self, tensors, x) for x in p[2]], p[1])
        return tensors[p[1]] if p[0] is True else self._dsr_consts[p[1]]

    def forward(self: nn.Module, *tensors: Any) -> Any:
        from torch.utils import _pytree as pytree
        args = [value(self, tensors, p) for p in plan]
        # forward's result as a pytree (tuples, dicts, ModelOutput): FX keeps only plain containers, so the
        # structure is taken here, from the Python objects, and the graph returns the flat leaves
        leaves, self._dsr_out_spec = pytree.tree_flatten(getattr(self, ROOT_ATTR)(*args))
        return tuple(leaves)
    forward.__wrapped__ = _named_signature(tensor_names)   # type: ignore[attr-defined]
    cls = type("DsrTraceRoot", (nn.Module,), {"forward": forward})
    root = cls()
    root.add_module(ROOT_ATTR, module)
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


