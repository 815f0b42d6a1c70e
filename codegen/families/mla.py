"""MLA kernel families (DESIGN.md §4 "MLA"): RoPE tables, the KV-cache write, the naive flash
attention with two dots, and the absorbed split-KV decode with its exact combine.

Where it sits: five records of codegen/families/ (`*_FAMILY` at the end), one Jinja template and
one lowering ir.Kernel -> KernelSpec each. The fusion pass makes
each MLA op its own kernel (family = the op's kind); `mla_attention` and `mla_decode` kernels also
hold the slice/permute/expand views of their operands (a fusion GROUP_RULE in ir/passes/absorb_mla.py),
read through strides:

    rope_table     one program per BLOCK elements of the [.., S, rope] tables: cos/sin of pos * inv_freq
    index_copy     one program per (outer index, BLOCK_N rows): row n takes src[hit] where index[hit] == n
                   (the last hit), else x[n] -- the decode's cache write as one copy; program 0 also
                   flags an index outside [0, N) in the runtime-check buffer (role "check")
    mla_attention  flash attention (templates/flash.j2, shared with `attention`): one program per
                   (batch, head, query block); q·k = q_nope·k_nope + q_pe·k_pe (two dots, k_pe read with
                   head stride 0: one copy for all heads), separate v dim, causal or position mask
    mla_decode     absorbed decode, split-KV: one program per (batch, BLOCK_H rows of (query, head),
                   split of SPLIT keys); every head of a program scores the same latent tile
                   (q_lat·kv + q_pe·pe), online softmax, writes the split's normalized latent output
                   and its log-sum-exp
    mla_combine    one program per (batch, query, head) row: Σ_i e^(lse_i - M) o_i / Σ_i e^(lse_i - M)

Index arithmetic over caches (B·S_max·kv_lora can exceed 2^31) runs in int64.
"""
from __future__ import annotations

from collections.abc import Sequence

import sympy
from dsr_compiler.ir.graph import Kernel, Node
from dsr_compiler.ir.ops import OPS, SOURCE
from dsr_compiler.ir.types import DType, dim_str, to_expr

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
from ..spec import ArgSpec, KernelSpec
from ..views import (
    Axis,
    IndexBuilder,
    ScalarPool,
    View,
    ViewError,
    apply_layout,
    broadcast_strides,
    prod,
)
from .attention import flash_pairs, flash_tiles
from .record import KernelFamily

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
ZERO = sympy.Integer(0)
P_DTYPES = {DType.bf16: "tl.bfloat16", DType.f16: "tl.float16"}


# ----------------------------------------------------------------------------- shared helpers

def _the_op(k: Kernel, op: str, views_ok: bool = False,
            iota_ok: bool = False) -> tuple[Node, dict[str, tuple[str, View]]]:
    """The kernel's one `op` node and the strided views of its operands (layout ops on inputs);
    with `iota_ok`, `iota` nodes too (the caller reads them as indices: see `_iota_inputs`)."""
    g = k.body
    views: dict[str, tuple[str, View]] = {v.name: (v.name, View.contiguous(v.type.shape)) for v in g.inputs}
    views.update({n.out.name: ("", View.contiguous(n.out.type.shape)) for n in g.nodes
                  if iota_ok and n.op == "iota"})
    main = [n for n in g.nodes if n.op == op]
    others = [n for n in g.nodes if n.op != op and OPS[n.op].kind != SOURCE
              and not (views_ok and n.op in INDEX_MAP_OPS) and not (iota_ok and n.op == "iota")]
    if len(main) != 1 or others:
        bad = others[0] if others else (main[1] if len(main) > 1 else None)
        extra = " and index-map layout ops on its inputs" if views_ok else ""
        raise fail(k, f"a {k.family} kernel holds exactly one {op}{extra}", bad,
                   "the fusion pass gives each MLA op its own kernel")
    for n in g.nodes:
        if n.op in INDEX_MAP_OPS and views_ok:
            if n.inputs[0] not in views:
                raise fail(k, f"{n.op} of %{n.inputs[0]}, a value computed inside the kernel", n)
            base, v = views[n.inputs[0]]
            try:
                views[n.out.name] = (base, apply_layout(v, n.op, n.attr_dict, n.out.type.shape))
            except ViewError as e:
                raise fail(k, f"{n.op} cannot be an index map: {e}", n) from None
    node = main[0]
    for i in node.inputs:
        if i not in views:
            raise fail(k, f"{op} must read kernel inputs (or views of them), %{i} is computed in the kernel", node)
    return node, views


def _strides(k: Kernel, node: Node, views: dict, name: str, shape: Sequence[sympy.Expr]) -> tuple[sympy.Expr, ...]:
    try:
        return broadcast_strides(views[name][1], tuple(shape))
    except ViewError as e:
        raise fail(k, f"operand %{name}: {e}", node) from None


def _static_dim(k: Kernel, n: Node, d: sympy.Expr, what: str) -> int:
    v = static_int(d)
    if v is None:
        raise fail(k, f"{what} must be static, got {d}", n)
    return v


def _pad(n: int) -> int:
    return max(16, next_pow2(n))


def _spec(k: Kernel, index: int, template: str, pool: ScalarPool, grid: sympy.Expr, params: tuple, num_warps: int,
          num_stages: int, flops: sympy.Expr, body: tuple = (), checks: tuple[ArgSpec, ...] = ()) -> KernelSpec:
    rd, wr = kernel_bytes(k.body)
    return KernelSpec(
        name=kernel_name(k, index), family=k.family, template=template,
        args=tuple(tensor_args(k.body)) + checks + tuple(pool.args), grid=(dim_str(sympy.simplify(grid)),),
        num_warps=num_warps, num_stages=num_stages, params=params, body=body, source_nodes=source_nodes(k.body),
        flops=dim_str(sympy.expand(flops)), bytes_read=rd, bytes_written=wr)


def _out_ptr(k: Kernel, n: Node, j: int) -> str:
    name = n.outputs[j].name
    if name not in k.body.outputs:
        return ""
    return arg_names(k.body)[("out", list(k.body.outputs).index(name))]


# ----------------------------------------------------------------------------- rope_table

def lower_rope_table(k: Kernel, index: int) -> KernelSpec:
    n, _ = _the_op(k, "rope_table")
    names = arg_names(k.body)
    vals = k.body.values()
    pos_t, freq_t = vals[n.inputs[0]].type, vals[n.inputs[1]].type
    r = _static_dim(k, n, freq_t.shape[0], "the RoPE width") * 2
    rows = pos_t.numel
    numel = rows * r
    pool = ScalarPool(i64=bool(k.attr("index_i64", False)))
    block = attr_int(k, "block", 256)
    params = (("BLOCK", block), ("R", r), ("NUMEL", pool.lit(numel)), ("FACTOR", repr(float(n.attr("attn_factor", 1.0)))),
              ("POS", names[("in", n.inputs[0])]), ("FREQ", names[("in", n.inputs[1])]),
              ("COS", _out_ptr(k, n, 0)), ("SIN", _out_ptr(k, n, 1)))
    return _spec(k, index, "rope_table.py.j2", pool, sympy.ceiling(numel / block), params, 4, 1, numel * 3)


# ----------------------------------------------------------------------------- index_copy

def lower_index_copy(k: Kernel, index: int) -> KernelSpec:
    n, views = _the_op(k, "index_copy", views_ok=True)
    names = arg_names(k.body)
    vals = k.body.values()
    xt, it, _st = (vals[i].type for i in n.inputs)
    for pos, name in enumerate(n.inputs):
        base, view = views[name]
        if not view.is_contiguous() or (pos > 0 and base != name):
            raise fail(k, f"index_copy reads %{name} through a view that is not one contiguous block", n,
                       "only the cache may be a view: a leading-dim slice of a stacked cache")
    x_base, x_view = views[n.inputs[0]]
    d = n.attr("dim") % xt.rank
    outer, rows, inner = prod(xt.shape[:d]), xt.shape[d], prod(xt.shape[d + 1:])
    length = it.shape[0]
    pool = ScalarPool(i64=True)
    static_q, static_l = static_int(inner), static_int(length)
    bq = attr_int(k, "block_q", min(256, next_pow2(static_q)) if static_q is not None else 256)
    bj = attr_int(k, "block_j", min(32, max(2, next_pow2(static_l))) if static_l is not None else 32)
    bn = attr_int(k, "block_n", 32)
    params = (("BLOCK_N", bn), ("BLOCK_J", bj), ("BLOCK_Q", bq), ("N", pool.lit(rows)), ("L", pool.lit(length)),
              ("Q", pool.lit(inner)),
              ("X", names[("in", x_base)]), ("X_OFF", pool.lit(x_view.offset)), ("IDX", names[("in", n.inputs[1])]),
              ("SRC", names[("in", n.inputs[2])]), ("OUT", names[("out", 0)]), ("ERR", "err_check"))
    grid = outer * sympy.ceiling(rows / bn)
    # An index outside [0, N) would silently drop its row (torch raises): the kernel flags it in a
    # runtime-owned error buffer that CompiledModule.check() reads (runtime/plan.py)
    err = ArgSpec("err_check", "tensor", value=f"{k.name}.check", dtype=DType.i64, role="check", shape=("2",),
                  expr=dim_str(rows))
    return _spec(k, index, "index_copy.py.j2", pool, grid, params, 4, 1, outer * rows * length, checks=(err,))


# ----------------------------------------------------------------------------- mla_attention (naive, flash)

def _operand(k: Kernel, node: Node, views: dict, names: dict, ix: IndexBuilder, pool: ScalarPool, name: str,
             shape: Sequence[sympy.Expr], perm: Sequence[int]) -> tuple[str, tuple, str, str, str]:
    """(pointer, batch index terms, offset, seq stride, head-dim stride) of an operand whose dims,
    reordered by `perm`, are [batch..., seq, head dim] (batch = (B, H); a missing H has stride 0)."""
    st = _strides(k, node, views, name, shape)
    st = tuple(st[p] if p >= 0 else ZERO for p in perm)
    return (names[("in", views[name][0])], ix.terms(st[:-2] + (ZERO, ZERO)), pool.lit(views[name][1].offset),
            pool.lit(st[-2]), pool.lit(st[-1]))


def _positions(k: Kernel, node: Node, views: dict, names: dict, pool: ScalarPool, name: str,
               size: sympy.Expr) -> tuple[str, str, str]:
    st = _strides(k, node, views, name, (size,))
    return names[("in", views[name][0])], pool.lit(views[name][1].offset), pool.lit(st[0])


def lower_mla_attention(k: Kernel, index: int) -> KernelSpec:
    n, views = _the_op(k, "mla_attention", views_ok=True)
    g = k.body
    vals = g.values()
    names = arg_names(g)
    qn, qp, kn, kp, v = (vals[i].type for i in n.inputs[:5])
    if len({qn.dtype, qp.dtype, kn.dtype, kp.dtype, v.dtype}) != 1:
        raise fail(k, "q_nope, q_pe, k_nope, k_pe and v need one dtype (the MMA operands)", n)
    if list(g.outputs) != [n.out.name]:
        raise fail(k, f"must return only the attention output %{n.out.name}, returns {list(g.outputs)}")
    b, sq, h, dn = qn.shape
    sk, dr, dv = kn.shape[1], qp.shape[3], v.shape[3]
    sdn, sdr, sdv = (_static_dim(k, n, x, what) for x, what in ((dn, "the nope head dim"), (dr, "the rope head dim"),
                                                              (dv, "the v head dim")))
    pool = ScalarPool(i64=bool(k.attr("index_i64", False)))
    ix = IndexBuilder((b, h, sympy.Integer(1), sympy.Integer(1)),
                      (Axis("pid_b", (0, 1)), Axis("seq", (2,)), Axis("hd", (3,))), pool)
    bshd = (0, 2, 1, 3)                        # [B, S, H, D] -> [B, H, S, D]
    params_ops = (
        ("QN", _operand(k, n, views, names, ix, pool, n.inputs[0], qn.shape, bshd)),
        ("QP", _operand(k, n, views, names, ix, pool, n.inputs[1], qp.shape, bshd)),
        ("KN", _operand(k, n, views, names, ix, pool, n.inputs[2], kn.shape, bshd)),
        ("KP", _operand(k, n, views, names, ix, pool, n.inputs[3], kp.shape, (0, -1, 1, 2))),
        ("V", _operand(k, n, views, names, ix, pool, n.inputs[4], v.shape, bshd)),
    )
    ost = View.contiguous(n.out.type.shape).strides
    ost = tuple(ost[p] for p in bshd)
    o = (names[("out", 0)], ix.terms(ost[:2] + (ZERO, ZERO)), "0", pool.lit(ost[2]), pool.lit(ost[3]))
    causal = len(n.inputs) == 5
    qpos = kpos = ("", "0", "0")
    if not causal:
        qpos = _positions(k, n, views, names, pool, n.inputs[5], sq)
        kpos = _positions(k, n, views, names, pool, n.inputs[6], sk)
    f32 = qn.dtype is DType.f32
    bm, bn, num_warps = flash_tiles(k, sq, f32)          # tiles as the `attention` family
    scale = float(n.attr("scale"))
    params = (
        ("BLOCK_M", bm), ("BLOCK_N", bn), ("DN", sdn), ("DR", sdr), ("DV", sdv),
        ("DN_PAD", _pad(sdn)), ("DR_PAD", _pad(sdr)), ("DV_PAD", _pad(sdv)),
        ("SQ", pool.lit(sq)), ("SK", pool.lit(sk)), ("CAUSAL", causal),
        ("QK_SCALE", repr(scale * LOG2E)), ("PRECISION", "ieee" if f32 else ""),
        ("P_DTYPE", P_DTYPES.get(qn.dtype, "tl.float32")),
    ) + params_ops + (("O", o), ("QPOS", qpos), ("KPOS", kpos))
    nb = prod((b, h))
    flops = 2 * nb * flash_pairs(sq, sk, causal) * (sdn + sdr + sdv)
    return _spec(k, index, "mla_attention.py.j2", pool, sympy.ceiling(sq / bm) * nb, params, num_warps,
                 attr_int(k, "num_stages", 2), flops, body=(("coords", tuple(ix.coords)),))


# ----------------------------------------------------------------------------- mla_decode (absorbed, split-KV)

def lower_mla_decode(k: Kernel, index: int) -> KernelSpec:
    n, views = _the_op(k, "mla_decode", views_ok=True, iota_ok=True)
    g = k.body
    vals = g.values()
    names = arg_names(g)
    ql, qp, kv, pe = (vals[i].type for i in n.inputs[:4])
    if len({ql.dtype, qp.dtype, kv.dtype, pe.dtype}) != 1:
        raise fail(k, "q_lat, q_pe and the two caches need one dtype (the MMA operands)", n)
    b, sq, h, c = ql.shape
    t, r = kv.shape[1], pe.shape[2]
    sc = _static_dim(k, n, c, "kv_lora (the latent width)")
    sr = _static_dim(k, n, r, "the rope head dim")
    split = int(n.attr("split"))
    ns = sympy.ceiling(to_expr(t) / split)
    pool = ScalarPool(i64=True)
    lit = pool.lit

    def st(i: int, shape) -> tuple[str, ...]:
        return tuple(lit(x) for x in _strides(k, n, views, n.inputs[i], shape))

    def base(i: int) -> tuple[str, str]:
        return names[("in", views[n.inputs[i]][0])], lit(views[n.inputs[i]][1].offset)

    def positions(i: int, size: sympy.Expr) -> tuple[str, ...]:
        if views[n.inputs[i]][0] == "":           # an iota in the kernel: the position is the index itself
            return ("", "0", "1")
        return base(i) + st(i, (size,))
    for i in range(4):
        if views[n.inputs[i]][0] == "":
            raise fail(k, f"operand %{n.inputs[i]} is an iota; only positions may be", n)
    f32 = ql.dtype is DType.f32
    # Tiles: every row of a program (a (query, head) pair) scores the same [BLOCK_N, kv_lora] latent
    # tile, so a program is a [BLOCK_H, kv_lora] x [kv_lora, BLOCK_N] MMA. ptxas for sm_90a at
    # DeepSeek-V3 (kv_lora 512, rope 64), bf16: 16 x 32 on 8 warps, 72 registers, no spills, 82 KiB
    # smem (4 warps spill); fp32 (exact FMA dots) keeps BLOCK_N at 16.
    bh = attr_int(k, "block_h", 16)
    bn = attr_int(k, "block_n", 16 if f32 else 32)
    num_warps = attr_int(k, "num_warps", 4 if f32 else 8)
    rows = sq * h
    params = (
        ("BLOCK_H", bh), ("BLOCK_N", bn), ("C", sc), ("R", sr), ("C_PAD", _pad(sc)), ("R_PAD", _pad(sr)),
        ("SPLIT", split), ("NS", lit(ns)), ("H", lit(h)), ("ROWS", lit(rows)), ("T", lit(t)),
        ("QK_SCALE", repr(float(n.attr("scale")) * LOG2E)), ("LN2", repr(LN2)),
        ("PRECISION", "ieee" if f32 else ""), ("P_DTYPE", P_DTYPES.get(ql.dtype, "tl.float32")),
        ("QL", base(0) + st(0, ql.shape)), ("QP", base(1) + st(1, qp.shape)),
        ("KV", base(2) + st(2, kv.shape)), ("PE", base(3) + st(3, pe.shape)),
        ("QPOS", positions(4, sq)), ("KPOS", positions(5, t)),
        ("O", _out_ptr(k, n, 0)), ("LSE", _out_ptr(k, n, 1)),
    )
    if not params[-2][1] or not params[-1][1]:
        raise fail(k, "must return both the partial outputs and their log-sum-exp", n)
    grid = b * sympy.ceiling(rows / bh) * ns
    flops = 2 * b * rows * t * (2 * sc + sr)
    return _spec(k, index, "mla_decode.py.j2", pool, grid, params, num_warps, attr_int(k, "num_stages", 2), flops)


def lower_mla_combine(k: Kernel, index: int) -> KernelSpec:
    n, _ = _the_op(k, "mla_combine")
    names = arg_names(k.body)
    vals = k.body.values()
    ot = vals[n.inputs[0]].type
    b, sq, h, ns, c = ot.shape
    sc = _static_dim(k, n, c, "kv_lora (the latent width)")
    pool = ScalarPool(i64=True)
    static_ns = static_int(ns)
    bs = attr_int(k, "block_s", min(16, max(2, next_pow2(static_ns))) if static_ns is not None else 16)
    rows = b * sq * h
    params = (("BLOCK_S", bs), ("C", sc), ("C_PAD", _pad(sc)), ("NS", pool.lit(ns)), ("LOG2E", repr(LOG2E)),
              ("O_PART", names[("in", n.inputs[0])]), ("LSE", names[("in", n.inputs[1])]), ("OUT", names[("out", 0)]),
              ("OUT_DTYPE", n.out.type.dtype))
    return _spec(k, index, "mla_combine.py.j2", pool, rows, params, attr_int(k, "num_warps", 4), 1,
                 rows * ns * (sc * 2 + 2))


# ----------------------------------------------------------------------------- the family records
# (which nodes share an MLA kernel is decided in ir/passes/absorb_mla.py, a fusion GROUP_RULE)

ROPE_TABLE_FAMILY = KernelFamily("rope_table", lower=lower_rope_table, template="rope_table.py.j2", peak="bf16")
INDEX_COPY_FAMILY = KernelFamily("index_copy", lower=lower_index_copy, template="index_copy.py.j2", peak="bf16")
MLA_ATTENTION_FAMILY = KernelFamily("mla_attention", lower=lower_mla_attention, template="mla_attention.py.j2",
                                    peak="bf16")
MLA_DECODE_FAMILY = KernelFamily("mla_decode", lower=lower_mla_decode, template="mla_decode.py.j2", peak="bf16")
MLA_COMBINE_FAMILY = KernelFamily("mla_combine", lower=lower_mla_combine, template="mla_combine.py.j2", peak="bf16")

__all__ = ["INDEX_COPY_FAMILY", "LN2", "LOG2E", "MLA_ATTENTION_FAMILY", "MLA_COMBINE_FAMILY", "MLA_DECODE_FAMILY",
           "ROPE_TABLE_FAMILY"]
