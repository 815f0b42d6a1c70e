"""Ops for DeepSeek's Multi-head Latent Attention (DESIGN §4 "MLA"), in the one op table
(`ir/ops/__init__.py` imports this module after `moe.py`).

Where they come from and go:
  iota            `torch.arange(n)` (frontend); pointwise, so `arange(S) + start_pos` is one small kernel
  rope_table      `rope_cos_sin(positions, inv_freq, attn_factor)` of the zoo -> (cos, sin) RoPE tables
  index_copy      `cache.index_copy(dim, positions, new)`: the KV-cache write of decode (a copy, SSA)
  mla_attention   the naive attention core (`deepseek.mla_attention`): per-head k_nope/v, head-shared k_pe
  mla_decode      absorbed decode, split-KV partial softmax (made by the `absorb_mla` pass)
  mla_combine     merges the partial results of `mla_decode` exactly

The eager references repeat the zoo's torch code op for op (the IR does not import the zoo), so
the interpreter reproduces eager MLA bit for bit.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import sympy
import torch

from ..types import DType, TensorType, to_expr
from ._def import POINTWISE, AttrSpec, OpDef, TypeRuleError, dims_equal, register

INT_DTYPES = (DType.i32, DType.i64)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise TypeRuleError(msg)


# ----------------------------------------------------------------------------- iota

def _iota_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    n, dt = a["n"], a["dtype"]
    _need(dt in INT_DTYPES, f"iota: dtype must be i32 or i64, got {dt.value}")
    n = to_expr(n)
    _need(not (n.is_Integer and int(n) < 1), f"iota: n must be >= 1, got {n}")
    return (TensorType(dt, (n,)),)


register(OpDef("iota", POINTWISE, (0, 0), _iota_rule,
               lambda n, dtype: torch.arange(n, dtype=dtype.torch),
               attrs={"n": AttrSpec((int, sympy.Expr)), "dtype": AttrSpec((DType,), required=False, default=DType.i64)},
               doc="0, 1, ..., n-1 (torch.arange(n)); n may be a symbolic size"))


# ----------------------------------------------------------------------------- rope_table

def rope_table_ref(positions: torch.Tensor, inv_freq: torch.Tensor, attn_factor: float = 1.0):
    # = dsr_compiler.models.layers.rope_cos_sin (op for op; `...` generalizes its [:, None] to [B, S])
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(device=positions.device, dtype=torch.float32)
    cos, sin = angles.cos(), angles.sin()
    if attn_factor != 1.0:
        cos, sin = cos * attn_factor, sin * attn_factor
    return cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)


def _rope_table_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    pos, freq = ts
    _need(pos.dtype in INT_DTYPES and pos.rank in (1, 2),
          f"rope_table: positions must be i32/i64 [S] or [B, S], got {pos}")
    _need(freq.dtype is DType.f32 and freq.rank == 1, f"rope_table: inv_freq must be f32[rope/2], got {freq}")
    out = TensorType(DType.f32, pos.shape + (freq.shape[0] * 2,))
    return out, out


register(OpDef("rope_table", "rope_table", (2, 2), _rope_table_rule, rope_table_ref,
               attrs={"attn_factor": AttrSpec((float,), required=False, default=1.0)}, n_outputs=2,
               doc="interleaved-pair RoPE tables (cos, sin) [..., S, rope] in fp32 from positions and inv_freq"))


# ----------------------------------------------------------------------------- index_copy

def _index_copy_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    x, index, src = ts
    _need(x.rank >= 1, f"index_copy: x must have rank >= 1, got {x}")
    d = a["dim"]
    _need(-x.rank <= d < x.rank, f"index_copy: dim {d} out of range for {x}")
    d %= x.rank
    _need(index.dtype in INT_DTYPES and index.rank == 1, f"index_copy: index must be i32/i64 [L], got {index}")
    want = x.shape[:d] + (index.shape[0],) + x.shape[d + 1:]
    _need(src.dtype == x.dtype and dims_equal(src.shape, want),
          f"index_copy: src must be {TensorType(x.dtype, want)} (x {x}, index {index}), got {src}")
    return (x,)


register(OpDef("index_copy", "index_copy", (3, 3), _index_copy_rule,
               lambda x, index, src, dim: x.index_copy(dim, index, src),
               attrs={"dim": AttrSpec((int,))},
               doc="a copy of x with x[..., index[i], ...] = src[..., i, ...] along dim (last write wins)"))


# ----------------------------------------------------------------------------- mla_attention

def _mask_positions(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    return k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # [S, T]


def _causal_positions(sq: int, sk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions that make `k <= q` the end-aligned causal mask (`t <= s + T - S`)."""
    return torch.arange(sq) + (sk - sq), torch.arange(sk)


def mla_attention_ref(q_nope, q_pe, k_nope, k_pe, v, q_pos=None, k_pos=None, *, scale: float, dtype: DType):
    # = dsr_compiler.models.deepseek.mla_attention, op for op
    if q_pos is None:
        q_pos, k_pos = _causal_positions(q_nope.shape[1], k_nope.shape[1])
    allowed = _mask_positions(q_pos, k_pos)
    scores = (torch.einsum("bshd,bthd->bsht", q_nope.float(), k_nope.float())
              + torch.einsum("bshr,btr->bsht", q_pe.float(), k_pe.float()))
    scores = scores * scale
    scores = scores.masked_fill(~allowed.unsqueeze(0).unsqueeze(2), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bsht,bthd->bshd", probs, v.float()).to(dtype.torch)


def _positions_rule(op: str, q_pos: TensorType, k_pos: TensorType, s: sympy.Expr, t: sympy.Expr) -> None:
    _need(q_pos.dtype in INT_DTYPES and q_pos.rank == 1 and dims_equal(q_pos.shape[0], s),
          f"{op}: q_pos must be i32/i64 [{s}], got {q_pos}")
    _need(k_pos.dtype in INT_DTYPES and k_pos.rank == 1 and dims_equal(k_pos.shape[0], t),
          f"{op}: k_pos must be i32/i64 [{t}], got {k_pos}")


def _mla_attention_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    _need(len(ts) in (5, 7), f"mla_attention takes 5 inputs (end-aligned causal) or 7 (with q_pos, k_pos), "
                             f"got {len(ts)}")
    qn, qp, kn, kp, v = ts[:5]
    for nm, t in (("q_nope", qn), ("q_pe", qp), ("k_nope", kn), ("v", v)):
        _need(t.rank == 4 and t.dtype.is_float, f"mla_attention: {nm} must be a float [B, S|T, H, D], got {t}")
    _need(kp.rank == 3 and kp.dtype.is_float, f"mla_attention: k_pe must be a float [B, T, rope] "
                                              f"(shared by the heads), got {kp}")
    b, s, h, dn = qn.shape
    t = kn.shape[1]
    _need(dims_equal(qp.shape[:3], (b, s, h)), f"mla_attention: q_pe {qp} does not match q_nope {qn}")
    _need(dims_equal(kn.shape, (b, t, h, dn)), f"mla_attention: k_nope must be [{b}, T, {h}, {dn}], got {kn}")
    _need(dims_equal(kp.shape, (b, t, qp.shape[3])), f"mla_attention: k_pe must be [{b}, {t}, {qp.shape[3]}], got {kp}")
    _need(dims_equal(v.shape[:3], (b, t, h)), f"mla_attention: v must be [{b}, {t}, {h}, Dv], got {v}")
    if len(ts) == 7:
        _positions_rule("mla_attention", ts[5], ts[6], s, t)
    _need(a["dtype"].is_float, f"mla_attention: dtype must be a float type, got {a['dtype'].value}")
    _need(math.isfinite(a["scale"]), f"mla_attention: scale must be finite, got {a['scale']}")
    return (TensorType(a["dtype"], (b, s, h, v.shape[3])),)


register(OpDef("mla_attention", "mla_attention", (5, 7), _mla_attention_rule, mla_attention_ref,
               attrs={"scale": AttrSpec((float,)), "dtype": AttrSpec((DType,))},
               doc="naive MLA core: softmax((q_nope·k_nope + q_pe·k_pe) * scale, mask) · v in fp32, cast to dtype; "
                   "k_pe [B, T, rope] is shared by the heads; mask k_pos <= q_pos (or end-aligned causal)"))


# ----------------------------------------------------------------------------- absorbed decode

def mla_decode_ref(q_lat, q_pe, kv, pe, q_pos, k_pos, *, scale: float, split: int):
    """Per split of `split` keys: lse = log Σ exp(s) and o = softmax-weighted latent (0 where empty)."""
    allowed = _mask_positions(q_pos, k_pos)                                          # [S, T]
    scores = (torch.einsum("bshc,btc->bsht", q_lat.float(), kv.float())
              + torch.einsum("bshr,btr->bsht", q_pe.float(), pe.float())) * scale
    scores = scores.masked_fill(~allowed.unsqueeze(0).unsqueeze(2), float("-inf"))
    os_, ls = [], []
    for lo in range(0, kv.shape[1], split):
        s = scores[..., lo:lo + split]
        m = s.amax(dim=-1, keepdim=True)
        m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = torch.exp(s - m_safe)
        lsum = p.sum(dim=-1, keepdim=True)
        o = torch.einsum("bsht,btc->bshc", p, kv[:, lo:lo + split].float())
        os_.append(torch.where(lsum > 0, o / lsum, torch.zeros_like(o)))
        ls.append((m_safe + torch.log(lsum)).squeeze(-1))
    return torch.stack(os_, dim=3), torch.stack(ls, dim=3)


def _n_splits(t: sympy.Expr, split: int) -> sympy.Expr:
    return sympy.ceiling(to_expr(t) / split)


def _mla_decode_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    ql, qp, kv, pe, q_pos, k_pos = ts
    _need(ql.rank == 4 and ql.dtype.is_float, f"mla_decode: q_lat must be a float [B, S, H, kv_lora], got {ql}")
    b, s, h, c = ql.shape
    _need(qp.rank == 4 and qp.dtype.is_float and dims_equal(qp.shape[:3], (b, s, h)),
          f"mla_decode: q_pe must be a float [{b}, {s}, {h}, rope], got {qp}")
    _need(kv.rank == 3 and kv.dtype.is_float and dims_equal(kv.shape[0], b) and dims_equal(kv.shape[2], c),
          f"mla_decode: the latent cache must be a float [{b}, T, {c}], got {kv}")
    t = kv.shape[1]
    _need(pe.rank == 3 and pe.dtype.is_float and dims_equal(pe.shape, (b, t, qp.shape[3])),
          f"mla_decode: the rope cache must be a float [{b}, {t}, {qp.shape[3]}], got {pe}")
    _positions_rule("mla_decode", q_pos, k_pos, s, t)
    _need(a["split"] >= 1, f"mla_decode: split (keys per split) must be >= 1, got {a['split']}")
    ns = _n_splits(t, a["split"])
    return TensorType(DType.f32, (b, s, h, ns, c)), TensorType(DType.f32, (b, s, h, ns))


register(OpDef("mla_decode", "mla_decode", (6, 6), _mla_decode_rule, mla_decode_ref,
               attrs={"scale": AttrSpec((float,)), "split": AttrSpec((int,))}, n_outputs=2,
               doc="absorbed MLA, split-KV: per split of `split` keys, the softmax-weighted latent (f32) and its "
                   "log-sum-exp; scores = (q_lat·kv + q_pe·pe) * scale under k_pos <= q_pos"))


def mla_combine_ref(o_part: torch.Tensor, lse: torch.Tensor, *, dtype: DType) -> torch.Tensor:
    m = lse.amax(dim=-1, keepdim=True)
    w = torch.exp(lse - m)                                    # all splits empty: nan, as eager softmax
    o = (w.unsqueeze(-1) * o_part).sum(dim=-2) / w.sum(dim=-1, keepdim=True)
    return o.to(dtype.torch)


def _mla_combine_rule(ts: Sequence[TensorType], a: Mapping[str, Any]) -> tuple[TensorType, ...]:
    o, lse = ts
    _need(o.rank == 5 and o.dtype is DType.f32, f"mla_combine: o_part must be f32[B, S, H, splits, C], got {o}")
    _need(lse.dtype is DType.f32 and dims_equal(lse.shape, o.shape[:4]),
          f"mla_combine: lse must be f32[{', '.join(map(str, o.shape[:4]))}], got {lse}")
    _need(a["dtype"].is_float, f"mla_combine: dtype must be a float type, got {a['dtype'].value}")
    return (TensorType(a["dtype"], o.shape[:3] + o.shape[4:]),)


register(OpDef("mla_combine", "mla_combine", (2, 2), _mla_combine_rule, mla_combine_ref,
               attrs={"dtype": AttrSpec((DType,))},
               doc="exact merge of split-KV partial softmax results: Σ e^(lse_i - M) o_i / Σ e^(lse_i - M)"))


__all__ = ["INT_DTYPES", "mla_attention_ref", "mla_combine_ref", "mla_decode_ref", "rope_table_ref"]
