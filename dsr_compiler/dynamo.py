"""`torch.compile(module, backend="dsr")`: the same pipeline behind TorchDynamo.

Dynamo hands over an FX GraphModule whose inputs are the user's tensors and, with
inline_inbuilt_nn_modules, the module's parameters. Dims that Dynamo made dynamic (its automatic dynamic
shapes after a second size, `torch._dynamo.mark_dynamic`, `dynamic=True`) stay symbolic: they become our
`dynamic` spec under Dynamo's symbol names (`s0`), and SymInt graph inputs are read from the tensor dims
they name; other dims are static (Dynamo guards them and recompiles). We return a callable with the
graph's output structure. Modules that a recognizer lowers as a whole (transformers' MoE routers and
stacked experts) are cut back out of the inlined graph first (dynamo_recognize.py). Tensor constants Dynamo lifts out of forward (position ids from `torch.arange`, masks) become
buffers of the graph module, so they enter the IR as parameters. Anything the compiler cannot take raises a DsrError: no silent fallback to eager.
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch


def dsr_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **_: Any):
    from dsr_compiler.api import compile as dsr_compile
    from dsr_compiler.options import CompileOptions
    from dsr_compiler.dynamo_recognize import recognize_in_graph
    from dsr_compiler.errors import DsrError
    dynamic, sizes = _dynamic_dims(gm, example_inputs)
    options = CompileOptions.make()         # defaults and knobs, validated like dsr.compile's
    notes = recognize_in_graph(gm, example_inputs)   # MoE routers / experts that Dynamo inlined: one call again
    module = _with_signature(gm, sizes)
    tensors = tuple(x for x in example_inputs if isinstance(x, torch.Tensor))
    try:
        cm = dsr_compile(module, tensors, name="dynamo", options=options, dynamic=dynamic or None)
    except DsrError as e:
        if not notes:
            raise
        more = "; ".join(notes)
        raise type(e)(e.what, e.where, f"{e.hint}; {more}" if e.hint else more) from None
    n_out = len(cm.graph.outputs)

    def run(*args: Any):
        out = cm(*(a for a in args if isinstance(a, torch.Tensor)))
        return (out,) if n_out == 1 else tuple(out)
    return run


def _placeholders(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _dynamic_dims(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[dict, dict]:
    """Dims that Dynamo made symbolic (automatic dynamic after a second size, `mark_dynamic`, `dynamic=True`)
    as our `dynamic` spec, by Dynamo's symbol names: {placeholder: {dim: "s0"}}; and, for each SymInt graph
    input, the (tensor placeholder, dim) it is read from at run time. A dim that is an expression of symbols
    (`2*s0`) or a SymInt that is no tensor's dim is refused."""
    from dsr_compiler.errors import DsrError
    phs = _placeholders(gm)
    if len(phs) != len(example_inputs):
        raise DsrError(f"torch.compile(backend='dsr'): {len(example_inputs)} example inputs for {len(phs)} graph inputs")
    dynamic: dict[str, dict[int, str]] = {}
    source: dict[str, tuple[int, int]] = {}
    names = _input_names(gm)
    for i, (n, x) in enumerate(zip(phs, example_inputs)):
        if not isinstance(x, torch.Tensor):
            continue
        fake = n.meta.get("example_value")
        for d, size in enumerate(getattr(fake, "shape", ())):
            if not isinstance(size, torch.SymInt):
                continue
            expr = size.node.expr
            if not getattr(expr, "is_Symbol", False):
                raise DsrError(f"torch.compile(backend='dsr'): dim {d} of input `{n.target}` is the expression "
                               f"`{expr}` of dynamic sizes; only plain dynamic dims are supported",
                               hint="call torch.compile(..., dynamic=False), or mark only plain dims dynamic")
            dynamic.setdefault(names[i], {})[d] = str(expr)
            source.setdefault(str(expr), (i, d))
    sizes: dict[int, tuple[int, int]] = {}
    for i, (n, x) in enumerate(zip(phs, example_inputs)):
        if isinstance(x, torch.Tensor):
            continue
        expr = getattr(getattr(x, "node", None), "expr", None) if isinstance(x, torch.SymInt) else None
        if expr is None or str(expr) not in source:
            raise DsrError(f"torch.compile(backend='dsr'): graph input `{n.target}` is a {type(x).__name__} that is "
                           "not the size of a tensor input", hint="call torch.compile(..., dynamic=False)")
        sizes[i] = source[str(expr)]
    return dynamic, sizes


MAX_CONSTANT_ELEMENTS = 1 << 24       # a tensor computed from constants alone, evaluated once at compile time


def _reads_values(node: torch.fx.Node) -> bool:
    """True when a call's arguments hold another node or a tensor (it is not built from constants alone)."""
    flat: list = []
    torch.fx.node.map_aggregate((node.args, node.kwargs), flat.append)
    return any(isinstance(a, (torch.fx.Node, torch.Tensor)) for a in flat)


def _lift_constants(gm: torch.fx.GraphModule) -> None:
    """Tensors that forward builds from Python numbers alone (Dynamo keeps `torch.arange(n)` position ids
    with a static n as a call, or folds them into plain tensor attributes): evaluate each once and make it
    a buffer of `gm`, so the trace takes it as a parameter of the graph. Random ones are refused."""
    from dsr_compiler.errors import DsrError
    owned = {id(t) for t in gm.parameters()} | {id(t) for t in gm.buffers()}
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.users == {}:
            continue
        if _reads_values(node):
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name.startswith(("rand", "normal", "bernoulli", "multinomial")):
            raise DsrError(f"torch.compile(backend='dsr'): torch.{name} in forward is random: the compiled graph "
                           "would freeze one draw", hint="draw the tensor outside and pass it in")
        if not name.startswith(("arange", "zeros", "ones", "full", "empty", "tensor", "linspace", "eye", "tril",
                                "triu")):
            continue
        try:            # its size first, on the meta device: nothing is allocated before the bound is checked
            probe = node.target(*node.args, **{**node.kwargs, "device": "meta"})
        except (TypeError, RuntimeError, ValueError):
            continue    # not a constructor that takes a device: left to the trace, which names it
        if not isinstance(probe, torch.Tensor):
            continue
        if probe.numel() > MAX_CONSTANT_ELEMENTS:
            raise DsrError(f"torch.compile(backend='dsr'): a {tuple(probe.shape)} tensor built in forward from "
                           f"constants is over {MAX_CONSTANT_ELEMENTS:,} elements",
                           hint="register it as a buffer of the module")
        val = node.target(*node.args, **node.kwargs)
        attr = f"_dsr_constant{count}"
        count += 1
        gm.register_buffer(attr, val.detach())
        owned.add(id(gm.get_buffer(attr)))
        with gm.graph.inserting_before(node):
            new = gm.graph.get_attr(attr)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    if count:
        gm.recompile()
    for node in gm.graph.nodes:
        if node.op != "get_attr" or "." in str(node.target):
            continue
        name = str(node.target)
        val = getattr(gm, name, None)
        if isinstance(val, torch.Tensor) and id(val) not in owned:
            delattr(gm, name)
            gm.register_buffer(name, val.detach())
            owned.add(id(val))


def _input_names(gm: torch.fx.GraphModule) -> list[str]:
    """Python names for the graph's placeholders (the tracer binds example inputs by signature)."""
    import keyword
    import re
    names: list[str] = []
    for n in _placeholders(gm):
        nm = re.sub(r"[^A-Za-z0-9_]", "_", str(n.target)).strip("_") or "arg"
        if nm[0].isdigit() or keyword.iskeyword(nm) or nm in names:
            nm = f"arg{len(names)}_{nm}"
        names.append(nm)
    return names


def _with_signature(gm: torch.fx.GraphModule, sizes: dict[int, tuple[int, int]] | None = None) -> torch.nn.Module:
    """Wrap `gm` in a module whose forward takes its tensor inputs by name; each SymInt input (`sizes`: graph
    input index -> (tensor input index, dim)) is read from its tensor, so the trace sees the symbolic size."""
    sizes = sizes or {}
    _lift_constants(gm)
    for node in gm.graph.nodes:      # `torch.Size([1, s0, 192])`: a plain tuple takes a symbolic size as well
        if node.op == "call_function" and node.target is torch.Size:
            node.target = tuple
    gm.recompile()
    names = _input_names(gm)
    n_in = len(names)
    tensor_pos = [i for i in range(n_in) if i not in sizes]

    def forward(self: torch.nn.Module, *args: Any) -> Any:
        full: list[Any] = [None] * n_in
        for i, a in zip(tensor_pos, args):
            full[i] = a
        for i, (src, d) in sizes.items():
            full[i] = full[src].size(d)
        return _Runner(self.gm).run(*full)
    # The tracer binds example inputs by `inspect.signature(module.forward)`; a signature object
    # names the placeholders without generating source.
    P = inspect.Parameter
    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [P("self", P.POSITIONAL_OR_KEYWORD)] + [P(names[i], P.POSITIONAL_OR_KEYWORD) for i in tensor_pos])
    wrapper_cls = type("DynamoGraph", (torch.nn.Module,), {"forward": forward})
    w = wrapper_cls()
    w.gm = gm
    return w


class _Runner(torch.fx.Interpreter):
    """Runs the Dynamo graph node by node (under our trace, on proxies), publishing the node being run so that
    trace errors and IR origins name the user's source line and module path behind it (frontend/origins.py
    DYNAMO_NODE), not the generated graph code and `gm`."""

    def run_node(self, n: torch.fx.Node) -> Any:
        from dsr_compiler.frontend.origins import DYNAMO_NODE
        prev, DYNAMO_NODE[0] = DYNAMO_NODE[0], n
        try:
            return super().run_node(n)
        finally:
            DYNAMO_NODE[0] = prev


def register() -> None:
    """Register the backend under the name "dsr" (idempotent)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend
    if "dsr" not in _BACKENDS:
        register_backend(name="dsr")(dsr_backend)
