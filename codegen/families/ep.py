"""Expert-parallel kernel families: the send plan (`ep_route`) and row gathers (`gather_rows`).

Where it sits: two records of codegen/families/ (`EP_*_FAMILY` at the end), each one Jinja template
plus one lowering ir.Kernel -> KernelSpec, sharing the MoE families' helpers (`moe_spec`). The
fusion pass gives each op its own kernel; the `all_to_all` between them is no kernel (the runtime
calls torch.distributed, runtime/collective.py). Ops and layout: ir/ops/ep.py.

    ep_route     one program: counting sort of the T*k slots into N runs of C rows (int32 workspace [N]),
                 every loop over chunks of slots, rows or ranks, so no tile spans all ranks or slots
    gather_rows  one program per (BP rows, BW columns) tile: index load, row copy, zeros for -1
"""
from __future__ import annotations

import dataclasses

import sympy
from dsr_compiler.ir.graph import Kernel
from dsr_compiler.ir.ops.ep import EP_ROUTE, GATHER_ROWS, ep_capacity
from dsr_compiler.ir.types import DType

from ..lower_common import arg_names, attr_int, fail, next_pow2, static_int
from ..spec import ArgSpec, KernelSpec
from ..views import ScalarPool, prod
from .moe import moe_spec, out_ptr, static_dim, the_moe_op
from .record import KernelFamily


def lower_route(k: Kernel, index: int) -> KernelSpec:
    n = the_moe_op(k, (EP_ROUTE,))
    vals = k.body.values()
    names = arg_names(k.body)
    ids_t = vals[n.inputs[0]].type
    ranks, el = n.attr("n_ranks"), n.attr("local_experts")
    topk = static_dim(k, n, ids_t.shape[1], "k (ids.shape[1])")
    cap = ep_capacity(ids_t.shape[0], topk, el)
    pool = ScalarPool()
    bs = attr_int(k, "block_s", 64)              # the [BS, BS] same-rank comparison of a slot chunk
    ws = ArgSpec("used_ws", "tensor", value=f"{k.name}.used", dtype=DType.i32, role="scratch", shape=(str(ranks),))
    slots = prod(ids_t.shape)
    params = (
        ("BLOCK_S", bs), ("BLOCK_R", attr_int(k, "block_r", 512)),
        ("BLOCK_N", attr_int(k, "block_n", min(1024, max(16, next_pow2(ranks))))),
        ("N", ranks), ("EL", el), ("NSLOTS", pool.lit(slots)), ("NROWS", pool.lit(ranks * cap)), ("CAP", pool.lit(cap)),
        ("IDS", names[("in", n.inputs[0])]), ("SEND", out_ptr(k, n, 0)), ("EID", out_ptr(k, n, 1)),
        ("POS", out_ptr(k, n, 2)), ("COUNTS", out_ptr(k, n, 3)), ("WS", ws.name),
    )
    if not all(dict(params)[p] for p in ("SEND", "EID", "POS")):
        raise fail(k, "ep_route must return its three outputs (send rows, expert ids, slot rows)", n)
    flops = slots * bs * 6 + ranks * 4
    # 8 warps: the [64, 64] comparison's reductions, as in moe_dispatch
    return moe_spec(k, index, "ep_route.py.j2", pool, sympy.Integer(1), params, attr_int(k, "num_warps", 8), 1,
                    flops, scratch=(ws,))


def lower_gather_rows(k: Kernel, index: int) -> KernelSpec:
    n = the_moe_op(k, (GATHER_ROWS,))
    vals = k.body.values()
    names = arg_names(k.body)
    src_t, idx_t = vals[n.inputs[0]].type, vals[n.inputs[1]].type
    width = static_dim(k, n, src_t.shape[1], "the row width")
    pool = ScalarPool(i64=(static_int(src_t.numel) or 0) >= 2**31)
    bw = attr_int(k, "block_w", min(256, max(16, next_pow2(width))))
    bp = attr_int(k, "block_p", max(1, min(64, 4096 // bw)))
    rows = idx_t.shape[0]
    params = (
        ("BLOCK_P", bp), ("BLOCK_W", bw), ("W", width), ("P", pool.lit(rows)), ("M", pool.lit(src_t.shape[0])),
        ("DIV", n.attr("div")), ("ZERO", "0.0" if src_t.dtype.is_float else "0"),
        ("SRC", names[("in", n.inputs[0])]), ("INDEX", names[("in", n.inputs[1])]), ("OUT", out_ptr(k, n, 0)),
    )
    if not params[-1][1]:
        raise fail(k, "gather_rows must return its output", n)
    isz = src_t.dtype.itemsize
    traffic = (rows * (4 + width * isz), rows * width * isz)
    spec = moe_spec(k, index, "gather_rows.py.j2", pool, sympy.ceiling(rows / bp), params,
                    attr_int(k, "num_warps", 4), 1, sympy.Integer(0), traffic)
    return dataclasses.replace(spec, grid=spec.grid + (str(-(-width // bw)),))     # (row tiles, column tiles)


EP_ROUTE_FAMILY = KernelFamily(EP_ROUTE, lower=lower_route, template="ep_route.py.j2", peak="bf16")
GATHER_ROWS_FAMILY = KernelFamily(GATHER_ROWS, lower=lower_gather_rows, template="gather_rows.py.j2", peak="bf16")

__all__ = ["EP_ROUTE_FAMILY", "GATHER_ROWS_FAMILY"]
