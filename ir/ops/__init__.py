"""The one op table: every IR op declared once (STYLE.md convention 1).

Each :class:`OpDef` carries the op's type rule (shapes as sympy expressions), its eager torch
reference (what the reference interpreter runs, and what compiled kernels are checked against),
its attribute schema, its kind (which fusion families may take it), and the per-op facts that
passes and codegen read (`commutative`, `flops`, `index_map`, `last_dim_reduction`, `vjp`).
The verifier, the interpreter, the printer/parser, the passes and codegen all read it.

Modules, imported in this order and only in one direction (each imports `_def` and the ones
listed before it, never a later one):

    _def   OpDef, AttrSpec, register, the op kinds, dims_equal / norm_dim, the query helpers
    core   pointwise, reductions, GEMMs, attention, layout, const, call
    fp8    quant_fp8, dequant_fp8, gemm_fp8 and the FP8 constants (E4M3_MAX, SCALE_FLOOR)
    moe    router, dispatch, grouped GEMMs (bf16 and FP8), combine
    ep     expert parallelism: ep_route, gather_rows, all_to_all (a collective, run by the runtime)
    mla    iota, rope_table, index_copy, mla_attention, mla_decode, mla_combine
    loss   token_logprobs and its gradients, gather, stop_gradient
"""
from ..graph import float_repr  # the printer's; re-exported where it used to live
from ._def import (
    ATTENTION,
    CALL,
    COLLECTIVE,
    GEMM,
    LAYOUT,
    OPS,
    POINTWISE,
    REDUCTION,
    SOURCE,
    AttrSpec,
    GradBuilder,
    OpDef,
    TypeRuleError,
    Vjp,
    differentiable_ops,
    dims_equal,
    fit,
    flops_per_element,
    get_op,
    index_map_ops,
    is_commutative,
    last_dim_reductions,
    norm_dim,
    register,
    single_output_vjp,
)
from . import core  # noqa: E402,F401  (the op modules register into OPS, in this order)
from . import fp8  # noqa: E402,F401
from . import moe  # noqa: E402,F401
from . import ep  # noqa: E402,F401
from . import mla  # noqa: E402,F401
from . import loss  # noqa: E402,F401

MODULES = ("core", "fp8", "moe", "ep", "mla", "loss")

__all__ = ["ATTENTION", "CALL", "COLLECTIVE", "GEMM", "LAYOUT", "MODULES", "OPS", "POINTWISE", "REDUCTION", "SOURCE", "AttrSpec",
           "GradBuilder", "OpDef", "TypeRuleError", "Vjp", "differentiable_ops", "dims_equal", "fit", "float_repr",
           "flops_per_element", "get_op", "index_map_ops", "is_commutative", "last_dim_reductions", "norm_dim",
           "register", "single_output_vjp"]
