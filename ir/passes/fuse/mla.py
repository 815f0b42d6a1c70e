"""Grouping rule and kernel-name tags of the MLA kernel families (and of rope_table, index_copy).

Where it sits: rules of `ir/passes/fuse/`, listed first in `rules.py`: an `mla_attention` /
`mla_decode` kernel reads the slice/permute/expand views of its operands in place (k_nope and v
are two slices of one wkv_b output; codegen/families/mla.py lowers them with strides) instead of copying
them, so the views must be claimed before any other rule makes them pointwise kernels.
"""
from __future__ import annotations

from ...ops import OPS
from .fuser import Fuser


def group_index_copy(f: Fuser) -> None:
    """An index_copy (a KV-cache write) reads its cache in place when the cache is one layer of a
    stacked cache, `reshape(slice(caches, dim=0, i:i+1))`: a slice along the leading dim of a
    buffer is contiguous, so the kernel reads it at an offset instead of a copy kernel making it."""
    for i, n in enumerate(f.nodes):
        if n.op != "index_copy" or i in f.group_of:
            continue
        grp = f.new_group("index_copy", i)
        r = f.index_of.get(n.inputs[0])
        if r is None or r in f.group_of or f.nodes[r].op != "reshape" or f.users[r] != {i}:
            continue
        s = f.index_of.get(f.nodes[r].inputs[0])
        if s is None or s in f.group_of or f.users[s] != {r}:
            continue
        sl = f.nodes[s]
        if sl.op != "slice" or sl.attr("dim") % max(f.type_of(sl.inputs[0]).rank, 1) != 0 or sl.attr("step", 1) != 1:
            continue
        if {sl.out.name, f.nodes[r].out.name} & f.graph_outputs:
            continue
        for j in (r, s):
            if f.can_join(grp, j, f"index_copy kernel of {f.name(i)}"):
                f.add(grp, j)


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
