"""Grouping rule and kernel-name tags of the MLA kernel families (and of rope_table, index_copy).

Where it sits: rules of `ir/passes/fuse/`, listed first in `rules.py`: an `mla_attention` /
`mla_decode` kernel reads the slice/permute/expand views of its operands in place (k_nope and v
are two slices of one wkv_b output; codegen/families/mla.py lowers them with strides) instead of copying
them, so the views must be claimed before any other rule makes them pointwise kernels.
"""
from __future__ import annotations

from ...ops import OPS
from .fuser import Fuser


def group_mla_operands(f: Fuser) -> None:
    """An mla_attention / mla_decode kernel with the views of its operands that only it reads."""
    for i, n in enumerate(f.nodes):
        if n.op in ("mla_attention", "mla_decode") and i not in f.group_of:
            f.absorb_operand_views(f.new_group(OPS[n.op].kind, i), i, f"{n.op} kernel of {f.name(i)}")


MLA_TAGS = {"mla_attention": "flash", "mla_decode": "splitkv", "mla_combine": "splits", "rope_table": "cos_sin",
            "index_copy": "rows"}
