"""Kernel family `pointwise`: a fused chain of pointwise ops (plus constants, cat, embedding and
layout ops on inputs) over one flat iteration space.

Where it sits: one record of codegen/families/ (`POINTWISE_FAMILY`). Triton: templates/pointwise.py.j2,
one program per BLOCK elements; direct PTX: templates/pointwise.ptx.j2 (`pointwise_ptx`), a CTA per
BLOCK elements. The statements come from the shared emitter (codegen/lower_body.py).
"""
from __future__ import annotations

import sympy
from dsr_compiler.ir.graph import Kernel
from dsr_compiler.ir.ops import OPS, POINTWISE
from dsr_compiler.ir.types import dim_str

from ..lower_body import Body
from ..lower_common import (
    INDEX_MAP_OPS,
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
from ..ptx_emit import PtxCode, PtxUnsupported, ptx_code, ptx_operand, ptx_setup
from ..spec import KernelSpec
from ..views import Axis, ScalarPool, prod, same
from .record import KernelFamily, PtxProgram


def lower_pointwise(k: Kernel, index: int, family_label: str = "pointwise") -> KernelSpec:
    """A pointwise kernel: one flat iteration space over the (common) output shape."""
    g = k.body
    vals = g.values()
    outs = [vals[o] for o in g.outputs]
    shape = outs[0].type.shape
    for o in outs[1:]:
        if o.type.rank != len(shape) or not all(same(a, b) for a, b in zip(o.type.shape, shape)):
            raise fail(k, f"outputs need one shape: %{outs[0].name} is {outs[0].type}, %{o.name} is {o.type}",
                       hint="the fusion pass groups only same-shape values into one pointwise kernel")
    numel = prod(shape)
    big = static_int(numel) is not None and static_int(numel) >= 2**31
    i64 = bool(k.attr("index_i64", False)) or big
    pool = ScalarPool(i64=i64)
    body = Body(k, pool, shape, [Axis("offs", tuple(range(len(shape))))], "mask", {"offs": "mask"})
    body.supports = ("rope",)
    body.check_layouts()
    for n in g.nodes:
        kind = OPS[n.op].kind
        if n.op == "const":
            body.const(n)
        elif n.op in INDEX_MAP_OPS:
            body.record_layout(n)
        elif n.op == "cat":
            body.cat(n)
        elif n.op == "embedding":
            body.embedding(n)
        elif kind == POINTWISE:
            body.pointwise(n)
        else:
            raise body.fail(n, f"{n.op} ({kind}) cannot be part of a pointwise kernel",
                            "pointwise kernels take pointwise ops, constants, embedding, and layout ops on inputs")
    for i, o in enumerate(outs):
        body.store(o, i, None)
    static = static_int(numel)
    block = attr_int(k, "block", min(1024, max(128, next_pow2(static))) if static is not None else 1024)
    num_warps = attr_int(k, "num_warps", max(1, min(4, block // 256)))
    n_lit = pool.lit(numel)
    params = (("BLOCK", block), ("NUMEL", n_lit), ("I64", i64))
    rd, wr = kernel_bytes(g)
    return KernelSpec(
        name=kernel_name(k, index), family="pointwise", template="pointwise.py.j2",
        args=tuple(tensor_args(g)) + tuple(pool.args), grid=(dim_str(sympy.ceiling(numel / block)),),
        num_warps=num_warps, num_stages=1, params=params,
        body=(("coords", tuple(body.ix.coords)), ("main", tuple(body.stmts))),
        source_nodes=source_nodes(g), flops=dim_str(pointwise_flops(g, numel)), bytes_read=rd, bytes_written=wr)


def pointwise_ptx(spec: KernelSpec) -> PtxCode:
    """The PTX program of a pointwise spec (templates/pointwise.ptx.j2): one element per thread and step."""
    if spec.param("I64", False) is not True and spec.param("I64", False) is not False:
        raise PtxUnsupported(f"ptx: kernel {spec.name}: unknown index width")
    e, params, pro = ptx_setup(spec, ["offs"])
    regs = {"offs": e.axes["offs"], "numel": ptx_operand(e, spec.param("NUMEL")), "i": e.reg("b32"),
            "pid": e.reg("u64"), "p": e.reg("pred"), "t": e.reg("b32")}
    blocks = {"coords": e.block(spec.block("coords"), ("mask",)), "main": e.block(spec.block("main"), ("mask",))}
    return ptx_code(e, params, pro, blocks, regs, 32 * spec.num_warps)


POINTWISE_FAMILY = KernelFamily("pointwise", lower=lower_pointwise, template="pointwise.py.j2",
                                ptx=PtxProgram(template="pointwise.ptx.j2", program=pointwise_ptx), peak="bf16")

__all__ = ["POINTWISE_FAMILY", "lower_pointwise", "pointwise_ptx"]
