"""Every template renders, parses, and compiles to PTX + cubin for sm_90a (no GPU needed)."""
from __future__ import annotations

import ast

import pytest
from codegen_helpers import KB
from dsr_compiler.codegen import CompiledKernel, compile_triton, lower_kernel, render
from dsr_compiler.codegen.build import compile_cached
from dsr_compiler.codegen.compile import parse_ptxas_log, run_ptxas
from dsr_compiler.ir import DType, sym
from dsr_compiler.ir.errors import CodegenError
from dsr_compiler.runtime.cache import ArtifactCache

T, S, N = sym("T"), sym("S"), sym("N")
f32, bf16 = DType.f32, DType.bf16


def pointwise_rope():
    kb = KB("k1_pointwise_rope", "pointwise")
    x = kb.input("x", bf16, T, 16, 64)
    cos = kb.input("cos", f32, T, 1, 64)
    sin = kb.input("sin", f32, T, 1, 64)
    r = kb.op("rope", x, cos, sin, name="r")
    return kb.kernel(r)


def reduction_add_rms():
    kb = KB("k2_reduction_add_rms_norm", "reduction")
    x = kb.input("x", bf16, T, 7168)
    r = kb.input("r", bf16, T, 7168)
    w = kb.input("w", bf16, 7168)
    h = kb.op("add", x, r, name="h")
    y = kb.op("rms_norm", h, w, eps=1e-6, name="y")
    return kb.kernel(h, y)


def reduction_looped_rms():
    kb = KB("k3_reduction_rms_norm", "reduction")
    x = kb.input("x", f32, T, N)
    w = kb.input("w", f32, N)
    y = kb.op("rms_norm", x, w, eps=1e-6)
    z = kb.op("silu", y, name="z")
    return kb.kernel(z)


def reduction_softmax():
    kb = KB("k4_reduction_softmax", "reduction")
    x = kb.input("x", f32, T, N)
    y = kb.op("softmax", x, dim=-1, name="y")
    return kb.kernel(y)


def gemm_swiglu():
    kb = KB("k5_gemm_swiglu", "gemm")
    x = kb.input("x", bf16, T, 512)
    w1 = kb.input("w1", bf16, 1024, 512)
    w3 = kb.input("w3", bf16, 1024, 512)
    a = kb.op("linear", x, w1)
    b = kb.op("linear", x, w3)
    y = kb.op("mul", kb.op("silu", a), b, name="y")
    return kb.kernel(y)


def gemm_residual_f32():
    kb = KB("k6_gemm_linear_add", "gemm")
    x = kb.input("x", f32, T, 200)
    w = kb.input("w", f32, 96, 200)
    res = kb.input("res", f32, T, 96)
    y = kb.op("add", kb.op("linear", x, w), res, name="y")
    return kb.kernel(y)


def attention_mla():
    kb = KB("k7_attention_attention", "attention")
    q = kb.input("q", bf16, 16, S, 192)
    k = kb.input("k", bf16, 16, S, 192)
    v = kb.input("v", bf16, 16, S, 128)
    o = kb.op("attention", q, k, v, causal=True, scale=192 ** -0.5, name="o")
    return kb.kernel(o)


def cumsum_bool():
    kb = KB("k8_cumsum_cumsum", "cumsum")
    x = kb.input("x", DType.bool, 2, S)
    return kb.kernel(kb.op("cumsum", x, dim=-1, name="y"))


def cumsum_bf16():
    kb = KB("k9_cumsum_cumsum", "cumsum")
    x = kb.input("x", bf16, T, 3000)
    return kb.kernel(kb.op("cumsum", x, dim=-1, name="y"))


def index_bf16():
    kb = KB("k10_index_index", "index")
    x = kb.input("x", bf16, T, 8, 64)
    i = kb.input("i", DType.i64, 3, S)
    j = kb.input("j", DType.i32, 3, S)
    return kb.kernel(kb.op("index", x, i, j, name="y"))


CASES = [
    pytest.param(pointwise_rope, id="pointwise_rope"),
    pytest.param(reduction_add_rms, id="reduction_add_rms_norm"),
    pytest.param(reduction_looped_rms, id="reduction_looped_rms"),
    pytest.param(reduction_softmax, id="reduction_softmax"),
    pytest.param(gemm_swiglu, id="gemm_swiglu", marks=pytest.mark.slow),
    pytest.param(gemm_residual_f32, id="gemm_residual_f32", marks=pytest.mark.slow),
    pytest.param(attention_mla, id="attention_mla", marks=pytest.mark.slow),
    pytest.param(cumsum_bool, id="cumsum_bool"),
    pytest.param(cumsum_bf16, id="cumsum_bf16"),
    pytest.param(index_bf16, id="index_bf16"),
]


@pytest.mark.parametrize("make", CASES)
def test_compiles_for_sm90a(make, tmp_path):
    spec = lower_kernel(make(), 1)
    src = render(spec)
    ast.parse(src)
    ck = compile_triton(spec, src, target="sm_90a")
    assert isinstance(ck, CompiledKernel) and ck.name == spec.name
    assert ".target sm_90a" in ck.ptx and f".entry {spec.name}" in ck.ptx
    assert ck.cubin[:4] == b"\x7fELF"
    assert ck.ttir and ck.ttgir and ck.llir
    assert ck.registers > 0
    assert ck.spills == 0, ck.ptxas_log            # the default tiles must not spill
    assert ck.ptx_params >= len(spec.args)
    assert "Used" in ck.ptxas_log
    if spec.family in ("gemm", "attention"):
        assert ck.shared_mem > 0
    # artifacts round-trip through the artifact cache (plain files, verified by hash)
    cache = ArtifactCache(tmp_path, enabled=True)
    first, hit = compile_cached(spec, src, "sm_90a", cache)
    assert not hit
    back, hit = compile_cached(spec, src, "sm_90a", cache)
    assert hit and back == first
    (cubin,) = tmp_path.glob("*/*/kernel.cubin")
    cubin.write_bytes(b"corrupt")                   # a changed file: evicted and compiled again
    again, hit = compile_cached(spec, src, "sm_90a", cache)
    assert not hit and cache.evictions == 1 and again.cubin == ck.cubin


def test_ptxas_failure_is_a_codegen_error():
    with pytest.raises(CodegenError, match="ptxas failed") as e:
        run_ptxas(".version 8.0\n.target sm_90a\n.address_size 64\nthis is not ptx\n", 90, "bad")
    assert "error" in e.value.where.lower()


def test_parse_ptxas_log():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    48 bytes stack frame, 16 bytes spill stores, 24 bytes spill loads\n"
           "ptxas info    : Used 168 registers, used 1 barriers, 1024 bytes smem, 400 bytes cmem[0]\n")
    assert parse_ptxas_log(log) == {"registers": 168, "spill_stores": 16, "spill_loads": 24, "smem": 1024,
                                    "stack": 48}


def test_unknown_target():
    spec = lower_kernel(reduction_softmax(), 1)
    with pytest.raises(CodegenError, match="unknown target"):
        compile_triton(spec, render(spec), target="gfx942")
