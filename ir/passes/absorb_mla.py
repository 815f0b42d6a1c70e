"""absorb_mla: rewrite naive MLA decode attention into the absorbed form (DESIGN §4 "MLA").

Where it sits: in the PIPELINE after the cleanup passes, before fuse; option `mla` of the pass
context: "absorb" (default) runs it, "naive" skips it. Pattern (what the frontend makes of the
zoo's `MLA.decode`, naive or absorbed eager form alike):

    %kvb = linear(%latent, %wkv_b)                       # [B, T, H*(nope+v)]: every cached token expanded
    %r   = reshape(%kvb, shape=(B, T, H, nope+v))
    %kn  = slice(%r, dim=3, start=0, end=nope)           # k_nope
    %v   = slice(%r, dim=3, start=nope)                  # v
    %o   = mla_attention(%q_nope, %q_pe, %kn, %k_pe, %v, %q_pos, %k_pos, scale=.., dtype=..)

with a key length T different from the query length S (queries attend to a cache). Rewritten:

    %w     = reshape(%wkv_b, shape=(H, nope+v, C))       # free view of the weight
    %w_uk  = slice(%w, dim=1, start=0, end=nope)         # read in place by the matmul (an index map)
    %w_uvt = permute(slice(%w, dim=1, start=nope), dims=(0, 2, 1))
    %q_lat = matmul(q_nope as [B*S, H, 1, nope], %w_uk)  # per head: q_nope . W_UK -> [B*S, H, 1, C]
    %o_part, %lse = mla_decode(q_lat as [B, S, H, C], %q_pe, %latent, %k_pe, %q_pos, %k_pos, split=..)
    %o_lat = mla_combine(%o_part, %lse)                  # [B, S, H, C], exact merge of the splits
    %o     = matmul(o_lat as [B*S, H, 1, C], %w_uvt)     # per head: . W_UV -> [B*S, H, 1, v]

The same function: scores q_nope.(W_UK latent) = (q_nope.W_UK).latent and output
(P latent) W_UV^T = P (latent W_UV^T); only the summation order changes (fp32 rounding). The
latent cache is never expanded: per step the kernel reads T*(C+rope) cache values instead of
computing and reading T*H*(nope+v). Prefill (S == T, causal self-attention) keeps the naive flash
form, as does any attention whose keys are not a wkv_b expansion; each is noted.

The fusion rule that lets `mla_attention`/`mla_decode` kernels read the slice/permute/expand views
of their operands in place is `group_mla_operands` in ir/passes/fuse/mla.py.
"""
from __future__ import annotations

import sympy

from ..errors import DsrError
from ..graph import Graph, GraphBuilder, Node, Value
from ..ops import OPS
from ..types import TensorType, dims_equal, to_expr
from .cleanup import dce
from .manager import PassContext

MODES = ("naive", "absorb")
TARGET_SPLITS = 16          # split-KV: about this many key splits per (batch, head block) ...
MIN_SPLIT = 16              # ... of at least this many keys (a tl.dot tile)
DYNAMIC_SPLIT = 256         # keys per split when the cache length is symbolic


def choose_split(t: sympy.Expr) -> int:
    """Keys per split for a cache of length t: enough splits to fill an H200 at batch 1
    (8 head blocks of 16 x 16 splits ~ 132 SMs for DeepSeek-V3's 128 heads), never tiny ones."""
    t = to_expr(t)
    if not t.is_Integer:
        return DYNAMIC_SPLIT
    n = -(-int(t) // TARGET_SPLITS)
    return max(MIN_SPLIT, 1 << max(0, (n - 1).bit_length()))


class _Match:
    def __init__(self, att: Node, latent: str, w: str, heads: sympy.Expr, nope: int, vdim: int):
        self.att, self.latent, self.w, self.heads, self.nope, self.vdim = att, latent, w, heads, nope, vdim


def _slice_of(n: Node | None, dim: int, start: int, end: int | None) -> bool:
    if n is None or n.op != "slice" or n.attr("step", 1) != 1 or n.attr("start") != start:
        return False
    rank = n.out.type.rank
    if n.attr("dim") % rank != dim % rank:
        return False
    e = n.attr("end")
    return e == end or (end is None and (e is None or dims_equal(e, n.out.type.shape[dim] + start)))


def _match(n: Node, prod: dict[str, Node], types: dict[str, TensorType]) -> tuple[_Match | None, str]:
    """The wkv_b expansion feeding mla_attention node n, or (None, why not)."""
    if len(n.inputs) != 7:
        return None, "prefill (causal self-attention) keeps the naive flash form"
    q_nope, _, k_nope, _, v = n.inputs[:5]
    s, t = types[q_nope].shape[1], types[k_nope].shape[1]
    if dims_equal(s, t):
        return None, "as many queries as keys (prefill) keeps the naive flash form"
    kn, vn = prod.get(k_nope), prod.get(v)
    nope = int(types[k_nope].shape[3])
    if not (_slice_of(kn, 3, 0, nope) and _slice_of(vn, 3, nope, None) and kn.inputs[0] == vn.inputs[0]):
        return None, "k_nope and v are not the two halves of one per-head expansion"
    r = prod.get(kn.inputs[0])
    if r is None or r.op != "reshape":
        return None, "k_nope/v do not come from a reshape of a wkv_b projection"
    lin = prod.get(r.inputs[0])
    if lin is None or lin.op != "linear" or len(lin.inputs) != 2:
        return None, "the keys are not a bias-free linear projection of a latent"
    latent, w = lin.inputs
    lt, wt, rt = types[latent], types[w], r.out.type
    b, tt, heads, per_head = rt.shape
    vdim = int(types[v].shape[3])
    if lt.rank != 3 or not (dims_equal(lt.shape[0], b) and dims_equal(lt.shape[1], tt)) or not dims_equal(per_head, nope + vdim):
        return None, f"the expansion {lt} -> {rt} is not [B, T, kv_lora] -> [B, T, H, nope+v]"
    if types[q_nope].dtype != wt.dtype:
        return None, f"q_nope is {types[q_nope].dtype.value} but wkv_b is {wt.dtype.value}"
    return _Match(n, latent, w, heads, nope, vdim), ""


def absorb_mla(g: Graph, ctx: PassContext) -> Graph:
    """Absorbed decode for every MLA attention over a wkv_b-expanded cache (see module doc)."""
    mode = ctx.options.get("mla", "absorb")
    if mode not in MODES:
        raise DsrError(f"absorb_mla: unknown MLA form {mode!r}", hint=f"use one of {', '.join(MODES)}")
    atts = [n for n in g.nodes if n.op == "mla_attention"]
    if mode == "naive" or not atts:
        if atts:
            ctx.note(f"absorb_mla: {len(atts)} MLA attention(s) kept naive (mla=naive)")
        return g.replace()   # a new graph per pass (the manager records each pass's result)
    prod = g.producers()
    types = {v.name: v.type for v in g.inputs}
    types.update({o.name: o.type for n in g.nodes for o in n.outputs})
    b = GraphBuilder(g.name, list(g.inputs), list(g.params))
    b.reserve(types)
    rewritten = 0
    for n in g.nodes:
        if n.op != "mla_attention":
            b.add(n)
            continue
        m, why = _match(n, prod, types)
        if m is None:
            ctx.note(f"absorb_mla: kept %{n.out.name} = mla_attention naive: {why}")
            b.add(n)
            continue
        _rewrite(b, m, prod, types, ctx)
        rewritten += 1
    ctx.count("absorb_mla.rewritten", rewritten)
    out = b.build(g.outputs)
    return dce(out, PassContext()) if rewritten else out


def _rewrite(b: GraphBuilder, m: _Match, prod: dict[str, Node], types: dict[str, TensorType],
             ctx: PassContext) -> None:
    n = m.att
    q_nope, q_pe, _, k_pe, _, q_pos, k_pos = n.inputs
    qt, lt, wt = types[q_nope], types[m.latent], types[m.w]
    bb, s, h = qt.shape[:3]
    t, c = lt.shape[1], lt.shape[2]
    nope, vdim, dt = m.nope, m.vdim, wt.dtype
    base = n.out.name

    def emit(op: str, inputs: tuple[str, ...], hint: str | tuple[str, ...], name: str | None = None, **attrs):
        outs = OPS[op].infer([types[i] for i in inputs], attrs)
        hints = (hint,) if isinstance(hint, str) else hint
        vals = tuple(Value(name or b.fresh(f"{base}.{h_}"), t_) for h_, t_ in zip(hints, outs))
        b.add(Node(vals, op, inputs, attrs, n.origin))
        for v in vals:
            types[v.name] = v.type
        return vals[0].name if len(vals) == 1 else tuple(v.name for v in vals)

    w3 = emit("reshape", (m.w,), "wkv_b", shape=(h, nope + vdim, c))
    w_uk = emit("slice", (w3,), "w_uk", dim=1, start=0, end=nope, step=1)
    w_uvt = emit("permute", (emit("slice", (w3,), "w_uv", dim=1, start=nope, end=None, step=1),), "w_uv_t",
                 dims=(0, 2, 1))
    # q_nope as [B*S, H, 1, nope]; reshape the sliced tensor before slicing, so the slice stays an
    # index map of the matmul (a reshape of a strided slice would need a copy)
    p = prod.get(q_nope)
    if p is not None and p.op == "slice" and p.attr("dim") % 4 == 3 and types[p.inputs[0]].rank == 4:
        d_full = types[p.inputs[0]].shape[3]
        x4 = emit("reshape", (p.inputs[0],), "q", shape=(bb * s, h, 1, d_full))
        q4 = emit("slice", (x4,), "q_nope", dim=3, start=p.attr("start"), end=p.attr("end"), step=p.attr("step", 1))
    else:
        q4 = emit("reshape", (q_nope,), "q_nope", shape=(bb * s, h, 1, nope))
    q_lat = emit("matmul", (q4, w_uk), "q_lat")
    ql4 = emit("reshape", (q_lat,), "q_lat4", shape=(bb, s, h, c))
    split = int(ctx.options.get("mla_split") or choose_split(t))
    kp = prod.get(k_pos)
    if kp is not None and kp.op == "iota":    # arange(T), often shared by every layer: an own copy per
        k_pos = emit("iota", (), "k_pos", **kp.attr_dict)   # decode, which its kernel reads as the key index
    o_part, lse = emit("mla_decode", (ql4, q_pe, m.latent, k_pe, q_pos, k_pos), ("o_part", "lse"),
                       scale=n.attr("scale"), split=split)
    o_lat = emit("mla_combine", (o_part, lse), "o_lat", dtype=dt)
    o4 = emit("reshape", (o_lat,), "o_lat4", shape=(bb * s, h, 1, c))
    ov = emit("matmul", (o4, w_uvt), "o_v")
    if n.out.type.dtype == dt:
        emit("reshape", (ov,), "o", name=base, shape=(bb, s, h, vdim))
    else:
        emit("cast", (emit("reshape", (ov,), "o_v4", shape=(bb, s, h, vdim)),), "o", name=base, dtype=n.out.type.dtype)
    ctx.note(f"absorb_mla: %{base} = mla_attention over %{m.latent} absorbed (split-KV decode, {split} keys/split)")


__all__ = ["MODES", "absorb_mla", "choose_split"]
