"""FP8 ops of the op table (ir/ops/fp8.py): type rules, printed IR round trips, and the eager
references that ARE the numeric contract of DESIGN.md section 5.

Round-trip bound per element of a 1x128 (or 128x128) tile with scale s (y = x / s, |y| <= 448):
RNE onto the e4m3 grid moves y by at most half a grid step: 2^-4 |y| in the normal range
(|y| >= 2^-6, step 2^(e-3) in binade [2^e, 2^(e+1))) and 2^-10 below it (subnormal step 2^-9).
So |dequant(quant(x)) - x| <= 2^-4 |x| + 2^-10 s, plus fp32 rounding of x / s and q * s (slack 2^-20 |x|).
"""
from __future__ import annotations

import pytest
import torch
from dsr_compiler.ir import DType, TensorType, parse, print_graph, verify
from dsr_compiler.ir.errors import VerifyError
from dsr_compiler.ir.ops import OPS, TypeRuleError
from dsr_compiler.ir.ops.fp8 import (
    calc_diff,
    dequant_fp8_ref,
    dequant_weight_ref,
    gemm_fp8_ref,
    quant_fp8_ref,
    quant_weight_ref,
)
from hypothesis import given
from hypothesis import strategies as st

from dsr_compiler.models.weights import quantize_fp8_blocks

F8 = DType.fp8e4m3


def _t(dt: DType, *shape) -> TensorType:
    return TensorType(dt, shape)


def test_type_rules():
    q, s = OPS["quant_fp8"].infer([_t(DType.bf16, "T", 200)], {})
    assert str(q) == "fp8e4m3[T,200]" and str(s) == "f32[T,2]"         # ragged K: ceil(200/128) scales
    (y,) = OPS["gemm_fp8"].infer([_t(F8, "T", 256), _t(DType.f32, "T", 2), _t(F8, 300, 256),
                                  _t(DType.f32, 3, 2)], {})
    assert str(y) == "bf16[T,300]"
    (y,) = OPS["dequant_fp8"].infer([_t(F8, 4, 256), _t(DType.f32, 4, 2)], {"out_dtype": DType.bf16})
    assert str(y) == "bf16[4,256]"


@pytest.mark.parametrize("op,ins,attrs,msg", [
    ("quant_fp8", [_t(DType.i32, 4, 128)], {}, "f32/bf16/f16"),
    ("quant_fp8", [_t(DType.f32, 4, 128)], {"block": 96}, "power of two"),
    ("quant_fp8", [_t(DType.f32, 4, 128)], {"scale_fmt": "e8m0"}, "scale_fmt"),
    ("gemm_fp8", [_t(F8, 4, 256), _t(DType.f32, 4, 2), _t(F8, 64, 128), _t(DType.f32, 1, 1)], {}, "K mismatch"),
    ("gemm_fp8", [_t(F8, 4, 256), _t(DType.f32, 4, 2), _t(F8, 300, 256), _t(DType.f32, 2, 2)], {}, r"f32\[3,2\]"),
    ("gemm_fp8", [_t(F8, 4, 256), _t(DType.f32, 4, 3), _t(F8, 64, 256), _t(DType.f32, 1, 2)], {}, r"f32\[4,2\]"),
    ("gemm_fp8", [_t(DType.bf16, 4, 256), _t(DType.f32, 4, 2), _t(F8, 64, 256), _t(DType.f32, 1, 2)], {}, "codes"),
    ("gemm_fp8", [_t(F8, 4, 256), _t(DType.f32, 4, 2), _t(F8, 64, 256), _t(DType.f32, 1, 2)],
     {"out_dtype": DType.i32}, "out_dtype"),
    ("gemm_fp8", [_t(F8, 4, 256), _t(DType.f32, 4, 2), _t(F8, 64, 256), _t(DType.f32, 1, 2)],
     {"block_m": 24}, "block_m"),
])
def test_type_rule_errors(op, ins, attrs, msg):
    with pytest.raises(TypeRuleError, match=msg):
        OPS[op].infer(ins, attrs)


IR = """
graph g(%x : bf16[T,256], param %w.q : fp8e4m3[384,256], param %w.s : f32[3,2]) {
  %x.q, %x.s : fp8e4m3[T,256], f32[T,2] = quant_fp8(%x, block=128, scale_fmt="ue8m0")  # mlp.w1
  %y : bf16[T,384] = gemm_fp8(%x.q, %x.s, %w.q, %w.s, block=128, out_dtype=bf16, block_m=64)  # mlp.w1
  %z : f32[T,256] = dequant_fp8(%x.q, %x.s, out_dtype=f32)
  return %y, %z
}
"""


def test_text_ir_round_trip_and_verify():
    g = parse(IR)
    assert parse(print_graph(g)) == g
    assert g.nodes[0].attr("scale_fmt") == "ue8m0" and g.nodes[1].attr("out_dtype") is DType.bf16
    bad = IR.replace("%y : bf16[T,384]", "%y : f32[T,384]")
    with pytest.raises(VerifyError, match="type rule gives bf16"):
        verify(parse(bad))


def _tile_bound_ok(x: torch.Tensor, deq: torch.Tensor, s: torch.Tensor, block: int) -> None:
    sf = s.repeat_interleave(block, dim=-1)[..., : x.shape[-1]]
    bound = 2.0 ** -4 * x.abs() + 2.0 ** -10 * sf + 2.0 ** -20 * x.abs()
    bad = (deq - x).abs() > bound
    assert not bad.any(), f"{int(bad.sum())} elements beyond half an e4m3 ulp"


PATTERNS = ("normal", "wide", "zero_tile", "huge_one", "tiny")


def _pattern(p: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if p == "wide":
        x = x * torch.exp2(torch.randint(-30, 30, shape, generator=g).float())
    elif p == "zero_tile":
        x[..., :128] = 0.0
    elif p == "huge_one":
        x[..., 5] = 3e30
    elif p == "tiny":
        x = x * 1e-7
    return x


@given(p=st.sampled_from(PATTERNS), rows=st.integers(1, 5), k=st.sampled_from([128, 200, 256, 384]),
       fmt=st.sampled_from([None, "ue8m0"]), seed=st.integers(0, 2 ** 16))
def test_activation_round_trip_within_half_an_e4m3_ulp(p, rows, k, fmt, seed):
    x = _pattern(p, (rows, k), seed)
    q, s = quant_fp8_ref(x, 128, fmt)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (rows, -(-k // 128))
    assert torch.equal(q.view(torch.uint8), torch.clamp(x / s.repeat_interleave(128, -1)[:, :k], -448, 448)
                       .to(torch.float8_e4m3fn).view(torch.uint8))          # codes are torch's own cast
    assert (s >= 1e-4 / 448).all()
    if fmt == "ue8m0":
        assert torch.equal(torch.frexp(s).mantissa, torch.full_like(s, 0.5))
    _tile_bound_ok(x, dequant_fp8_ref(q, s), s, 128)


@given(p=st.sampled_from(PATTERNS), n=st.sampled_from([128, 130, 256]), k=st.sampled_from([128, 256, 320]),
       seed=st.integers(0, 2 ** 16))
def test_weight_round_trip_per_128x128_block(p, n, k, seed):
    w = _pattern(p, (n, k), seed)
    q, s = quant_weight_ref(w)
    assert s.shape == (-(-n // 128), -(-k // 128))
    full = s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    _tile_bound_ok(w.reshape(-1, 1), dequant_weight_ref(q, s).reshape(-1, 1), full.reshape(-1, 1), 1)
    qq, ss = quantize_fp8_blocks(w)                                         # the checkpoint loader's quantizer
    assert torch.equal(q.view(torch.uint8), qq.view(torch.uint8)) and torch.equal(s, ss)


def test_stacked_weights_quantize_per_expert():
    w = torch.randn(3, 130, 256)
    q, s = quant_weight_ref(w)
    assert s.shape == (3, 2, 2)
    for e in range(3):
        qe, se = quant_weight_ref(w[e])
        assert torch.equal(q[e].view(torch.uint8), qe.view(torch.uint8)) and torch.equal(s[e], se)


@pytest.mark.parametrize("m,k,n", [(7, 256, 200), (64, 512, 128)])
def test_gemm_reference_vs_fp32_gemm_of_dequantized_operands(m, k, n):
    x, w = torch.randn(m, k), torch.randn(n, k) / k ** 0.5
    xq, xs = quant_fp8_ref(x)
    wq, ws = quant_weight_ref(w)
    y = gemm_fp8_ref(xq, xs, wq, ws)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    ref = dequant_fp8_ref(xq, xs) @ dequant_weight_ref(wq, ws).T
    assert calc_diff(y.float(), ref) <= 1e-3
    torch.testing.assert_close(y.float(), ref, rtol=2 ** -8, atol=1e-5)      # one bf16 rounding apart
    assert calc_diff(y.float(), x @ w.T) <= 4e-3                           # the fp8 tolerance's GEMM budget
    y3 = gemm_fp8_ref(xq.reshape(1, m, k), xs.reshape(1, m, -1), wq, ws)    # leading dims pass through
    assert torch.equal(y3.reshape(m, n), y)


def test_calc_diff():
    a = torch.randn(100)
    assert calc_diff(a, a) == pytest.approx(0.0, abs=1e-12)
    assert calc_diff(a, -a) == pytest.approx(2.0)
    assert calc_diff(torch.zeros(3), torch.zeros(3)) == 0.0
