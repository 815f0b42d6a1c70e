"""Kernel family `gemm`: one linear/matmul (or two bias-free linears sharing x: the SwiGLU gate/up
pair) with a pointwise epilogue over the output tile.

Where it sits: one record of codegen/families/ (`GEMM_FAMILY`); template templates/gemm.py.j2
(tl.dot over BLOCK_K steps, grouped program order, the epilogue from the shared statement emitter).
Operands are kernel inputs read through strides (index-map layout ops on inputs fold into them).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import sympy
from dsr_compiler.ir.graph import Kernel, Node
from dsr_compiler.ir.ops import OPS, POINTWISE, SOURCE
from dsr_compiler.ir.types import DType, dim_str

from ..lower_body import Body
from ..lower_common import (
    INDEX_MAP_OPS,
    TOKEN,
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
from ..views import Axis, IndexBuilder, ScalarPool, View, ViewError, apply_layout, broadcast_strides, prod, same
from .pointwise import lower_pointwise
from .record import KernelFamily


def lower_gemm(k: Kernel, index: int) -> KernelSpec:
    """A GEMM kernel: output tiles of BLOCK_M x BLOCK_N, the epilogue over each tile (a kernel holding
    only an embedding lowers as pointwise)."""
    g = k.body
    vals = g.values()
    mms = [n for n in g.nodes if n.op in ("linear", "matmul")]
    if any(n.op == "embedding" for n in g.nodes) and not mms:
        return lower_pointwise(k, index)
    if not mms:
        raise fail(k, "has no linear or matmul op")
    if len(mms) > 2 or (len(mms) == 2 and not _dual(mms)):
        raise fail(k, "takes one linear/matmul, or two bias-free linears sharing x with same-shaped weights",
                   mms[-1])
    first = mms[0]
    dual = len(mms) == 2
    pool = ScalarPool(i64=bool(k.attr("index_i64", False)))
    names = arg_names(g)
    out_t = first.out.type
    is_mm = first.op == "matmul"
    x_name, w_name = first.inputs[0], first.inputs[1]
    dt = vals[x_name].type.dtype
    # views of the operands (inputs, possibly through index-map layout ops)
    views: dict[str, tuple[str, View]] = {v.name: (v.name, View.contiguous(v.type.shape)) for v in g.inputs}
    epi_nodes: list[Node] = []
    for n in g.nodes:
        if n.op in INDEX_MAP_OPS and n.inputs[0] in views:
            base, v = views[n.inputs[0]]
            try:
                views[n.out.name] = (base, apply_layout(v, n.op, n.attr_dict, n.out.type.shape))
            except ViewError as e:
                raise fail(k, f"{n.op} cannot be an index map: {e}", n) from None
            epi_nodes.append(n)
        elif n.op in ("linear", "matmul"):
            for x in n.inputs[:2]:
                if x not in views:
                    raise fail(k, f"GEMM operand %{x} is computed inside the kernel; operands must be kernel inputs",
                               n, "a prologue must be its own kernel")
        else:
            kind = OPS[n.op].kind
            if kind not in (POINTWISE, SOURCE) and n.op not in INDEX_MAP_OPS:
                raise fail(k, f"{n.op} ({kind}) cannot be part of a GEMM epilogue", n)
            if n.op in INDEX_MAP_OPS:
                raise fail(k, f"{n.op} of a value computed inside the kernel", n)
            if n.op == "rope":
                raise fail(k, "rope is not supported in a GEMM epilogue", n)
            epi_nodes.append(n)
    if is_mm:
        at, bt = vals[x_name].type, vals[w_name].type
        batch = out_t.shape[:-2]
        m_e, k_e, n_e = at.shape[-2], at.shape[-1], bt.shape[-1]
        a_shape = batch + (m_e, k_e)
        b_shape = batch + (k_e, n_e)
        a_axes = [Axis("pid_b", tuple(range(len(batch)))), Axis("offs_m", (len(batch),), "[:, None]"),
                  Axis("offs_k", (len(batch) + 1,), "[None, :]")]
        b_axes = [Axis("pid_b", tuple(range(len(batch)))), Axis("offs_k", (len(batch),), "[:, None]"),
                  Axis("offs_n", (len(batch) + 1,), "[None, :]")]
        o_axes = [Axis("pid_b", tuple(range(len(batch)))), Axis("offs_m", (len(batch),), "[:, None]"),
                  Axis("offs_n", (len(batch) + 1,), "[None, :]")]
        try:
            a_st = broadcast_strides(views[x_name][1], a_shape)
            b_views = [broadcast_strides(views[w_name][1], b_shape)]
        except ViewError as e:
            raise fail(k, f"matmul operands: {e}", first) from None
    else:
        xt = vals[x_name].type
        lead = xt.shape[:-1]
        batch = ()
        m_e, k_e, n_e = prod(lead), xt.shape[-1], vals[w_name].type.shape[0]
        a_shape = tuple(lead) + (k_e,)
        b_shape = (k_e, n_e)
        a_axes = [Axis("offs_m", tuple(range(len(lead))), "[:, None]"), Axis("offs_k", (len(lead),), "[None, :]")]
        b_axes = [Axis("offs_k", (0,), "[:, None]"), Axis("offs_n", (1,), "[None, :]")]
        o_axes = [Axis("offs_m", tuple(range(len(lead))), "[:, None]"), Axis("offs_n", (len(lead),), "[None, :]")]
        try:
            a_st = broadcast_strides(views[x_name][1], a_shape)
            b_views = []
            for mm in mms:
                wv = views[mm.inputs[1]][1]
                b_views.append(broadcast_strides(View(tuple(reversed(wv.shape)), tuple(reversed(wv.strides)),
                                                      wv.offset), b_shape))
        except ViewError as e:
            raise fail(k, f"linear operands: {e}", first) from None
    # operand address terms (the K term is advanced by the template's loop)
    a_ix = IndexBuilder(a_shape, tuple(a_axes), pool)
    a_terms = _cover_tile(a_ix.terms(a_st), a_axes[-2:])
    b_ix = IndexBuilder(b_shape, tuple(b_axes), pool)
    b_terms = [_cover_tile(b_ix.terms(st), b_axes[-2:]) for st in b_views]
    kdim_a, kdim_b = len(a_shape) - 1, len(b_shape) - 2
    sak = pool.lit(a_st[kdim_a])
    sbk = [pool.lit(st[kdim_b]) for st in b_views]
    a_off = pool.lit(views[x_name][1].offset)
    b_off = [pool.lit(views[mm.inputs[1]][1].offset) for mm in mms]
    # epilogue over the output tile
    o_shape = out_t.shape
    body = Body(k, pool, o_shape, o_axes, "omask", {"offs_m": "mmask[:, None]", "offs_n": "nmask[None, :]"})
    body.views = views
    for j, mm in enumerate(mms):
        acc = f"acc{j}"
        body.bind_accumulator(acc)
        if len(mm.inputs) == 3:
            bias = body.convert(body.use(mm.inputs[2], mm), "f32")
            out = body.fresh(mm.out.name)
            body.define(Stmt("add", out, (acc, bias), (), mm.out.type.dtype), True, "f32")
            body.var[mm.out.name] = out
        else:
            body.var[mm.out.name] = acc
    for n in epi_nodes:
        if n.op == "const":
            body.const(n)
        elif n.op in INDEX_MAP_OPS:
            continue
        else:
            body.pointwise(n)
    for i, oname in enumerate(g.outputs):
        o = vals[oname]
        if o.type.rank != len(o_shape) or not all(same(a, b) for a, b in zip(o.type.shape, o_shape)):
            raise fail(k, f"output %{oname} : {o.type} does not have the GEMM output shape {out_t}")
        body.store(o, i, None)
    # tiles
    static_m, static_n, static_k = static_int(m_e), static_int(n_e), static_int(k_e)
    f32 = dt is DType.f32
    # Tiles (checked with ptxas for sm_90a: no spills). bf16: 128x128x64 on 8 warps (wgmma,
    # 3-stage cp.async pipeline); f32 uses exact FMA dots ("ieee"), so smaller tiles. A small
    # static M (decode) shrinks BLOCK_M to the next power of two >= 16 (tl.dot's minimum).
    bm_default = 32 if f32 else 128
    if static_m is not None:
        bm_default = min(bm_default, max(16, next_pow2(static_m)))
    bm = attr_int(k, "block_m", bm_default)
    bn = attr_int(k, "block_n", 64 if f32 else 128)
    if static_n is not None:
        bn = min(bn, max(16, next_pow2(static_n)))
    bk = attr_int(k, "block_k", 32 if f32 else 64)
    if static_k is not None:
        bk = min(bk, max(16, next_pow2(static_k)))
    even_k = static_k is not None and static_k % bk == 0
    num_warps = attr_int(k, "num_warps", 8 if bm * bn >= 128 * 128 else 4)
    num_stages = attr_int(k, "num_stages", 3)
    m_lit, n_lit, k_lit = pool.lit(m_e), pool.lit(n_e), pool.lit(k_e)
    nbatch = prod(batch)
    grid = [dim_str(sympy.ceiling(m_e / bm) * sympy.ceiling(n_e / bn) * nbatch)]
    params = (
        ("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK_K", bk), ("GROUP_M", 8), ("M", m_lit), ("N", n_lit), ("K", k_lit),
        ("EVEN_K", even_k), ("DUAL", dual), ("BATCHED", bool(batch)),
        ("PRECISION", "ieee" if f32 else ""),
        ("A_PTR", names[("in", views[x_name][0])]), ("A_TERMS", a_terms), ("A_OFF", a_off), ("A_SK", sak),
        ("B_PTRS", tuple(names[("in", views[mm.inputs[1]][0])] for mm in mms)), ("B_TERMS", tuple(b_terms)),
        ("B_OFFS", tuple(b_off)), ("B_SK", tuple(sbk)),
    )
    rd, wr = kernel_bytes(g)
    numel = prod(o_shape)
    flops = 2 * len(mms) * nbatch * m_e * n_e * k_e + pointwise_flops(g, numel)
    coords = tuple(a_ix.coords) + tuple(b_ix.coords)
    return KernelSpec(
        name=kernel_name(k, index), family="gemm", template="gemm.py.j2",
        args=tuple(tensor_args(g)) + tuple(pool.args), grid=tuple(grid), num_warps=num_warps,
        num_stages=num_stages, params=params,
        body=(("operand_coords", _dedupe(coords)), ("coords", tuple(body.ix.coords)), ("epilogue", tuple(body.stmts))),
        source_nodes=source_nodes(g), flops=dim_str(sympy.expand(flops)), bytes_read=rd, bytes_written=wr)


def _cover_tile(terms: tuple[tuple[str, str], ...], axes: Sequence[Axis]) -> tuple[tuple[str, str], ...]:
    """Add `axis * 0` terms so an operand pointer spans the whole 2-D tile (size-1 dims drop out)."""
    have = {tok for expr, _ in terms for tok in TOKEN.findall(expr)}
    extra = tuple((f"{a.var}{a.bcast} * 0", "1") for a in axes
                  if not any(t == a.var or t.startswith(a.var + "_d") for t in have))
    return terms + extra


def _dedupe(stmts: Iterable[Stmt]) -> tuple[Stmt, ...]:
    seen: set[str] = set()
    out = []
    for s in stmts:
        if s.out not in seen:
            seen.add(s.out)
            out.append(s)
    return tuple(out)


def _dual(mms: list[Node]) -> bool:
    a, b = mms
    return (a.op == b.op == "linear" and len(a.inputs) == len(b.inputs) == 2 and a.inputs[0] == b.inputs[0]
            and a.out.type.rank == b.out.type.rank
            and all(same(x, y) for x, y in zip(a.out.type.shape, b.out.type.shape)))


GEMM_FAMILY = KernelFamily("gemm", lower=lower_gemm, template="gemm.py.j2", peak="bf16")

__all__ = ["GEMM_FAMILY", "lower_gemm"]
