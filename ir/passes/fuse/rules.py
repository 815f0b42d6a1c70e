"""The fusion pass's rule table: grouping rules in priority order, and kernel-name taggers.

Where it sits: read by `kernels.py` (the `fuse` pass). Each rule walks the graph in order and
claims nodes for its family (`Fuser.new_group`, `add`, `can_join`); a later rule skips nodes an
earlier one claimed, so the order below is the priority. It is written here once; no module adds
rules or taggers at import time.
"""
from __future__ import annotations

from typing import Callable

from . import core, fp8, mla
from .fuser import Fuser

GROUP_RULES: tuple[Callable[[Fuser], None], ...] = (
    mla.group_mla_operands,     # mla_attention / mla_decode read their operands' views in place
    mla.group_index_copy,       # a cache write reads one layer of a stacked cache in place
    fp8.group_gemm_fp8,         # gemm_fp8 (dual SwiGLU pair), epilogue, quant epilogue
    fp8.group_quant_fp8,        # quant_fp8 with its rms_norm / pointwise prologue; dequant_fp8 alone
    core.group_gemm,            # linear / matmul (SwiGLU pair), operand views, epilogue
    core.group_reduction,       # last-dim reductions with prologue and epilogue
    core.group_attention,       # attention
    core.group_pointwise,       # remaining pointwise chains; any other op alone (its kind is the family)
)

# family -> fn(ops of the kernel, in order) -> the tag of its name k{n}_{family}_{tag};
# families not listed use `core.core_tag`.
TAGGERS: dict[str, Callable[[list[str]], str]] = {
    **{family: (lambda ops, t=tag: t) for family, tag in mla.MLA_TAGS.items()},
    "gemm_fp8": fp8.tag_gemm_fp8,
    "quant_fp8": fp8.tag_quant_fp8,
    "moe_gemm_fp8": fp8.tag_moe_gemm_fp8,
}


def kernel_tag(family: str, ops: list[str]) -> str:
    """The tag of a kernel's name from its family and its member ops."""
    if family in TAGGERS:
        return TAGGERS[family](ops)
    return core.core_tag(family, ops)
