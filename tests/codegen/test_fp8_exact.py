"""Bit-exactness of the FP8 e4m3 helpers in `codegen/templates/fp8_macros.j2` under the Triton
interpreter, against torch's own `torch.clamp(x, -448, 448).to(torch.float8_e4m3fn)`.

The inputs are every float32 where rounding can go wrong: all 256 e4m3 values, the midpoints
between neighbours (ties), the floats right next to each midpoint and each grid value, binade
edges (where the rounding carry must reach the exponent), e4m3 subnormals and their ties, fp32
subnormals, the saturation region (448, 449, 464 = halfway to 480, 1e6, inf), +-0 and NaNs; all
with both signs; plus a strided sweep over the whole fp32 bit space.

NaN policy (codegen/fp8.py): NaN in -> NaN code out (0x7F | sign of the NaN). In DeepSeek's
quantization x / s is NaN only if x or the tile's amax is NaN/inf, i.e. only from NaN/inf inputs.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dsr_compiler.codegen import fp8

PROBE = """\
import triton
import triton.language as tl
{% import "fp8_macros.j2" as fp8 %}


{{ fp8.helpers() }}


@triton.jit
def fp8_probe(x_ptr, r_ptr, code_ptr, dec_ptr, naive_ptr, cast_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok)
    r = _fp8_e4m3_round(x)
    code = _fp8_e4m3_quantize(x)
    tl.store(r_ptr + offs, r, mask=ok)
    tl.store(code_ptr + offs, code, mask=ok)
    tl.store(dec_ptr + offs, _fp8_e4m3_decode(code), mask=ok)
    # Triton's own casts: of the raw value (wrong in the interpreter) and of the rounded value
    tl.store(naive_ptr + offs, tl.clamp(x, -448.0, 448.0).to(tl.float8e4nv), mask=ok)
    tl.store(cast_ptr + offs, r.to(tl.float8e4nv), mask=ok)


@triton.jit
def misc_probe(s_ptr, p2_ptr, bf_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    s = tl.load(s_ptr + offs, mask=ok)
    tl.store(p2_ptr + offs, _fp8_pow2_ceil(s), mask=ok)
    tl.store(bf_ptr + offs, _fp8_to_bf16(s), mask=ok)
"""

BLOCK = 8192


def _f32(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(bits, dtype=np.uint32).view(np.float32).copy())


def _grid() -> torch.Tensor:
    """The finite non-negative e4m3 values in increasing order (codes 0x00..0x7E)."""
    return torch.arange(0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def _interesting() -> torch.Tensor:
    g = _grid()
    mids = (g[1:] + g[:-1]) / 2                      # exact in fp32: ties
    mids = torch.cat([mids, torch.tensor([464.0, 2.0 ** -10])])
    inf = torch.tensor(float("inf"))
    pts = torch.cat([g, mids])
    near = torch.cat([torch.nextafter(pts, inf), torch.nextafter(pts, -inf)])
    edges = torch.tensor([124.7, 31.9, 7.9, 1.97, 0.0155, 0.01562, 0.0156, 15.9, 3.95, 0.98, 0.49, 0.2449,
                          0.123, 0.0615, 0.0308, 1.9375, 1.96875, 239.9, 247.9, 255.9, 0.99, 1.03125,
                          1.0625, 1.1875, 3.0 * 2 ** -10, 5.0 * 2 ** -10, 7.5 * 2 ** -9, 2.0 ** -6 - 2.0 ** -11,
                          448.0, 449.0, 463.9, 464.0, 464.1, 479.0, 480.0, 500.0, 1e6, 3.4e38, float("inf")])
    subn = torch.arange(0, 17, dtype=torch.float32) * 2.0 ** -10   # k * 2^-9 and the ties between
    tiny = _f32(np.array([1, 2, 0x7FFFFF, 0x800000, 0x00400000], dtype=np.uint32))   # fp32 subnormals
    pos = torch.cat([pts, near, edges, subn, tiny])
    x = torch.cat([pos, -pos])
    nans = _f32(np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF], dtype=np.uint32))
    return torch.cat([x, torch.tensor([0.0, -0.0]), nans])


def _sweep(step: int = 4099) -> torch.Tensor:
    """Every `step`-th fp32 bit pattern (~1M values, both signs, NaNs included)."""
    bits = np.arange(0, 1 << 32, step, dtype=np.uint64).astype(np.uint32)
    return _f32(bits)


def _probe(x: torch.Tensor) -> dict[str, torch.Tensor]:
    src = fp8.template_env().from_string(PROBE).render()
    n = x.numel()
    out = {"r": torch.empty(n), "code": torch.empty(n, dtype=torch.uint8), "dec": torch.empty(n),
           "naive": torch.empty(n, dtype=torch.float8_e4m3fn), "cast": torch.empty(n, dtype=torch.float8_e4m3fn)}
    fp8.launch_interpreted(src, "fp8_probe", (-(-n // BLOCK),), x, out["r"], out["code"], out["dec"],
                           out["naive"], out["cast"], n, BLOCK)
    return out


@pytest.fixture(scope="module")
def interesting():
    x = _interesting()
    return x, _probe(x)


def _ref_codes(x: torch.Tensor) -> torch.Tensor:
    return fp8.e4m3_ref(x).view(torch.uint8)


def _assert_codes(x: torch.Tensor, got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit, except that a NaN code's sign is compared by class (IEEE leaves it open)."""
    nan_want = (want & 0x7F) == 0x7F
    nan_got = (got & 0x7F) == 0x7F
    bad = (nan_want != nan_got) | (~nan_want & (got != want))
    if bad.any():
        i = bad.nonzero().flatten()[:12]
        rows = [f"x={x[j].item()!r} (0x{x[j:j+1].view(torch.int32).item() & 0xFFFFFFFF:08x}): "
                f"got 0x{got[j].item():02x} want 0x{want[j].item():02x}" for j in i]
        pytest.fail(f"{int(bad.sum())} of {x.numel()} codes differ:\n" + "\n".join(rows))


def test_input_set_covers_every_code_and_tie(interesting):
    x, _ = interesting
    codes = set(_ref_codes(x).tolist())
    assert codes == set(range(256)), "every e4m3 code (NaN codes included) is produced by some input"
    assert (x == 1.0625).any() and (x == 464.0).any() and (x == 2.0 ** -10).any()


def test_quantize_matches_torch_bit_for_bit(interesting):
    x, out = interesting
    _assert_codes(x, out["code"], _ref_codes(x))


def test_round_gives_the_exact_e4m3_value(interesting):
    x, out = interesting
    want = fp8.e4m3_ref(x).float()
    r = out["r"]
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(r), nan)
    # equal values *and* equal sign bits (so -0 stays -0)
    assert torch.equal(r[~nan].view(torch.int32), want[~nan].view(torch.int32))


def test_nan_policy(interesting):
    """NaN in -> NaN code out, keeping the NaN's sign bit; -0 -> 0x80; +-inf saturate to +-448."""
    x, out = interesting
    bits = x.view(torch.int32)
    nan = torch.isnan(x)
    assert ((out["code"][nan] & 0x7F) == 0x7F).all()
    assert torch.equal(out["code"][nan] >> 7, ((bits[nan] >> 31) & 1).to(torch.uint8))
    assert out["code"][(x == 0) & (bits < 0)].eq(0x80).all() and out["code"][(x == 0) & (bits >= 0)].eq(0).all()
    assert out["code"][x == float("inf")].eq(0x7E).all() and out["code"][x == -float("inf")].eq(0xFE).all()


def test_decode_is_exact(interesting):
    x, out = interesting
    want = out["code"].view(torch.float8_e4m3fn).float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(out["dec"]), nan)
    assert torch.equal(out["dec"][~nan].view(torch.int32), want[~nan].view(torch.int32))


def test_triton_cast_of_rounded_value_is_exact(interesting):
    """Rounding first makes even the interpreter's broken cast exact (finite inputs), so the same
    helper is safe before a native `.to(tl.float8e4nv)` on a GPU too."""
    x, out = interesting
    keep = ~torch.isnan(x)
    _assert_codes(x[keep], out["cast"].view(torch.uint8)[keep], _ref_codes(x)[keep])


def test_interpreter_naive_cast_is_wrong(interesting):
    """Documents triton issue #8322: the interpreter's own f32 -> float8e4nv cast (after clamping)
    loses the rounding carry, rounds ties away from zero and truncates subnormals. Skips once a
    Triton release fixes it (then the helpers are merely redundant on the interpreter)."""
    x, out = interesting
    got, want = out["naive"].view(torch.uint8), _ref_codes(x)
    finite = torch.isfinite(x)
    bad = finite & (got != want)
    if not bad.any():
        pytest.skip("the Triton interpreter casts f32 -> float8e4nv correctly now (#8322 fixed)")
    by_value = {v: (int(g), int(w)) for v, g, w in zip(x[bad].tolist(), got[bad].tolist(), want[bad].tolist())}
    # the three failure modes named in the issue, each on a value from the input set
    assert 1.0625 in by_value, "tie 1 + 2^-4 must round to even (1.0, 0x38)"
    assert 1.97 in [round(v, 6) for v in by_value] or 124.7 in [round(v, 4) for v in by_value], "lost carry"
    assert any(abs(v) < 2.0 ** -6 for v in by_value), "subnormal rounding"


def test_sweep_over_fp32_bits():
    x = _sweep()
    out = _probe(x)
    _assert_codes(x, out["code"], _ref_codes(x))


def test_pow2_ceil_and_bf16_helpers():
    """ue8m0 rounding up to a power of two and f32 -> bf16 RNE, exact against torch (float64 log2)."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0x30000000, 0x50000000, size=20000, dtype=np.uint32)
    s = torch.cat([_f32(bits), torch.tensor([1e-4 / 448, 2.0 ** -20, 2.0 ** -20 * (1 + 2.0 ** -23), 1.0, 0.75,
                                             1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, float("inf"), float("nan")])])
    n = s.numel()
    p2, bf = torch.empty(n), torch.empty(n, dtype=torch.bfloat16)
    src = fp8.template_env().from_string(PROBE).render()
    fp8.launch_interpreted(src, "misc_probe", (-(-n // BLOCK),), s, p2, bf, n, BLOCK)
    ref = fp8.pow2_ceil_ref(s)
    fin = torch.isfinite(s)
    log2_ref = torch.exp2(torch.ceil(torch.log2(s[fin].double()))).float()
    assert torch.equal(ref[fin], log2_ref), "the bit formula is 2^ceil(log2 s)"
    assert torch.equal(p2[fin], ref[fin]) and torch.isnan(p2[~fin][-1]) and p2[~fin][0] == float("inf")
    nan = torch.isnan(s)
    assert torch.equal(bf[~nan].view(torch.int16), s[~nan].to(torch.bfloat16).view(torch.int16))
    assert torch.isnan(bf[nan]).all()
