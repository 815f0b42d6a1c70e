"""The production quant_fp8 kernel family (codegen/fp8_rows.py) under the Triton interpreter: codes
and scales bit for bit against the eager DeepSeek reference (`ir.ops.fp8.quant_fp8_ref`), and the
dequant round trip.

Round-trip bound (per element, tile scale s, y = x / s with |y| <= 448 after the clamp):
  * y in the e4m3 normal range (|y| >= 2^-6, binade [2^e, 2^(e+1))): the grid step is 2^(e-3),
    so RNE moves y by at most half of it, 2^(e-4) <= 2^-4 |y|;
  * y in the subnormal range (|y| < 2^-6): the step is 2^-9, so the error is at most 2^-10.
  Hence |q - y| <= 2^-4 |y| + 2^-10 and, multiplying by s, |deq - x| <= 2^-4 |x| + 2^-10 s:
  half an e4m3 ulp at that magnitude. fp32 rounding of x / s and q * s adds a relative 2^-23
  at most (slack below), and a bf16 output adds half a bf16 ulp, 2^-9 |deq| (8 significant bits).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fp8_kernels import DTYPES, F32, dequant, quant
from dsr_compiler.ir import DType, TensorType
from dsr_compiler.ir.ops import OPS, TypeRuleError
from dsr_compiler.ir.ops.fp8 import dequant_fp8_ref, quant_fp8_ref

BF16 = torch.bfloat16


def _codes_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    g, w = got.view(torch.uint8), want.view(torch.uint8)
    nan_w, nan_g = (w & 0x7F) == 0x7F, (g & 0x7F) == 0x7F
    bad = (nan_w != nan_g) | (~nan_w & (g != w))
    assert not bad.any(), f"{int(bad.sum())} codes differ, first at {bad.nonzero()[0].tolist()}: " \
                          f"got 0x{g[bad][0].item():02x} want 0x{w[bad][0].item():02x}"


def _scales_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


def _check_quant(x: torch.Tensor, scale_fmt: str | None = None):
    q, s = quant(x, scale_fmt)
    qr, sr = quant_fp8_ref(x, scale_fmt=scale_fmt)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (x.shape[0], x.shape[1] // 128)
    _codes_equal(q, qr)
    _scales_equal(s, sr)
    return q, s


PATTERNS = ("normal", "wide", "zero_tile", "huge_one", "tiny", "on_grid", "ties")


def _make(pattern: str, M: int, K: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    if pattern == "wide":            # magnitudes spread over 2^-30 .. 2^30
        x = x * torch.exp2(torch.randint(-30, 30, (M, K), generator=g).float())
    elif pattern == "zero_tile":     # some whole 1x128 tiles are zero
        x.view(M, K // 128, 128)[:, ::2] = 0.0
    elif pattern == "huge_one":      # one huge value per tile flushes the others towards 0
        t = x.view(M, K // 128, 128)
        idx = torch.randint(0, 128, (M, K // 128, 1), generator=g)
        t.scatter_(2, idx, torch.full((M, K // 128, 1), 3e30))
    elif pattern == "tiny":          # amax below the 1e-4 floor, fp32 subnormals included
        x = x * 1e-6
        x[0, :3] = torch.tensor([1e-40, -1e-45, 0.0])
    elif pattern == "on_grid":       # x / s lands exactly on e4m3 values and ties
        codes = torch.randint(0, 0x7F, (M, K), generator=g, dtype=torch.uint8)
        x = codes.view(torch.float8_e4m3fn).float() * (1.0 + (torch.rand(M, K, generator=g) < 0.5).float() / 16)
        x[:, ::128] = 448.0          # amax = 448 -> s = 1 exactly
        x = x * torch.where(torch.rand(M, K, generator=g) < 0.5, -1.0, 1.0)
    elif pattern == "ties":          # x / s = grid midpoints under a power-of-two scale
        x = (torch.randint(0, 2 * 448, (M, K), generator=g).float() / 2) * 2.0 ** -3
        x[:, ::128] = 448.0 * 2.0 ** -3   # s = 2^-3
    return x.to(dtype).contiguous()


@given(pattern=st.sampled_from(PATTERNS), M=st.sampled_from([1, 2, 5, 16, 17, 40]),
       K=st.sampled_from([128, 256, 384]), dtype=st.sampled_from([torch.float32, BF16]),
       scale_fmt=st.sampled_from([None, "ue8m0"]), seed=st.integers(0, 2 ** 16))
def test_quant_matches_reference(pattern, M, K, dtype, scale_fmt, seed):
    x = _make(pattern, M, K, dtype, seed)
    q, s = _check_quant(x, scale_fmt)
    # the dequant kernel is the reference's inverse, bit for bit, in f32 and bf16
    for out in (torch.float32, BF16):
        y = dequant(q, s, DTYPES[out])
        yr = dequant_fp8_ref(q, s, out_dtype=DTYPES[out])
        nan = torch.isnan(yr)
        assert torch.equal(torch.isnan(y), nan)
        assert torch.equal(y[~nan].view(torch.int16 if out == BF16 else torch.int32),
                           yr[~nan].view(torch.int16 if out == BF16 else torch.int32))


@given(pattern=st.sampled_from(("normal", "wide", "zero_tile", "tiny", "on_grid", "ties")),
       M=st.sampled_from([1, 3, 17]), dtype=st.sampled_from([torch.float32, BF16]),
       scale_fmt=st.sampled_from([None, "ue8m0"]), out=st.sampled_from(["f32", "bf16"]),
       seed=st.integers(0, 2 ** 16))
def test_dequant_round_trip_within_half_an_e4m3_ulp(pattern, M, dtype, scale_fmt, out, seed):
    x = _make(pattern, M, 256, dtype, seed).float()
    q, s = quant(x.to(dtype).contiguous(), scale_fmt)
    y = dequant(q, s, DType[out]).float()
    s_el = s.repeat_interleave(128, dim=1)
    bound = (2.0 ** -4 * x.abs() + 2.0 ** -10 * s_el) * (1 + 2.0 ** -20)
    if out == "bf16":
        bound = bound + 2.0 ** -9 * y.abs()
    err = (x - y).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g} at {(err - bound).argmax().item()}"


def test_all_zero_tile_scale_is_the_floor():
    q, s = _check_quant(torch.zeros(3, 256))
    assert torch.equal(s, torch.full((3, 2), torch.tensor(1e-4, dtype=torch.float32).item()) / 448)
    assert q.view(torch.uint8).eq(0).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # inf / inf in numpy
def test_non_finite_inputs_follow_torch():
    """A NaN makes its tile's scale and every code of the tile NaN; an inf makes s = inf, its own
    code NaN (inf / inf) and the others 0 -- all as the eager reference (NaN codes by class)."""
    x = torch.randn(2, 256)
    x[0, 3] = float("nan")
    x[1, 200] = float("inf")
    q, s = _check_quant(x)
    assert torch.isnan(s[0, 0]) and s[1, 1] == float("inf") and torch.isfinite(s[0, 1]) and torch.isfinite(s[1, 0])
    c = q.view(torch.uint8)
    assert ((c[0, :128] & 0x7F) == 0x7F).all()
    assert (c[1, 200] & 0x7F) == 0x7F and (c[1, 128:] & 0x7F).sum() == 0x7F


def test_one_huge_value_keeps_its_code_448():
    x = torch.full((1, 128), 1.0)
    x[0, 7] = -3e38
    q, s = _check_quant(x)
    assert q.view(torch.uint8)[0, 7] == 0xFE and (q.view(torch.uint8)[0, torch.arange(128) != 7] == 0).all()


def test_bad_quantizations_are_type_errors():
    x = TensorType(F32, ("T", 256))
    assert OPS["quant_fp8"].infer([TensorType(F32, ("T", 200))], {})[1].shape[-1] == 2   # ragged K: 2 tiles
    with pytest.raises(TypeRuleError, match="f32/bf16/f16"):
        OPS["quant_fp8"].infer([TensorType(DType.i32, ("T", 128))], {})
    with pytest.raises(TypeRuleError, match="scale_fmt"):
        OPS["quant_fp8"].infer([x], {"scale_fmt": "e8m0"})


def test_interpret_env_is_restored(monkeypatch):
    import os
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    quant(torch.ones(1, 128))
    assert "TRITON_INTERPRET" not in os.environ
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    quant(torch.ones(2, 128))
    assert os.environ["TRITON_INTERPRET"] == "0"
