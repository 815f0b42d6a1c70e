"""Kernel family `quant_fp8`: row kernels that write FP8 activations (or read them back).

Where it sits: a codegen extension (registered through `codegen/families.py` EXTENSIONS). Lowers
the kernels that `ir/passes/fuse_fp8.py` groups around one `quant_fp8`: a pointwise prologue
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

from .families import register_family
from .lower import (
    INDEX_MAP_OPS,
    _attr_int,
    _Body,
    _bytes,
    _closure,
    _fail,
    _kernel_name,
    _pointwise_flops,
    _static,
    arg_names,
    source_nodes,
    tensor_args,
)
from .spec import KernelSpec, Stmt
from .views import Axis, ScalarPool, prod, same


def lower_quant_rows(k: Kernel, index: int) -> KernelSpec:
    g = k.body
    vals = g.values()
    anchors = [n for n in g.nodes if n.op in ("quant_fp8", "dequant_fp8")]
    if len(anchors) != 1:
        raise _fail(k, f"needs exactly one quant_fp8 or dequant_fp8, found {len(anchors)}",
                    anchors[1] if len(anchors) > 1 else None)
    anchor = anchors[0]
    if anchor.op == "dequant_fp8":
        return _lower_dequant(k, index, anchor)
    norms = [n for n in g.nodes if n.op == "rms_norm"]
    if len(norms) > 1:
        raise _fail(k, "at most one rms_norm per quant_fp8 kernel", norms[1])
    src = anchor.inputs[0]
    xt = vals[src].type
    shape = xt.shape
    lead, ncols = shape[:-1], shape[-1]
    block = int(anchor.attr("block", 128))
    pool = ScalarPool(i64=bool(k.attr("index_i64", False)))
    axes = [Axis("row", tuple(range(len(lead)))), Axis("cols", (len(lead),))]
    body = _Body(k, pool, shape, axes, "cmask", {"cols": "cmask"})
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
                raise _fail(k, f"rms_norm over {nt} must normalize the quantized rows {xt}", n)
            x = body.use(n.inputs[0], n)
            if not body.vec[x]:
                raise body.fail(n, "the normalized value does not vary along the row")
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
        raise _fail(k, f"quant_fp8 of %{src}: the value does not vary along the row", anchor)
    outs = list(g.outputs)
    codes, scales = (o.name for o in anchor.outputs)
    roots: list[int] = []
    for i, oname in enumerate(outs):
        if oname in (codes, scales):
            continue
        o = vals[oname]
        if o.type.rank != len(shape) or not all(same(a, b) for a, b in zip(o.type.shape, shape)):
            raise _fail(k, f"output %{oname} : {o.type} is not a row value {xt}",
                        hint="a quant_fp8 kernel returns the fp8 codes and scales and row values only")
        body.store(o, i, None)
        roots.append(len(body.stmts) - 1)
    stmts = body.stmts
    q_idx = next(i for i, s in enumerate(stmts) if s.out == qv) if any(s.out == qv for s in stmts) else None
    finish: list[int] = []
    pass1: list[int] = []
    if finish_idx >= 0:
        src_idx = next(i for i, s in enumerate(stmts) if s.out == red_src)
        pass1 = _closure(stmts, [src_idx], set())
        finish = _closure(stmts, [finish_idx], set())
    have = {stmts[i].out for i in finish if stmts[i].out}
    pass2 = [i for i in _closure(stmts, roots + ([q_idx] if q_idx is not None else []), have) if i not in finish]
    blocks = (("pass1", pass1), ("finish", finish), ("pass2", pass2))
    static_n = _static(ncols)
    nkb = -(-static_n // block) if static_n is not None else pool.lit(sympy.ceiling(ncols / block))
    rows = prod(lead)
    params = (("BLOCK", block), ("N", n_lit), ("NKB", nkb), ("NORM", finish_idx >= 0), ("RED_SRC", red_src),
              ("MODE", "quant"), ("QSRC", qv), ("Q_UE8M0", anchor.attr("scale_fmt") == "ue8m0"),
              ("Q_ROUND_BF16", xt.dtype is DType.bf16),
              ("Q_OUT", names[("out", outs.index(codes))] if codes in outs else ""),
              ("S_OUT", names[("out", outs.index(scales))] if scales in outs else ""))
    rd, wr = _bytes(g)
    numel = prod(shape)
    flops = _pointwise_flops(g, numel) + numel * (3 if finish_idx >= 0 else 0) + numel * 4
    return KernelSpec(
        name=_kernel_name(k, index), family="quant_fp8", template="quant_fp8_rows.py.j2",
        args=tuple(tensor_args(g)) + tuple(pool.args), grid=(dim_str(rows),),
        num_warps=_attr_int(k, "num_warps", 1 if block <= 128 else 2), num_stages=1, params=params,
        body=(("coords", tuple(body.ix.coords)),) + tuple((nm, tuple(stmts[i] for i in ix)) for nm, ix in blocks),
        source_nodes=source_nodes(g), flops=dim_str(sympy.expand(flops)), bytes_read=rd, bytes_written=wr)


def _lower_dequant(k: Kernel, index: int, n) -> KernelSpec:
    g = k.body
    vals = g.values()
    if len(g.nodes) != 1 or list(g.outputs) != [n.out.name] or list(n.inputs) != [v.name for v in g.inputs]:
        raise _fail(k, "a dequant_fp8 kernel holds exactly one dequant_fp8 of its two inputs", n,
                    "fold dequantization into the GEMM that reads the values (gemm_fp8)")
    qt = vals[n.inputs[0]].type
    block = int(n.attr("block", 128))
    pool = ScalarPool(i64=bool(k.attr("index_i64", False)))
    names = arg_names(g)
    ncols = qt.shape[-1]
    static_n = _static(ncols)
    nkb = -(-static_n // block) if static_n is not None else pool.lit(sympy.ceiling(ncols / block))
    rows = prod(qt.shape[:-1])
    params = (("BLOCK", block), ("N", pool.lit(ncols)), ("NKB", nkb), ("NORM", False), ("RED_SRC", ""),
              ("MODE", "dequant"), ("Q_IN", names[("in", n.inputs[0])]), ("S_IN", names[("in", n.inputs[1])]),
              ("Y_OUT", names[("out", 0)]), ("Y_BF16", n.out.type.dtype is DType.bf16))
    rd, wr = _bytes(g)
    return KernelSpec(
        name=_kernel_name(k, index), family="quant_fp8", template="quant_fp8_rows.py.j2",
        args=tuple(tensor_args(g)) + tuple(pool.args), grid=(dim_str(rows),),
        num_warps=_attr_int(k, "num_warps", 1 if block <= 128 else 2), num_stages=1, params=params,
        body=(("coords", ()), ("pass1", ()), ("finish", ()), ("pass2", ())),
        source_nodes=source_nodes(g), flops=dim_str(sympy.expand(prod(qt.shape))), bytes_read=rd, bytes_written=wr)


register_family("quant_fp8", "quant_fp8_rows.py.j2", lower_quant_rows)
