"""Grouping rules of the four core kernel families, and their kernel-name tag.

Where it sits: rules of `ir/passes/fuse/`, listed in order in `rules.py` after the FP8 and MLA
rules (which claim their nodes first). Families (what codegen/lower.py accepts):

  gemm       one linear/matmul, or two linears sharing x (SwiGLU), plus a pointwise epilogue
  reduction  a pointwise prologue, one last-dim reduction (rms_norm, softmax, sum, ...), an epilogue
  attention  one attention op
  pointwise  a connected chain of pointwise ops (layout ops allowed on kernel inputs)

`reshape` stays outside kernels: buffers are contiguous, so it is a free view at run time.
"""
from __future__ import annotations

from ...graph import Node
from ...ops import ATTENTION, COLLECTIVE, LAYOUT, OPS, POINTWISE, REDUCTION, SOURCE
from ...types import dims_equal
from .fuser import VIEW_OPS, Fuser


def group_gemm(f: Fuser) -> None:
    """GEMMs (dual-B SwiGLU first), with operand views and epilogues."""
    for i, n in enumerate(f.nodes):
        if n.op not in ("linear", "matmul") or i in f.group_of:
            continue
        grp = f.new_group("gemm", i)
        what = f"gemm kernel of {f.name(i)}"
        if n.op == "linear" and len(n.inputs) == 2:
            partner = swiglu_partner(f, i)
            if partner is not None and f.can_join(grp, partner, what):
                f.add(grp, partner)
        for m in list(grp.members):
            f.absorb_operand_views(grp, m, what)
        f.absorb_epilogue(grp, n.outputs[0].type, what)


def group_reduction(f: Fuser) -> None:
    """Last-dim reductions, with prologue and epilogue."""
    for i, n in enumerate(f.nodes):
        if i in f.group_of or OPS[n.op].kind != REDUCTION:
            continue
        x = n.inputs[0]
        xt = f.type_of(x)
        dim = n.attr("dim", -1)
        if OPS[n.op].last_dim_reduction and dim % max(xt.rank, 1) == xt.rank - 1:
            grp = f.new_group("reduction", i)
            what = f"reduction kernel of {f.name(i)}"
            f.absorb_prologue(grp, x, xt, what)
            red = n.outputs[0].type
            f.absorb_epilogue(grp, xt, what, also=None if dims_equal(red.shape, xt.shape) else red)
        else:
            f.ctx.note(f"cannot make a reduction kernel of {f.name(i)}: only last-dim reductions are supported")


def group_attention(f: Fuser) -> None:
    """One attention op per kernel, reading its operands' views in place."""
    for i, n in enumerate(f.nodes):
        if i not in f.group_of and OPS[n.op].kind == ATTENTION:
            f.absorb_operand_views(f.new_group("attention", i), i, f"attention kernel of {f.name(i)}")


def group_pointwise(f: Fuser) -> None:
    """The remaining pointwise chains (and layout ops other than reshape); any other node alone."""
    for i, n in enumerate(f.nodes):
        if i in f.group_of or n.op == "reshape":
            continue
        kind = OPS[n.op].kind
        if kind == SOURCE:
            continue  # constants are copied into the kernels that use them
        if kind == COLLECTIVE:
            continue  # all_to_all stays at the top level: the runtime runs it between kernels
        if kind in (POINTWISE, LAYOUT):
            grp = f.new_group("pointwise", i)
            what = f"pointwise kernel of {f.name(i)}"
            f.absorb_epilogue(grp, n.outputs[0].type, what)
        else:
            f.new_group(kind, i)  # no fusion family: lowering reports it clearly


def swiglu_partner(f: Fuser, i: int) -> int | None:
    """The other linear of silu(x @ w1.T) * (x @ w3.T) sharing x, whichever of the two `i` is."""
    n = f.nodes[i]

    def compatible(j: int | None) -> bool:
        if j is None or j == i or j in f.group_of:
            return False
        jn = f.nodes[j]
        return (jn.op == "linear" and len(jn.inputs) == 2 and jn.inputs[0] == n.inputs[0]
                and dims_equal(jn.outputs[0].type.shape, n.outputs[0].type.shape)
                and jn.outputs[0].type.dtype == n.outputs[0].type.dtype)

    def other_operand(mul: Node, mine: str) -> str:
        return mul.inputs[1] if mul.inputs[0] == mine else mul.inputs[0]

    for u in sorted(f.users[i]):
        un = f.nodes[u]
        if un.op == "silu":  # i is the gate: mul(silu(i), j)
            for m in sorted(f.users[u]):
                if f.nodes[m].op == "mul":
                    j = f.index_of.get(other_operand(f.nodes[m], un.outputs[0].name))
                    if compatible(j):
                        return j
        elif un.op == "mul":  # i is the up projection: mul(silu(j), i)
            s = f.index_of.get(other_operand(un, n.outputs[0].name))
            if s is not None and f.nodes[s].op == "silu":
                j = f.index_of.get(f.nodes[s].inputs[0])
                if compatible(j):
                    return j
    return None


def core_tag(family: str, ops: list[str]) -> str:
    """Kernel-name tag of a family without its own tagger: swiglu, or its first three distinct ops."""
    if family == "gemm" and ops.count("linear") == 2 and "silu" in ops and "mul" in ops:
        return "swiglu"
    seen: list[str] = []
    for o in ops:
        if family != "pointwise" and o in VIEW_OPS:
            continue  # operand views of a gemm/attention kernel say nothing about what it computes
        if o not in seen and o != "const":
            seen.append(o)
    return "_".join(seen[:3]) or family
