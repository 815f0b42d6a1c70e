"""FP8 grouped GEMMs of the routed MoE experts (the DeepSeek-V3 recipe applied to ir/ops_moe.py).

Where it sits: registered into the op table (ir/ops.py imports it last); `quantize_fp8` rewrites
a `moe_gemm_gate_up` + `moe_gemm_down` pair into these two ops when the policy quantizes experts,
and codegen/fp8_moe.py lowers each to one kernel of family `moe_gemm_fp8`. Same expert-sorted,
block-padded row layout as ir/ops_moe.py (`rows`, `blk`, R = T*k + E*(BM-1)); weights are the
stacked expert tensors quantized in 128x128 blocks per expert (`fp8_block_quant` on [E, N, K]):

    %a.q, %a.s : fp8e4m3[R,I], f32[R,I/128] = moe_gemm_gate_up_fp8(%x.q, %x.s, %rows, %blk, %w13.q, %w13.s, ...)
    %y_slots   : f32[T*k,H]                 = moe_gemm_down_fp8(%a.q, %a.s, %rows, %blk, %w2.q, %w2.s, %w, ...)

gate_up: per row r of expert e = blk[r // BM] and token t = rows[r] // k: gate and up are the
DeepSeek block-scaled GEMMs of x[t] with w13[e]'s first and second I rows (fp32 accumulation per
128-wide K block, result rounded to bf16 as DESIGN.md section 5 prescribes, then held in
`out_dtype`, the experts' eager dtype), h = silu(gate) * up in `out_dtype` arithmetic (as the eager
expert computes it), then h is quantized in 1x128 tiles (the quant epilogue: only codes + scales
leave the kernel). Pad rows hold h = 0 (codes 0, scale 1e-4/448).
down: the block-scaled GEMM of the act codes with w2[e] (bf16 result), times the slot's routing
weight in fp32, written to row `slot` of [T*k, H] (pad rows skipped), as moe_gemm_down.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from .ops import AttrSpec, OpDef, TypeRuleError, _same, register
from .ops_fp8 import SCALE_FMTS, gemm_fp8_ref, n_blocks, quant_fp8_ref
from .ops_moe import _check_layout, _row_experts, _static_int
from .types import DType, TensorType

MOE_GEMM_FP8 = "moe_gemm_fp8"


def _scales(op: str, what: str, codes: TensorType, s: TensorType, block: int, weight: bool) -> None:
    if codes.dtype is not DType.fp8e4m3:
        raise TypeRuleError(f"{op}: {what} codes must be fp8e4m3, got {codes}")
    if weight:
        want = codes.shape[:-2] + (n_blocks(codes.shape[-2], block), n_blocks(codes.shape[-1], block))
    else:
        want = codes.shape[:-1] + (n_blocks(codes.shape[-1], block),)
    if s.dtype is not DType.f32 or s.rank != len(want) or not all(_same(a, b) for a, b in zip(s.shape, want)):
        raise TypeRuleError(f"{op}: {what} scales must be {TensorType(DType.f32, want)}, got {s}")


def _gate_up_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    xq, xs, rows_t, blocks_t, wq, ws = ts
    op, b = "moe_gemm_gate_up_fp8", a["block"]
    if xq.rank != 2:
        raise TypeRuleError(f"{op}: x codes must be [T, H], got {xq}")
    _scales(op, "activation", xq, xs, b, False)
    if wq.rank != 3 or not _same(wq.shape[2], xq.shape[1]):
        raise TypeRuleError(f"{op}: w13 codes must be fp8e4m3[E, 2I, {xq.shape[1]}], got {wq}")
    _scales(op, "w13", wq, ws, b, True)
    e = _static_int(wq.shape[0], "E", op)
    two_i = _static_int(wq.shape[1], "2I", op)
    if two_i % (2 * b):
        raise TypeRuleError(f"{op}: 2I={two_i} must be a multiple of 2*{b} (gate and up blocks must not mix)")
    if a["out_dtype"] not in (DType.bf16, DType.f32, DType.f16) or a["scale_fmt"] not in SCALE_FMTS:
        raise TypeRuleError(f"{op}: out_dtype must be a float and scale_fmt None or 'ue8m0'")
    rows = _check_layout(op, xq.shape[0], a["topk"], e, a["block_m"], rows_t, blocks_t)
    return (TensorType(DType.fp8e4m3, (rows, two_i // 2)), TensorType(DType.f32, (rows, (two_i // 2) // b)))


def gate_up_fp8_ref(xq, xs, rows, blk, w13q, w13s, *, topk: int, block_m: int, block: int = 128,
                    out_dtype: DType = DType.bf16, scale_fmt: str | None = None):
    n_rows, inter = rows.shape[0], w13q.shape[1] // 2
    h = torch.zeros(n_rows, inter, dtype=out_dtype.torch)
    valid = rows >= 0
    expert = _row_experts(blk, n_rows, block_m)
    tok = rows.long().clamp_min(0) // topk
    ib = inter // block
    for e in torch.unique(expert[valid]).tolist():
        sel = valid & (expert == e)
        t = tok[sel]
        gate = gemm_fp8_ref(xq[t], xs[t], w13q[e, :inter], w13s[e, :ib], block).to(out_dtype.torch)
        up = gemm_fp8_ref(xq[t], xs[t], w13q[e, inter:], w13s[e, ib:], block).to(out_dtype.torch)
        h[sel] = F.silu(gate) * up
    return quant_fp8_ref(h, block, scale_fmt)


def _down_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    aq, as_, rows_t, blocks_t, wq, ws, weights = ts
    op, b = "moe_gemm_down_fp8", a["block"]
    if aq.rank != 2:
        raise TypeRuleError(f"{op}: act codes must be [R, I], got {aq}")
    _scales(op, "act", aq, as_, b, False)
    if wq.rank != 3 or not _same(wq.shape[2], aq.shape[1]):
        raise TypeRuleError(f"{op}: w2 codes must be fp8e4m3[E, H, {aq.shape[1]}], got {wq}")
    _scales(op, "w2", wq, ws, b, True)
    if weights.rank != 2 or weights.dtype is not DType.f32:
        raise TypeRuleError(f"{op}: routing weights must be f32[T, k], got {weights}")
    e = _static_int(wq.shape[0], "E", op)
    k = _static_int(weights.shape[1], "k", op)
    rows = _check_layout(op, weights.shape[0], k, e, a["block_m"], rows_t, blocks_t)
    if not _same(aq.shape[0], rows):
        raise TypeRuleError(f"{op}: act must have {rows} rows (the sorted layout), got {aq}")
    return (TensorType(DType.f32, (weights.shape[0] * k, wq.shape[1])),)


def down_fp8_ref(aq, as_, rows, blk, w2q, w2s, weights, *, block_m: int, block: int = 128):
    out = torch.zeros(weights.numel(), w2q.shape[1], dtype=torch.float32)
    valid = rows >= 0
    expert = _row_experts(blk, rows.shape[0], block_m)
    flat_w = weights.reshape(-1)
    for e in torch.unique(expert[valid]).tolist():
        sel = valid & (expert == e)
        slots = rows[sel].long()
        y = gemm_fp8_ref(aq[sel], as_[sel], w2q[e], w2s[e], block)
        out[slots] = y.float() * flat_w[slots].unsqueeze(-1)
    return out


_COMMON = {"block_m": AttrSpec((int,)), "block": AttrSpec((int,), required=False, default=128)}

register(OpDef("moe_gemm_gate_up_fp8", MOE_GEMM_FP8, (6, 6), _gate_up_rule, gate_up_fp8_ref, n_outputs=2,
               attrs={**_COMMON, "topk": AttrSpec((int,)),
                      "out_dtype": AttrSpec((DType,), required=False, default=DType.bf16,
                                            doc="the experts' eager dtype (silu(gate) * up is computed in it)"),
                      "scale_fmt": AttrSpec((str,), required=False, default=None)},
               doc="FP8 grouped GEMM gate+up (gathered token rows, SwiGLU) with a 1x128 quant epilogue"))
register(OpDef("moe_gemm_down_fp8", MOE_GEMM_FP8, (7, 7), _down_rule, down_fp8_ref, attrs=_COMMON,
               doc="FP8 grouped GEMM down, x routing weight, scattered to row `slot` of [T*k, H]"))

__all__ = ["MOE_GEMM_FP8", "down_fp8_ref", "gate_up_fp8_ref"]
