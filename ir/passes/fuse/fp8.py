"""Grouping rules of the FP8 kernel families, and their kernel-name tags.

Where it sits: rules of `ir/passes/fuse/`, listed in `rules.py` (GROUP_RULES, TAGGERS) after the
MLA operand-view rule and before the core families, so the FP8 ops and their epilogues are claimed
first. Two kernel families come out of it (lowered by codegen/families/gemm_fp8.py and quant_fp8.py):

  gemm_fp8   one gemm_fp8, or two sharing the quantized activation whose results meet in a `mul`
             (the SwiGLU gate/up pair: A is read once, two fp32 accumulators); the pointwise
             epilogue of the output tile (casts, silu, mul, residual add, ...); and at most one
             `quant_fp8` of the epilogue's result: the tile is then quantized in registers and only
             fp8 codes + scales reach memory (the SwiGLU epilogue + quant of DESIGN.md section 4).
  quant_fp8  one `quant_fp8` with its producers pulled in: a pointwise chain, at most one
             `rms_norm` (RMSNorm output written directly as fp8 codes + scales; the norm output
             and prologue values that others read become extra outputs), and the pointwise prologue
             of the norm (e.g. a residual add). Or one `dequant_fp8` alone.

Dequantization never needs its own kernel in a compiled FP8 plan: gemm_fp8 reads codes and scales
and applies the scales to its fp32 partial sums (the dequant folded into the GEMM).
"""
from __future__ import annotations

from ...ops import OPS, POINTWISE
from ...types import dims_equal
from .fuser import Fuser

_UNARY_CHAIN = ("cast", "silu", "sigmoid", "relu", "gelu", "tanh", "neg")


def _forward_unary(f: Fuser, i: int) -> set[int]:
    """Nodes reachable from node i through single-input pointwise ops (casts, activations)."""
    out, stack = {i}, [i]
    while stack:
        x = stack.pop()
        for u in f.users[x]:
            if u not in out and f.nodes[u].op in _UNARY_CHAIN:
                out.add(u)
                stack.append(u)
    return out


def _dual_partner(f: Fuser, i: int) -> int | None:
    """Another gemm_fp8 on the same quantized activation whose result meets node i's in a `mul`."""
    n = f.nodes[i]
    reach_i = _forward_unary(f, i)
    for j, m in enumerate(f.nodes):
        if j == i or m.op != "gemm_fp8" or j in f.group_of or m.inputs[:2] != n.inputs[:2]:
            continue
        if (m.attrs != n.attrs or not dims_equal(m.out.type.shape, n.out.type.shape)
                or m.out.type.dtype != n.out.type.dtype):
            continue
        reach_j = _forward_unary(f, j)
        for a in reach_i:
            for u in f.users[a]:
                un = f.nodes[u]
                if un.op != "mul":
                    continue
                srcs = [f.index_of.get(x) for x in un.inputs]
                if any(s in reach_i for s in srcs) and any(s in reach_j for s in srcs):
                    return j
    return None


def _quant_epilogue(f: Fuser, grp, out_type, what: str) -> None:
    """Pull one quant_fp8 of a value the GEMM kernel computes (over the output tile) into it."""
    for i in sorted({u for m in grp.members for u in f.users[m]} - set(grp.members)):
        n = f.nodes[i]
        if n.op != "quant_fp8" or i in f.group_of:
            continue
        xt = f.type_of(n.inputs[0])
        if not dims_equal(xt.shape, out_type.shape):
            f.ctx.note(f"cannot fuse {f.name(i)} into {what}: it quantizes {xt}, not the output tile {out_type}")
            continue
        if f.can_join(grp, i, what):
            f.add(grp, i)
            return


def group_gemm_fp8(f: Fuser) -> None:
    for i, n in enumerate(f.nodes):
        if n.op != "gemm_fp8" or i in f.group_of:
            continue
        grp = f.new_group("gemm_fp8", i)
        what = f"gemm_fp8 kernel of {f.name(i)}"
        partner = _dual_partner(f, i)
        if partner is not None and f.can_join(grp, partner, what):
            f.add(grp, partner)
        f.absorb_epilogue(grp, n.out.type, what)
        _quant_epilogue(f, grp, n.out.type, what)


def group_quant_fp8(f: Fuser) -> None:
    for i, n in enumerate(f.nodes):
        if i in f.group_of or n.op not in ("quant_fp8", "dequant_fp8"):
            continue
        grp = f.new_group("quant_fp8", i)
        if n.op == "dequant_fp8":
            continue
        row = f.type_of(n.inputs[0])
        what = f"quant_fp8 kernel of {f.name(i)}"
        have_norm = False
        stack = [n.inputs[0]]
        while stack:
            v = stack.pop()
            j = f.index_of.get(v)
            if j is None or j in f.group_of:
                continue
            pj = f.nodes[j]
            if not dims_equal(pj.outputs[0].type.shape, row.shape):
                f.ctx.note(f"cannot fuse {f.name(j)} into {what}: shape {pj.outputs[0].type} differs from the row {row}")
                continue
            if pj.op == "rms_norm" and not have_norm:
                if f.can_join(grp, j, what):
                    f.add(grp, j)
                    have_norm = True
                    stack.append(pj.inputs[0])
            elif OPS[pj.op].kind == POINTWISE and pj.op != "rope":
                if f.can_join(grp, j, what):
                    f.add(grp, j)
                    stack.extend(pj.inputs)
            else:
                f.ctx.note(f"cannot fuse {f.name(j)} into {what} as prologue: {pj.op} is not pointwise")


def tag_gemm_fp8(ops: list[str]) -> str:
    quant = "_quant" if "quant_fp8" in ops else ""
    if ops.count("gemm_fp8") == 2 and "silu" in ops and "mul" in ops:
        return "swiglu" + quant
    rest = [o for o in dict.fromkeys(ops) if o not in ("gemm_fp8", "cast", "const", "quant_fp8")]
    return ("_".join(rest[:2]) or "gemm") + quant


def tag_quant_fp8(ops: list[str]) -> str:
    if "dequant_fp8" in ops:
        return "dequant"
    return ("rms_norm" if "rms_norm" in ops else "act") + ("_add" if "add" in ops else "")


def tag_moe_gemm_fp8(ops: list[str]) -> str:
    return "gate_up_quant" if "moe_gemm_gate_up_fp8" in ops else "down"
