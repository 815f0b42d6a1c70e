"""Kernel family `quant_fp8`: row kernels that write FP8 activations (or read them back).

Where it sits: one record of codegen/families/ (`QUANT_FP8_FAMILY`). Lowers
the kernels that `ir/passes/fuse/fp8.py` groups around one `quant_fp8`: a pointwise prologue
(e.g. a residual add), at most one `rms_norm`, pointwise ops after it, then the 1 x block
quantization, so an RMSNorm output goes to memory only as fp8 codes + scales (plus whatever value
other kernels read, e.g. the residual sum or the norm output for a high-precision router gate).
A kernel holding one `dequant_fp8` is the inverse (codes x scales -> f32/bf16).

One program per row; the row is walked in `block`-wide tiles (a tile is exactly one scale):
    NORM:  pass 1 accumulates sum(x^2) over the tiles; rinv = rsqrt(mean + eps) (fp32)
    pass 2 per tile: prologue -> x * rinv * w (fp32, as DESIGN.md section 5) -> epilogue ->
           amax -> s = max(amax, 1e-4) / 448 -> codes (bit-exact vs torch, fp8_macros.j2) -> store
A bf16 value is rounded to bf16 before it is quantized, as eager quantizes the bf16 tensor.
"""
from __future__ import annotations

import sympy
from dsr_compiler.ir.graph import Kernel
from dsr_compiler.ir.ops import OPS, POINTWISE
from dsr_compiler.ir.types import DType, dim_str

from ..lower_body import Body
from ..lower_common import (
    INDEX_MAP_OPS,
    arg_names,
    attr_int,
    closure,
    fail,
    kernel_bytes,
    kernel_name,
    pointwise_flops,
    source_nodes,
    static_int,
    tensor_args,
)
from ..ptx_emit import PtxCode, PtxUnsupported, pass2_with_pass1, ptx_code, ptx_operand, ptx_setup
from ..spec import KernelSpec, Stmt
from ..views import Axis, ScalarPool, prod, same
from .record import KernelFamily, PtxProgram


def lower_quant_rows(k: Kernel, index: int) -> KernelSpec:
    """A quant_fp8 kernel (prologue, optional rms_norm, epilogue, 1 x block quantization), or a dequant_fp8."""
    g = k.body
    vals = g.values()
    anchors = [n for n in g.nodes if n.op in ("quant_fp8", "dequant_fp8")]
    if len(anchors) != 1:
        raise fail(k, f"needs exactly one quant_fp8 or dequant_fp8, found {len(anchors)}",
                   anchors[1] if len(anchors) > 1 else None)
    anchor = anchors[0]
    if anchor.op == "dequant_fp8":
        return _lower_dequant(k, index, anchor)
    norms = [n for n in g.nodes if n.op == "rms_norm"]
    if len(norms) > 1:
        raise fail(k, "at most one rms_norm per quant_fp8 kernel", norms[1])
    src = anchor.inputs[0]
    xt = vals[src].type
    shape = xt.shape
    lead, ncols = shape[:-1], shape[-1]
    block = int(anchor.attr("block", 128))
    pool = ScalarPool(i64=bool(k.attr("index_i64", False)))
    axes = [Axis("row", tuple(range(len(lead)))), Axis("cols", (len(lead),))]
    body = Body(k, pool, shape, axes, "cmask", {"cols": "cmask"})
    body.check_layouts()
    n_lit = pool.lit(ncols)
    names = arg_names(g)
    red_src = ""
    finish_idx = -1
    for n in g.nodes:
        kind = OPS[n.op].kind
        if n is anchor:
            continue
        if n.op == "rms_norm":
            nt = vals[n.inputs[0]].type
            if nt.rank != len(shape) or not all(same(a, b) for a, b in zip(nt.shape, shape)):
                raise fail(k, f"rms_norm over {nt} must normalize the quantized rows {xt}", n)
            x = body.use(n.inputs[0], n)
            if not body.vec[x]:
                raise body.fail(n, "the row rms_norm normalizes does not vary along it (a size-1 or broadcast row)",
                                "rms_norm of such a row is x * rsqrt(x*x + eps) * w; write it as pointwise ops in the model")
            red_src = body.convert(x, "f32")
            w = body.convert(body.use(n.inputs[1], n), "f32")
            rinv = body.define(Stmt("rms_finish", body.fresh(n.out.name + "_rinv"),
                                    ("r_acc", n_lit, repr(float(n.attr("eps")))), (), DType.f32), False, "f32")
            finish_idx = len(body.stmts) - 1
            body.var[n.out.name] = body.define(Stmt("rms_apply", body.fresh(n.out.name), (red_src, rinv, w), (),
                                                    n.out.type.dtype), True, "f32")
        elif n.op == "const":
            body.const(n)
        elif n.op in INDEX_MAP_OPS:
            body.record_layout(n)
        elif kind == POINTWISE and n.op != "rope":
            body.pointwise(n)
        else:
            raise body.fail(n, f"{n.op} ({kind}) cannot be part of a quant_fp8 kernel",
                            "it takes pointwise ops, one rms_norm and one quant_fp8 over the same rows")
    qv = body.use(src, anchor)
    if not body.vec[qv]:
        raise fail(k, f"quant_fp8 of %{src}: the value does not vary along the row", anchor)
    outs = list(g.outputs)
    codes, scales = (o.name for o in anchor.outputs)
    roots: list[int] = []
    for i, oname in enumerate(outs):
        if oname in (codes, scales):
            continue
        o = vals[oname]
        if o.type.rank != len(shape) or not all(same(a, b) for a, b in zip(o.type.shape, shape)):
            raise fail(k, f"output %{oname} : {o.type} is not a row value {xt}",
                       hint="a quant_fp8 kernel returns the fp8 codes and scales and row values only")
        body.store(o, i, None)
        roots.append(len(body.stmts) - 1)
    stmts = body.stmts
    q_idx = next(i for i, s in enumerate(stmts) if s.out == qv) if any(s.out == qv for s in stmts) else None
    finish: list[int] = []
    pass1: list[int] = []
    if finish_idx >= 0:
        src_idx = next(i for i, s in enumerate(stmts) if s.out == red_src)
        pass1 = closure(stmts, [src_idx], set())
        finish = closure(stmts, [finish_idx], set())
    have = {stmts[i].out for i in finish if stmts[i].out}
    pass2 = [i for i in closure(stmts, roots + ([q_idx] if q_idx is not None else []), have) if i not in finish]
    blocks = (("pass1", pass1), ("finish", finish), ("pass2", pass2))
    static_n = static_int(ncols)
    nkb = -(-static_n // block) if static_n is not None else pool.lit(sympy.ceiling(ncols / block))
    rows = prod(lead)
    params = (("BLOCK", block), ("N", n_lit), ("NKB", nkb), ("NORM", finish_idx >= 0), ("RED_SRC", red_src),
              ("MODE", "quant"), ("QSRC", qv), ("Q_UE8M0", anchor.attr("scale_fmt") == "ue8m0"),
              ("Q_ROUND_BF16", xt.dtype is DType.bf16),
              ("Q_OUT", names[("out", outs.index(codes))] if codes in outs else ""),
              ("S_OUT", names[("out", outs.index(scales))] if scales in outs else ""))
    rd, wr = kernel_bytes(g)
    numel = prod(shape)
    flops = pointwise_flops(g, numel) + numel * (3 if finish_idx >= 0 else 0) + numel * 4
    return KernelSpec(
        name=kernel_name(k, index), family="quant_fp8", template="quant_fp8_rows.py.j2",
        args=tuple(tensor_args(g)) + tuple(pool.args), grid=(dim_str(rows),),
        num_warps=attr_int(k, "num_warps", 1 if block <= 128 else 2), num_stages=1, params=params,
        body=(("coords", tuple(body.ix.coords)),) + tuple((nm, tuple(stmts[i] for i in ix)) for nm, ix in blocks),
        source_nodes=source_nodes(g), flops=dim_str(sympy.expand(flops)), bytes_read=rd, bytes_written=wr)


def _lower_dequant(k: Kernel, index: int, n) -> KernelSpec:
    g = k.body
    vals = g.values()
    if len(g.nodes) != 1 or list(g.outputs) != [n.out.name] or list(n.inputs) != [v.name for v in g.inputs]:
        raise fail(k, "a dequant_fp8 kernel holds exactly one dequant_fp8 of its two inputs", n,
                   "fold dequantization into the GEMM that reads the values (gemm_fp8)")
    qt = vals[n.inputs[0]].type
    block = int(n.attr("block", 128))
    pool = ScalarPool(i64=bool(k.attr("index_i64", False)))
    names = arg_names(g)
    ncols = qt.shape[-1]
    static_n = static_int(ncols)
    nkb = -(-static_n // block) if static_n is not None else pool.lit(sympy.ceiling(ncols / block))
    rows = prod(qt.shape[:-1])
    params = (("BLOCK", block), ("N", pool.lit(ncols)), ("NKB", nkb), ("NORM", False), ("RED_SRC", ""),
              ("MODE", "dequant"), ("Q_IN", names[("in", n.inputs[0])]), ("S_IN", names[("in", n.inputs[1])]),
              ("Y_OUT", names[("out", 0)]), ("Y_BF16", n.out.type.dtype is DType.bf16))
    rd, wr = kernel_bytes(g)
    return KernelSpec(
        name=kernel_name(k, index), family="quant_fp8", template="quant_fp8_rows.py.j2",
        args=tuple(tensor_args(g)) + tuple(pool.args), grid=(dim_str(rows),),
        num_warps=attr_int(k, "num_warps", 1 if block <= 128 else 2), num_stages=1, params=params,
        body=(("coords", ()), ("pass1", ()), ("finish", ()), ("pass2", ())),
        source_nodes=source_nodes(g), flops=dim_str(sympy.expand(prod(qt.shape))), bytes_read=rd, bytes_written=wr)


def quant_rows_ptx(spec: KernelSpec) -> PtxCode:
    """The PTX program of a quant_fp8 spec (templates/quant_fp8_rows.ptx.j2): a CTA per row; a lane holds
    4 elements of a 1x128 tile (cols = kb*128 + lane + 32 j), codes from cvt.rn.satfinite.e4m3x2.f32."""
    block = spec.param("BLOCK")
    if block != 128:
        raise PtxUnsupported(f"ptx: kernel {spec.name}: the PTX quant template takes 1x128 tiles, got {block}",
                             hint="the Triton twin is used instead")
    e, params, pro = ptx_setup(spec, ["row", "cols"])
    regs = {"row": e.axes["row"], "cols": e.axes["cols"], "n": ptx_operand(e, spec.param("N")),
            "nkb": ptx_operand(e, spec.param("NKB")), "acc": e.reg("f32"), "tmp": e.reg("f32"), "p": e.reg("pred"),
            "q": e.reg("pred"), "lane": e.reg("b32"), "warp": e.reg("b32"), "tid": e.reg("b32"), "kb": e.reg("u64"),
            "j": e.reg("b32"), "a32": e.reg("b32"), "a64": e.reg("u64"), "s": e.reg("f32"), "amax": e.reg("f32"),
            "v0": e.reg("f32"), "v1": e.reg("f32"), "v2": e.reg("f32"), "v3": e.reg("f32"),
            "h0": e.reg("b16"), "h1": e.reg("b16")}
    blocks: dict[str, list[str]] = {"coords": e.block(spec.block("coords"), ())}
    for name in ("q_ptr", "s_ptr", "y_ptr"):
        regs[name] = ""
    if spec.param("MODE") == "dequant":
        regs["q_ptr"] = e.ptrs[spec.param("Q_IN")]
        regs["s_ptr"] = e.ptrs[spec.param("S_IN")]
        regs["y_ptr"] = e.ptrs[spec.param("Y_OUT")]
        return ptx_code(e, params, pro, blocks, regs, 32 * spec.num_warps)
    saved = dict(e.var)
    if spec.param("NORM"):
        blocks["pass1"] = e.block(spec.block("pass1"), ("cmask",))
        src = e.var.get(spec.param("RED_SRC"))
        if src is None or src[1] != "f32":
            raise PtxUnsupported(f"ptx: kernel {spec.name}: normalized value is not a float", hint="Triton twin used")
        regs["src"] = src[0]
        e.var = dict(saved)
        e.var["r_acc"] = (regs["acc"], "f32")
        blocks["finish"] = e.block(spec.block("finish"), ())
    after = dict(e.var)
    # pass 2 runs once per element j = 0..3 of a lane's slice of the tile (cols = kb*128 + lane + 32 j)
    for j in range(4):
        e.var = dict(after)
        lines = e.block(pass2_with_pass1(spec), ("cmask",))
        q = e.var.get(spec.param("QSRC"))
        if q is None or q[1] != "f32":
            raise PtxUnsupported(f"ptx: kernel {spec.name}: quantized value is not a float", hint="Triton twin used")
        lines.append(f"\tmov.f32 \t{regs[f'v{j}']}, {q[0]};")
        blocks[f"pass2_{j}"] = lines
    e.var = after
    regs["q_ptr"] = e.ptrs.get(spec.param("Q_OUT"), "")
    regs["s_ptr"] = e.ptrs.get(spec.param("S_OUT"), "")
    return ptx_code(e, params, pro, blocks, regs, 32 * spec.num_warps)


QUANT_FP8_FAMILY = KernelFamily("quant_fp8", lower=lower_quant_rows, template="quant_fp8_rows.py.j2",
                                ptx=PtxProgram(template="quant_fp8_rows.ptx.j2", program=quant_rows_ptx), peak="bf16")

__all__ = ["QUANT_FP8_FAMILY", "lower_quant_rows", "quant_rows_ptx"]
