"""Kernel families of the vocabulary-chunked losses: `vocab_logprobs`, `vocab_grad_hidden`,
`vocab_grad_weight` (ops in ir/ops/loss.py) and `gather`.

Where it sits: four records of codegen/families/ (`*_FAMILY` at the end); each family is one
template under codegen/templates (vocab_*.py.j2, gather.py.j2, shared macros in vocab_macros.j2)
plus a lowering below that reads the fused kernel (one op, its inputs) into a KernelSpec.

The three vocabulary kernels never hold more than a [BLOCK_T, BLOCK_V] logits tile, in registers:

  vocab_logprobs     grid ceil(NT / BLOCK_T); per program: for each vocabulary tile, the logits tile
                     (a K loop of BLOCK_K-wide tl.dot over H, fp32 accumulation, rounded to the
                     input dtype as eager's LM head output is) feeds an online logsumexp and the
                     target logit; writes logp and lse per token (NaN for an id outside [0, V)).
  vocab_grad_hidden  per block of BLOCK_T tokens: for each vocabulary tile, recompute the logits
                     tile, dlogits = (onehot - exp(z - lse)) * g / T, then fp32 rows
                     += dlogits @ W[tile] by BLOCK_H chunks.
  vocab_grad_weight  per block of BLOCK_V vocabulary rows: for each token tile, recompute the
                     transposed logits tile, then fp32 rows += dlogits^T @ hidden[tile].

The gradient kernels accumulate by read-modify-write of fp32 rows that only their program touches
(deterministic: a fixed loop order, no atomics). f32: those rows are the gradient itself, one
program per block. bf16/f16: `programs` (default 132, the H200's SMs) persistent programs each own
a slot of an fp32 workspace (role "scratch" in the KernelSpec: the runtime allocates it for the
launch only, programs x rows x H x 4 bytes, 0.23 GiB at V3 shapes) and loop over blocks; at the end
of a block the slot is rounded once into the gradient, so no fp32 [V, H] buffer ever exists.

Modeled DRAM bytes (report.json): the programs of one wave (132 SMs on H200) stream the weight (or
hidden) in the same order, so it is counted once per wave; the read-modify-write of the fp32
accumulator rows is counted in full (2 x 4 bytes per element per vocabulary / token tile): it
dominates at V3 shapes (~0.5 TB per gradient kernel at 16k tokens), which is the price of holding
no logits-sized buffer; a larger tile along the looped dim divides it.
Tiles are kernel attributes (block_t, block_v, block_k, block_h, num_warps, programs) with defaults per dtype.
"""
from __future__ import annotations

import sympy
from dsr_compiler.ir.graph import Kernel, Node
from dsr_compiler.ir.ops.loss import (
    GATHER,
    VOCAB_GRAD_HIDDEN,
    VOCAB_GRAD_WEIGHT,
    VOCAB_LOGPROBS,
)
from dsr_compiler.ir.types import DType, dim_str

from ..lower_common import (arg_names, attr_int, fail, flat_spec, kernel_name, next_pow2, single_op, source_nodes,
                            static_int, tensor_args)
from ..spec import ArgSpec, KernelSpec
from ..views import ScalarPool, prod
from .record import KernelFamily

H200_SMS = 132
_OPS = {VOCAB_LOGPROBS: "token_logprobs", VOCAB_GRAD_HIDDEN: "token_logprobs_grad_hidden",
        VOCAB_GRAD_WEIGHT: "token_logprobs_grad_weight", GATHER: "gather"}
# default tiles: (BLOCK_T, BLOCK_V, BLOCK_K, BLOCK_H, num_warps), checked with ptxas for sm_90a at
# DeepSeek-V3 shapes (H = 7168, V = 129280): no spills. f32 uses exact FMA dots ("ieee"), bf16/f16
# tensor cores. The gradient kernels make the tile wide along the dim they loop over (V for
# d hidden, tokens for d W): the read-modify-write of their fp32 gradient rows costs 8 bytes per
# element per tile of that dim, so a wide tile divides that traffic.
_TILES = {
    (VOCAB_LOGPROBS, True): (64, 64, 32, 32, 8), (VOCAB_LOGPROBS, False): (64, 128, 64, 64, 8),
    (VOCAB_GRAD_HIDDEN, True): (16, 256, 32, 32, 8), (VOCAB_GRAD_HIDDEN, False): (64, 256, 64, 64, 8),
    (VOCAB_GRAD_WEIGHT, True): (256, 32, 32, 32, 8), (VOCAB_GRAD_WEIGHT, False): (256, 64, 64, 64, 8),
}
_DOT = {DType.bf16: "bf16", DType.f16: "f16", DType.f32: ""}


def _the_op(k: Kernel) -> Node:
    return single_op(k, _OPS[k.family], only_output=False)


def _fit(size: sympy.Expr, default: int, lo: int = 16) -> int:
    """A power-of-two tile no larger than needed for a static size (>= 16, tl.dot's minimum)."""
    s = static_int(size)
    return default if s is None else min(default, max(lo, next_pow2(s)))


def lower_vocab(k: Kernel, index: int) -> KernelSpec:
    n = _the_op(k)
    g = k.body
    vals = g.values()
    names = arg_names(g)
    pool = ScalarPool(i64=bool(k.attr("index_i64", False)))
    fam = k.family
    if fam == VOCAB_LOGPROBS:
        hid, w, ids = n.inputs
        gname = lse_in = ""
    else:
        gname, hid, w, ids, lse_in = n.inputs
    ht, wt = vals[hid].type, vals[w].type
    f32 = ht.dtype is DType.f32
    nt_e, v_e, h_e = prod(ht.shape[:-1]), wt.shape[0], wt.shape[1]
    bt0, bv0, bk0, bh0, warps = _TILES[(fam, f32)]
    bt = attr_int(k, "block_t", _fit(nt_e, bt0))
    bv = attr_int(k, "block_v", _fit(v_e, bv0))
    bk = attr_int(k, "block_k", _fit(h_e, bk0))
    bh = attr_int(k, "block_h", _fit(h_e, bh0))
    for nm, b in (("block_t", bt), ("block_v", bv), ("block_k", bk), ("block_h", bh)):
        if b < 16 or b & (b - 1):
            raise fail(k, f"{nm}={b} must be a power of two >= 16 (tl.dot's minimum)", n)
    temp = float(n.attr("temperature"))
    outs = {o: i for i, o in enumerate(g.outputs)}
    scratch: list[ArgSpec] = []
    params: list[tuple[str, object]] = [
        ("BLOCK_T", bt), ("BLOCK_V", bv), ("BLOCK_K", bk), ("BLOCK_H", bh),
        ("NT", pool.lit(nt_e)), ("V", pool.lit(v_e)), ("H", pool.lit(h_e)), ("TEMP", repr(temp)),
        ("PRECISION", "ieee" if f32 else ""), ("ROUND_LOGITS", _DOT[ht.dtype]), ("DOT_DTYPE", _DOT[ht.dtype]),
        ("HIDDEN", names[("in", hid)]), ("WEIGHT", names[("in", w)]), ("IDS", names[("in", ids)]),
    ]
    isz = ht.dtype.itemsize

    def waves(programs: sympy.Expr) -> sympy.Expr:
        return sympy.ceiling(programs / H200_SMS)
    n_tok_blocks = sympy.ceiling(nt_e / bt)
    n_voc_blocks = sympy.ceiling(v_e / bv)
    logits_flops = 2 * nt_e * v_e * h_e
    if fam == VOCAB_LOGPROBS:
        lp, ls = n.outputs[0].name, n.outputs[1].name
        if not (lp in outs or ls in outs):
            raise fail(k, "returns neither logp nor lse", n)
        params += [("LOGP_OUT", names[("out", outs[lp])] if lp in outs else ""),
                   ("LSE_OUT", names[("out", outs[ls])] if ls in outs else "")]
        grid = n_tok_blocks
        flops = logits_flops + 6 * nt_e * v_e
        rd = nt_e * h_e * isz + waves(n_tok_blocks) * v_e * h_e * isz + nt_e * vals[ids].type.dtype.itemsize
        wr = 4 * nt_e * len(outs)
        template = "vocab_logprobs.py.j2"
    else:
        (out,) = g.outputs
        params += [("G", names[("in", gname)]), ("LSE", names[("in", lse_in)])]
        if fam == VOCAB_GRAD_HIDDEN:
            params.append(("DH_OUT", names[("out", 0)]))
            n_blocks, rows = n_tok_blocks, bt
            rmw = 8 * nt_e * h_e * n_voc_blocks
            rd = nt_e * h_e * isz + 2 * waves(n_tok_blocks) * v_e * h_e * isz + 12 * nt_e
            template = "vocab_grad_hidden.py.j2"
        else:
            params.append(("DW_OUT", names[("out", 0)]))
            n_blocks, rows = n_voc_blocks, bv
            rmw = 8 * v_e * h_e * n_tok_blocks
            rd = waves(n_voc_blocks) * (2 * nt_e * h_e * isz + 12 * nt_e) + v_e * h_e * isz
            template = "vocab_grad_weight.py.j2"
        out_t = vals[out].type
        if f32:
            # accumulate in the f32 gradient itself: one program per block
            programs = n_blocks
            params += [("SCRATCH", ""), ("OUT_DTYPE", "")]
        else:
            # bf16/f16: persistent programs (one per SM) accumulate each block in their own slot of
            # an fp32 workspace (programs x rows x H), then round it once into the gradient
            programs = sympy.Min(attr_int(k, "programs", H200_SMS), n_blocks)
            ws_shape = (programs * rows, h_e)
            ws = ArgSpec("ws_scratch", "tensor", value=f"{k.name}.workspace", dtype=DType.f32, role="scratch",
                         shape=tuple(dim_str(d) for d in ws_shape))
            scratch.append(ws)
            params += [("SCRATCH", ws.name), ("OUT_DTYPE", _DOT[out_t.dtype])]
            rmw = rmw + 4 * out_t.numel + 4 * out_t.numel       # workspace read + output write at block ends
        params += [("NBLOCKS", pool.lit(n_blocks)), ("PROGRAMS", pool.lit(programs))]
        grid = programs
        wr = out_t.dtype.itemsize * out_t.numel + rmw / 2
        rd = rd + rmw / 2
        flops = 2 * logits_flops + 8 * nt_e * v_e
    return KernelSpec(
        name=kernel_name(k, index), family=fam, template=template,
        args=tuple(tensor_args(g)) + tuple(scratch) + tuple(pool.args), grid=(dim_str(grid),),
        num_warps=attr_int(k, "num_warps", warps), num_stages=attr_int(k, "num_stages", 2 if fam != VOCAB_LOGPROBS else 3),
        params=tuple(params), body=(), source_nodes=source_nodes(g),
        flops=dim_str(sympy.expand(flops)), bytes_read=dim_str(sympy.expand(rd)), bytes_written=dim_str(sympy.expand(wr)))


def lower_gather(k: Kernel, index: int) -> KernelSpec:
    n = _the_op(k)
    g = k.body
    vals = g.values()
    names = arg_names(g)
    x, idx = n.inputs
    xt, it = vals[x].type, vals[idx].type
    if list(g.outputs) != [n.out.name]:
        raise fail(k, f"must return only %{n.out.name}", n)
    pool = ScalarPool(i64=bool(k.attr("index_i64", False)) or (static_int(xt.numel) or 0) >= 2**31)
    numel = it.numel
    s = static_int(numel)
    block = attr_int(k, "block", min(1024, max(128, next_pow2(s))) if s is not None else 1024)
    oob = 'float("nan")' if xt.dtype.is_float else "0"
    params = (("BLOCK", block), ("NUMEL", pool.lit(numel)), ("K", pool.lit(it.shape[-1])), ("V", pool.lit(xt.shape[-1])),
              ("X", names[("in", x)]), ("INDEX", names[("in", idx)]), ("OUT", names[("out", 0)]), ("OOB", oob))
    rd = numel * (it.dtype.itemsize + xt.dtype.itemsize)
    return flat_spec(k, index, GATHER, "gather.py.j2", pool, params, numel, block, rd, numel * xt.dtype.itemsize)



VOCAB_LOGPROBS_FAMILY = KernelFamily(VOCAB_LOGPROBS, lower=lower_vocab, template="vocab_logprobs.py.j2", peak="bf16")
VOCAB_GRAD_HIDDEN_FAMILY = KernelFamily(VOCAB_GRAD_HIDDEN, lower=lower_vocab, template="vocab_grad_hidden.py.j2",
                                        peak="bf16")
VOCAB_GRAD_WEIGHT_FAMILY = KernelFamily(VOCAB_GRAD_WEIGHT, lower=lower_vocab, template="vocab_grad_weight.py.j2",
                                        peak="bf16")
GATHER_FAMILY = KernelFamily(GATHER, lower=lower_gather, template="gather.py.j2", peak="bf16")

__all__ = ["GATHER_FAMILY", "H200_SMS", "VOCAB_GRAD_HIDDEN_FAMILY", "VOCAB_GRAD_WEIGHT_FAMILY", "VOCAB_LOGPROBS_FAMILY"]
