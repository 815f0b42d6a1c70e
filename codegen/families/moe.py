"""MoE kernel families: router, dispatch, grouped GEMMs, combine (DESIGN.md §4 "MoE").

Where it sits: four records of codegen/families/ (`MOE_*_FAMILY` at the end), each one Jinja
template (`templates/moe_*.py.j2`) plus one lowering ir.Kernel -> KernelSpec; the helpers for a
kernel of one MoE op (`the_moe_op`, `out_ptr`, `static_dim`, `moe_spec`) serve moe_gemm_fp8.py too.
The fusion pass makes each MoE op its own kernel (family = the op's kind):

    moe_router   one program per 16 tokens: fp32 gate GEMM, scores, group limit, top-k, weights, each
                 a loop over chunks of <= 256 experts through an fp32 workspace [T, E] (+ [T, G])
    moe_dispatch one program: counting sort of the slots into the BM-padded expert layout, counts
                 and row cursors in an int32 workspace [2, E], every loop over chunks of slots or experts
    moe_gemm     one program per (BM-row block, BN-column tile); mode gate_up (gather + SwiGLU) or
                 down (x routing weight, scatter to y_slots rows); unused blocks skip the K loop
    moe_combine  one program per 1024 outputs: fixed-order fp32 sum over the k slots (+ shared)

Grids and sizes are sympy expressions of the token count, evaluated at launch from input shapes:
nothing reads routing results back to the host, and one compiled artifact serves every T.
Index arithmetic that can exceed 2^31 (token rows x H, expert x weight size) runs in int64.
"""
from __future__ import annotations

import sympy
from dsr_compiler.ir.graph import Kernel, Node
from dsr_compiler.ir.ops import OPS, SOURCE
from dsr_compiler.ir.ops.moe import MOE_COMBINE, MOE_DISPATCH, MOE_GEMM, MOE_ROUTER
from dsr_compiler.ir.types import DType, dim_str

from ..lower_common import (
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
from ..spec import ArgSpec, KernelSpec
from ..views import ScalarPool, prod
from .record import KernelFamily


def the_moe_op(k: Kernel, ops: tuple[str, ...]) -> Node:
    """The kernel's one MoE node (its body holds nothing else but constants)."""
    main = [n for n in k.body.nodes if n.op in ops]
    others = [n for n in k.body.nodes if n.op not in ops and OPS[n.op].kind != SOURCE]
    if len(main) != 1 or others:
        bad = others[0] if others else (main[1] if len(main) > 1 else None)
        raise fail(k, f"a {k.family} kernel holds exactly one of {', '.join(ops)}", bad,
                   "the fusion pass gives each MoE op its own kernel")
    n = main[0]
    if any(i not in {v.name for v in k.body.inputs} for i in n.inputs):
        raise fail(k, f"{n.op} must read kernel inputs only", n)
    return n


def out_ptr(k: Kernel, n: Node, j: int) -> str:
    """The pointer argument of output j of node n, or "" when the kernel does not return it."""
    name = n.outputs[j].name
    if name not in k.body.outputs:
        return ""
    return arg_names(k.body)[("out", list(k.body.outputs).index(name))]


def static_dim(k: Kernel, n: Node, d: sympy.Expr, what: str) -> int:
    v = static_int(d)
    if v is None:
        raise fail(k, f"{what} must be static, got {d}", n)
    return v


def moe_spec(k: Kernel, index: int, template: str, pool: ScalarPool, grid: sympy.Expr, params: tuple, num_warps: int,
             num_stages: int, flops: sympy.Expr, traffic: tuple[sympy.Expr, sympy.Expr] | None = None,
             scratch: tuple[ArgSpec, ...] = ()) -> KernelSpec:
    rd, wr = kernel_bytes(k.body) if traffic is None else (dim_str(traffic[0]), dim_str(traffic[1]))
    return KernelSpec(
        name=kernel_name(k, index), family=k.family, template=template,
        args=tuple(tensor_args(k.body)) + scratch + tuple(pool.args), grid=(dim_str(sympy.simplify(grid)),),
        num_warps=num_warps, num_stages=num_stages, params=params, body=(), source_nodes=source_nodes(k.body),
        flops=dim_str(sympy.expand(flops)), bytes_read=rd, bytes_written=wr)


# ----------------------------------------------------------------------------- router

# Router tiles: no register tile spans all experts (65,536 experts compile like 256), and each
# loop chunk holds at most _ROUTER_TILE fp32 values per token row.
_ROUTER_TILE = 256


def lower_router(k: Kernel, index: int) -> KernelSpec:
    n = the_moe_op(k, (MOE_ROUTER,))
    vals = k.body.values()
    names = arg_names(k.body)
    xt, wt = vals[n.inputs[0]].type, vals[n.inputs[1]].type
    a = OPS[n.op].with_defaults(n.attr_dict)
    pool = ScalarPool()
    tokens = xt.shape[0]
    e = static_dim(k, n, wt.shape[0], "the expert count")
    h = static_dim(k, n, xt.shape[1], "the hidden size")
    ng, topk = a["n_group"], a["topk"]
    epg = e // ng
    bt = attr_int(k, "block_t", 16)
    be = attr_int(k, "block_e", min(_ROUTER_TILE, max(16, next_pow2(e))))
    bk = attr_int(k, "block_k", max(16, min(64, 8192 // be)))   # the gate tile [BK, BE] fp32 <= 32 KiB
    bj = min(next_pow2(epg), be)                                 # group pass: [BG groups, BJ members]
    bg = min(next_pow2(ng), max(1, be // bj))
    # fp32 workspaces, this launch only: the scores [T, E] and (with a group limit) the group scores [T, G]
    scratch = [ArgSpec("scores_ws", "tensor", value=f"{k.name}.scores", dtype=DType.f32, role="scratch",
                       shape=(dim_str(tokens), str(e)))]
    if ng > 1:
        scratch.append(ArgSpec("groups_ws", "tensor", value=f"{k.name}.group_scores", dtype=DType.f32,
                               role="scratch", shape=(dim_str(tokens), str(ng))))
    params = (
        ("BLOCK_T", bt), ("BLOCK_E", be), ("BLOCK_K", bk), ("BLOCK_G", bg), ("BLOCK_J", bj),
        ("BLOCK_GS", min(next_pow2(ng), be)), ("BLOCK_W", attr_int(k, "block_w", min(next_pow2(topk), 64))),
        ("T", pool.lit(tokens)), ("H", h), ("E", e),
        ("TOPK", topk), ("N_GROUP", ng), ("EPG", epg), ("TOPK_GROUP", a["topk_group"]), ("SCORING", a["scoring"]),
        ("GROUP_SCORE", a["group_score"]), ("ROUTE_SCALE", repr(float(a["route_scale"]))),
        ("NORM", bool(a["norm_topk"])),
        ("X", names[("in", n.inputs[0])]), ("GW", names[("in", n.inputs[1])]),
        ("BIAS", names[("in", n.inputs[2])] if len(n.inputs) == 3 else ""),
        ("W_OUT", out_ptr(k, n, 0)), ("IDS_OUT", out_ptr(k, n, 1)),
        ("SCORES", scratch[0].name), ("GROUPS", scratch[1].name if ng > 1 else ""),
    )
    flops = 2 * tokens * e * h + tokens * e * (8 + 4 * topk + 6 * ng)
    return moe_spec(k, index, "moe_router.py.j2", pool, sympy.ceiling(tokens / bt), params,
                    attr_int(k, "num_warps", 4 if be <= 64 else 8), attr_int(k, "num_stages", 2), flops,
                    scratch=tuple(scratch))


# ----------------------------------------------------------------------------- dispatch

# Dispatch tiles: a counting sort over chunks of slots and of experts, so, like the router, no
# register tile spans all experts; the zero/scan passes hold at most _DISPATCH_TILE counts.
_DISPATCH_TILE = 1024


def lower_dispatch(k: Kernel, index: int) -> KernelSpec:
    n = the_moe_op(k, (MOE_DISPATCH,))
    vals = k.body.values()
    names = arg_names(k.body)
    ids_t = vals[n.inputs[0]].type
    e, bm = n.attr("n_experts"), n.attr("block_m")
    rows_t, blocks_t = n.outputs[0].type, n.outputs[1].type
    pool = ScalarPool()
    bs = attr_int(k, "block_s", 64)          # the [BS, BS] same-expert comparison of a slot chunk
    steps = e.bit_length()                     # binary search over E expert starts
    # int32 workspace, this launch only: [counts; starts, then next free rows] per expert
    ws = ArgSpec("counts_ws", "tensor", value=f"{k.name}.counts", dtype=DType.i32, role="scratch",
                 shape=("2", str(e)))
    slots, rows, nb = prod(ids_t.shape), rows_t.shape[0], blocks_t.shape[0]
    params = (
        ("BLOCK_S", bs), ("BLOCK_E", attr_int(k, "block_e", min(_DISPATCH_TILE, max(16, next_pow2(e))))),
        ("BLOCK_R", attr_int(k, "block_r", 512)), ("E", e), ("BM", bm), ("STEPS", steps),
        ("NSLOTS", pool.lit(slots)), ("R", pool.lit(rows)), ("NB", pool.lit(nb)),
        ("IDS", names[("in", n.inputs[0])]), ("ROWS_OUT", out_ptr(k, n, 0)), ("BLK_OUT", out_ptr(k, n, 1)),
        ("WS", ws.name),
    )
    flops = slots * bs * 6 + e * 8 + nb * steps * 3
    # 8 warps: with 4, the [64, 64] comparison's reductions take 122 registers (40 with 8)
    return moe_spec(k, index, "moe_dispatch.py.j2", pool, sympy.Integer(1), params,
                    attr_int(k, "num_warps", 8), 1, flops, scratch=(ws,))


# ----------------------------------------------------------------------------- grouped GEMMs

def lower_moe_gemm(k: Kernel, index: int) -> KernelSpec:
    n = the_moe_op(k, ("moe_gemm_gate_up", "moe_gemm_down"))
    vals = k.body.values()
    names = arg_names(k.body)
    gate_up = n.op == "moe_gemm_gate_up"
    a_t, rows_t, blocks_t, w_t = (vals[i].type for i in n.inputs[:4])
    out_t = n.outputs[0].type
    bm = n.attr("block_m")
    if bm < 16 or bm & (bm - 1):
        raise fail(k, f"block_m={bm} must be a power of two >= 16 (a tl.dot tile)", n,
                   "the frontend picks block_m (frontend/lowerings/moe.py BLOCK_M)")
    e = static_dim(k, n, w_t.shape[0], "the expert count")
    kd = static_dim(k, n, a_t.shape[1], "the reduction dim")
    width = static_dim(k, n, w_t.shape[1], "the weight rows")
    nn_ = width // 2 if gate_up else width
    f32 = a_t.dtype is DType.f32
    pool = ScalarPool()
    bn = attr_int(k, "block_n", min(64 if f32 else 128, max(16, next_pow2(nn_))))
    bk = attr_int(k, "block_k", min(64, max(16, next_pow2(kd))))
    rows = rows_t.shape[0]
    round_to = {DType.bf16: "bf16", DType.f16: "f16"}.get(a_t.dtype, "")
    params = (
        ("MODE", "gate_up" if gate_up else "down"), ("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK_K", bk),
        ("N", nn_), ("KD", kd), ("R", pool.lit(rows)), ("EVEN_K", kd % bk == 0),
        ("TOPK", n.attr("topk") if gate_up else 0), ("W_ESTRIDE", width * kd), ("UP_OFF", nn_ * kd if gate_up else 0),
        ("PRECISION", "ieee" if f32 else ""), ("OUT_DTYPE", out_t.dtype), ("ROUND", round_to),
        ("A", names[("in", n.inputs[0])]), ("ROWS", names[("in", n.inputs[1])]),
        ("BLK", names[("in", n.inputs[2])]), ("W", names[("in", n.inputs[3])]),
        ("WTS", "" if gate_up else names[("in", n.inputs[4])]), ("OUT", out_ptr(k, n, 0)),
    )
    if not params[-1][1]:
        raise fail(k, f"{n.op} must return its output", n)
    slots = rows - e * (bm - 1)                 # T*k: the rows that hold real work
    flops = 2 * slots * width * kd + slots * nn_ * (5 if gate_up else 2)
    # modeled DRAM traffic: the real rows, and only the experts that can be hit (at most T*k)
    isz = a_t.dtype.itemsize
    layout = 4 * (rows + blocks_t.shape[0])
    if gate_up:
        traffic = (slots * kd * isz + sympy.Min(e, slots) * width * kd * isz + layout, rows * nn_ * isz)
    else:
        traffic = (slots * (kd * isz + 4) + sympy.Min(e, slots) * width * kd * isz + layout, slots * nn_ * 4)
    big = bm * bn * (2 if gate_up else 1) >= 64 * 128 * 2
    grid = blocks_t.shape[0] * ((nn_ + bn - 1) // bn)
    return moe_spec(k, index, "moe_gemm.py.j2", pool, grid, params, attr_int(k, "num_warps", 8 if big else 4),
                    attr_int(k, "num_stages", 3), flops, traffic)


# ----------------------------------------------------------------------------- combine

def lower_combine(k: Kernel, index: int) -> KernelSpec:
    n = the_moe_op(k, (MOE_COMBINE,))
    names = arg_names(k.body)
    out_t = n.outputs[0].type
    h = static_dim(k, n, out_t.shape[1], "the hidden size")
    pool = ScalarPool()
    numel = prod(out_t.shape)
    block = attr_int(k, "block", 1024)
    params = (
        ("TOPK", n.attr("topk")), ("H", h), ("BLOCK", block), ("NUMEL", pool.lit(numel)),
        ("YS", names[("in", n.inputs[0])]), ("SHARED", names[("in", n.inputs[1])] if len(n.inputs) == 2 else ""),
        ("OUT", out_ptr(k, n, 0)), ("OUT_DTYPE", out_t.dtype),
    )
    return moe_spec(k, index, "moe_combine.py.j2", pool, sympy.ceiling(numel / block), params,
                    attr_int(k, "num_warps", 4), 1, numel * n.attr("topk"))


MOE_ROUTER_FAMILY = KernelFamily(MOE_ROUTER, lower=lower_router, template="moe_router.py.j2", peak="bf16")
MOE_DISPATCH_FAMILY = KernelFamily(MOE_DISPATCH, lower=lower_dispatch, template="moe_dispatch.py.j2", peak="bf16")
MOE_GEMM_FAMILY = KernelFamily(MOE_GEMM, lower=lower_moe_gemm, template="moe_gemm.py.j2", peak="bf16")
MOE_COMBINE_FAMILY = KernelFamily(MOE_COMBINE, lower=lower_combine, template="moe_combine.py.j2", peak="bf16")

__all__ = ["MOE_COMBINE_FAMILY", "MOE_DISPATCH_FAMILY", "MOE_GEMM_FAMILY", "MOE_ROUTER_FAMILY", "moe_spec",
           "out_ptr", "static_dim", "the_moe_op"]
