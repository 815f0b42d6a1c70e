"""Kernel family `index` (op in ir/ops/core.py): torch's advanced indexing `x[i0, ..., ik-1]` of the first
k dims by k integer tensors of one shape S; the output is S + x.shape[k:].

Where it sits: one record of codegen/families/ (`INDEX_FAMILY` at the end); template
codegen/templates/index.py.j2. The fusion pass gives the op a kernel of its own.

    index   one program per BLOCK output elements: each element's position in S reads the k indices
            (negative ones count from the end, as in torch), which make the row offset into x (sizes of
            the indexed dims as literals or runtime scalars, symbolic ones too); the trailing R elements
            of x.shape[k:] are copied. An index still outside its dim reads nothing and gives 0 (NaN
            for floats): a kernel cannot raise torch's IndexError without a host sync.
"""
from __future__ import annotations

import sympy

from dsr_compiler.ir.graph import Kernel
from dsr_compiler.ir.ops.core import INDEX
from dsr_compiler.ir.types import dim_str

from ..lower_common import arg_names, attr_int, fail, kernel_name, next_pow2, source_nodes, static_int, tensor_args
from ..spec import KernelSpec
from ..views import ScalarPool
from .record import KernelFamily


def _prod(dims) -> sympy.Expr:
    out = sympy.Integer(1)
    for d in dims:
        out = out * d
    return out


def lower_index(k: Kernel, index: int) -> KernelSpec:
    g = k.body
    ops = [n for n in g.nodes if n.op != "const"]
    if len(ops) != 1 or ops[0].op != INDEX:
        raise fail(k, f"an index kernel holds exactly one index op, got {[n.op for n in ops]}",
                   ops[1] if len(ops) > 1 else None)
    n = ops[0]
    vals = g.values()
    names = arg_names(g)
    inputs = {v.name for v in g.inputs}
    for v in n.inputs:
        if v not in inputs:
            raise fail(k, f"index operand %{v} is computed inside the kernel; operands must be kernel inputs", n)
    if list(g.outputs) != [n.out.name]:
        raise fail(k, f"must return only %{n.out.name}", n)
    x, idx = n.inputs[0], n.inputs[1:]
    xt = vals[x].type
    kk = len(idx)
    numel = n.out.type.numel
    pool = ScalarPool(i64=True)
    s = static_int(numel)
    block = attr_int(k, "block", min(1024, max(128, next_pow2(s))) if s is not None else 1024)
    dims = [pool.lit(d) for d in xt.shape[:kk]]
    params = (("BLOCK", block), ("NUMEL", pool.lit(numel)), ("R", pool.lit(_prod(xt.shape[kk:]))),
              ("DIMS", tuple(dims)), ("IDX", tuple(names[("in", i)] for i in idx)), ("X", names[("in", x)]),
              ("OUT", names[("out", 0)]), ("OOB", 'float("nan")' if xt.dtype.is_float else "0"))
    it = sum(vals[i].type.dtype.itemsize for i in idx)
    rd = numel * xt.dtype.itemsize + _prod(vals[idx[0]].type.shape) * it
    return KernelSpec(
        name=kernel_name(k, index), family=INDEX, template="index.py.j2",
        args=tuple(tensor_args(g)) + tuple(pool.args), grid=(dim_str(sympy.ceiling(numel / block)),),
        num_warps=attr_int(k, "num_warps", 4), num_stages=1, params=params, body=(), source_nodes=source_nodes(g),
        flops="0", bytes_read=dim_str(sympy.expand(rd)), bytes_written=dim_str(sympy.expand(numel * xt.dtype.itemsize)))


INDEX_FAMILY = KernelFamily(INDEX, lower=lower_index, template="index.py.j2", peak="bf16")

__all__ = ["INDEX_FAMILY"]
