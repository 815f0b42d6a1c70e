"""MoE kernel families (codegen/families/moe.py), one kernel at a time on the Triton interpreter.

Each kernel's outputs are compared with its op's eager reference (ir/ops/moe.py): integer
outputs (routing ids, the dispatch layout) exactly, float outputs within the tolerance table.
Inputs are continuous random draws, so routing ties have probability ~0; `test_router_ties_*`
builds exact ties on purpose and checks the documented rule (lower expert / group index wins).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from dsr_compiler.codegen import compile_triton, lower_kernel, render
from dsr_compiler.ir import OPS, DType, TensorType
from dsr_compiler.ir.errors import CodegenError
from dsr_compiler.ir.ops.moe import moe_blocks, moe_rows
from dsr_compiler.ir.types import sym
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import examples  # noqa: E402  per-test budget from the active profile

from tests.codegen.codegen_helpers import check_kernel, one_op_kernel

T = sym("T")
f32, bf16, i32 = DType.f32, DType.bf16, DType.i32


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- router

@st.composite
def router_cases(draw):
    n_group = draw(st.sampled_from([1, 2, 4]))
    epg = draw(st.sampled_from([1, 2, 4, 8]) if n_group > 1 else st.sampled_from([4, 8, 16, 20]))
    e = n_group * epg
    topk_group = draw(st.integers(1, n_group))
    topk = draw(st.integers(1, min(8, topk_group * epg if n_group > 1 else e)))
    scoring = draw(st.sampled_from(["sigmoid", "softmax"]))
    bias = draw(st.booleans())
    group_score = "top2_sum" if bias else "max"
    attrs = {"topk": topk, "n_group": n_group, "topk_group": topk_group, "scoring": scoring,
             "group_score": group_score, "route_scale": draw(st.sampled_from([1.0, 2.5])),
             "norm_topk": draw(st.booleans())}
    return e, bias, attrs, draw(st.integers(1, 40)), draw(st.integers(0, 2**16))


@settings(max_examples=examples(10))
@given(case=router_cases(), dtype=st.sampled_from([f32, bf16]))
def test_router_matches_reference(case, dtype):
    e, bias, attrs, tokens, seed = case
    h = 48
    ins = [("x", TensorType(dtype, (T, h))), ("gw", TensorType(dtype, (e, h)))]
    if bias:
        ins.append(("bias", TensorType(f32, (e,))))
    k = one_op_kernel("moe_router", "moe_router", ins, attrs)
    g = _gen(seed)
    x = torch.randn(tokens, h, generator=g).to(dtype.torch)
    w = (torch.randn(e, h, generator=g) / math.sqrt(h)).to(dtype.torch)
    args = [x, w] + ([0.1 * torch.randn(e, generator=g)] if bias else [])
    _, ids = check_kernel(k, args)
    assert ids.dtype == torch.int32 and int(ids.min()) >= 0 and int(ids.max()) < e
    assert all(len(set(r)) == attrs["topk"] for r in ids.tolist())   # k distinct experts per token


def test_router_ties_go_to_lower_index():
    """Documented rule (the eager stable sort): equal scores -> lower expert index first, and
    equal group scores -> lower group index kept. Built with duplicate gate rows, so the fp32
    logits are bit-identical in eager and compiled code."""
    e, h, tokens = 16, 32, 6
    g = _gen(3)
    base = torch.nn.functional.normalize(torch.randn(3, h, generator=g), dim=-1)
    # experts 1, 5, 9, 13 share a row (one per group of 4), as do 2 and 3, and 0, 4, 8, 12;
    # logits stay O(1) (no sigmoid saturation), the shared rows clearly on top
    w = torch.randn(e, h, generator=g) * 0.02
    for grp_rows, r in (((1, 5, 9, 13), base[0]), ((2, 3), base[1]), ((0, 4, 8, 12), base[2])):
        for j in grp_rows:
            w[j] = r
    x = 0.05 * torch.randn(tokens, h, generator=g) + 2.0 * base[0] + 1.5 * base[1] + base[2]
    for n_group, topk_group, topk in ((1, 1, 6), (4, 2, 4), (4, 3, 5)):
        for scoring in ("sigmoid", "softmax"):
            attrs = {"topk": topk, "n_group": n_group, "topk_group": topk_group, "scoring": scoring,
                     "group_score": "max", "route_scale": 1.0, "norm_topk": True}
            k = one_op_kernel("moe_router", "moe_router", [("x", TensorType(f32, (T, h))), ("gw", TensorType(f32, (e, h)))],
                        attrs)
            _, ids = check_kernel(k, [x, w])
            logits = torch.nn.functional.linear(x, w)
            scores = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(-1)
            for t in range(tokens):
                row = ids[t].tolist()
                for a_, b_ in itertools.pairwise(row):       # slot order: score descending, then index ascending
                    sa, sb = scores[t, a_].item(), scores[t, b_].item()
                    assert sa > sb or (sa == sb and a_ < b_), (t, row)
            # the tie happens: the duplicated experts come first, in index order (groups 0.. kept first)
            assert all(r[:2] == [1, 5] for r in ids.tolist()), ids


# ----------------------------------------------------------------------------- dispatch

@settings(max_examples=examples(10))
@given(e=st.sampled_from([1, 3, 16, 40]), topk=st.integers(1, 4), bm=st.sampled_from([16, 32]),
       tokens=st.integers(1, 70), skew=st.booleans(), seed=st.integers(0, 2**16))
def test_dispatch_layout(e, topk, bm, tokens, skew, seed):
    k = one_op_kernel("moe_dispatch", "moe_dispatch", [("ids", TensorType(i32, (T, topk)))],
                {"n_experts": e, "block_m": bm})
    g = _gen(seed)
    hi = min(e, 2) if skew else e                  # skew: every token in experts 0..1, the rest empty
    ids = torch.randint(0, hi, (tokens, topk), generator=g, dtype=torch.int32)
    rows, blocks = check_kernel(k, [ids])
    r = tokens * topk + e * (bm - 1)
    assert rows.shape == (r,) and blocks.shape == (-(-r // bm),)
    flat = ids.reshape(-1)
    real = rows[rows >= 0].long()
    assert sorted(real.tolist()) == list(range(tokens * topk))        # every slot exactly once
    row_expert = blocks.long()[torch.arange(r) // bm]
    assert torch.equal(row_expert[rows >= 0], flat[real].long())      # each row sits in its expert's blocks
    for x in range(e):                                                # ascending slot order within an expert
        mine = rows[(row_expert == x) & (rows >= 0)].tolist()
        assert mine == sorted(mine)


def test_dispatch_layout_symbolic_sizes():
    (rows_t, blocks_t) = OPS["moe_dispatch"].infer([TensorType(i32, (T, 8))], {"n_experts": 256, "block_m": 64})
    assert rows_t.shape[0] == moe_rows(T, 8, 256, 64) == 8 * T + 256 * 63
    assert blocks_t.shape[0] == moe_blocks(8 * T + 256 * 63, 64)
    assert rows_t.free_symbols() == {T}


# ----------------------------------------------------------------------------- grouped GEMMs, combine

def _layout(tokens: int, topk: int, e: int, bm: int, seed: int):
    g = _gen(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:topk] for _ in range(tokens)]).to(torch.int32)
    return OPS["moe_dispatch"].reference(ids, n_experts=e, block_m=bm)


@settings(max_examples=examples(6))
@given(dtype=st.sampled_from([f32, bf16]), e=st.sampled_from([2, 8]), topk=st.integers(1, 2),
       tokens=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_grouped_gemms_and_combine(dtype, e, topk, tokens, seed):
    h, inter, bm = 48, 40, 16
    rows, blocks = _layout(tokens, topk, e, bm, seed)
    r, nb = rows.shape[0], blocks.shape[0]
    rsym, nbsym = moe_rows(T, topk, e, bm), moe_blocks(moe_rows(T, topk, e, bm), bm)
    g = _gen(seed + 1)
    x = torch.randn(tokens, h, generator=g).to(dtype.torch)
    w13 = (torch.randn(e, 2 * inter, h, generator=g) / math.sqrt(h)).to(dtype.torch)
    w2 = (torch.randn(e, h, inter, generator=g) / math.sqrt(inter)).to(dtype.torch)
    weights = torch.rand(tokens, topk, generator=g)
    up = one_op_kernel("moe_gemm_gate_up", "moe_gemm",
                 [("x", TensorType(dtype, (T, h))), ("rows", TensorType(i32, (rsym,))),
                  ("blocks", TensorType(i32, (nbsym,))), ("w13", TensorType(dtype, (e, 2 * inter, h)))],
                 {"topk": topk, "block_m": bm})
    (act,) = check_kernel(up, [x, rows, blocks, w13])
    assert act.shape == (r, inter) and nb == -(-r // bm)
    assert not act[rows < 0].any()                                     # pad rows are written as 0
    down = one_op_kernel("moe_gemm_down", "moe_gemm",
                   [("act", TensorType(dtype, (rsym, inter))), ("rows", TensorType(i32, (rsym,))),
                    ("blocks", TensorType(i32, (nbsym,))), ("w2", TensorType(dtype, (e, h, inter))),
                    ("wts", TensorType(f32, (T, topk)))], {"block_m": bm})
    (ys,) = check_kernel(down, [act, rows, blocks, w2, weights])
    shared = torch.randn(tokens, h, generator=g).to(dtype.torch)
    comb = one_op_kernel("moe_combine", "moe_combine",
                   [("ys", TensorType(f32, (T * topk, h))), ("shared", TensorType(dtype, (T, h)))],
                   {"topk": topk, "dtype": dtype})
    (y,) = check_kernel(comb, [ys, shared])
    manual = ys.reshape(tokens, topk, h)
    acc = manual[:, 0]
    for s in range(1, topk):
        acc = acc + manual[:, s]
    assert torch.equal(y, (acc + shared.float()).to(dtype.torch))    # fixed slot order: bit-exact


def test_gemm_refuses_bad_block():
    k = one_op_kernel("moe_gemm_gate_up", "moe_gemm",
                [("x", TensorType(f32, (T, 32))), ("rows", TensorType(i32, (moe_rows(T, 2, 4, 8),))),
                 ("blocks", TensorType(i32, (moe_blocks(moe_rows(T, 2, 4, 8), 8),))),
                 ("w13", TensorType(f32, (4, 64, 32)))], {"topk": 2, "block_m": 8})
    with pytest.raises(CodegenError, match="block_m=8"):
        lower_kernel(k, 1)


@pytest.mark.parametrize("dtype", [f32, bf16])
def test_families_compile_for_sm90a(dtype):
    """DeepSeek-V3 widths (256 experts in 8 groups, top-8, H=7168, I=2048): every MoE kernel
    assembles with ptxas for sm_90a without spills."""
    e, h, inter, topk, bm = 256, 7168, 2048, 8, 64 if dtype is bf16 else 16
    rsym = moe_rows(T, topk, e, bm)
    nbsym = moe_blocks(rsym, bm)
    kernels = [
        one_op_kernel("moe_router", "moe_router", [("x", TensorType(dtype, (T, h))), ("gw", TensorType(dtype, (e, h))),
                                             ("bias", TensorType(f32, (e,)))],
                {"topk": topk, "n_group": 8, "topk_group": 4, "scoring": "sigmoid", "group_score": "top2_sum",
                 "route_scale": 2.5, "norm_topk": True}),
        one_op_kernel("moe_dispatch", "moe_dispatch", [("ids", TensorType(i32, (T, topk)))],
                {"n_experts": e, "block_m": bm}),
        one_op_kernel("moe_gemm_gate_up", "moe_gemm",
                [("x", TensorType(dtype, (T, h))), ("rows", TensorType(i32, (rsym,))),
                 ("blocks", TensorType(i32, (nbsym,))), ("w13", TensorType(dtype, (e, 2 * inter, h)))],
                {"topk": topk, "block_m": bm}),
        one_op_kernel("moe_gemm_down", "moe_gemm",
                [("act", TensorType(dtype, (rsym, inter))), ("rows", TensorType(i32, (rsym,))),
                 ("blocks", TensorType(i32, (nbsym,))), ("w2", TensorType(dtype, (e, h, inter))),
                 ("wts", TensorType(f32, (T, topk)))], {"block_m": bm}),
        one_op_kernel("moe_combine", "moe_combine",
                [("ys", TensorType(f32, (T * topk, h))), ("sh", TensorType(dtype, (T, h)))],
                {"topk": topk, "dtype": dtype}),
    ]
    for i, k in enumerate(kernels, 1):
        spec = lower_kernel(k, i)
        ck = compile_triton(spec, render(spec))
        assert ck.cubin and ck.spills == 0, (spec.name, ck.ptxas_log)
