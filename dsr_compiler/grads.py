"""Gradients at the front door: `dsr.compile(..., grad_wrt=names)` and the eager reference for checks.

    cm = dsr.compile(loss_fn, example_inputs, grad_wrt=("hidden", "lm_head_weight"))
    loss, grads = cm(*inputs)          # grads["hidden"], grads["lm_head_weight"]

Names are the forward's parameter names (tensor inputs), or qualified names of the module's own
parameters (`lm_head.weight`). The `differentiate` pass (ir/passes/autodiff.py) appends the
gradients to the graph; this module validates the names and computes the eager reference
(`torch.autograd` on the same module) for `dsrc run --check` and the tests.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from dsr_compiler.errors import DsrError
from dsr_compiler.ir import Graph


def check_grad_wrt(module: nn.Module, g: Graph, names: Sequence[str] | str | None) -> tuple[str, ...]:
    """The validated grad_wrt names (DsrError for a name that is not a float tensor input)."""
    if names is None:
        return ()
    if isinstance(names, str):
        names = (names,)
    names = tuple(names)
    cls = type(module).__name__
    try:
        fwd = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        fwd = []
    inputs = {v.name: v for v in g.inputs}
    own = {n for n, _ in module.named_parameters()}
    out: list[str] = []
    for n in names:
        if not isinstance(n, str):
            raise DsrError(f"grad_wrt: names must be strings, got {n!r}", where=f"dsr.compile({cls})",
                           hint=f"forward parameters: {', '.join(fwd)}")
        if n in out:
            raise DsrError(f"grad_wrt: {n!r} is named twice", where=f"dsr.compile({cls})")
        v = inputs.get(n)
        if v is None:
            if n in fwd:
                raise DsrError(f"grad_wrt: forward parameter {n!r} is not a tensor input (its example input is not a "
                               "tensor, or the loss does not use it)", where=f"dsr.compile({cls})",
                               hint="pass a tensor example input for it, or drop it from grad_wrt")
            if n in own:
                raise DsrError(f"grad_wrt: parameter {n!r} of {cls} is not used by forward()", where=f"dsr.compile({cls})")
            raise DsrError(f"grad_wrt: {n!r} is not a parameter of {cls}.forward", where=f"dsr.compile({cls})",
                           hint=f"forward parameters: {', '.join(fwd) or 'none'}"
                                + (f"; module parameters: {', '.join(sorted(own))}" if own else ""))
        if not v.type.dtype.is_float:
            raise DsrError(f"grad_wrt: {n!r} is {v.type}, not a float tensor", where=f"dsr.compile({cls})",
                           hint="gradients exist for float inputs only")
        out.append(n)
    return tuple(out)


def split_outputs(outs: Sequence[torch.Tensor], names: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, {name: grad}) from the compiled graph's outputs [loss, grad_0, ...]."""
    return outs[0], {n: outs[1 + i] for i, n in enumerate(names)}


def eager_loss_and_grads(module: nn.Module, inputs: Sequence, names: Sequence[str]
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The eager reference: forward on fresh leaves, then torch.autograd.grad for `names`."""
    fwd = list(inspect.signature(module.forward).parameters)
    args = []
    leaves: dict[str, torch.Tensor] = {}
    for i, x in enumerate(inputs):
        pname = fwd[i] if i < len(fwd) else ""
        if isinstance(x, torch.Tensor) and pname in names:
            x = x.detach().clone().requires_grad_(True)
            leaves[pname] = x
        args.append(x)
    params = dict(module.named_parameters())
    for n in names:
        if n not in leaves:
            leaves[n] = params[n]
    loss = module(*args)
    want = [leaves[n] for n in names]
    gs = torch.autograd.grad(loss, want, allow_unused=True)
    return loss.detach(), {n: (torch.zeros_like(w) if gr is None else gr) for n, w, gr in zip(names, want, gs)}


def run_check(cm, wl, inputs: Sequence, out, backend: str, check: bool) -> int:
    """`dsrc run` for a workload with grad_wrt: print the loss and gradients; with `check`, compare
    both with eager autograd through the one tolerance table (CheckFailed beyond it)."""
    from dsr_compiler.errors import CheckFailed
    from dsr_compiler.tolerance import compare
    loss, grads = out
    shapes = ", ".join(f"d{n} {tuple(g.shape)}" for n, g in grads.items())
    print(f"ran {len(cm.kernels)} kernels on backend {backend}; loss {float(loss):.6g}; gradients {shapes}")
    if not check:
        return 0
    ref_loss, ref_grads = eager_loss_and_grads(wl.module, inputs, tuple(grads))
    ok = True
    for what, a, e in [("loss", loss, ref_loss)] + [(f"d{n}", grads[n], ref_grads[n]) for n in grads]:
        r = compare(a.cpu(), e)
        ok = ok and r["ok"]
        print(f"check {what} vs eager autograd: max abs err {r['max_abs']:.3e}, max rel err {r['max_rel']:.3e}; "
              f"tolerance atol {r['atol']:.1e} rtol {r['rtol']:.1e} ({str(e.dtype).replace('torch.', '')})"
              + ("" if r["ok"] else "  FAILED"))
    if not ok:
        raise CheckFailed("check failed: compiled loss or gradients differ from eager autograd beyond tolerance",
                          where=f"--module {wl.name}", hint="DSR_DEBUG=4 shows the generated kernels")
    print("check passed")
    return 0
