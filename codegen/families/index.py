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

from ..lower_common import arg_names, attr_int, flat_spec, next_pow2, single_op, static_int
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
    n = single_op(k, INDEX)
    vals = g.values()
    names = arg_names(g)
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
    return flat_spec(k, index, INDEX, "index.py.j2", pool, params, numel, block, rd, numel * xt.dtype.itemsize)


INDEX_FAMILY = KernelFamily(INDEX, lower=lower_index, template="index.py.j2", peak="bf16")

__all__ = ["INDEX_FAMILY"]
