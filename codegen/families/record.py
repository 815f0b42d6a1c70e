"""KernelFamily: the one record that says what codegen knows about a kernel family.

Sits at the bottom of codegen/families/: every family module ends with its record(s), and
codegen/families/__init__.py lists all records in one tuple. Everything that depends on the family
reads the record: lowering dispatch (codegen/lower.py), template checks (codegen/render.py), the
direct PTX backend (codegen/ptx.py) and the roofline ceiling of the report (dsr_compiler/api.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dsr_compiler.ir.errors import CodegenError
from dsr_compiler.ir.graph import Kernel
from dsr_compiler.ir.types import DType

from ..ptx_emit import PtxCode
from ..spec import KernelSpec

# codegen/templates: the Jinja templates of every family (Triton `*.py.j2`, PTX `*.ptx.j2`, macros).
TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"

# The H200 FLOP ceilings a family's roofline can use (report.json `roofline_peak` = "flops_" + peak).
PEAKS = ("fp8", "bf16", "f32")

Lowering = Callable[[Kernel, int], KernelSpec]


@dataclass(frozen=True)
class PtxProgram:
    """The direct-PTX form of a family: its template (templates/<name>.ptx.j2) and the program that
    emits a spec's statement blocks for it (codegen/ptx_emit.py; raises PtxUnsupported for a spec
    the template cannot express, so the Triton twin is used)."""

    template: str
    program: Callable[[KernelSpec], PtxCode]


@dataclass(frozen=True)
class KernelFamily:
    """One kernel family.

    name      the family (a name of ir.verifier.KERNEL_FAMILIES; kernels carry it as `family`)
    lower     ir.Kernel, index -> KernelSpec (the spec names `template` and this family)
    template  the Triton template file under codegen/templates
    ptx       the direct-PTX form, or None (Triton only)
    peak      the FLOP ceiling of its roofline: "fp8" (FP8 tensor cores), "bf16" (16-bit tensor
              cores; a kernel with an f32 float input falls to "f32": its dots run in "ieee"
              precision on CUDA cores) or "f32"
    """

    name: str
    lower: Lowering
    template: str
    ptx: PtxProgram | None = None
    peak: str = "bf16"

    def __post_init__(self) -> None:
        where = f"kernel family {self.name!r}"
        if self.peak not in PEAKS:
            raise CodegenError(f"codegen: {where}: peak {self.peak!r} is not one of {', '.join(PEAKS)}",
                               where=where, hint="fp8 for FP8 GEMMs, else bf16 (f32 inputs are detected per kernel)")
        if not self.template.endswith(".py.j2"):
            raise CodegenError(f"codegen: {where}: template {self.template!r} is not a Triton template (*.py.j2)",
                               where=where)
        if self.ptx is not None and not self.ptx.template.endswith(".ptx.j2"):
            raise CodegenError(f"codegen: {where}: PTX template {self.ptx.template!r} is not a *.ptx.j2 file",
                               where=where)

    def peak_of(self, spec: KernelSpec) -> str:
        """The FLOP ceiling ("fp8" | "bf16" | "f32") that bounds `spec` in the roofline."""
        if self.peak == "bf16" and any(a.kind == "tensor" and a.role == "in" and a.dtype is DType.f32
                                       for a in spec.args):
            return "f32"
        return self.peak


__all__ = ["KernelFamily", "Lowering", "PEAKS", "PtxProgram", "TEMPLATE_DIR"]
