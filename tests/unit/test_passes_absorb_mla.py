"""absorb_mla: Before/Expected text, the cases it keeps naive, the fusion of its result, and the
property that the interpreter's outputs do not change (fp32 tolerance) over random MLA shapes."""
from __future__ import annotations

import pytest
import torch
from dsr_compiler.ir import (
    OPS,
    GraphBuilder,
    Node,
    TensorType,
    Value,
    parse,
    print_graph,
    run_graph,
    sym,
)
from dsr_compiler.ir.errors import DsrError
from dsr_compiler.ir.passes import PassContext, absorb_mla, fuse
from dsr_compiler.ir.passes.absorb_mla import choose_split
from dsr_compiler.ir.types import DType
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import apply_pass, examples, ir_text

from dsr_compiler.tolerance import TOLERANCES

F32 = TOLERANCES[torch.float32]

NAIVE_DECODE = """
    graph step(%q : f32[B,1,2,24], %q_pe : f32[B,1,2,8], %latent : f32[B,20,32], %k_pe : f32[B,20,8], %q_pos : i64[1], %k_pos : i64[20], param %wkv_b : f32[64,32]) {
      %kvb : f32[B,20,64] = linear(%latent, %wkv_b)  # attn.wkv_b
      %r : f32[B,20,2,32] = reshape(%kvb, shape=(B, 20, 2, 32))
      %k_nope : f32[B,20,2,16] = slice(%r, dim=3, start=0, end=16, step=1)
      %v : f32[B,20,2,16] = slice(%r, dim=3, start=16, end=None, step=1)
      %q_nope : f32[B,1,2,16] = slice(%q, dim=3, start=0, end=16, step=1)
      %o : f32[B,1,2,16] = mla_attention(%q_nope, %q_pe, %k_nope, %k_pe, %v, %q_pos, %k_pos, scale=0.25, dtype=f32)  # attn
      return %o
    }
"""

ABSORBED = """
    graph step(%q : f32[B,1,2,24], %q_pe : f32[B,1,2,8], %latent : f32[B,20,32], %k_pe : f32[B,20,8], %q_pos : i64[1], %k_pos : i64[20], param %wkv_b : f32[64,32]) {
      %o.wkv_b : f32[2,32,32] = reshape(%wkv_b, shape=(2, 32, 32))  # attn
      %o.w_uk : f32[2,16,32] = slice(%o.wkv_b, dim=1, start=0, end=16, step=1)  # attn
      %o.w_uv : f32[2,16,32] = slice(%o.wkv_b, dim=1, start=16, end=None, step=1)  # attn
      %o.w_uv_t : f32[2,32,16] = permute(%o.w_uv, dims=(0, 2, 1))  # attn
      %o.q : f32[B,2,1,24] = reshape(%q, shape=(B, 2, 1, 24))  # attn
      %o.q_nope : f32[B,2,1,16] = slice(%o.q, dim=3, start=0, end=16, step=1)  # attn
      %o.q_lat : f32[B,2,1,32] = matmul(%o.q_nope, %o.w_uk)  # attn
      %o.q_lat4 : f32[B,1,2,32] = reshape(%o.q_lat, shape=(B, 1, 2, 32))  # attn
      %o.o_part, %o.lse : f32[B,1,2,2,32], f32[B,1,2,2] = mla_decode(%o.q_lat4, %q_pe, %latent, %k_pe, %q_pos, %k_pos, scale=0.25, split=16)  # attn
      %o.o_lat : f32[B,1,2,32] = mla_combine(%o.o_part, %o.lse, dtype=f32)  # attn
      %o.o_lat4 : f32[B,2,1,32] = reshape(%o.o_lat, shape=(B, 2, 1, 32))  # attn
      %o.o_v : f32[B,2,1,16] = matmul(%o.o_lat4, %o.w_uv_t)  # attn
      %o : f32[B,1,2,16] = reshape(%o.o_v, shape=(B, 1, 2, 16))  # attn
      return %o
    }
"""


def _absorb(text: str, **options) -> tuple:
    ctx = PassContext(options=options)
    return apply_pass(text, "absorb_mla", absorb_mla, ctx), ctx


def _inputs(g, b: int, start: int, seed: int = 0) -> list[torch.Tensor]:
    """Random floats, q_pos = start + arange(S), k_pos = arange(T)."""
    gen = torch.Generator().manual_seed(seed)
    env = {sym("B"): b}
    out = []
    for v in g.inputs:
        shape = v.type.concrete_shape(env)
        if v.name == "q_pos":
            out.append(torch.arange(shape[0]) + start)
        elif v.name == "k_pos":
            out.append(torch.arange(shape[0]))
        else:
            out.append(torch.randn(shape, generator=gen, dtype=torch.float64).to(v.type.dtype.torch))
    return out


def test_naive_decode_becomes_absorbed():
    g, ctx = _absorb(NAIVE_DECODE)
    assert print_graph(g) == ir_text(ABSORBED)
    assert parse(print_graph(g)) == g
    assert ctx.counts["absorb_mla.rewritten"] == 1
    assert ctx.notes == ["absorb_mla: %o = mla_attention over %latent absorbed (split-KV decode, 16 keys/split)"]


@pytest.mark.parametrize("start", [0, 7, 19])
def test_absorbed_keeps_interpreter_outputs(start):
    before = parse(ir_text(NAIVE_DECODE))
    after, _ = _absorb(NAIVE_DECODE)
    args = _inputs(before, 3, start)
    (want,), (got,) = run_graph(before, args), run_graph(after, args)
    torch.testing.assert_close(got, want, **F32)


def test_mla_naive_option_skips_the_pass():
    g, ctx = _absorb(NAIVE_DECODE, mla="naive")
    assert g == parse(ir_text(NAIVE_DECODE))
    assert ctx.notes == ["absorb_mla: 1 MLA attention(s) kept naive (mla=naive)"]


def test_unknown_mode_is_a_user_error():
    with pytest.raises(DsrError, match="unknown MLA form 'fast'"):
        _absorb(NAIVE_DECODE, mla="fast")


def test_prefill_and_non_expansions_stay_naive():
    prefill = """
        graph p(%qn : f32[1,S,2,16], %qp : f32[1,S,2,8], %kn : f32[1,S,2,16], %kp : f32[1,S,8], %v : f32[1,S,2,16]) {
          %o : f32[1,S,2,16] = mla_attention(%qn, %qp, %kn, %kp, %v, scale=0.25, dtype=f32)
          return %o
        }
    """
    g, ctx = _absorb(prefill)
    assert g == parse(ir_text(prefill))
    assert ctx.notes == [("absorb_mla: kept %o = mla_attention naive: prefill (causal self-attention) keeps the naive "
                         "flash form")]
    plain = """
        graph d(%qn : f32[1,1,2,16], %qp : f32[1,1,2,8], %kn : f32[1,9,2,16], %kp : f32[1,9,8], %v : f32[1,9,2,16], %qpos : i64[1], %kpos : i64[9]) {
          %o : f32[1,1,2,16] = mla_attention(%qn, %qp, %kn, %kp, %v, %qpos, %kpos, scale=0.25, dtype=f32)
          return %o
        }
    """
    g, ctx = _absorb(plain)
    assert g == parse(ir_text(plain))
    assert "k_nope and v are not the two halves of one per-head expansion" in ctx.notes[0]


def test_fused_absorbed_decode_reads_weight_slices_in_place():
    g, _ = _absorb(NAIVE_DECODE)
    fused = apply_pass(g, "fuse", fuse)
    fams = [k.family for k in fused.kernels]
    assert fams == ["gemm", "mla_decode", "mla_combine", "gemm"], fams
    # the per-head weight slices and the q_nope slice are index maps of the two matmuls: no copy kernels
    q_lat, o = fused.kernels[0].body, fused.kernels[3].body
    assert [n.op for n in q_lat.nodes] == ["slice", "slice", "matmul"]
    assert [n.op for n in o.nodes] == ["slice", "permute", "matmul"]
    assert [n.op for n in fused.nodes].count("reshape") == 5


def test_choose_split():
    assert choose_split(sym("T")) == 256
    assert choose_split(20) == 16 and choose_split(4096) == 256 and choose_split(163840) == 16384


@st.composite
def mla_shapes(draw):
    return {"b": draw(st.integers(1, 2)), "s": draw(st.integers(1, 3)), "t": draw(st.integers(4, 40)),
                "h": draw(st.integers(1, 3)), "nope": draw(st.sampled_from([8, 16, 24])),
                "rope": draw(st.sampled_from([4, 8])), "vd": draw(st.sampled_from([8, 16, 40])),
                "c": draw(st.sampled_from([16, 24, 32])), "extra_q": draw(st.booleans())}


def _naive_graph(b, s, t, h, nope, rope, vd, c, extra_q):
    """The frontend's naive decode shape: q from a [B, S, H, nope+rope] projection (or q_nope given)."""
    bld = GraphBuilder("step")
    types: dict[str, TensorType] = {}

    def inp(name, dt, *shape, param=False):
        types[name] = TensorType(dt, shape)
        bld.add_input(name, types[name], param)
        return name

    def op(name, op_, *ins, **attrs):
        (t_,) = OPS[op_].infer([types[i] for i in ins], attrs)
        types[name] = t_
        bld.add(Node((Value(name, t_),), op_, ins, attrs))
        return name
    B = sym("B")
    if extra_q:
        q = inp("q", DType.f32, B, s, h, nope + rope)
        q_nope = op("q_nope", "slice", q, dim=3, start=0, end=nope, step=1)
        q_pe = op("q_pe", "slice", q, dim=3, start=nope, end=None, step=1)
    else:
        q_nope = inp("q_nope", DType.f32, B, s, h, nope)
        q_pe = inp("q_pe", DType.f32, B, s, h, rope)
    latent = inp("latent", DType.f32, B, t, c)
    k_pe = inp("k_pe", DType.f32, B, t, rope)
    q_pos, k_pos = inp("q_pos", DType.i64, s), inp("k_pos", DType.i64, t)
    w = inp("wkv_b", DType.f32, h * (nope + vd), c, param=True)
    r = op("r", "reshape", op("kvb", "linear", latent, w), shape=(B, t, h, nope + vd))
    k_nope = op("k_nope", "slice", r, dim=3, start=0, end=nope, step=1)
    v = op("v", "slice", r, dim=3, start=nope, end=None, step=1)
    o = op("o", "mla_attention", q_nope, q_pe, k_nope, k_pe, v, q_pos, k_pos, scale=0.3, dtype=DType.f32)
    return bld.build([o])


@settings(max_examples=examples(12), deadline=None)
@given(shape=mla_shapes(), data=st.data())
def test_absorb_keeps_outputs_on_random_shapes(shape, data):
    g = _naive_graph(**shape)
    split = data.draw(st.sampled_from([None, 3, 16]))
    out, ctx = _absorb(g, mla_split=split)
    assert ctx.counts.get("absorb_mla.rewritten") == 1
    assert not any(n.op == "mla_attention" for n in out.nodes) and not any(n.op == "linear" for n in out.nodes)
    start = data.draw(st.integers(0, shape["t"] - shape["s"]))
    args = _inputs(g, shape["b"], start, seed=start)
    (want,), (got,) = run_graph(g, args), run_graph(out, args)
    torch.testing.assert_close(got, want, **F32)


def _with_iota_positions(extra_user: bool) -> str:
    text = ABSORBED.replace(", %k_pos : i64[20], param", ", param").replace(
        "      %o.o_part,", "      %k_pos : i64[20] = iota(n=20, dtype=i64)\n      %o.o_part,", 1)
    if extra_user:
        text = text.replace("return %o\n", "return %o, %k_pos\n")
    return text


def test_decode_key_positions_from_an_iota_are_the_key_index():
    fused = apply_pass(parse(ir_text(_with_iota_positions(False))), "fuse", fuse)
    assert [k.family for k in fused.kernels] == ["gemm", "mla_decode", "mla_combine", "gemm"]
    assert [n.op for n in fused.kernels[1].body.nodes] == ["iota", "mla_decode"]
    assert "k_pos" not in [v.name for v in fused.kernels[1].body.inputs]
    # another reader (here: a graph output) keeps the iota its own kernel
    shared = apply_pass(parse(ir_text(_with_iota_positions(True))), "fuse", fuse)
    assert [k.family for k in shared.kernels].count("pointwise") == 1
    decode = next(k for k in shared.kernels if k.family == "mla_decode")
    assert [n.op for n in decode.body.nodes] == ["mla_decode"] and "k_pos" in [v.name for v in decode.body.inputs]
