"""MoE ops of the op table: router, dispatch, grouped GEMMs, combine (DESIGN.md §4 "MoE").

Where it sits: in the one op table (`ir/ops/__init__.py` imports it after `fp8.py`, whose references
the FP8 grouped GEMMs at the end of this module reuse). The
frontend's MoE leaf lowering (`dsr_compiler/frontend/lowerings/moe.py`) emits these five ops for the
zoo's `MoE`; `codegen/families/moe.py` lowers each to one kernel family. No op loops over experts in the
IR, and no shape depends on routing: every size is a sympy expression of the token count `T`.

    %w, %ids     : f32[T,k], i32[T,k]      = moe_router(%x, %gate_w[, %bias], topk=k, ...)
    %rows, %blk  : i32[R], i32[NB]         = moe_dispatch(%ids, n_experts=E, block_m=BM)
    %act         : bf16[R,I]               = moe_gemm_gate_up(%x, %rows, %blk, %w13, topk=k, block_m=BM)
    %y_slots     : f32[T*k,H]              = moe_gemm_down(%act, %rows, %blk, %w2, %w, block_m=BM)
    %y           : bf16[T,H]               = moe_combine(%y_slots[, %shared], topk=k, dtype=bf16)

with R = T*k + E*(BM-1) (the most rows the expert-sorted, block-padded layout can need) and
NB = ceiling(R/BM). Layout contract shared by the ops (and checked by the tests):

* a *slot* is one (token, choice) pair, numbered `t*k + j` (row-major `[T, k]`);
* `rows` lists the slots expert by expert (expert 0 first), ascending slot id within an expert,
  each expert's run padded with -1 to a multiple of BM and starting at a multiple of BM; the
  unused tail is -1. `blk[b]` is the expert of rows `b*BM .. b*BM+BM-1`, or -1 for unused blocks.
* `w13[e]` is `cat(w1_e, w3_e)` along dim 0 (`[2I, H]`, gate rows first); `w2[e]` is `[H, I]`.

Numerics are the zoo's (`dsr_compiler.models.deepseek`): the references below are its code.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sympy
import torch
import torch.nn.functional as F

from ..types import DType, TensorType, to_expr
from ._def import AttrSpec, OpDef, TypeRuleError, dims_equal, register
from .fp8 import SCALE_FMTS, gemm_fp8_ref, n_blocks, quant_fp8_ref

MOE_ROUTER = "moe_router"
MOE_DISPATCH = "moe_dispatch"
MOE_GEMM = "moe_gemm"
MOE_COMBINE = "moe_combine"

SCORINGS = ("sigmoid", "softmax")
GROUP_SCORES = ("top2_sum", "max")


def moe_rows(tokens: sympy.Expr | int, topk: int, n_experts: int, block_m: int) -> sympy.Expr:
    """R: the most rows of the padded expert-sorted layout (every expert may waste BM-1 rows)."""
    return to_expr(tokens) * topk + n_experts * (block_m - 1)


def moe_blocks(rows: sympy.Expr, block_m: int) -> sympy.Expr:
    """NB: BM-row blocks covering R rows."""
    return sympy.ceiling(to_expr(rows) / block_m)


def _static_int(d: sympy.Expr, what: str, op: str) -> int:
    if not d.is_Integer:
        raise TypeRuleError(f"{op}: {what} must be static, got {d}")
    return int(d)


def _stable_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


# ----------------------------------------------------------------------------- moe_router

def _router_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    x, w = ts[0], ts[1]
    op = MOE_ROUTER
    if x.rank != 2 or not x.dtype.is_float:
        raise TypeRuleError(f"{op}: x must be a float [T, H] tensor, got {x}")
    if w.rank != 2 or not w.dtype.is_float or not dims_equal(w.shape[1], x.shape[1]):
        raise TypeRuleError(f"{op}: gate weight must be float [E, {x.shape[1]}], got {w}")
    e = _static_int(w.shape[0], "the expert count", op)
    if len(ts) == 3:
        b = ts[2]
        if b.rank != 1 or not b.dtype.is_float or not dims_equal(b.shape[0], e):
            raise TypeRuleError(f"{op}: bias must be float [{e}], got {b}")
    k, ng, kg = a["topk"], a["n_group"], a["topk_group"]
    if not 1 <= k <= e:
        raise TypeRuleError(f"{op}: topk={k} must be in 1..{e} (the expert count)")
    if ng < 1 or e % ng:
        raise TypeRuleError(f"{op}: n_group={ng} must divide the expert count {e}")
    if not 1 <= kg <= ng:
        raise TypeRuleError(f"{op}: topk_group={kg} must be in 1..n_group={ng}")
    if ng > 1 and k > kg * (e // ng):
        raise TypeRuleError(f"{op}: topk={k} exceeds the {kg * (e // ng)} experts of the {kg} kept groups")
    if a["scoring"] not in SCORINGS:
        raise TypeRuleError(f"{op}: scoring must be one of {SCORINGS}, got {a['scoring']!r}")
    if a["group_score"] not in GROUP_SCORES:
        raise TypeRuleError(f"{op}: group_score must be one of {GROUP_SCORES}, got {a['group_score']!r}")
    t = x.shape[0]
    return TensorType(DType.f32, (t, k)), TensorType(DType.i32, (t, k))


def _router_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *, topk: int, n_group: int,
                topk_group: int, scoring: str, group_score: str, route_scale: float, norm_topk: bool):
    # The zoo's Gate.forward, op for op (fp32 GEMM, stable top-k: ties go to the lower index).
    logits = F.linear(x.float(), w.float())
    scores = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(dim=-1)
    original = scores
    if bias is not None:
        scores = scores + bias.float()
    if n_group > 1:
        e = w.shape[0]
        grouped = scores.unflatten(-1, (n_group, e // n_group))
        if group_score == "top2_sum":
            gs = _stable_topk(grouped, min(2, e // n_group))[0].sum(dim=-1)
        else:
            gs = grouped.amax(dim=-1)
        kept = _stable_topk(gs, topk_group)[1]
        keep = torch.zeros_like(gs, dtype=torch.bool).scatter(-1, kept, True)
        scores = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(-2)
    indices = _stable_topk(scores, topk)[1]
    weights = original.gather(-1, indices)
    if norm_topk:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * route_scale, indices.to(torch.int32)


register(OpDef(
    MOE_ROUTER, MOE_ROUTER, (2, 3), _router_rule, _router_ref, n_outputs=2,
    attrs={"topk": AttrSpec((int,), doc="experts per token"),
           "n_group": AttrSpec((int,), required=False, default=1, doc="expert groups (1: no group limit)"),
           "topk_group": AttrSpec((int,), required=False, default=1, doc="groups kept per token"),
           "scoring": AttrSpec((str,), doc="sigmoid | softmax"),
           "group_score": AttrSpec((str,), required=False, default="top2_sum",
                                   doc="top2_sum (sum of a group's top-2 biased scores) | max"),
           "route_scale": AttrSpec((float,), required=False, default=1.0, doc="routed_scaling_factor"),
           "norm_topk": AttrSpec((bool,), required=False, default=False, doc="normalize the k weights (+1e-20)")},
    doc="router: fp32 gate GEMM -> sigmoid|softmax -> +bias (selection only) -> group limit -> stable top-k; "
        "weights from the unbiased scores (normalized when norm_topk) x route_scale; ids i32"))


# ----------------------------------------------------------------------------- moe_dispatch

def _dispatch_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    (ids,) = ts
    op = MOE_DISPATCH
    if ids.rank != 2 or ids.dtype not in (DType.i32, DType.i64):
        raise TypeRuleError(f"{op}: ids must be integer [T, k], got {ids}")
    e, bm = a["n_experts"], a["block_m"]
    if e < 1 or bm < 1:
        raise TypeRuleError(f"{op}: n_experts and block_m must be >= 1, got {e} and {bm}")
    k = _static_int(ids.shape[1], "k (ids.shape[1])", op)
    rows = moe_rows(ids.shape[0], k, e, bm)
    return TensorType(DType.i32, (rows,)), TensorType(DType.i32, (moe_blocks(rows, bm),))


def _dispatch_ref(ids: torch.Tensor, *, n_experts: int, block_m: int):
    t, k = ids.shape
    flat = ids.reshape(-1).long()
    rows = t * k + n_experts * (block_m - 1)
    nb = -(-rows // block_m)
    valid = (flat >= 0) & (flat < n_experts)
    counts = torch.bincount(flat[valid], minlength=n_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    offsets = torch.cumsum(padded, 0) - padded
    key = torch.where(valid, flat, n_experts)
    order = torch.sort(key, stable=True).indices          # slots by expert, ascending slot id within
    order = order[: int(valid.sum())]
    e_sorted = flat[order]
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel()) - first[e_sorted]
    sorted_slots = torch.full((rows,), -1, dtype=torch.int32)
    sorted_slots[offsets[e_sorted] + rank] = order.to(torch.int32)
    starts = torch.arange(nb) * block_m
    ends = offsets + padded
    inside = (starts[:, None] >= offsets[None, :]) & (starts[:, None] < ends[None, :])
    block_expert = torch.where(inside.any(1), inside.int().argmax(1), -1).to(torch.int32)
    return sorted_slots, block_expert


register(OpDef(
    MOE_DISPATCH, MOE_DISPATCH, (1, 1), _dispatch_rule, _dispatch_ref, n_outputs=2,
    attrs={"n_experts": AttrSpec((int,)), "block_m": AttrSpec((int,), doc="rows per grouped-GEMM block")},
    doc="per-expert counts, exclusive scan of the BM-padded counts, slot ids sorted by expert (ascending within), "
        "pads -1; block_expert[b] = expert of block b (-1: unused)"))


# ----------------------------------------------------------------------------- grouped GEMMs

def _check_layout(op: str, tokens: sympy.Expr, k: int, e: int, bm: int, rows_t: TensorType,
                  blocks_t: TensorType) -> sympy.Expr:
    if bm < 1:
        raise TypeRuleError(f"{op}: block_m must be >= 1, got {bm}")
    rows = moe_rows(tokens, k, e, bm)
    if rows_t.rank != 1 or rows_t.dtype is not DType.i32 or not dims_equal(rows_t.shape[0], rows):
        raise TypeRuleError(f"{op}: sorted slots must be i32[{rows}] (T*k + E*(BM-1)), got {rows_t}")
    nb = moe_blocks(rows, bm)
    if blocks_t.rank != 1 or blocks_t.dtype is not DType.i32 or not dims_equal(blocks_t.shape[0], nb):
        raise TypeRuleError(f"{op}: block experts must be i32[{nb}], got {blocks_t}")
    return rows


def _gate_up_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    x, rows_t, blocks_t, w13 = ts
    op = "moe_gemm_gate_up"
    if x.rank != 2 or not x.dtype.is_float:
        raise TypeRuleError(f"{op}: x must be a float [T, H] tensor, got {x}")
    if w13.rank != 3 or w13.dtype != x.dtype or not dims_equal(w13.shape[2], x.shape[1]):
        raise TypeRuleError(f"{op}: w13 must be {x.dtype.value}[E, 2I, {x.shape[1]}], got {w13}")
    e = _static_int(w13.shape[0], "E (w13.shape[0])", op)
    two_i = _static_int(w13.shape[1], "2I (w13.shape[1])", op)
    if two_i % 2:
        raise TypeRuleError(f"{op}: w13.shape[1] must be even (gate rows then up rows), got {two_i}")
    rows = _check_layout(op, x.shape[0], a["topk"], e, a["block_m"], rows_t, blocks_t)
    return (TensorType(x.dtype, (rows, two_i // 2)),)


def _row_experts(blocks: torch.Tensor, n_rows: int, block_m: int) -> torch.Tensor:
    return blocks.long()[torch.arange(n_rows) // block_m]


def _gate_up_ref(x, sorted_slots, block_expert, w13, *, topk: int, block_m: int):
    # Each present expert runs the zoo MLP's first half on its rows: silu(x @ w1^T) * (x @ w3^T).
    n_rows, inter = sorted_slots.shape[0], w13.shape[1] // 2
    out = x.new_zeros(n_rows, inter)
    valid = sorted_slots >= 0
    expert = _row_experts(block_expert, n_rows, block_m)
    tok = sorted_slots.long().clamp_min(0) // topk
    for e in torch.unique(expert[valid]).tolist():      # the reference loops; the kernel does not
        sel = valid & (expert == e)
        xe = x[tok[sel]]
        out[sel] = F.silu(F.linear(xe, w13[e, :inter])) * F.linear(xe, w13[e, inter:])
    return out


register(OpDef(
    "moe_gemm_gate_up", MOE_GEMM, (4, 4), _gate_up_rule, _gate_up_ref,
    attrs={"topk": AttrSpec((int,)), "block_m": AttrSpec((int,))},
    doc="grouped GEMM over expert-sorted rows: gather x[slot // k], both halves of w13[e] = [w1; w3], "
        "SwiGLU epilogue; pad rows give 0"))


def _down_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    act, rows_t, blocks_t, w2, weights = ts
    op = "moe_gemm_down"
    if act.rank != 2 or not act.dtype.is_float:
        raise TypeRuleError(f"{op}: act must be a float [R, I] tensor, got {act}")
    if w2.rank != 3 or w2.dtype != act.dtype or not dims_equal(w2.shape[2], act.shape[1]):
        raise TypeRuleError(f"{op}: w2 must be {act.dtype.value}[E, H, {act.shape[1]}], got {w2}")
    if weights.rank != 2 or weights.dtype is not DType.f32:
        raise TypeRuleError(f"{op}: routing weights must be f32[T, k], got {weights}")
    e = _static_int(w2.shape[0], "E (w2.shape[0])", op)
    k = _static_int(weights.shape[1], "k (weights.shape[1])", op)
    rows = _check_layout(op, weights.shape[0], k, e, a["block_m"], rows_t, blocks_t)
    if not dims_equal(act.shape[0], rows):
        raise TypeRuleError(f"{op}: act must have {rows} rows (the sorted layout), got {act}")
    return (TensorType(DType.f32, (weights.shape[0] * k, w2.shape[1])),)


def _down_ref(act, sorted_slots, block_expert, w2, weights, *, block_m: int):
    # expert(x).float() * weight, written to the slot's row (the zoo's per_slot[tok, slot]).
    n_rows = sorted_slots.shape[0]
    out = torch.zeros(weights.numel(), w2.shape[1], dtype=torch.float32)
    valid = sorted_slots >= 0
    expert = _row_experts(block_expert, n_rows, block_m)
    flat_w = weights.reshape(-1)
    for e in torch.unique(expert[valid]).tolist():
        sel = valid & (expert == e)
        slots = sorted_slots[sel].long()
        out[slots] = F.linear(act[sel], w2[e]).float() * flat_w[slots].unsqueeze(-1)
    return out


register(OpDef(
    "moe_gemm_down", MOE_GEMM, (5, 5), _down_rule, _down_ref, attrs={"block_m": AttrSpec((int,))},
    doc="grouped GEMM act @ w2[e]^T, output rounded to act's dtype, x routing weight (fp32), "
        "scattered to row `slot` of [T*k, H]; pad rows skipped"))


# ----------------------------------------------------------------------------- moe_combine

def _combine_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    ys = ts[0]
    op = MOE_COMBINE
    k = a["topk"]
    if ys.rank != 2 or ys.dtype is not DType.f32:
        raise TypeRuleError(f"{op}: per-slot outputs must be f32[T*k, H], got {ys}")
    if k < 1:
        raise TypeRuleError(f"{op}: topk must be >= 1, got {k}")
    tokens = sympy.simplify(ys.shape[0] / k)
    if tokens.is_integer is not True:
        raise TypeRuleError(f"{op}: {ys.shape[0]} rows are not a multiple of topk={k}")
    if not a["dtype"].is_float:
        raise TypeRuleError(f"{op}: output dtype must be float, got {a['dtype'].value}")
    if len(ts) == 2:
        sh = ts[1]
        if (sh.rank != 2 or not sh.dtype.is_float or not dims_equal(sh.shape[0], tokens)
                or not dims_equal(sh.shape[1], ys.shape[1])):
            raise TypeRuleError(f"{op}: shared-expert output must be float [{tokens}, {ys.shape[1]}], got {sh}")
    return (TensorType(a["dtype"], (tokens, ys.shape[1])),)


def _combine_ref(ys: torch.Tensor, shared: torch.Tensor | None = None, *, topk: int, dtype: DType):
    per_slot = ys.reshape(-1, topk, ys.shape[1])
    y = per_slot[:, 0]
    for s in range(1, topk):                             # fp32, slot order (the zoo's sum)
        y = y + per_slot[:, s]
    if shared is not None:
        y = y + shared.float()
    return y.to(dtype.torch)


register(OpDef(
    MOE_COMBINE, MOE_COMBINE, (1, 2), _combine_rule, _combine_ref,
    attrs={"topk": AttrSpec((int,)), "dtype": AttrSpec((DType,))},
    doc="y[t] = sum over slots j = 0..k-1 of y_slots[t*k + j] in fp32 and fixed order, + shared[t]; one cast"))


# ----------------------------------------------------------------------------- FP8 grouped GEMMs
# FP8 grouped GEMMs of the routed MoE experts (the DeepSeek-V3 recipe applied to the ops above).
#
# `quantize_fp8` rewrites a `moe_gemm_gate_up` + `moe_gemm_down` pair into these two ops when the
# policy quantizes experts, and codegen/families/moe_gemm_fp8.py lowers each to one kernel of family `moe_gemm_fp8`. Same expert-sorted,
# block-padded row layout as the ops above (`rows`, `blk`, R = T*k + E*(BM-1)); weights are the
# stacked expert tensors quantized in 128x128 blocks per expert (`fp8_block_quant` on [E, N, K]):
#
#     %a.q, %a.s : fp8e4m3[R,I], f32[R,I/128] = moe_gemm_gate_up_fp8(%x.q, %x.s, %rows, %blk, %w13.q, %w13.s, ...)
#     %y_slots   : f32[T*k,H]                 = moe_gemm_down_fp8(%a.q, %a.s, %rows, %blk, %w2.q, %w2.s, %w, ...)
#
# gate_up: per row r of expert e = blk[r // BM] and token t = rows[r] // k: gate and up are the
# DeepSeek block-scaled GEMMs of x[t] with w13[e]'s first and second I rows (fp32 accumulation per
# 128-wide K block, result rounded to bf16 as DESIGN.md section 5 prescribes, then held in
# `out_dtype`, the experts' eager dtype), h = silu(gate) * up in `out_dtype` arithmetic (as the eager
# expert computes it), then h is quantized in 1x128 tiles (the quant epilogue: only codes + scales
# leave the kernel). Pad rows hold h = 0 (codes 0, scale 1e-4/448).
# down: the block-scaled GEMM of the act codes with w2[e] (bf16 result), times the slot's routing
# weight in fp32, written to row `slot` of [T*k, H] (pad rows skipped), as moe_gemm_down.

MOE_GEMM_FP8 = "moe_gemm_fp8"


def _fp8_scales(op: str, what: str, codes: TensorType, s: TensorType, block: int, weight: bool) -> None:
    if codes.dtype is not DType.fp8e4m3:
        raise TypeRuleError(f"{op}: {what} codes must be fp8e4m3, got {codes}")
    if weight:
        want = codes.shape[:-2] + (n_blocks(codes.shape[-2], block), n_blocks(codes.shape[-1], block))
    else:
        want = codes.shape[:-1] + (n_blocks(codes.shape[-1], block),)
    if s.dtype is not DType.f32 or not dims_equal(s.shape, want):
        raise TypeRuleError(f"{op}: {what} scales must be {TensorType(DType.f32, want)}, got {s}")


def _gate_up_fp8_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    xq, xs, rows_t, blocks_t, wq, ws = ts
    op, b = "moe_gemm_gate_up_fp8", a["block"]
    if xq.rank != 2:
        raise TypeRuleError(f"{op}: x codes must be [T, H], got {xq}")
    _fp8_scales(op, "activation", xq, xs, b, False)
    if wq.rank != 3 or not dims_equal(wq.shape[2], xq.shape[1]):
        raise TypeRuleError(f"{op}: w13 codes must be fp8e4m3[E, 2I, {xq.shape[1]}], got {wq}")
    _fp8_scales(op, "w13", wq, ws, b, True)
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


def _down_fp8_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    aq, as_, rows_t, blocks_t, wq, ws, weights = ts
    op, b = "moe_gemm_down_fp8", a["block"]
    if aq.rank != 2:
        raise TypeRuleError(f"{op}: act codes must be [R, I], got {aq}")
    _fp8_scales(op, "act", aq, as_, b, False)
    if wq.rank != 3 or not dims_equal(wq.shape[2], aq.shape[1]):
        raise TypeRuleError(f"{op}: w2 codes must be fp8e4m3[E, H, {aq.shape[1]}], got {wq}")
    _fp8_scales(op, "w2", wq, ws, b, True)
    if weights.rank != 2 or weights.dtype is not DType.f32:
        raise TypeRuleError(f"{op}: routing weights must be f32[T, k], got {weights}")
    e = _static_int(wq.shape[0], "E", op)
    k = _static_int(weights.shape[1], "k", op)
    rows = _check_layout(op, weights.shape[0], k, e, a["block_m"], rows_t, blocks_t)
    if not dims_equal(aq.shape[0], rows):
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

register(OpDef("moe_gemm_gate_up_fp8", MOE_GEMM_FP8, (6, 6), _gate_up_fp8_rule, gate_up_fp8_ref, n_outputs=2,
               attrs={**_COMMON, "topk": AttrSpec((int,)),
                      "out_dtype": AttrSpec((DType,), required=False, default=DType.bf16,
                                            doc="the experts' eager dtype (silu(gate) * up is computed in it)"),
                      "scale_fmt": AttrSpec((str,), required=False, default=None)},
               doc="FP8 grouped GEMM gate+up (gathered token rows, SwiGLU) with a 1x128 quant epilogue"))
register(OpDef("moe_gemm_down_fp8", MOE_GEMM_FP8, (7, 7), _down_fp8_rule, down_fp8_ref, attrs=_COMMON,
               doc="FP8 grouped GEMM down, x routing weight, scattered to row `slot` of [T*k, H]"))

__all__ = ["GROUP_SCORES", "MOE_COMBINE", "MOE_DISPATCH", "MOE_GEMM", "MOE_GEMM_FP8", "MOE_ROUTER", "SCORINGS",
           "down_fp8_ref", "gate_up_fp8_ref", "moe_blocks", "moe_rows"]
