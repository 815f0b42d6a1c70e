"""Kernel family `gemm_fp8`: DeepSeek block-scaled FP8 GEMM with a fused epilogue (and quant epilogue).

Where it sits: one record of codegen/families/ (`GEMM_FP8_FAMILY`). Lowers
the kernels that `ir/passes/fuse/fp8.py` groups: one `gemm_fp8` (or two sharing the quantized
activation: the SwiGLU gate/up pair, two fp32 accumulators, A read once), a pointwise epilogue
over the output tile, and at most one `quant_fp8` of an epilogue value, which then leaves the
kernel as fp8 codes + 1x128 scales only (BLOCK_N is the quant block, so a program owns whole tiles).

Numerics (DESIGN.md section 5, reference `ir/ops/fp8.gemm_fp8_ref`): per 128-wide K block the fp8
tiles are dotted with fp32 accumulation, multiplied by sA[m, kb] * sB[nb, kb] and added to the fp32
accumulator; a bf16 GEMM result is rounded to bf16 (RNE) before the epilogue reads it, as eager
does. The template `gemm_fp8.py.j2` dots fp8 operands on the GPU (`tl.dot` on float8e4nv, wgmma/mma
with fp32 accumulation) and, under the Triton interpreter (whose fp8 dot is wrong), decodes the tiles
to fp32 in registers with exact integer ops and dots in fp32 "ieee": one source, a constexpr switch.
"""
from __future__ import annotations

import sympy
from dsr_compiler.ir.graph import Kernel, Node
from dsr_compiler.ir.ops import OPS, POINTWISE
from dsr_compiler.ir.types import DType, dim_str

from ..lower_body import Body
from ..lower_common import (
    arg_names,
    attr_int,
    fail,
    kernel_bytes,
    kernel_name,
    next_pow2,
    pointwise_flops,
    source_nodes,
    static_int,
    tensor_args,
)
from ..spec import KernelSpec, Stmt
from ..views import Axis, ScalarPool, prod, same
from .record import KernelFamily


def lower_gemm_fp8(k: Kernel, index: int) -> KernelSpec:
    g = k.body
    vals = g.values()
    mms = [n for n in g.nodes if n.op == "gemm_fp8"]
    quants = [n for n in g.nodes if n.op == "quant_fp8"]
    if not 1 <= len(mms) <= 2:
        raise fail(k, f"takes one or two gemm_fp8 ops, found {len(mms)}", mms[2] if len(mms) > 2 else None)
    first = mms[0]
    if len(mms) == 2:
        a, b = mms
        if a.inputs[:2] != b.inputs[:2] or a.attrs != b.attrs or a.out.type != b.out.type:
            raise fail(k, "two gemm_fp8 in one kernel must share the quantized activation, attributes and "
                          "output type (the SwiGLU gate/up pair)", b)
    if len(quants) > 1:
        raise fail(k, "at most one quant_fp8 epilogue per kernel", quants[1])
    inputs = {v.name for v in g.inputs}
    for mm in mms:
        for x in mm.inputs:
            if x not in inputs:
                raise fail(k, f"gemm_fp8 operand %{x} is computed inside the kernel; operands must be kernel "
                              "inputs (contiguous codes and scales)", mm)
    block = int(first.attr("block", 128))
    out_t = first.out.type
    xq_t, wq_t = vals[first.inputs[0]].type, vals[first.inputs[2]].type
    lead = xq_t.shape[:-1]
    m_e, k_e, n_e = prod(lead), xq_t.shape[-1], wq_t.shape[0]
    static_k = static_int(k_e)
    if static_k is None:
        raise fail(k, f"K={k_e} must be static", first)
    pool = ScalarPool(i64=bool(k.attr("index_i64", False)))
    names = arg_names(g)
    o_shape = out_t.shape
    o_axes = [Axis("offs_m", tuple(range(len(lead))), "[:, None]"), Axis("offs_n", (len(lead),), "[None, :]")]
    body = Body(k, pool, o_shape, o_axes, "omask", {"offs_m": "mmask[:, None]", "offs_n": "nmask[None, :]"})
    body.check_layouts()
    for j, mm in enumerate(mms):
        acc = f"acc{j}"
        body.bind_accumulator(acc)
        if mm.out.type.dtype is DType.bf16:    # eager rounds the GEMM result to bf16 before anything reads it
            body.var[mm.out.name] = body.define(Stmt("cast", body.fresh(mm.out.name), (acc,), (("to", DType.bf16),),
                                                     DType.bf16), True, "f32")
        else:
            body.var[mm.out.name] = acc
    quant: Node | None = quants[0] if quants else None
    for n in g.nodes:
        if n.op in ("gemm_fp8", "quant_fp8"):
            continue
        kind = OPS[n.op].kind
        if n.op == "const":
            body.const(n)
        elif kind == POINTWISE and n.op != "rope":
            body.pointwise(n)
        else:
            raise fail(k, f"{n.op} ({kind}) cannot be part of a gemm_fp8 epilogue", n,
                       "the epilogue takes pointwise ops over the output tile and one quant_fp8")
    q_params: tuple = (("QUANT", False),)
    q_outs: set[str] = set()
    if quant is not None:
        src = quant.inputs[0]
        st = vals[src].type
        if st.rank != len(o_shape) or not all(same(x, y) for x, y in zip(st.shape, o_shape)):
            raise fail(k, f"quant_fp8 of %{src} : {st} does not quantize the output tile {out_t}", quant)
        if any(x in {o.name for o in quant.outputs} for n in g.nodes for x in n.inputs):
            raise fail(k, "the quant_fp8 epilogue's codes/scales are read inside the kernel", quant)
        qv = body.use(src, quant)
        if not body.vec[qv]:
            raise fail(k, f"quant_fp8 of %{src}: the value does not vary over the tile", quant)
        qb = int(quant.attr("block", 128))
        outs = list(g.outputs)
        codes, scales = (o.name for o in quant.outputs)
        q_outs = {codes, scales}
        q_params = (("QUANT", True), ("QSRC", qv), ("Q_BLOCK", qb), ("Q_UE8M0", quant.attr("scale_fmt") == "ue8m0"),
                    ("Q_ROUND_BF16", st.dtype is DType.bf16),
                    ("Q_OUT", names[("out", outs.index(codes))] if codes in outs else ""),
                    ("S_OUT", names[("out", outs.index(scales))] if scales in outs else ""),
                    ("NSB", pool.lit(sympy.ceiling(n_e / qb))))
    for i, oname in enumerate(g.outputs):
        if oname in q_outs:
            continue
        o = vals[oname]
        if o.type.rank != len(o_shape) or not all(same(x, y) for x, y in zip(o.type.shape, o_shape)):
            raise fail(k, f"output %{oname} : {o.type} does not have the GEMM output shape {out_t}")
        body.store(o, i, None)
    # Tiles: BLOCK_K is the scale block (one sA/sB pair per K step). BLOCK_N is the scale block too
    # when a quant epilogue needs whole 1x128 tiles per program, else 128 (DeepGEMM's N tile).
    # BLOCK_M 64 on 8 warps keeps the dual-accumulator SwiGLU kernel free of spills on sm_90a
    # (ptxas: 254 registers, 0 spills; 4 warps spill 796 bytes); a small static M (decode) shrinks
    # it to the next power of two >= 16.
    static_m, static_n = static_int(m_e), static_int(n_e)
    bm = first.attr("block_m") or attr_int(k, "block_m", 64)
    if static_m is not None and first.attr("block_m") is None:
        bm = min(bm, max(16, next_pow2(static_m)))
    bn = first.attr("block_n") or attr_int(k, "block_n", 128)
    if quant is not None:
        bn = int(quant.attr("block", 128))
    elif static_n is not None and first.attr("block_n") is None:
        bn = min(bn, max(16, next_pow2(static_n)))
    num_warps = attr_int(k, "num_warps", 8 if bm * bn >= 64 * 128 else 4)
    num_stages = attr_int(k, "num_stages", 3)
    even_k = static_k % block == 0
    nkb = -(-static_k // block)
    m_lit, n_lit = pool.lit(m_e), pool.lit(n_e)
    grid = (dim_str(sympy.ceiling(m_e / bm) * sympy.ceiling(n_e / bn)),)
    params = (("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK", block), ("GROUP_M", 8), ("M", m_lit), ("N", n_lit),
              ("K", static_k), ("NKB", nkb), ("EVEN_K", even_k), ("DUAL", len(mms) == 2),
              ("A_PTR", names[("in", first.inputs[0])]), ("AS_PTR", names[("in", first.inputs[1])]),
              ("B_PTRS", tuple(names[("in", mm.inputs[2])] for mm in mms)),
              ("BS_PTRS", tuple(names[("in", mm.inputs[3])] for mm in mms))) + q_params
    rd, wr = kernel_bytes(g)
    numel = prod(o_shape)
    flops = 2 * len(mms) * m_e * n_e * k_e + pointwise_flops(g, numel) + (numel * 4 if quant is not None else 0)
    return KernelSpec(
        name=kernel_name(k, index), family="gemm_fp8", template="gemm_fp8.py.j2",
        args=tuple(tensor_args(g)) + tuple(pool.args), grid=grid, num_warps=num_warps, num_stages=num_stages,
        params=params, body=(("coords", tuple(body.ix.coords)), ("epilogue", tuple(body.stmts))),
        source_nodes=source_nodes(g), flops=dim_str(sympy.expand(flops)), bytes_read=rd, bytes_written=wr)


GEMM_FP8_FAMILY = KernelFamily("gemm_fp8", lower=lower_gemm_fp8, template="gemm_fp8.py.j2", peak="fp8")

__all__ = ["GEMM_FP8_FAMILY", "lower_gemm_fp8"]
