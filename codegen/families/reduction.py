"""Kernel family `reduction`: one last-dim reduction (rms_norm, softmax, log_softmax, sum, mean, amax)
with its pointwise prologue and epilogue, one program per row.

Where it sits: one record of codegen/families/ (`REDUCTION_FAMILY`). Triton:
templates/reduction.py.j2 (a single row tile, or a loop over row chunks for long rows); direct PTX:
templates/reduction.ptx.j2 (`reduction_ptx`; sum, sum of squares, max), a CTA per row. The statement
program is split into phases: pass1 (prologue + accumulate), finish (per-row scalars), pass2
(epilogue).
"""
from __future__ import annotations

import sympy
from dsr_compiler.ir.graph import Kernel
from dsr_compiler.ir.ops import OPS, POINTWISE, REDUCTION, last_dim_reductions
from dsr_compiler.ir.types import DType, dim_str

from ..lower_body import Body
from ..lower_common import (
    INDEX_MAP_OPS,
    attr_int,
    closure,
    fail,
    kernel_bytes,
    kernel_name,
    next_pow2,
    pointwise_flops,
    source_nodes,
    static_int,
    tensor_args,
)
from ..ptx_emit import PtxCode, PtxUnsupported, pass2_with_pass1, ptx_code, ptx_operand, ptx_setup
from ..spec import KernelSpec, Stmt
from ..views import Axis, ScalarPool, View, broadcast_strides, prod, same
from .record import KernelFamily, PtxProgram

LAST_DIM_REDUCTIONS = last_dim_reductions()     # the reductions this family takes (`OpDef.last_dim_reduction`)


def lower_reduction(k: Kernel, index: int) -> KernelSpec:
    """A reduction kernel: one row per program, the reduced (last) dim walked in BLOCK_N chunks."""
    g = k.body
    reds = [n for n in g.nodes if OPS[n.op].kind == REDUCTION]
    if len(reds) != 1:
        raise fail(k, f"needs exactly one reduction op, found {len(reds)}",
                   reds[1] if len(reds) > 1 else None)
    red = reds[0]
    if red.op not in LAST_DIM_REDUCTIONS:
        raise fail(k, f"{red.op} is not a supported reduction", red)
    xt = g.values()[red.inputs[0]].type
    if xt.rank < 1 or red.attr("dim", -1) % xt.rank != xt.rank - 1:
        raise fail(k, f"{red.op} reduces dim {red.attr('dim')} of {xt}; only the last dim is supported", red,
                   "permute the reduced dim last before the reduction")
    if not xt.dtype.is_float:
        raise fail(k, f"{red.op} over {xt.dtype.value} values is not supported (float only)", red)
    shape = xt.shape
    lead, ncols = shape[:-1], shape[-1]
    pool = ScalarPool(i64=bool(k.attr("index_i64", False)))
    axes = [Axis("row", tuple(range(len(lead)))), Axis("cols", (len(lead),))]
    body = Body(k, pool, shape, axes, "cmask", {"cols": "cmask"})
    body.check_layouts()
    n_lit = pool.lit(ncols)
    keepdim = bool(red.attr("keepdim", False))
    # which values depend on the reduction (epilogue) and which use the no-keepdim layout
    post: set[str] = set()
    lstyle: set[str] = set()
    red_kind = {"sum": "sum", "mean": "sum", "amax": "max", "rms_norm": "sumsq",
                "softmax": "softmax", "log_softmax": "softmax"}[red.op]
    red_src = ""
    for n in g.nodes:
        kind = OPS[n.op].kind
        if n is red:
            src = body.use(red.inputs[0], n)
            # a row-constant value (a size-1 row) still sums / maxes: the templates spread it over the
            # row tile with tl.where(cmask, src, neutral); row-shaped results need a varying value
            if not body.vec[src] and red.op not in ("sum", "mean", "amax"):
                raise body.fail(n, f"the row {red.op} reduces does not vary along it (a size-1 or broadcast row)",
                                "every element of such a row is equal: softmax of it is 1/N, log_softmax -log(N), "
                                "rms_norm x * rsqrt(x*x + eps) * w; write those as pointwise ops in the model")
            red_src = body.convert(src, "f32")
            o = n.out.name
            if red.op in ("sum", "mean", "amax"):
                fin = {"sum": ("sum_finish", ("r_acc",)), "mean": ("mean_finish", ("r_acc", n_lit)),
                       "amax": ("amax_finish", ("r_max",))}[red.op]
                body.var[o] = body.define(Stmt(fin[0], body.fresh(o), fin[1], (), n.out.type.dtype), False, "f32")
                if not keepdim and len(lead):
                    lstyle.add(o)
            elif red.op == "rms_norm":
                w = body.convert(body.use(red.inputs[1], n), "f32")
                rinv = body.define(Stmt("rms_finish", body.fresh(o + "_rinv"),
                                        ("r_acc", n_lit, repr(float(red.attr("eps")))), (), DType.f32), False, "f32")
                body.var[o] = body.define(Stmt("rms_apply", body.fresh(o), (red_src, rinv, w), (), n.out.type.dtype),
                                          True, "f32")
            else:
                body.var[o] = body.define(Stmt(f"{red.op}_apply", body.fresh(o), (red_src, "r_max", "r_sum"), (),
                                               n.out.type.dtype), True, "f32")
            post.add(o)
            continue
        if kind == REDUCTION:
            raise body.fail(n, "a second reduction in one kernel")
        is_post = any(x in post for x in n.inputs)
        if n.op == "const":
            body.const(n)
        elif n.op in INDEX_MAP_OPS:
            body.record_layout(n)
        elif kind == POINTWISE:
            ot = n.out.type
            per_row = (not keepdim and len(lead) > 0 and ot.rank == len(lead)
                       and all(same(a, b) for a, b in zip(ot.shape, lead)))
            if per_row or any(x in lstyle for x in n.inputs):
                for x in n.inputs:
                    xt_ = g.values()[x].type
                    if x in lstyle or xt_.rank == 0:
                        continue
                    if x in body.views and x not in body.var and xt_.rank == len(lead) \
                            and all(same(a, b) for a, b in zip(xt_.shape, lead)):
                        # a per-row kernel input (e.g. an upstream gradient [rows]): read it per row,
                        # not broadcast against the row elements (numpy would align it with the last dim)
                        st = broadcast_strides(body.views[x][1], lead) + (sympy.Integer(0),)
                        body.var[x] = body.load(x, n, strides=st, hint=x)
                        lstyle.add(x)
                        continue
                    raise body.fail(n, f"mixes the keepdim=False result of {red.op} with row values; numpy "
                                       "broadcasting would align it with the wrong dims", "use keepdim=True")
                lstyle.add(n.out.name)
            body.pointwise(n)
        else:
            raise body.fail(n, f"{n.op} ({kind}) cannot be part of a reduction kernel")
        if is_post:
            post.add(n.out.name)
    # stores: E outputs (row shape) go with their phase, R outputs (per row) after the reduction
    vals = g.values()
    row_shapes = (tuple(lead), tuple(lead) + (sympy.Integer(1),))
    e_roots: list[int] = []    # store statement indices, by phase
    pre_roots: list[int] = []
    r_roots: list[int] = []
    for i, oname in enumerate(g.outputs):
        o = vals[oname]
        var = body.var.get(oname) or body.use(oname, None)
        full = o.type.rank == len(shape) and all(same(a, b) for a, b in zip(o.type.shape, shape))
        if full and body.vec[var]:
            body.store(o, i, None)
            (e_roots if oname in post else pre_roots).append(len(body.stmts) - 1)
        elif not body.vec[var] and any(o.type.rank == len(rs) and all(same(a, b) for a, b in zip(o.type.shape, rs))
                                       for rs in row_shapes):
            flat = View.contiguous(lead).strides
            body.store(o, i, None, mask="", strides=tuple(flat) + (sympy.Integer(0),))
            r_roots.append(len(body.stmts) - 1)
        else:
            raise fail(k, f"output %{oname} : {o.type} is neither a row value {xt} nor a per-row value "
                          f"[{', '.join(map(dim_str, row_shapes[1]))}]")
    stmts = body.stmts
    src_idx = next(i for i, s in enumerate(stmts) if s.out == red_src)
    static_n = static_int(ncols)
    looped = static_n is None or static_n > attr_int(k, "max_single_block", 8192)
    if looped:
        block_n = attr_int(k, "block_n", 1024 if static_n is None else 4096)
    else:
        block_n = attr_int(k, "block_n", max(32, next_pow2(static_n)))
    # Phases: pass1 (row chunks: prologue + accumulate), finish (per-row scalars, top level),
    # pass2 (row chunks: epilogue). Per-row values never depend on row elements except through
    # the accumulators, so everything pass2 needs that is scalar is hoisted into finish.
    pass1 = closure(stmts, [src_idx] + pre_roots, set())
    c2 = closure(stmts, e_roots, set())
    finish = closure(stmts, r_roots + [i for i in c2 if stmts[i].out and not body.vec[stmts[i].out]], set())
    have = {stmts[i].out for i in finish if stmts[i].out}
    if not looped:
        finish = [i for i in finish if i not in pass1]
        have |= {stmts[i].out for i in pass1 if stmts[i].out}
    skip = set(finish) | (set() if looped else set(pass1))
    pass2 = [i for i in closure(stmts, e_roots, have) if i not in skip]
    blocks = (("pass1", pass1), ("finish", finish), ("pass2", pass2))
    num_warps = attr_int(k, "num_warps", max(1, min(8, block_n // 256)))
    rows = prod(lead)
    params = (("BLOCK_N", block_n), ("N", n_lit), ("ROWS", pool.lit(rows)), ("LOOPED", looped),
              ("RED", red_kind), ("RED_SRC", red_src))
    rd, wr = kernel_bytes(g)
    numel = prod(shape)
    flops = pointwise_flops(g, numel) + numel * (3 if red.op in ("rms_norm", "softmax", "log_softmax") else 1)
    return KernelSpec(
        name=kernel_name(k, index), family="reduction", template="reduction.py.j2",
        args=tuple(tensor_args(g)) + tuple(pool.args), grid=(dim_str(rows),), num_warps=num_warps,
        num_stages=1, params=params,
        body=(("coords", tuple(body.ix.coords)),) + tuple((nm, tuple(stmts[i] for i in ix)) for nm, ix in blocks),
        source_nodes=source_nodes(g), flops=dim_str(flops), bytes_read=rd, bytes_written=wr)


def reduction_ptx(spec: KernelSpec) -> PtxCode:
    """The PTX program of a reduction spec (templates/reduction.ptx.j2): a CTA per row, warp shuffles."""
    red = spec.param("RED")
    if red not in ("sum", "sumsq", "max"):
        raise PtxUnsupported(f"ptx: kernel {spec.name}: reduction {red!r} is not in the PTX templates "
                             "(sum, sum of squares, max)", hint="the Triton twin is used instead")
    e, params, pro = ptx_setup(spec, ["row", "cols"])
    regs = {"row": e.axes["row"], "cols": e.axes["cols"], "n": ptx_operand(e, spec.param("N")),
            "acc": e.reg("f32"), "tmp": e.reg("f32"), "p": e.reg("pred"), "lane": e.reg("b32"),
            "warp": e.reg("b32"), "tid": e.reg("b32"), "a32": e.reg("b32"), "a64": e.reg("u64")}
    coords = e.block(spec.block("coords"), ())
    saved = dict(e.var)
    pass1 = e.block(spec.block("pass1"), ("cmask",))
    src = e.var.get(spec.param("RED_SRC"))
    if src is None or src[1] != "f32":
        raise PtxUnsupported(f"ptx: kernel {spec.name}: reduced value is not a float", hint="Triton twin used")
    regs["src"] = src[0]
    e.var = dict(saved)
    e.var["r_acc"] = (regs["acc"], "f32")
    e.var["r_max"] = (regs["acc"], "f32")
    finish = e.block(spec.block("finish"), ())
    after_finish = dict(e.var)
    pass2 = e.block(pass2_with_pass1(spec), ("cmask",))
    e.var = after_finish
    return ptx_code(e, params, pro, {"coords": coords, "pass1": pass1, "finish": finish, "pass2": pass2},
                    regs, 32 * spec.num_warps)


REDUCTION_FAMILY = KernelFamily("reduction", lower=lower_reduction, template="reduction.py.j2",
                                ptx=PtxProgram(template="reduction.ptx.j2", program=reduction_ptx), peak="bf16")

__all__ = ["LAST_DIM_REDUCTIONS", "REDUCTION_FAMILY", "lower_reduction", "reduction_ptx"]
