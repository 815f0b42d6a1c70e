"""`torch.compile(module, backend="dsr")`: the same pipeline behind TorchDynamo.

Dynamo hands over an FX GraphModule whose inputs are the user's tensors and, with
inline_inbuilt_nn_modules, the module's parameters. We compile it with static shapes (Dynamo
recompiles on new shapes and guards them itself) and return a callable with the graph's output
structure. Tensor constants Dynamo lifts out of forward (position ids from `torch.arange`, masks) become
buffers of the graph module, so they enter the IR as parameters. Anything the compiler cannot take raises a DsrError: no silent fallback to eager.
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch


def dsr_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **_: Any):
    from dsr_compiler.api import compile as dsr_compile
    from dsr_compiler.errors import DsrError
    from dsr_compiler.options import CompileOptions
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    if len(tensors) != len(example_inputs):
        raise DsrError("torch.compile(backend='dsr'): symbolic or non-tensor graph inputs are not supported",
                       hint="call torch.compile(..., dynamic=False)")
    options = CompileOptions.make()         # defaults and knobs, validated like dsr.compile's
    cm = dsr_compile(_with_signature(gm), tuple(tensors), name="dynamo", options=options)
    n_out = len(cm.graph.outputs)

    def run(*args: torch.Tensor):
        out = cm(*args)
        return (out,) if n_out == 1 else tuple(out)
    return run


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


def _with_signature(gm: torch.fx.GraphModule) -> torch.nn.Module:
    """Wrap `gm` in a module whose forward names its placeholders (the tracer binds by signature)."""
    import keyword
    import re
    _lift_constants(gm)
    names = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            nm = re.sub(r"[^A-Za-z0-9_]", "_", str(n.target)).strip("_") or "arg"
            if nm[0].isdigit() or keyword.iskeyword(nm) or nm in names:
                nm = f"arg{len(names)}_{nm}"
            names.append(nm)

    def forward(self: torch.nn.Module, *args: Any) -> Any:
        return self.gm(*args)
    # The tracer binds example inputs by `inspect.signature(module.forward)`; a signature object
    # names the placeholders without generating source.
    P = inspect.Parameter
    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [P("self", P.POSITIONAL_OR_KEYWORD)] + [P(n, P.POSITIONAL_OR_KEYWORD) for n in names])
    wrapper_cls = type("DynamoGraph", (torch.nn.Module,), {"forward": forward})
    w = wrapper_cls()
    w.gm = gm
    return w


def register() -> None:
    """Register the backend under the name "dsr" (idempotent)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend
    if "dsr" not in _BACKENDS:
        register_backend(name="dsr")(dsr_backend)
