"""FP8 ops of the op table: `quant_fp8`, `gemm_fp8`, `dequant_fp8` (DeepSeek-V3 block recipe).

Where it sits: in the one op table (`ir/ops/__init__.py` imports it after `core.py`); the FP8
constants (E4M3_MAX, SCALE_FLOOR) live here once, and codegen and the zoo import them.
The `quantize_fp8` pass (ir/passes/quantize_fp8.py) rewrites eligible `linear`s into
`quant_fp8` + `gemm_fp8`; codegen lowers them in the `quant_fp8` and `gemm_fp8` kernel families
(codegen/families/quant_fp8.py, codegen/families/gemm_fp8.py). The eager references below ARE the numeric contract
of DESIGN.md section 5; compiled kernels are checked against them:

    element type   float8_e4m3fn, max +-448; codes are torch's own clamp(v, -448, 448).to(e4m3fn)
    activations    1 x `block` tiles along the last dim: s = max(amax|tile|, 1e-4) / 448 (fp32),
                   scale_fmt "ue8m0": s = 2^ceil(log2 s) (exact, from the bits); q = cast(x / s)
    weights        `block` x `block` tiles: codes [N, K] + fp32 scales [ceil(N/b), ceil(K/b)]
                   (`weight_scale_inv` of DeepSeek checkpoints: w ~ q * s); see ir/params.py
    GEMM           fp32 accumulator; each `block`-wide K slice is an fp32 dot of the decoded codes,
                   scaled by sA[m, kb] * sB[nb, kb] (that product first) and added; one cast at the end

A ragged last tile (K or N not a multiple of `block`) takes its amax over the elements that exist.
NaN follows torch: a NaN input makes its tile's scale NaN (amax propagates NaN).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import sympy
import torch

from ..types import DType, TensorType, to_expr
from ._def import GEMM, AttrSpec, OpDef, TypeRuleError, dims_equal, register

QUANT = "quant"          # op kind: fused by ir/passes/fuse/fp8.py into the quant_fp8 / gemm_fp8 families
E4M3_MAX = 448.0         # largest finite float8_e4m3fn; codes are clamp(v, -448, 448).to(e4m3fn)
SCALE_FLOOR = 1e-4       # scales are max(amax, SCALE_FLOOR) / E4M3_MAX
SCALE_FMTS = (None, "ue8m0")
GEMM_OUT_DTYPES = (DType.bf16, DType.f32)


def n_blocks(size: Any, block: int) -> sympy.Expr:
    """ceil(size / block) as a sympy dim (an int for static sizes)."""
    return sympy.ceiling(to_expr(size) / block)


# ----------------------------------------------------------------------------- eager references

def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2 s) for positive fp32 s, exactly (bits: bump the exponent unless the mantissa is 0)."""
    bits = s.float().contiguous().view(torch.int32)
    up = ((bits >> 23) + ((bits & 0x7FFFFF) != 0).to(torch.int32)) << 23
    return torch.where(torch.isnan(s), s, up.view(torch.float32))


def e4m3(v: torch.Tensor) -> torch.Tensor:
    """torch's saturating cast to float8_e4m3fn: clamp to +-448, then round to nearest even."""
    return torch.clamp(v.float(), -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def _tiles(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., K] as fp32 [..., ceil(K/block), block], zero-padded (zeros never raise an amax)."""
    k = x.shape[-1]
    nb = -(-k // block)
    xf = x.float()
    if nb * block != k:
        xf = torch.nn.functional.pad(xf, (0, nb * block - k))
    return xf.reshape(*x.shape[:-1], nb, block)


def tile_scales(amax: torch.Tensor, scale_fmt: str | None) -> torch.Tensor:
    s = amax.clamp(min=SCALE_FLOOR) / E4M3_MAX
    return pow2_ceil(s) if scale_fmt == "ue8m0" else s


def quant_fp8_ref(x: torch.Tensor, block: int = 128, scale_fmt: str | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (codes float8_e4m3fn [..., K], scales f32 [..., ceil(K/block)])."""
    k = x.shape[-1]
    t = _tiles(x, block)
    s = tile_scales(t.abs().amax(dim=-1), scale_fmt)
    q = e4m3(t / s[..., None]).reshape(*x.shape[:-1], -1)[..., :k].contiguous()
    return q, s.contiguous()


def dequant_fp8_ref(q: torch.Tensor, s: torch.Tensor, block: int = 128, out_dtype: DType = DType.f32
                    ) -> torch.Tensor:
    """codes [..., K] x scales [..., ceil(K/block)] -> values, computed in fp32, one cast at the end."""
    k = q.shape[-1]
    y = q.float() * s.float().repeat_interleave(block, dim=-1)[..., :k]
    return y.to(out_dtype.torch)


def quant_weight_ref(w: torch.Tensor, block: int = 128, scale_fmt: str | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (codes float8_e4m3fn [..., N, K], scales f32 [..., ceil(N/b), ceil(K/b)]) in
    `block` x `block` tiles (leading dims, e.g. stacked MoE experts, are quantized independently)."""
    if w.dim() < 2:
        raise ValueError(f"weight quantization takes a [..., N, K] weight, got shape {tuple(w.shape)}")
    lead, (n, k) = w.shape[:-2], w.shape[-2:]
    nb, kb = -(-n // block), -(-k // block)
    wf = torch.nn.functional.pad(w.float(), (0, kb * block - k, 0, nb * block - n))
    t = wf.reshape(*lead, nb, block, kb, block)
    s = tile_scales(t.abs().amax(dim=(-3, -1)), scale_fmt)
    q = e4m3(t / s[..., :, None, :, None]).reshape(*lead, nb * block, kb * block)[..., :n, :k].contiguous()
    return q, s.contiguous()


def dequant_weight_ref(q: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    n, k = q.shape[-2:]
    full = s.float().repeat_interleave(block, dim=-2)[..., :n, :].repeat_interleave(block, dim=-1)[..., :k]
    return q.float() * full


def gemm_fp8_ref(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, block: int = 128,
                 out_dtype: DType = DType.bf16, block_m: int | None = None, block_n: int | None = None
                 ) -> torch.Tensor:
    """DeepSeek block-scaled GEMM: fp32 acc += (xq_kb . wq_kb^T) * (sA[:, kb] * sB[nb, kb]) per K block."""
    lead, k = xq.shape[:-1], xq.shape[-1]
    n = wq.shape[0]
    a = xq.reshape(-1, k).float()
    sa = xs.reshape(-1, xs.shape[-1]).float()
    b = wq.float()
    sb = ws.float().repeat_interleave(block, dim=0)[:n]          # [N, ceil(K/b)]: row n uses block row n // b
    acc = torch.zeros(a.shape[0], n, dtype=torch.float32)
    for kb in range(-(-k // block)):
        lo, hi = kb * block, min(k, (kb + 1) * block)
        part = a[:, lo:hi] @ b[:, lo:hi].T
        acc = acc + part * (sa[:, kb, None] * sb[None, :, kb])
    return acc.to(out_dtype.torch).reshape(*lead, n)


# ----------------------------------------------------------------------------- type rules

def _check_block(a: Mapping[str, Any], op: str) -> int:
    b = a["block"]
    if b <= 0 or b & (b - 1):
        raise TypeRuleError(f"{op}: block must be a positive power of two, got {b}")
    return b


def _quant_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    x = ts[0]
    b = _check_block(a, "quant_fp8")
    if a["scale_fmt"] not in SCALE_FMTS:
        raise TypeRuleError(f"quant_fp8: scale_fmt must be None or \"ue8m0\", got {a['scale_fmt']!r}")
    if x.rank < 1 or x.dtype not in (DType.f32, DType.bf16, DType.f16):
        raise TypeRuleError(f"quant_fp8: x must be an f32/bf16/f16 tensor [..., K], got {x}")
    return (x.with_dtype(DType.fp8e4m3), TensorType(DType.f32, x.shape[:-1] + (n_blocks(x.shape[-1], b),)))


def _scales_of(q: TensorType, s: TensorType, block: int, op: str) -> None:
    if q.dtype is not DType.fp8e4m3 or q.rank < 1:
        raise TypeRuleError(f"{op}: codes must be fp8e4m3[..., K], got {q}")
    want = q.shape[:-1] + (n_blocks(q.shape[-1], block),)
    if s.dtype is not DType.f32 or s.rank != q.rank or not dims_equal(s.shape, want):
        raise TypeRuleError(f"{op}: scales for codes {q} in 1x{block} tiles must be "
                            f"{TensorType(DType.f32, want)}, got {s}")


def _dequant_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    q, s = ts
    b = _check_block(a, "dequant_fp8")
    _scales_of(q, s, b, "dequant_fp8")
    if a["out_dtype"] not in (DType.f32, DType.bf16):
        raise TypeRuleError(f"dequant_fp8: out_dtype must be f32 or bf16, got {a['out_dtype']}")
    return (q.with_dtype(a["out_dtype"]),)


def _gemm_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    xq, xs, wq, ws = ts
    b = _check_block(a, "gemm_fp8")
    _scales_of(xq, xs, b, "gemm_fp8 (activation)")
    if wq.dtype is not DType.fp8e4m3 or wq.rank != 2:
        raise TypeRuleError(f"gemm_fp8: weight codes must be fp8e4m3[N, K], got {wq}")
    if not dims_equal(wq.shape[1], xq.shape[-1]):
        raise TypeRuleError(f"gemm_fp8: K mismatch: activation {xq} vs weight {wq}")
    want = (n_blocks(wq.shape[0], b), n_blocks(wq.shape[1], b))
    if ws.dtype is not DType.f32 or ws.rank != 2 or not dims_equal(ws.shape, want):
        raise TypeRuleError(f"gemm_fp8: weight scales for {wq} in {b}x{b} blocks must be "
                            f"{TensorType(DType.f32, want)}, got {ws}")
    if a["out_dtype"] not in GEMM_OUT_DTYPES:
        raise TypeRuleError(f"gemm_fp8: out_dtype must be bf16 or f32, got {a['out_dtype']}")
    for key in ("block_m", "block_n"):
        t = a[key]
        if t is not None and (t < 16 or t & (t - 1)):
            raise TypeRuleError(f"gemm_fp8: {key} must be None or a power of two >= 16, got {t}")
    if a["block_n"] is not None and a["block_n"] % b and b % a["block_n"]:
        raise TypeRuleError(f"gemm_fp8: block_n {a['block_n']} and block {b} must divide one another")
    return (TensorType(a["out_dtype"], xq.shape[:-1] + (wq.shape[0],)),)


_BLOCK = AttrSpec((int,), required=False, default=128, doc="tile width of the scales (DeepSeek: 128)")

register(OpDef("quant_fp8", QUANT, (1, 1), _quant_rule,
               lambda x, block, scale_fmt: quant_fp8_ref(x, block, scale_fmt),
               attrs={"block": _BLOCK,
                      "scale_fmt": AttrSpec((str,), required=False, default=None,
                                            doc='None (fp32 scales) or "ue8m0" (power-of-two scales)')},
               n_outputs=2,
               doc="1 x block activation quantization -> (codes fp8e4m3[..., K], scales f32[..., ceil(K/block)])"))

register(OpDef("dequant_fp8", QUANT, (2, 2), _dequant_rule,
               lambda q, s, block, out_dtype: dequant_fp8_ref(q, s, block, out_dtype),
               attrs={"block": _BLOCK, "out_dtype": AttrSpec((DType,), required=False, default=DType.f32)},
               doc="codes x 1 x block scales -> values (fp32 math, one cast)"))

register(OpDef("gemm_fp8", GEMM, (4, 4), _gemm_rule, gemm_fp8_ref,
               attrs={"block": _BLOCK,
                      "out_dtype": AttrSpec((DType,), required=False, default=DType.bf16,
                                            doc="bf16 per DESIGN.md section 5"),
                      "block_m": AttrSpec((int,), required=False, default=None, doc="GEMM tile rows (None: codegen)"),
                      "block_n": AttrSpec((int,), required=False, default=None, doc="GEMM tile cols (None: codegen)")},
               doc="x[..., K] @ w[N, K]^T on fp8 codes with 1 x block activation and block x block weight "
                   "scales; fp32 accumulation per K block; -> out_dtype[..., N]"))


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's global error measure 1 - 2 sum(x y) / sum(x^2 + y^2) (0 when equal), in fp64."""
    x, y = x.detach().double(), y.detach().double()
    denom = float((x * x + y * y).sum())
    if denom == 0.0:
        return 0.0
    return 1.0 - 2.0 * float((x * y).sum()) / denom


__all__ = ["E4M3_MAX", "QUANT", "SCALE_FLOOR", "SCALE_FMTS", "calc_diff", "dequant_fp8_ref", "dequant_weight_ref",
           "e4m3", "gemm_fp8_ref", "n_blocks", "pow2_ceil", "quant_fp8_ref", "quant_weight_ref",
           "tile_scales"]
