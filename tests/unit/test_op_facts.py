"""Per-op facts on the op table (ir/ops/): the query helpers answer what the passes and codegen
used to keep as their own lists, and codegen's copies cannot drift from the table."""
from __future__ import annotations

from dsr_compiler.codegen import lower_common
from dsr_compiler.codegen.families import reduction
from dsr_compiler.ir import ops
from dsr_compiler.ir.ops import OPS, POINTWISE
from dsr_compiler.ir.passes import fuse as _fuse_fn  # noqa: F401  (loads the package)
from dsr_compiler.ir.passes.fuse import GROUP_RULES, INDEX_MAP_OPS, TAGGERS, VIEW_OPS


def test_codegen_reads_index_maps_and_reductions_from_the_table():
    assert lower_common.INDEX_MAP_OPS == ops.index_map_ops()
    assert set(lower_common.INDEX_MAP_OPS) == {"permute", "expand", "slice", "reshape"}
    assert reduction.LAST_DIM_REDUCTIONS == ops.last_dim_reductions()


def test_flops_of_the_cost_model():
    """The modeled FLOPs per element (report.json's MFLOP): 1 unless the op is several instructions."""
    many = {"rope": 3, "silu": 4, "sigmoid": 3, "gelu": 8, "tanh": 4, "pow": 4, "cast": 0, "cos": 8, "sin": 8}
    for name, op in OPS.items():
        if op.kind == POINTWISE:
            assert ops.flops_per_element(name) == many.get(name, 1), name


def test_fuse_reads_the_table():
    assert set(INDEX_MAP_OPS) == {"permute", "expand", "slice", "reshape"}
    assert set(VIEW_OPS) == {"permute", "expand", "slice"}
    assert set(ops.last_dim_reductions()) == {"rms_norm", "softmax", "log_softmax", "sum", "mean", "amax"}


def test_commutative_ops():
    assert {n for n, op in OPS.items() if op.commutative} == {"add", "mul", "maximum", "minimum", "eq"}
    assert ops.is_commutative("add") and not ops.is_commutative("sub")


def test_derivative_rules_live_on_the_ops():
    assert set(ops.differentiable_ops()) == {
        "add", "sub", "neg", "mul", "div", "exp", "log", "sqrt", "reciprocal", "sigmoid", "tanh", "pow", "cos", "sin",
        "maximum", "minimum", "where", "cast", "sum", "mean", "reshape", "expand", "permute", "stop_gradient",
        "token_logprobs"}
    assert OPS["softmax"].vjp is None


def test_fusion_rules_are_one_ordered_tuple():
    assert isinstance(GROUP_RULES, tuple)
    assert [r.__name__ for r in GROUP_RULES] == [
        "group_mla_operands", "group_index_copy", "group_gemm_fp8", "group_quant_fp8", "group_gemm", "group_reduction",
        "group_attention", "group_pointwise"]
    assert set(TAGGERS) == {"mla_attention", "mla_decode", "mla_combine", "rope_table", "index_copy", "gemm_fp8",
                            "quant_fp8", "moe_gemm_fp8"}


def test_one_dims_helper():
    import sympy
    from dsr_compiler.ir.types import sym
    t = sym("T")
    assert ops.dims_equal(t * 2, t + t)
    assert ops.dims_equal((t, 4), (t, sympy.Integer(4)))
    assert not ops.dims_equal((t, 4), (t,))
    assert not ops.dims_equal(sympy.ceiling(t / 128), sympy.floor(t / 128))
    assert ops.dims_equal(sympy.ceiling(t / 128), sympy.ceiling(t / 128))
