"""`torch.compile(module, backend="dsr")`: the same pipeline behind TorchDynamo.

Dynamo hands over an FX GraphModule whose inputs are the user's tensors and, with
inline_inbuilt_nn_modules, the module's parameters. We compile it with static shapes (Dynamo
recompiles on new shapes and guards them itself) and return a callable with the graph's output
structure. Anything the compiler cannot take raises a DsrError: no silent fallback to eager.
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


def _with_signature(gm: torch.fx.GraphModule) -> torch.nn.Module:
    """Wrap `gm` in a module whose forward names its placeholders (the tracer binds by signature)."""
    import keyword
    import re
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
