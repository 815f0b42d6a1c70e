"""KernelSpec identity and launch arithmetic, rendering, the expression table, lowering refusals."""
from __future__ import annotations

import ast
import dataclasses

import pytest
from codegen_helpers import KB
from dsr_compiler.codegen import KernelSpec, eval_expr, launch_values, lower_kernel, render
from dsr_compiler.codegen.exprs import POINTWISE_EXPRS
from dsr_compiler.codegen.families import FAMILIES, TEMPLATE_FAMILY, KernelFamily, PtxProgram, validate
from dsr_compiler.codegen.spec import Stmt
from dsr_compiler.ir import OPS, DType, Kernel, sym
from dsr_compiler.ir.errors import CodegenError
from dsr_compiler.ir.ops import POINTWISE
from test_interpret import one_op_kernel

T = sym("T")
f32, bf16 = DType.f32, DType.bf16


def mlp_spine():
    kb = KB("k1_reduction_add_rms_norm", "reduction")
    x = kb.input("x", bf16, T, 256)
    r = kb.input("r", bf16, T, 256)
    w = kb.input("w", bf16, 256)
    h = kb.op("add", x, r, name="h")
    y = kb.op("rms_norm", h, w, eps=1e-6, name="y")
    return kb.kernel(h, y)


# ----------------------------------------------------------------------------- spec

def test_spec_is_plain_hashable_and_round_trips():
    a, b = lower_kernel(mlp_spine(), 1), lower_kernel(mlp_spine(), 1)
    assert a == b and hash(a) == hash(b) and a.hash() == b.hash()
    assert len(a.hash()) == 64
    back = KernelSpec.from_json(a.to_json())
    assert back == a and back.hash() == a.hash()
    c = dataclasses.replace(a, num_warps=a.num_warps * 2)
    assert c.hash() != a.hash()


def test_spec_calling_convention():
    spec = lower_kernel(mlp_spine(), 1)
    assert spec.name == "k1_reduction_add_rms_norm" and spec.family == "reduction"
    assert spec.template == "reduction.py.j2"
    kinds = [(a.kind, a.role, a.value, a.index) for a in spec.args]
    assert kinds == [("tensor", "in", "x", 0), ("tensor", "in", "r", 1), ("tensor", "in", "w", 2),
                     ("tensor", "out", "h", 0), ("tensor", "out", "y", 1), ("scalar", "", "", -1)]
    assert spec.args[-1].expr == "T"
    assert spec.signature() == {"x_ptr": "*bf16", "r_ptr": "*bf16", "w_ptr": "*bf16", "h_out": "*bf16",
                                "y_out": "*bf16", "s_T": "i32"}
    grid, scalars = launch_values(spec, {T: 7})
    assert grid == (7,) and scalars == {"s_T": 7}
    assert spec.source_nodes == ("%h = add @ test.add", "%y = rms_norm @ test.rms_norm")
    assert eval_expr(spec.bytes_read, {"T": 3}) == 2 * 3 * 256 * 2 + 256 * 2
    assert eval_expr(spec.bytes_written, {"T": 3}) == 2 * 3 * 256 * 2


def test_eval_expr_is_exact():
    assert eval_expr("ceiling(T*256/1024)", {"T": 5}) == 2
    assert eval_expr("ceiling(T/3)*ceiling(S/64)", {"T": 7, "S": 65}) == 6
    assert eval_expr("Max(T, 4) + Min(T, 2) + floor(T/2)", {"T": 9}) == 9 + 2 + 4
    assert eval_expr("T*(T + 1)/2", {"T": 3}) == 6
    with pytest.raises(CodegenError, match="not an integer"):
        eval_expr("T/2", {"T": 3})
    with pytest.raises(CodegenError, match="needs symbol"):
        eval_expr("T*S", {"T": 3})


def test_gemm_flops_model():
    kb = KB("k1_gemm_swiglu", "gemm")
    x = kb.input("x", bf16, T, 64)
    w1 = kb.input("w1", bf16, 32, 64)
    w3 = kb.input("w3", bf16, 32, 64)
    y = kb.op("mul", kb.op("silu", kb.op("linear", x, w1)), kb.op("linear", x, w3), name="y")
    spec = lower_kernel(kb.kernel(y), 1)
    # two GEMMs plus silu (4) and mul (1) per output element
    assert eval_expr(spec.flops, {"T": 10}) == 2 * 2 * 10 * 32 * 64 + 5 * 10 * 32


# ----------------------------------------------------------------------------- render

def test_render_header_is_deterministic():
    spec = lower_kernel(mlp_spine(), 1)
    src = render(spec)
    assert src == render(lower_kernel(mlp_spine(), 1))
    head = src.splitlines()[:8]
    assert any("template reduction.py.j2" in line for line in head)
    assert any(spec.hash() in line for line in head)
    assert "#   %y = rms_norm @ test.rms_norm" in src
    assert f"def {spec.name}(x_ptr, r_ptr, w_ptr, h_out, y_out, s_T):" in src


def test_registry_rejects_duplicates():
    core = {"pointwise.py.j2": "pointwise", "reduction.py.j2": "reduction", "gemm.py.j2": "gemm",
            "attention.py.j2": "attention"}
    assert core.items() <= TEMPLATE_FAMILY.items()   # plus the DeepSeek families (codegen/families/)
    validate(FAMILIES)
    gemm = next(f for f in FAMILIES if f.name == "gemm")
    with pytest.raises(CodegenError, match="listed twice"):
        validate(FAMILIES + (gemm,))
    other = next(f for f in FAMILIES if f.name == "attention")
    with pytest.raises(CodegenError, match="belongs to two families"):
        validate(tuple(f for f in FAMILIES if f.name != "attention")
                 + (dataclasses.replace(other, template="gemm.py.j2"),))
    with pytest.raises(CodegenError, match="belongs to two families"):
        validate(tuple(f for f in FAMILIES if f.name != "attention")
                 + (dataclasses.replace(other, ptx=PtxProgram("reduction.ptx.j2", lambda spec: None)),))
    with pytest.raises(CodegenError, match="does not exist"):
        validate(tuple(f for f in FAMILIES if f.name != "attention")
                 + (dataclasses.replace(other, template="no_such.py.j2"),))
    with pytest.raises(CodegenError, match="not in dsr_compiler.ir.verifier.KERNEL_FAMILIES"):
        validate(FAMILIES + (KernelFamily("conv", lower=gemm.lower, template="conv.py.j2"),))
    with pytest.raises(CodegenError, match="have no record"):
        validate(tuple(f for f in FAMILIES if f.name != "attention"))
    with pytest.raises(CodegenError, match="peak"):
        KernelFamily("gemm", lower=gemm.lower, template="gemm.py.j2", peak="int8")


def test_roofline_peak_comes_from_the_family_record():
    spec = lower_kernel(mlp_spine(), 1)
    fams = {f.name: f for f in FAMILIES}
    assert {n for n, f in fams.items() if f.peak == "fp8"} == {"gemm_fp8", "moe_gemm_fp8"}
    assert fams["reduction"].peak_of(spec) == "bf16"            # bf16 inputs: 16-bit tensor-core ceiling
    f32_in = dataclasses.replace(spec, args=tuple(dataclasses.replace(a, dtype=f32) if a.role == "in" else a
                                                  for a in spec.args))
    assert fams["reduction"].peak_of(f32_in) == "f32"           # an f32 operand: fp32 CUDA cores
    assert fams["gemm_fp8"].peak_of(f32_in) == "fp8"            # FP8 GEMMs: always the fp8 ceiling


def test_render_errors_are_codegen_errors():
    spec = lower_kernel(mlp_spine(), 1)
    missing = dataclasses.replace(spec, params=tuple(p for p in spec.params if p[0] != "BLOCK_N"))
    with pytest.raises(CodegenError, match="BLOCK_N"):
        render(missing)
    bad_stmt = Stmt("add", "v_bad", ("(", "v_h"), (), DType.f32)
    body = tuple((n, b + ((bad_stmt,) if n == "pass2" else ())) for n, b in spec.body)
    with pytest.raises(CodegenError, match="invalid Python") as e:
        render(dataclasses.replace(spec, body=body))
    assert ">>" in e.value.where and "v_bad = ( + v_h" in e.value.where
    with pytest.raises(CodegenError, match="is for gemm"):
        render(dataclasses.replace(spec, template="gemm.py.j2"))


def test_every_pointwise_op_has_an_expression_and_renders():
    ops = sorted(n for n, op in OPS.items() if op.kind == POINTWISE)
    assert set(ops) <= set(POINTWISE_EXPRS), set(ops) - set(POINTWISE_EXPRS)
    for name in ops:
        k, _ = one_op_kernel(name)
        src = render(lower_kernel(k, 1))
        ast.parse(src)
        assert "v_out = " in src


# ----------------------------------------------------------------------------- refusals

def _refused(k: Kernel, match: str) -> CodegenError:
    with pytest.raises(CodegenError, match=match) as e:
        lower_kernel(k, 1)
    assert f"@{k.name}" in str(e.value)
    return e.value


def test_refuses_non_last_dim_reduction():
    kb = KB("k1_reduction_sum", "reduction")
    x = kb.input("x", f32, T, 8)
    s = kb.op("sum", x, dim=0, name="s")
    err = _refused(kb.kernel(s), "only the last dim")
    assert ">> %s" in err.where


@pytest.mark.parametrize("op", ["rms_norm", "softmax"])
def test_refuses_a_row_of_one_element_with_a_hint(op):
    """nn.RMSNorm(1) / softmax over a size-1 dim: the row is one value; the error says what to write."""
    kb = KB(f"k1_reduction_{op}", "reduction")
    x = kb.input("x", f32, T, 1)
    y = kb.op("rms_norm", x, kb.input("w", f32, 1), eps=1e-6, name="y") if op == "rms_norm" else \
        kb.op("softmax", x, dim=-1, name="y")
    err = _refused(kb.kernel(y), f"the row {op} reduces does not vary along it")
    assert "write those as pointwise ops" in err.hint and ">> %y" in err.where


def test_refuses_two_reductions():
    kb = KB("k1_reduction_two", "reduction")
    x = kb.input("x", f32, T, 8)
    a = kb.op("sum", x, dim=-1, keepdim=True, name="a")
    b = kb.op("amax", x, dim=-1, keepdim=True, name="b")
    _refused(kb.kernel(a, b), "exactly one reduction")


def test_refuses_layout_of_computed_value():
    kb = KB("k1_pointwise_bad", "pointwise")
    x = kb.input("x", f32, 4, 8)
    e = kb.op("exp", x)
    p = kb.op("permute", e, dims=(1, 0), name="p")
    err = _refused(kb.kernel(p), "only kernel inputs can be re-indexed")
    assert ">> %p" in err.where and err.hint


def test_refuses_mixed_output_shapes_and_bad_families():
    kb = KB("k1_pointwise_two", "pointwise")
    x = kb.input("x", f32, 4, 8)
    w = kb.input("w", f32, 8)
    a = kb.op("exp", x, name="a")
    b = kb.op("exp", w, name="b")
    _refused(kb.kernel(a, b), "outputs need one shape")
    with pytest.raises(CodegenError, match="unknown family"):
        lower_kernel(Kernel("k9_scan_x", "scan", kb.kernel(a).body), 9)


def test_refuses_gemm_prologue_and_attention_extras():
    kb = KB("k1_gemm_pro", "gemm")
    x = kb.input("x", f32, T, 8)
    w = kb.input("w", f32, 4, 8)
    y = kb.op("linear", kb.op("exp", x), w, name="y")
    _refused(kb.kernel(y), "computed inside the kernel")
    kb2 = KB("k2_attention_x", "attention")
    q = kb2.input("q", f32, 2, 4, 16)
    o = kb2.op("attention", q, q, q, causal=False, scale=0.25)
    z = kb2.op("exp", o, name="z")
    _refused(kb2.kernel(z), "exactly one attention op")


def test_refuses_keepdim_false_mixed_with_rows():
    kb = KB("k1_reduction_mean", "reduction")
    x = kb.input("x", f32, 4, 4)
    m = kb.op("mean", x, dim=-1, name="m")         # [4], aligns with the columns under numpy rules
    y = kb.op("mul", x, m, name="y")
    _refused(kb.kernel(y), "keepdim=False")
