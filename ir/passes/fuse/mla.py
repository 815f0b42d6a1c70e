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
    """An mla_attention / mla_decode kernel with the views of its operands that only it reads; an
    mla_decode also takes the `iota` of its key positions (`arange(T)`, read by nothing else): the
    kernel uses the key index itself instead of loading positions another kernel wrote."""
    for i, n in enumerate(f.nodes):
        if n.op in ("mla_attention", "mla_decode") and i not in f.group_of:
            grp = f.new_group(OPS[n.op].kind, i)
            f.absorb_operand_views(grp, i, f"{n.op} kernel of {f.name(i)}")
            if n.op == "mla_decode":
                j = f.index_of.get(n.inputs[5])
                if (j is not None and j not in f.group_of and f.nodes[j].op == "iota"
                        and f.users[j] == {i} and n.inputs[5] not in f.graph_outputs):
                    f.add(grp, j)


MLA_TAGS = {"mla_attention": "flash", "mla_decode": "splitkv", "mla_combine": "splits", "rope_table": "cos_sin",
            "index_copy": "rows"}
