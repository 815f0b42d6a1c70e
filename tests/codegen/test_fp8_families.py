"""The gemm_fp8 and quant_fp8 kernel families (codegen/families/gemm_fp8.py, .../quant_fp8.py): run
under the Triton interpreter against the op table's eager references (ir/ops/fp8.py), compiled for
sm_90a, and their direct-PTX versions (codegen/ptx.py) assembled by ptxas.

Bounds used here:
  * codes and scales of a quantization whose input the kernel loads as is: bit for bit (torch's cast);
  * codes after in-kernel arithmetic (RMSNorm, a GEMM): the fp32 input of the rounding can differ from
    eager's in the last bit (operation order), which moves a value sitting on an e4m3 rounding
    boundary by one code: at most one code step, on at most 1% of the codes. In bf16 models eager
    also rounds every intermediate to bf16 (2^-8 relative) where the fused kernel keeps fp32, so a
    value moves by up to half an e4m3 step's 1/8 and ~1/16 of the codes may move by one step: 8%;
  * gemm_fp8 vs an fp32 GEMM of the dequantized operands: calc_diff <= 1e-3 (DeepGEMM's test);
    vs its reference (same block order, bf16 output): within one bf16 ulp (2^-8 relative).
"""
from __future__ import annotations

import re

import pytest
import torch
from codegen_helpers import KB, run_interpreted
from dsr_compiler.codegen import compile_triton, lower_kernel, render
from dsr_compiler.codegen.ptx import compile_ptx_kernel, ptx_supported
from dsr_compiler.ir import (
    DType,
    Kernel,
    run_graph,
)
from dsr_compiler.ir.ops.fp8 import (
    calc_diff,
    dequant_fp8_ref,
    dequant_weight_ref,
    pow2_ceil,
    quant_fp8_ref,
    quant_weight_ref,
)

F32, BF16 = DType.f32, DType.bf16


def _codes_close(got: torch.Tensor, want: torch.Tensor, exact: bool, frac: float = 0.01) -> None:
    g, w = got.view(torch.uint8).int(), want.view(torch.uint8).int()
    if exact:
        assert torch.equal(g, w), f"{int((g != w).sum())} codes differ"
        return
    diff = (g - w).abs()
    assert int(diff.max()) <= 1, f"codes differ by up to {int(diff.max())} steps"
    assert float((diff != 0).float().mean()) <= frac, f"{int((diff != 0).sum())} of {diff.numel()} codes differ"


def _gemm_operands(M: int, K: int, N: int, seed: int, pattern: str = "normal"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    if pattern == "zero_tile":
        x[:, :128] = 0.0
    elif pattern == "huge_one":
        x[:, 7] = 3e4
    w = torch.randn(N, K, generator=g) / K ** 0.5
    xq, xs = quant_fp8_ref(x)
    wq, ws = quant_weight_ref(w)
    return x, w, xq, xs, wq, ws


def _gemm_kernel(M, K, N, out_dtype=BF16, **attrs) -> Kernel:
    kb = KB("k1_gemm_fp8_test", "gemm_fp8")
    kb.input("xq", DType.fp8e4m3, M, K)
    kb.input("xs", F32, M, -(-K // 128))
    kb.input("wq", DType.fp8e4m3, N, K)
    kb.input("ws", F32, -(-N // 128), -(-K // 128))
    (y,) = kb.ops("gemm_fp8", "xq", "xs", "wq", "ws", out_dtype=out_dtype, **attrs)
    return kb.kernel(y)


@pytest.mark.parametrize("M,K,N,pattern", [(5, 256, 192, "normal"), (33, 384, 128, "zero_tile"),
                                           (16, 256, 256, "huge_one")])
def test_gemm_fp8_matches_reference_and_dequantized_fp32_gemm(M, K, N, pattern):
    x, w, xq, xs, wq, ws = _gemm_operands(M, K, N, seed=M + K + N, pattern=pattern)
    k = _gemm_kernel(M, K, N)
    (y,) = run_interpreted(k, [xq, xs, wq, ws])
    (ref,) = run_graph(k.body, [xq, xs, wq, ws])
    torch.testing.assert_close(y.float(), ref.float(), rtol=2 ** -8, atol=1e-6)
    fp32 = dequant_fp8_ref(xq, xs) @ dequant_weight_ref(wq, ws).T
    assert calc_diff(y.float(), fp32) <= 1e-3
    assert calc_diff(y.float(), x @ w.T) <= 4e-3          # vs unquantized operands: DESIGN's fp8 tolerance


def test_gemm_fp8_ragged_k_and_f32_output():
    M, K, N = 7, 200, 130                                  # K and N not multiples of 128 (masked tiles)
    _, _, xq, xs, wq, ws = _gemm_operands(M, K, N, seed=3)
    k = _gemm_kernel(M, K, N, out_dtype=F32, block_n=64)
    (y,) = run_interpreted(k, [xq, xs, wq, ws])
    (ref,) = run_graph(k.body, [xq, xs, wq, ws])
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def _swiglu_quant_kernel(M: int, K: int, N: int, model: DType) -> Kernel:
    kb = KB("k1_gemm_fp8_swiglu_quant", "gemm_fp8")
    kb.input("xq", DType.fp8e4m3, M, K)
    kb.input("xs", F32, M, K // 128)
    for w in ("w1", "w3"):
        kb.input(f"{w}q", DType.fp8e4m3, N, K)
        kb.input(f"{w}s", F32, -(-N // 128), K // 128)
    (a,) = kb.ops("gemm_fp8", "xq", "xs", "w1q", "w1s")
    (b,) = kb.ops("gemm_fp8", "xq", "xs", "w3q", "w3s")
    if model is F32:
        (a,) = kb.ops("cast", a, dtype=F32)
        (b,) = kb.ops("cast", b, dtype=F32)
    (s,) = kb.ops("silu", a)
    (h,) = kb.ops("mul", s, b)
    q, sc = kb.ops("quant_fp8", h)
    return kb.kernel(q, sc)


@pytest.mark.parametrize("model", [F32, BF16])
def test_swiglu_epilogue_quantizes_in_registers(model):
    M, K, N = 9, 256, 256
    _, _, xq, xs, w1q, w1s = _gemm_operands(M, K, N, seed=11)
    _, _, _, _, w3q, w3s = _gemm_operands(M, K, N, seed=12)
    k = _swiglu_quant_kernel(M, K, N, model)
    spec = lower_kernel(k, 1)
    assert spec.param("QUANT") and spec.param("DUAL") and spec.param("BLOCK_N") == 128
    ins = [xq, xs, w1q, w1s, w3q, w3s]
    q, s = run_interpreted(k, ins)
    qr, sr = run_graph(k.body, ins)
    torch.testing.assert_close(s, sr, rtol=2 ** -7, atol=0.0)
    _codes_close(q, qr, exact=False, frac=0.08 if model is BF16 else 0.01)


def _norm_quant_kernel(K: int, dt: DType, prologue: bool, scale_fmt=None) -> Kernel:
    kb = KB("k1_quant_fp8_rms_norm", "quant_fp8")
    kb.input("x", dt, "T", K)
    kb.input("w", dt, K)
    src = "x"
    outs: list[str] = []
    if prologue:                       # decoder-style residual: h = x + r feeds the norm and is returned
        kb.input("r", dt, "T", K)
        (src,) = kb.ops("add", "x", "r", outs=("h",))
        outs.append("h")
    (n,) = kb.ops("rms_norm", src, "w", eps=1e-6, outs=("n",))
    q, s = kb.ops("quant_fp8", n, scale_fmt=scale_fmt, outs=("n.q", "n.s"))
    if prologue:
        outs.append("n")               # e.g. the norm output also feeds a high-precision router gate
    return kb.kernel(q, s, *outs)


@pytest.mark.parametrize("K,dt,prologue,scale_fmt", [(256, F32, False, None), (384, BF16, True, "ue8m0"),
                                                     (200, F32, True, None)])
def test_rms_norm_writes_fp8_directly(K, dt, prologue, scale_fmt):
    g = torch.Generator().manual_seed(K)
    T = 6
    ins = [torch.randn(T, K, generator=g).to(dt.torch), (1 + 0.1 * torch.randn(K, generator=g)).to(dt.torch)]
    if prologue:
        ins.append(torch.randn(T, K, generator=g).to(dt.torch))
    for t in ins[:1] + ins[2:]:
        t[1] = 0.0                    # an all-zero row: rinv = 1/sqrt(eps), every tile's scale is the floor
    k = _norm_quant_kernel(K, dt, prologue, scale_fmt)
    got = run_interpreted(k, ins)
    want = run_graph(k.body, ins)
    _codes_close(got[0], want[0], exact=False, frac=0.08 if dt is BF16 else 0.01)
    torch.testing.assert_close(got[1], want[1], rtol=2 ** -20 if dt is F32 else 2 ** -7, atol=0.0)
    floor = torch.tensor([1e-4]) / 448
    assert torch.equal(got[1][1], (pow2_ceil(floor) if scale_fmt else floor).expand_as(got[1][1]))
    for a, b in zip(got[2:], want[2:]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2 if dt is BF16 else 1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern", ["zero_tile", "huge_one", "ragged"])
def test_bare_quant_is_bit_exact(pattern):
    g = torch.Generator().manual_seed(1)
    K = 320 if pattern == "ragged" else 256
    x = torch.randn(5, K, generator=g)
    if pattern == "zero_tile":
        x[:, 128:256] = 0.0
    elif pattern == "huge_one":
        x[:, 3] = 1e30
        x[:, 200] = -3e4
    kb = KB("k1_quant_fp8_act", "quant_fp8")
    kb.input("x", F32, "T", K)
    q, s = kb.ops("quant_fp8", "x")
    k = kb.kernel(q, s)
    got = run_interpreted(k, [x])
    want = quant_fp8_ref(x)
    _codes_close(got[0], want[0], exact=True)
    assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("out", [F32, BF16])
def test_dequant_kernel(out):
    x = torch.randn(4, 256) * 10
    q, s = quant_fp8_ref(x)
    kb = KB("k1_quant_fp8_dequant", "quant_fp8")
    kb.input("q", DType.fp8e4m3, "T", 256)
    kb.input("s", F32, "T", 2)
    (y,) = kb.ops("dequant_fp8", "q", "s", out_dtype=out)
    k = kb.kernel(y)
    (got,) = run_interpreted(k, [q, s])
    assert torch.equal(got, dequant_fp8_ref(q, s, out_dtype=out))


def test_families_compile_for_sm90a_and_their_ptx_assembles():
    """Triton for sm_90a (no spills), and every PTX-family kernel also as direct PTX through ptxas."""
    kernels = [_swiglu_quant_kernel("T", 256, 512, F32), _gemm_kernel("T", 512, 256),
               _norm_quant_kernel(256, BF16, True, "ue8m0")]
    kb = KB("k1_quant_fp8_dequant", "quant_fp8")
    kb.input("q", DType.fp8e4m3, "T", 256)
    kb.input("s", F32, "T", 2)
    kernels.append(kb.kernel(*kb.ops("dequant_fp8", "q", "s", out_dtype=BF16)))
    for i, k in enumerate(kernels, 1):
        spec = lower_kernel(k, i)
        ck = compile_triton(spec, render(spec))
        assert ck.registers > 0 and ck.spills == 0, (spec.name, ck.registers, ck.spills)
        if spec.family == "gemm_fp8":
            assert ptx_supported(spec) is not None         # GEMMs stay on Triton
            assert re.search(r"\b(wgmma|mma)\S*e4m3\.e4m3", ck.ptx), "no fp8 MMA in the sm_90a PTX"
        else:
            p = compile_ptx_kernel(spec)
            assert p.registers > 0 and p.spills == 0 and p.cubin
            assert p.ptx.count(".entry") == 1 and spec.name in p.ptx
