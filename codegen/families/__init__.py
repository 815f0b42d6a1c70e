"""Every kernel family codegen can lower, as one explicit tuple of `KernelFamily` records.

A family is one record (record.py): its lowering (ir.Kernel -> KernelSpec), its Triton template,
optionally its direct-PTX program and template, and the FLOP ceiling of its roofline. Each module
here holds the lowering(s) of one family, or of a group that shares helpers (moe: router,
dispatch, grouped GEMM, combine; mla: RoPE tables, KV-cache write, attention, decode, combine;
vocab_loss: the three vocabulary-chunked loss kernels and gather), and ends with its record(s).
Nothing registers itself by being imported: `FAMILIES` below is the list, checked once by
`validate` when this package is imported (unique names and templates, template files present,
and the same families as the IR verifier's `KERNEL_FAMILIES`).

Adding a family: its lowering module here, its template in codegen/templates, one line in
`FAMILIES` (and its name in ir/verifier.py KERNEL_FAMILIES); see docs/architecture.md.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Sequence

from dsr_compiler.ir.errors import CodegenError
from dsr_compiler.ir.verifier import KERNEL_FAMILIES

from . import attention, ep, gemm, gemm_fp8, index, mla, moe, moe_gemm_fp8, pointwise, quant_fp8, reduction, scan, vocab_loss
from .record import PEAKS, TEMPLATE_DIR, KernelFamily, Lowering, PtxProgram

FAMILIES: tuple[KernelFamily, ...] = (
    pointwise.POINTWISE_FAMILY,          # the fusion pass's core four
    reduction.REDUCTION_FAMILY,
    gemm.GEMM_FAMILY,
    attention.ATTENTION_FAMILY,
    moe.MOE_ROUTER_FAMILY,               # MoE (DESIGN.md section 4)
    moe.MOE_DISPATCH_FAMILY,
    moe.MOE_GEMM_FAMILY,
    moe.MOE_COMBINE_FAMILY,
    gemm_fp8.GEMM_FP8_FAMILY,            # FP8 recipe (DESIGN.md section 5)
    quant_fp8.QUANT_FP8_FAMILY,
    moe_gemm_fp8.MOE_GEMM_FP8_FAMILY,
    vocab_loss.VOCAB_LOGPROBS_FAMILY,    # vocabulary-chunked losses (GRPO, MTP)
    vocab_loss.VOCAB_GRAD_HIDDEN_FAMILY,
    vocab_loss.VOCAB_GRAD_WEIGHT_FAMILY,
    vocab_loss.GATHER_FAMILY,
    ep.EP_ROUTE_FAMILY,                  # expert parallelism (README "Expert parallelism")
    ep.GATHER_ROWS_FAMILY,
    mla.ROPE_TABLE_FAMILY,               # MLA (DESIGN.md section 4)
    mla.INDEX_COPY_FAMILY,
    mla.MLA_ATTENTION_FAMILY,
    mla.MLA_DECODE_FAMILY,
    mla.MLA_COMBINE_FAMILY,
    scan.CUMSUM_FAMILY,                  # scans (transformers' mask code)
    index.INDEX_FAMILY,                  # advanced indexing x[i0, ..., ik-1]
)


def validate(families: Sequence[KernelFamily]) -> None:
    """Refuse a families tuple with a duplicate name or template, a missing template file, or a name
    set different from the IR verifier's KERNEL_FAMILIES (ir cannot import codegen, so the two lists
    are compared here)."""
    where = "codegen/families/__init__.py FAMILIES"
    names: set[str] = set()
    templates: dict[str, str] = {}
    for f in families:
        if not isinstance(f, KernelFamily):
            raise CodegenError(f"codegen: {f!r} in the families tuple is not a KernelFamily", where=where)
        if f.name in names:
            raise CodegenError(f"codegen: kernel family {f.name!r} is listed twice", where=where)
        names.add(f.name)
        if f.name not in KERNEL_FAMILIES:
            raise CodegenError(f"codegen: kernel family {f.name!r} is not in dsr_compiler.ir.verifier.KERNEL_FAMILIES",
                               where=where, hint="add the name to KERNEL_FAMILIES (ir/verifier.py)")
        for t in (f.template,) + ((f.ptx.template,) if f.ptx is not None else ()):
            if t in templates:
                raise CodegenError(f"codegen: template {t} belongs to two families: {templates[t]} and {f.name}",
                                   where=where, hint="one template per family")
            templates[t] = f.name
            if not (TEMPLATE_DIR / t).is_file():
                raise CodegenError(f"codegen: kernel family {f.name!r}: template {t} does not exist in {TEMPLATE_DIR}",
                                   where=where)
    missing = [n for n in KERNEL_FAMILIES if n not in names]
    if missing:
        raise CodegenError(f"codegen: kernel families {missing} of ir.verifier.KERNEL_FAMILIES have no record",
                           where=where, hint="list each family's record in FAMILIES")


validate(FAMILIES)

FAMILY_NAMES: tuple[str, ...] = tuple(f.name for f in FAMILIES)
_BY_NAME: Mapping[str, KernelFamily] = MappingProxyType({f.name: f for f in FAMILIES})
# Triton template file -> family name (derived; render.py checks a spec's template against it).
TEMPLATE_FAMILY: Mapping[str, str] = MappingProxyType({f.template: f.name for f in FAMILIES})


def find_family(name: str) -> KernelFamily | None:
    """The record of family `name`, or None."""
    return _BY_NAME.get(name)


def family(name: str) -> KernelFamily:
    """The record of family `name`; a CodegenError for an unknown name."""
    f = _BY_NAME.get(name)
    if f is None:
        raise CodegenError(f"codegen: unknown kernel family {name!r}", hint=f"families: {', '.join(FAMILY_NAMES)}")
    return f


__all__ = ["FAMILIES", "FAMILY_NAMES", "KernelFamily", "Lowering", "PEAKS", "PtxProgram", "TEMPLATE_DIR",
           "TEMPLATE_FAMILY", "family", "find_family", "validate"]
