"""Fusion: group the graph into kernels (`kernel @k{n}_{family}_{tag}` blocks + `call`s).

Modules, imported one way (each only imports those above it):

    fuser    Fuser (nodes, users, groups), Group, the cycle checks and absorb_* helpers
    core     rules and tag of the core families: gemm, reduction, attention, pointwise
    fp8      rules and tags of gemm_fp8 and quant_fp8 (and the moe_gemm_fp8 tag)
    mla      the MLA operand-view rule and the MLA tags
    rules    GROUP_RULES (the one ordered tuple of grouping rules) and TAGGERS (the one tag table)
    kernels  the `fuse` pass: run the rules, write the groups as kernels

Legality: a node joins a group only if no path leaves the group and comes back to it
(no cycle in the graph of kernels), and every value a group makes that someone else
reads becomes a kernel output. Every refusal is logged as "cannot fuse X into Y: why".
"""
from .fuser import INDEX_MAP_OPS, VIEW_OPS, Fuser, Group
from .kernels import fuse
from .rules import GROUP_RULES, TAGGERS, kernel_tag

__all__ = ["GROUP_RULES", "INDEX_MAP_OPS", "TAGGERS", "VIEW_OPS", "Fuser", "Group", "fuse", "kernel_tag"]
