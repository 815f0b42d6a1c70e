"""Kernel family `cumsum` (op in ir/ops/core.py): an inclusive scan along the last dim.

Where it sits: one record of codegen/families/ (`CUMSUM_FAMILY` at the end); template
codegen/templates/cumsum.py.j2. The fusion pass gives the op a kernel of its own.

    cumsum   one program per row; the row is read in BLOCK-wide chunks, each scanned with tl.cumsum
             and offset by the running total of the chunks before it (a loop-carried scalar), so any
             row length works, symbolic or not. Bool / integer inputs accumulate in int64 (exact, like
             torch); floats in fp32, each position rounded once to the output dtype.
"""
from __future__ import annotations

import sympy

from dsr_compiler.ir.graph import Kernel
from dsr_compiler.ir.ops.core import CUMSUM
from dsr_compiler.ir.types import dim_str

from ..exprs import store_value
from ..lower_common import (arg_names, attr_int, kernel_name, next_pow2, single_op, source_nodes, static_int,
                            tensor_args)
from ..spec import KernelSpec
from ..views import ScalarPool
from .record import KernelFamily


def lower_cumsum(k: Kernel, index: int) -> KernelSpec:
    g = k.body
    n = single_op(k, CUMSUM)
    vals = g.values()
    names = arg_names(g)
    (x,) = n.inputs
    xt, ot = vals[x].type, n.out.type
    width = xt.shape[-1]
    rows = sympy.Integer(1)
    for d in xt.shape[:-1]:
        rows = rows * d
    pool = ScalarPool(i64=(static_int(xt.numel) or 2**31) >= 2**31)
    s = static_int(width)
    block = attr_int(k, "block", min(1024, max(16, next_pow2(s))) if s is not None else 1024)
    acc = "tl.float32" if xt.dtype.is_float else "tl.int64"
    params = (("BLOCK", block), ("N", pool.lit(width)), ("ACC", acc), ("STORED", store_value("c", ot.dtype)),
              ("X", names[("in", x)]), ("OUT", names[("out", 0)]))
    numel = xt.numel
    return KernelSpec(
        name=kernel_name(k, index), family=CUMSUM, template="cumsum.py.j2",
        args=tuple(tensor_args(g)) + tuple(pool.args), grid=(dim_str(rows),),
        num_warps=attr_int(k, "num_warps", 4), num_stages=1, params=params, body=(), source_nodes=source_nodes(g),
        flops=dim_str(sympy.expand(numel)), bytes_read=dim_str(sympy.expand(numel * xt.dtype.itemsize)),
        bytes_written=dim_str(sympy.expand(numel * ot.dtype.itemsize)))


CUMSUM_FAMILY = KernelFamily(CUMSUM, lower=lower_cumsum, template="cumsum.py.j2", peak="bf16")

__all__ = ["CUMSUM_FAMILY"]
