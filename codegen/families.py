"""Registration of kernel families beyond the four core ones.

A family is one Jinja template plus one lowering (ir.Kernel -> KernelSpec). DeepSeek-specific
families (MoE router/dispatch/grouped GEMMs, MLA decode, FP8 GEMMs, vocabulary-chunked losses)
live in their own modules and call `register_family` when imported; EXTENSIONS lists them so
that importing `dsr_compiler.codegen` makes every family available.
"""
from __future__ import annotations

import importlib
from typing import Callable

from dsr_compiler.ir.graph import Kernel
from dsr_compiler.ir.verifier import KERNEL_FAMILIES

from .lower import LOWERINGS
from .render import register_template
from .spec import FAMILIES, KernelSpec

# Modules (inside dsr_compiler.codegen) that register families when imported.
EXTENSIONS: list[str] = ["moe", "fp8_gemm", "fp8_rows", "fp8_moe", "vocab_loss", "mla"]


def register_family(family: str, template: str, lowering: Callable[[Kernel, int], KernelSpec]) -> None:
    """Add a kernel family: its template file under codegen/templates and its lowering."""
    if family in LOWERINGS:
        raise ValueError(f"kernel family {family!r} registered twice")
    if family not in KERNEL_FAMILIES:   # the verifier's list (ir cannot import codegen)
        raise ValueError(f"kernel family {family!r} is not in dsr_compiler.ir.verifier.KERNEL_FAMILIES")
    register_template(template, family)
    FAMILIES.append(family)
    LOWERINGS[family] = lowering


def load_extensions() -> None:
    for mod in EXTENSIONS:
        importlib.import_module(f"dsr_compiler.codegen.{mod}")
