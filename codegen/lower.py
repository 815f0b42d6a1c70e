"""Lowering: one fused IR kernel (`ir.Kernel`) -> one frozen `KernelSpec`.

Sits after the fusion pass and before rendering. This is the entry point only: it checks what every
family needs (outputs, no duplicates) and calls the lowering of the kernel's family record
(codegen/families/). The shared pieces live in codegen/lower_common.py (argument names, bytes,
FLOPs, errors) and codegen/lower_body.py (the statement emitter); everything a family cannot express
is refused with a CodegenError that names the kernel and marks the offending statement.

Calling convention (see spec.py): tensor args are the body inputs in order, then the body
outputs in order; then int scalars (sizes the runtime evaluates from the dim symbols).
"""
from __future__ import annotations

from dsr_compiler.ir.errors import CodegenError
from dsr_compiler.ir.graph import Kernel

from .families import FAMILY_NAMES, find_family
from .lower_common import fail
from .spec import KernelSpec


def _check_outputs_unique(k: Kernel) -> None:
    if len(set(k.body.outputs)) != len(k.body.outputs):
        raise fail(k, f"returns a value twice: {list(k.body.outputs)}")


def lower_kernel(kernel: Kernel, index: int) -> KernelSpec:
    """Lower a fused IR kernel to a KernelSpec; `index` numbers it (k{index}_...) if unnamed."""
    fam = find_family(kernel.family)
    if fam is None:
        raise CodegenError(f"codegen: kernel @{kernel.name}: unknown family {kernel.family!r}",
                           hint=f"families: {', '.join(FAMILY_NAMES)}")
    if not kernel.body.outputs:
        raise fail(kernel, "returns nothing")
    _check_outputs_unique(kernel)
    for o in kernel.body.outputs:
        if o in {v.name for v in kernel.body.inputs} and kernel.family != "pointwise":
            raise fail(kernel, f"returns its input %{o} unchanged")
    return fam.lower(kernel, index)


__all__ = ["lower_kernel"]
