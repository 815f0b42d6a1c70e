"""Kernel family `attention`: scaled-dot-product attention as flash attention (online softmax,
causal or not, qk dim split into two power-of-two dots, separate v dim).

Where it sits: one record of codegen/families/ (`ATTENTION_FAMILY`); template
templates/attention.py.j2 (the flash loop lives in templates/flash.j2, shared with `mla_attention`,
which also shares `flash_tiles` and `flash_pairs` below). One program per (batch, query block).
"""
from __future__ import annotations

import sympy
from dsr_compiler.ir.graph import Kernel
from dsr_compiler.ir.ops import ATTENTION, OPS
from dsr_compiler.ir.types import DType, dim_str

from ..lower_common import (
    INDEX_MAP_OPS,
    arg_names,
    attr_int,
    fail,
    kernel_bytes,
    kernel_name,
    next_pow2,
    source_nodes,
    static_int,
    tensor_args,
)
from ..spec import KernelSpec
from ..views import Axis, IndexBuilder, ScalarPool, View, ViewError, apply_layout, broadcast_strides, prod
from .record import KernelFamily


def flash_tiles(k: Kernel, sq: sympy.Expr, f32: bool) -> tuple[int, int, int]:
    """BLOCK_M, BLOCK_N and num_warps of a flash-attention kernel (`attention`, `mla_attention`).

    Defaults (ptxas for sm_90a, no spills at D=192/Dv=128 and at MLA's nope 128 + rope 64 / v 128):
    bf16 128x64 on 8 warps; f32 (exact FMA dots) 32x32 on 4 warps; a small static Sq (decode)
    shrinks BLOCK_M to >= 16. Kernel attributes block_m, block_n, num_warps override them."""
    bm_default = 32 if f32 else 128
    static_sq = static_int(sq)
    if static_sq is not None:
        bm_default = min(bm_default, max(16, next_pow2(static_sq)))
    bm = attr_int(k, "block_m", bm_default)
    bn = attr_int(k, "block_n", 32 if f32 else 64)
    return bm, bn, attr_int(k, "num_warps", 8 if bm >= 128 else 4)


def flash_pairs(sq: sympy.Expr, sk: sympy.Expr, causal: bool) -> sympy.Expr:
    """(query, key) pairs one (batch, head) scores: all Sq x Sk, or causally (the queries being the
    last Sq of Sk positions) Sq(Sk - Sq) + Sq(Sq + 1)/2."""
    return sq * sk if not causal else sq * (sk - sq) + sq * (sq + 1) / 2


def lower_attention(k: Kernel, index: int) -> KernelSpec:
    """A flash-attention kernel: one attention op (and layout ops on its inputs), one program per
    (batch, query block)."""
    g = k.body
    vals = g.values()
    atts = [n for n in g.nodes if OPS[n.op].kind == ATTENTION]
    others = [n for n in g.nodes if OPS[n.op].kind != ATTENTION and n.op not in INDEX_MAP_OPS]
    if len(atts) != 1 or others:
        bad = others[0] if others else (atts[1] if len(atts) > 1 else None)
        raise fail(k, "an attention kernel holds exactly one attention op (and layout ops on its inputs)", bad)
    att = atts[0]
    if list(g.outputs) != [att.out.name]:
        raise fail(k, f"must return only the attention output %{att.out.name}, returns {list(g.outputs)}")
    pool = ScalarPool(i64=bool(k.attr("index_i64", False)))
    names = arg_names(g)
    views: dict[str, tuple[str, View]] = {v.name: (v.name, View.contiguous(v.type.shape)) for v in g.inputs}
    for n in g.nodes:
        if n.op in INDEX_MAP_OPS:
            if n.inputs[0] not in views:
                raise fail(k, f"{n.op} of a computed value", n)
            base, v = views[n.inputs[0]]
            try:
                views[n.out.name] = (base, apply_layout(v, n.op, n.attr_dict, n.out.type.shape))
            except ViewError as e:
                raise fail(k, f"{n.op} cannot be an index map: {e}", n) from None
    q, kk, v = att.inputs
    qt, kt, vt = vals[q].type, vals[kk].type, vals[v].type
    batch = qt.shape[:-2]
    sq, sk, d, dv = qt.shape[-2], kt.shape[-2], qt.shape[-1], vt.shape[-1]
    sd, sdv = static_int(d), static_int(dv)
    if sd is None or sdv is None:
        raise fail(k, f"head dims must be static, got D={d} Dv={dv}", att)
    nbd = len(batch)
    # batch offsets only: seq and head-dim strides are applied by the template
    ix = IndexBuilder(tuple(batch) + (sympy.Integer(1), sympy.Integer(1)),
                      (Axis("pid_b", tuple(range(nbd))), Axis("seq", (nbd,)), Axis("hd", (nbd + 1,))), pool)
    zero2 = (sympy.Integer(0), sympy.Integer(0))

    def operand(name: str, shape: tuple) -> tuple[str, tuple, str, str, str]:
        base, view = views[name]
        try:
            st = broadcast_strides(view, shape)
        except ViewError as e:
            raise fail(k, f"attention operand %{name}: {e}", att) from None
        return (names[("in", base)], ix.terms(st[:-2] + zero2), pool.lit(view.offset), pool.lit(st[-2]),
                pool.lit(st[-1]))
    qo = operand(q, tuple(batch) + (sq, d))
    ko = operand(kk, tuple(batch) + (sk, d))
    vo = operand(v, tuple(batch) + (sk, dv))
    ot = att.out.type
    ost = View.contiguous(ot.shape).strides
    oterms = ix.terms(tuple(ost[:-2]) + zero2)
    d0 = max(16, 1 << (sd.bit_length() - 1)) if sd >= 16 else 16
    rest = sd - d0 if sd > d0 else 0
    d1 = max(16, next_pow2(rest)) if rest > 0 else 0
    dv_pad = max(16, next_pow2(sdv))
    f32 = qt.dtype is DType.f32
    bm, bn, num_warps = flash_tiles(k, sq, f32)
    scale = float(att.attr("scale"))
    params = (
        ("BLOCK_M", bm), ("BLOCK_N", bn), ("D", sd), ("D0", d0), ("D1", d1), ("DV", sdv), ("DV_PAD", dv_pad),
        ("SQ", pool.lit(sq)), ("SK", pool.lit(sk)), ("CAUSAL", bool(att.attr("causal"))),
        ("QK_SCALE", repr(scale * 1.4426950408889634)), ("PRECISION", "ieee" if f32 else ""),
        ("P_DTYPE", {DType.bf16: "tl.bfloat16", DType.f16: "tl.float16"}.get(qt.dtype, "tl.float32")),
        ("Q", qo), ("K", ko), ("V", vo),
        ("O", (names[("out", 0)], oterms, "0", pool.lit(ost[-2]), pool.lit(ost[-1]))),
    )
    nb = prod(batch)
    flops = 2 * nb * flash_pairs(sq, sk, bool(att.attr("causal"))) * (sd + sdv)
    rd, wr = kernel_bytes(g)
    return KernelSpec(
        name=kernel_name(k, index), family="attention", template="attention.py.j2",
        args=tuple(tensor_args(g)) + tuple(pool.args),
        grid=(dim_str(sympy.ceiling(sq / bm) * nb),), num_warps=num_warps,
        num_stages=attr_int(k, "num_stages", 2), params=params, body=(("coords", tuple(ix.coords)),),
        source_nodes=source_nodes(g), flops=dim_str(sympy.expand(flops)), bytes_read=rd, bytes_written=wr)


ATTENTION_FAMILY = KernelFamily("attention", lower=lower_attention, template="attention.py.j2", peak="bf16")

__all__ = ["ATTENTION_FAMILY", "flash_pairs", "flash_tiles", "lower_attention"]
