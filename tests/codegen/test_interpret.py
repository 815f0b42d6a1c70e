"""Lowered kernels run in the Triton interpreter agree with the reference interpreter (run_graph)."""
from __future__ import annotations

import pytest
import torch
from codegen_helpers import KB, check_kernel, random_inputs
from dsr_compiler.codegen import lower_kernel
from dsr_compiler.ir import DType, sym
from dsr_compiler.ir.errors import CodegenError

# masked-off lanes of a block compute on the loads' `other=0` (log(0), 1/0): numpy warns, harmlessly
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

T = sym("T")
N = sym("N")
f32, bf16 = DType.f32, DType.bf16


# ----------------------------------------------------------------------------- pointwise

@pytest.mark.parametrize("dt", [f32, bf16])
def test_pointwise_broadcast_permute_rope(dt):
    kb = KB("k1_pointwise_rope", "pointwise")
    x = kb.input("x", dt, T, 4, 16)               # [T, H, D]
    y = kb.input("y", dt, 4, T, 16)               # read through a permute
    bias = kb.input("bias", dt, 16)               # broadcast over T and H
    cos = kb.input("cos", f32, T, 1, 16)          # broadcast over H
    sin = kb.input("sin", f32, T, 1, 16)
    yp = kb.op("permute", y, dims=(1, 0, 2))
    r = kb.op("rope", x, cos, sin)
    a = kb.op("add", r, bias)
    s = kb.op("mul", a, yp)
    c = kb.op("cast", s, dtype=bf16, name="c")
    out = kb.op("silu", c, name="out")
    k = kb.kernel(out, r)
    for t in (1, 5):
        check_kernel(k, random_inputs(k, {"T": t}, seed=t))


def test_pointwise_slice_expand_reshape_where_cat():
    kb = KB("k2_pointwise_mix", "pointwise")
    x = kb.input("x", f32, T, 24)
    w = kb.input("w", f32, 3, 1)
    z = kb.input("z", f32, T, 3, 4)
    xs = kb.op("slice", x, dim=1, start=4, end=16)           # [T, 12]
    xr = kb.op("reshape", xs, shape=(T, 3, 4))               # a strided reshape (a view)
    we = kb.op("expand", w, shape=(T, 3, 4))
    zero = kb.op("const", value=0.0, dtype=f32)
    cond = kb.op("gt", xr, zero)
    sel = kb.op("where", cond, xr, we)
    m = kb.op("maximum", sel, z, name="m")
    k = kb.kernel(m)
    check_kernel(k, random_inputs(k, {"T": 3}))
    kb2 = KB("k3_pointwise_cat", "pointwise")
    a = kb2.input("a", f32, T, 5)
    b = kb2.input("b", f32, T, 3)
    c = kb2.op("cat", a, b, dim=1)
    e = kb2.op("exp", c, name="e")
    k2 = kb2.kernel(e)
    check_kernel(k2, random_inputs(k2, {"T": 4}))


def test_embedding_gather():
    kb = KB("k1_gemm_embedding", "gemm")
    w = kb.input("w", f32, 11, 8)
    ids = kb.input("ids", DType.i64, T)
    e = kb.op("embedding", w, ids, name="e")
    k = kb.kernel(e)
    check_kernel(k, random_inputs(k, {"T": 6}))


# ----------------------------------------------------------------------------- reductions

@pytest.mark.parametrize("dt,n", [(f32, 64), (bf16, 256)])
def test_residual_add_rms_norm_two_outputs(dt, n):
    kb = KB("k1_reduction_add_rms_norm", "reduction")
    x = kb.input("x", dt, T, n)
    r = kb.input("r", dt, T, n)
    w = kb.input("w", dt, n)
    h = kb.op("add", x, r, name="h")
    y = kb.op("rms_norm", h, w, eps=1e-6, name="y")
    k = kb.kernel(h, y)
    spec = lower_kernel(k, 1)
    assert spec.param("LOOPED") is False
    check_kernel(k, random_inputs(k, {"T": 3}))


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_symbolic_n_softmax_looped(op):
    kb = KB("k1_reduction_softmax", "reduction")
    x = kb.input("x", f32, T, N)
    s = kb.input("s", f32, T, 1)                   # per-row scale in the prologue
    xs = kb.op("mul", x, s)
    y = kb.op(op, xs, dim=-1, name="y")
    k = kb.kernel(y, block_n=32)
    spec = lower_kernel(k, 1)
    assert spec.param("LOOPED") is True and spec.param("BLOCK_N") == 32
    check_kernel(k, random_inputs(k, {"T": 3, "N": 75}))    # 3 chunks, last one ragged
    check_kernel(k, random_inputs(k, {"T": 2, "N": 20}))    # one partial chunk


def test_rms_norm_looped_with_epilogue_and_row_outputs():
    kb = KB("k1_reduction_rms_norm", "reduction")
    x = kb.input("x", f32, T, 80)
    w = kb.input("w", f32, 80)
    y = kb.op("rms_norm", x, w, eps=1e-5, name="y")
    z = kb.op("silu", y, name="z")
    k = kb.kernel(z, y, block_n=32, max_single_block=32)
    assert lower_kernel(k, 1).param("LOOPED") is True
    check_kernel(k, random_inputs(k, {"T": 2}))


@pytest.mark.parametrize("op,keepdim", [("sum", True), ("mean", False), ("amax", True), ("mean", True)])
def test_sum_mean_amax(op, keepdim):
    kb = KB(f"k1_reduction_{op}", "reduction")
    x = kb.input("x", f32, 2, T, 48)
    sq = kb.op("mul", x, x)
    m = kb.op(op, sq, dim=-1, keepdim=keepdim, name="m")
    outs = [m]
    if op == "mean" and keepdim:
        # mean -> + eps -> rsqrt -> * row: per-row epilogue feeding a row epilogue
        eps = kb.op("const", value=1e-6, dtype=f32)
        r = kb.op("rsqrt", kb.op("add", m, eps), name="r")
        outs = [kb.op("mul", x, r, name="y"), r]
    k = kb.kernel(*outs)
    check_kernel(k, random_inputs(k, {"T": 3}))


# ----------------------------------------------------------------------------- gemm

@pytest.mark.parametrize("m", [1, 7, 33])
def test_dual_gemm_swiglu(m):
    kb = KB("k1_gemm_swiglu", "gemm")
    x = kb.input("x", f32, T, 64)
    w1 = kb.input("w1", f32, 48, 64)
    w3 = kb.input("w3", f32, 48, 64)
    a = kb.op("linear", x, w1)
    b = kb.op("linear", x, w3)
    y = kb.op("mul", kb.op("silu", a), b, name="y")
    k = kb.kernel(y)
    spec = lower_kernel(k, 1)
    assert spec.param("DUAL") is True
    check_kernel(k, random_inputs(k, {"T": m}, seed=m), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("m", [1, 7, 33])
def test_gemm_residual_epilogue(m):
    kb = KB("k1_gemm_linear_add", "gemm")
    x = kb.input("x", f32, T, 40)                 # K not a multiple of BLOCK_K
    w = kb.input("w", f32, 24, 40)
    bias = kb.input("bias", f32, 24)
    res = kb.input("res", f32, T, 24)
    o = kb.op("linear", x, w, bias)
    y = kb.op("add", o, res, name="y")
    k = kb.kernel(y)
    check_kernel(k, random_inputs(k, {"T": m}, seed=m), rtol=1e-3, atol=1e-4)


def test_gemm_bf16_and_batched_matmul():
    kb = KB("k1_gemm_linear", "gemm")
    x = kb.input("x", bf16, 2, T, 32)
    w = kb.input("w", bf16, 16, 32)
    y = kb.op("linear", x, w, name="y")
    k = kb.kernel(y)
    check_kernel(k, random_inputs(k, {"T": 5}))
    kb2 = KB("k2_gemm_matmul", "gemm")
    a = kb2.input("a", f32, 3, T, 16)
    b = kb2.input("b", f32, 1, 16, 20)            # batch broadcast (stride 0)
    c = kb2.op("matmul", a, b)
    s = kb2.op("const", value=0.5, dtype=f32)
    y2 = kb2.op("mul", c, s, name="y")
    k2 = kb2.kernel(y2)
    check_kernel(k2, random_inputs(k2, {"T": 9}), rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- attention

def _attention_kernel(dt, causal, sq, sk, d=48, dv=32, scale=0.2):
    kb = KB("k1_attention_attention", "attention")
    q = kb.input("q", dt, 2, 2, sq, d)
    k = kb.input("k", dt, 2, 2, sk, d)
    v = kb.input("v", dt, 2, 2, sk, dv)
    o = kb.op("attention", q, k, v, causal=causal, scale=scale, name="o")
    return kb.kernel(o)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_prefill_d_ne_dv(causal):
    S = sym("S")
    k = _attention_kernel(f32, causal, S, S)
    spec = lower_kernel(k, 1)
    assert (spec.param("D0"), spec.param("D1"), spec.param("DV_PAD")) == (32, 16, 32)
    check_kernel(k, random_inputs(k, {"S": 19}))


def test_attention_decode_sq_lt_sk_causal():
    k = _attention_kernel(f32, True, sym("Q"), sym("S"))
    check_kernel(k, random_inputs(k, {"Q": 1, "S": 37}))
    check_kernel(k, random_inputs(k, {"Q": 3, "S": 21}))


def test_attention_bf16():
    k = _attention_kernel(bf16, True, 17, 17, d=32, dv=32)
    check_kernel(k, random_inputs(k, {}))


def test_every_pointwise_op_matches_reference():
    """Each POINTWISE op in the table, alone in a kernel, matches its eager reference."""
    from dsr_compiler.ir import OPS
    from dsr_compiler.ir.ops import POINTWISE
    for name, op in OPS.items():
        if op.kind != POINTWISE:
            continue
        k, inputs = one_op_kernel(name)
        check_kernel(k, inputs)


def one_op_kernel(name: str):
    kb = KB(f"k1_pointwise_{name}", "pointwise")
    a = kb.input("a", f32, 3, 8)
    b = kb.input("b", f32, 3, 8)
    pos = {"log", "sqrt", "rsqrt", "pow", "reciprocal"}
    if name == "where":
        c = kb.input("c", DType.bool, 3, 8)
        out = kb.op(name, c, a, b, name="out")
    elif name == "rope":
        out = kb.op(name, a, b, kb.input("s", f32, 8), name="out")
    elif name == "cast":
        out = kb.op(name, a, dtype=bf16, name="out")
    elif name == "iota":
        out = kb.op(name, n=24, dtype=DType.i64, name="out")
    elif name in ("lt", "le", "gt", "ge", "eq", "add", "sub", "mul", "div", "maximum", "minimum", "pow"):
        out = kb.op(name, a, b, name="out")
    else:
        out = kb.op(name, a, name="out")
    k = kb.kernel(out)
    inputs = random_inputs(k, {}, seed=1, positive=("a",) if name in pos else ())
    if name == "eq":
        inputs[1][0] = inputs[0][0]
    return k, inputs


def test_integer_and_bool_pointwise():
    kb = KB("k1_pointwise_int", "pointwise")
    i = kb.input("i", DType.i32, T)
    j = kb.input("j", DType.i64, T)
    x = kb.input("x", f32, T)
    s = kb.op("add", i, j, name="s")               # i64
    f = kb.op("mul", s, x, name="f")               # f32
    c = kb.op("lt", i, x, name="c")                # bool
    n = kb.op("cast", f, dtype=DType.i32, name="n")
    k = kb.kernel(s, f, c, n)
    check_kernel(k, random_inputs(k, {"T": 9}))


def test_bf16_cast_rounds_like_eager():
    kb = KB("k1_pointwise_cast", "pointwise")
    x = kb.input("x", f32, 64)
    c = kb.op("cast", x, dtype=bf16)
    y = kb.op("cast", c, dtype=f32, name="y")
    k = kb.kernel(y)
    inputs = random_inputs(k, {})
    from codegen_helpers import run_interpreted
    got = run_interpreted(k, inputs)[0]
    assert torch.equal(got, inputs[0].to(torch.bfloat16).float())


def test_edge_ranks():
    """Rank-1 rows, rank-0 outputs, vector GEMMs and unbatched attention."""
    kb = KB("k1_reduction_softmax", "reduction")
    x = kb.input("x", f32, 40)
    k = kb.kernel(kb.op("softmax", x, dim=0, name="y"), kb.op("sum", x, dim=-1, name="s"))
    with pytest.raises(CodegenError, match="needs exactly one reduction op, found 2"):
        lower_kernel(k, 1)
    kb = KB("k1_reduction_softmax", "reduction")
    x = kb.input("x", f32, 40)
    k = kb.kernel(kb.op("softmax", x, dim=0, name="y"))
    check_kernel(k, random_inputs(k, {}))
    kb = KB("k2_pointwise_scalar", "pointwise")
    a = kb.input("a", f32)
    b = kb.input("b", f32)
    k = kb.kernel(kb.op("mul", a, b, name="c"))
    check_kernel(k, random_inputs(k, {}))
    kb = KB("k3_gemm_linear", "gemm")
    v = kb.input("v", f32, 24)
    w = kb.input("w", f32, 8, 24)
    k = kb.kernel(kb.op("linear", v, w, name="y"))
    check_kernel(k, random_inputs(k, {}), rtol=1e-3)
    kb = KB("k4_attention_attention", "attention")
    q = kb.input("q", f32, 5, 16)
    kk = kb.input("k", f32, 9, 16)
    vv = kb.input("v", f32, 9, 8)
    k = kb.kernel(kb.op("attention", q, kk, vv, causal=True, scale=0.3, name="o"))
    check_kernel(k, random_inputs(k, {}))
