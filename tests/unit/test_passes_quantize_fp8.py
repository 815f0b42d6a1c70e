"""The quantize_fp8 pass (policy, rewrite, derived params, notes, errors) and the FP8 fusion rules
(ir/passes/fuse/fp8.py), as Before/After IR text."""
from __future__ import annotations

import textwrap

import pytest
import torch
from dsr_compiler.ir import parse, print_graph, run_graph
from dsr_compiler.ir.params import evaluate
from dsr_compiler.ir.passes import Fp8Policy, PassContext, fuse, quantize_fp8

from dsr_compiler.errors import DsrError


def ir(text: str):
    return parse(textwrap.dedent(text))


def body(g) -> str:
    return print_graph(g).split("\n", 1)[1] if print_graph(g).startswith("#") else print_graph(g)


MLP = """
    graph mlp(%x : bf16[T,256], param %n.w : bf16[256], param %w1 : bf16[512,256], param %w3 : bf16[512,256], param %w2 : bf16[256,512]) {
      %n : bf16[T,256] = rms_norm(%x, %n.w, eps=1e-06)  # norm
      %a : bf16[T,512] = linear(%n, %w1)  # mlp.w1
      %s : bf16[T,512] = silu(%a)  # mlp
      %b : bf16[T,512] = linear(%n, %w3)  # mlp.w3
      %h : bf16[T,512] = mul(%s, %b)  # mlp
      %o : bf16[T,256] = linear(%h, %w2)  # mlp.w2
      %y : bf16[T,256] = add(%x, %o)
      return %y
    }
"""

MLP_FP8 = """
    graph mlp(%x : bf16[T,256], param %n.w : bf16[256], param %w1.q : fp8e4m3[512,256], param %w1.s : f32[4,2], param %w3.q : fp8e4m3[512,256], param %w3.s : f32[4,2], param %w2.q : fp8e4m3[256,512], param %w2.s : f32[2,4]) {
      %n : bf16[T,256] = rms_norm(%x, %n.w, eps=1e-06)  # norm
      %n.q, %n.s : fp8e4m3[T,256], f32[T,2] = quant_fp8(%n, block=128, scale_fmt=None)  # mlp.w1
      %a : bf16[T,512] = gemm_fp8(%n.q, %n.s, %w1.q, %w1.s, block=128)  # mlp.w1
      %s : bf16[T,512] = silu(%a)  # mlp
      %b : bf16[T,512] = gemm_fp8(%n.q, %n.s, %w3.q, %w3.s, block=128)  # mlp.w3
      %h : bf16[T,512] = mul(%s, %b)  # mlp
      %h.q, %h.s : fp8e4m3[T,512], f32[T,4] = quant_fp8(%h, block=128, scale_fmt=None)  # mlp.w2
      %o : bf16[T,256] = gemm_fp8(%h.q, %h.s, %w2.q, %w2.s, block=128)  # mlp.w2
      %y : bf16[T,256] = add(%x, %o)
      return %y
    }
"""


def test_mlp_before_after():
    ctx = PassContext(options={"fp8": True})
    out = quantize_fp8(ir(MLP), ctx)
    assert out == ir(MLP_FP8)
    assert [str(d) for d in ctx.derived] == [
        "%w1.q, %w1.s = fp8_block_quant(%w1, block=128, scale_fmt=None)  # mlp.w1",
        "%w3.q, %w3.s = fp8_block_quant(%w3, block=128, scale_fmt=None)  # mlp.w3",
        "%w2.q, %w2.s = fp8_block_quant(%w2, block=128, scale_fmt=None)  # mlp.w2"]
    assert dict(ctx.counts) == {"quantize_fp8.gemms": 3, "quantize_fp8.activation_quants": 2}
    assert all(n.startswith("quantized: ") for n in ctx.notes) and len(ctx.notes) == 3


def test_off_by_default_and_identity_without_candidates():
    g = ir(MLP)
    assert quantize_fp8(g, PassContext()) == g
    assert quantize_fp8(g, PassContext(options={"fp8": False})) == g


def test_fused_plan_has_norm_quant_swiglu_quant_and_no_dequant():
    ctx = PassContext(options={"fp8": True})
    g = fuse(quantize_fp8(ir(MLP), ctx), ctx)
    assert [(k.name, k.family) for k in g.kernels] == [
        ("k1_quant_fp8_rms_norm", "quant_fp8"), ("k2_gemm_fp8_swiglu_quant", "gemm_fp8"), ("k3_gemm_fp8_add", "gemm_fp8")]
    k1, k2, _ = g.kernels
    assert [n.op for n in k1.body.nodes] == ["rms_norm", "quant_fp8"] and list(k1.body.outputs) == ["n.q", "n.s"]
    assert [n.op for n in k2.body.nodes] == ["gemm_fp8", "silu", "gemm_fp8", "mul", "quant_fp8"]
    assert list(k2.body.outputs) == ["h.q", "h.s"]               # the SwiGLU product never reaches memory
    assert not any(n.op == "dequant_fp8" for k in g.kernels for n in k.body.nodes)


def test_numerics_of_the_rewrite_match_a_hand_written_simulation():
    g = ir(MLP)
    ctx = PassContext(options={"fp8": True})
    q = quantize_fp8(g, ctx)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 256, generator=gen).bfloat16()
    ws = {"n.w": (1 + 0.1 * torch.randn(256, generator=gen)).bfloat16(),
          "w1": (torch.randn(512, 256, generator=gen) / 16).bfloat16(),
          "w3": (torch.randn(512, 256, generator=gen) / 16).bfloat16(),
          "w2": (torch.randn(256, 512, generator=gen) / 22).bfloat16()}
    vals = dict(ws)
    for d in ctx.derived:
        vals.update(zip(d.outputs, evaluate(d, [ws[s] for s in d.sources])))
    (y,) = run_graph(q, [x] + [vals[p] for p in q.params])
    from dsr_compiler.ir.ops.fp8 import (
        dequant_fp8_ref,
        dequant_weight_ref,
        quant_fp8_ref,
        quant_weight_ref,
    )

    def lin(a, w):   # the contract, written out: quantize both, fp32 dot per 128 block, bf16 result
        aq, as_ = quant_fp8_ref(a)
        wq, ws_ = quant_weight_ref(w)
        return (dequant_fp8_ref(aq, as_) @ dequant_weight_ref(wq, ws_).T).bfloat16()
    n = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * ws["n.w"].float()).bfloat16()
    h = torch.nn.functional.silu(lin(n, ws["w1"])) * lin(n, ws["w3"])
    ref = x + lin(h, ws["w2"])
    from dsr_compiler.tolerance import compare_fp8
    r = compare_fp8(y, ref, "fp8_sim")
    assert r["ok"], r


F32_BIAS = """
    graph g(%x : f32[T,128], param %w : f32[64,128], param %b : f32[64], param %h : f32[1000,128], param %g : f32[8,128], param %v : f32[32,96]) {
      %y : f32[T,64] = linear(%x, %w, %b)  # ffn.w1
      %l : f32[T,1000] = linear(%x, %h)  # head
      %r : f32[T,8] = linear(%x, %g)  # ffn.gate
      %z : f32[T,96] = slice(%x, dim=1, start=0, end=96)
      %u : f32[T,32] = linear(%z, %v)  # attn.wq
      return %y, %l, %r, %u
    }
"""


def test_bias_f32_islands_and_ragged_k():
    ctx = PassContext(options={"fp8": True})
    out = quantize_fp8(ir(F32_BIAS), ctx)
    text = body(out)
    assert "%y.fp8 : bf16[T,64] = gemm_fp8(%x.q, %x.s, %w.q, %w.s, block=128)  # ffn.w1" in text
    assert "%y.wide : f32[T,64] = cast(%y.fp8, dtype=f32)  # ffn.w1" in text
    assert "%y : f32[T,64] = add(%y.wide, %b)  # ffn.w1" in text
    assert "linear(%x, %h)" in text and "linear(%x, %g)" in text and "linear(%z, %v)" in text
    assert [p for p in out.params] == ["w.q", "w.s", "b", "h", "g", "v"]          # %w left the graph
    notes = "\n".join(ctx.notes)
    assert "not quantized: %l = linear @ head: the LM head stays high precision" in notes
    assert "not quantized: %r = linear @ ffn.gate: the MoE router gate stays high precision" in notes
    assert "not quantized: %u = linear @ attn.wq: K=96 not a multiple of 128" in notes


def test_policy_classes_force_and_ue8m0_in_attrs():
    ctx = PassContext(options={"fp8": {"mlp": False, "force": ["mlp.w2"], "scale_fmt": "ue8m0", "block_m": 32}})
    out = quantize_fp8(ir(MLP), ctx)
    text = body(out)
    assert "linear(%n, %w1)" in text and "linear(%n, %w3)" in text      # the class is off ...
    assert 'quant_fp8(%h, block=128, scale_fmt="ue8m0")' in text          # ... but mlp.w2 is forced
    assert "gemm_fp8(%h.q, %h.s, %w2.q, %w2.s, block=128, block_m=32)" in text
    assert ctx.derived[0].attr_dict == {"block": 128, "scale_fmt": "ue8m0"}
    assert any("op class 'mlp' is off" in n for n in ctx.notes)


@pytest.mark.parametrize("policy,msg", [
    ({"force": ["attn.wq"]}, "K=96 not a multiple of 128"),
    ({"force": ["head"]}, "the LM head stays high precision"),
    ({"force": ["nope.w9"]}, "matches no linear"),
    ({"scale_fmt": "e8m0"}, "scale_fmt"),
    ({"block": 100}, "power of two"),
    ({"blocks": 128}, "unknown option"),
    ({"block_n": 48}, "power of two"),
])
def test_policy_errors(policy, msg):
    with pytest.raises(DsrError, match=msg):
        quantize_fp8(ir(F32_BIAS), PassContext(options={"fp8": Fp8Policy.from_option(policy)}))


def test_policy_round_trips_as_plain_data():
    p = Fp8Policy(scale_fmt="ue8m0", force=("mlp.w2",), attn=False)
    assert Fp8Policy.from_option(p.to_dict()) == p
    assert Fp8Policy.from_option(True) == Fp8Policy() and Fp8Policy.from_option(False) is None


def test_quantizes_before_a_view_that_keeps_the_last_dim_so_the_norm_fuses():
    g = ir("""
        graph moe(%x : bf16[B,1,256], param %n.w : bf16[256], param %w1 : bf16[128,256], param %gate : bf16[8,256]) {
          %n : bf16[B,1,256] = rms_norm(%x, %n.w, eps=1e-06)  # ffn_norm
          %v : bf16[B,256] = reshape(%n, shape=(B, 256))  # ffn
          %r : bf16[B,8] = linear(%v, %gate)  # ffn.gate
          %a : bf16[B,128] = linear(%v, %w1)  # ffn.shared_experts.w1
          return %r, %a
        }
    """)
    ctx = PassContext(options={"fp8": True})
    q = quantize_fp8(g, ctx)
    text = body(q)
    assert "%n.q, %n.s : fp8e4m3[B,1,256], f32[B,1,2] = quant_fp8(%n, block=128, scale_fmt=None)" in text
    assert "%v.q : fp8e4m3[B,256] = reshape(%n.q, shape=(B, 256))" in text
    assert "%v.s : f32[B,2] = reshape(%n.s, shape=(B, 2))" in text
    assert "gemm_fp8(%v.q, %v.s, %w1.q, %w1.s" in text and "linear(%v, %gate)" in text
    fused = fuse(q, ctx)
    k1 = fused.kernels[0]
    assert k1.family == "quant_fp8" and [n.op for n in k1.body.nodes] == ["rms_norm", "quant_fp8"]
    assert set(k1.body.outputs) == {"n", "n.q", "n.s"}      # the router gate reads the norm output in bf16


CONV1D = """
    graph g(%x : bf16[T,128], param %w : bf16[128,256], param %b : bf16[256], param %v : bf16[96,64]) {
      %m : bf16[T,256] = matmul(%x, %w)  # attn.c_attn
      %y : bf16[T,256] = add(%m, %b)  # attn.c_attn
      %z : bf16[T,96] = slice(%x, dim=1, start=0, end=96)
      %u : bf16[T,64] = matmul(%z, %v)  # mlp.c_fc
      return %y, %u
    }
"""


def test_matmul_by_a_parameter_is_a_linear_with_the_weight_transposed():
    """GPT-2's Conv1D (`addmm(b, x, W)` with W [K, N]): the codes and scales are those of W's transpose, derived
    once (rule fp8_block_quant_t), and the result is the FP8 contract of x @ W; K=96 stays bf16, with a note."""
    from dsr_compiler.ir.ops.fp8 import dequant_fp8_ref, dequant_weight_ref, quant_fp8_ref, quant_weight_ref
    from dsr_compiler.tolerance import compare_fp8
    ctx = PassContext(options={"fp8": True})
    q = quantize_fp8(ir(CONV1D), ctx)
    text = body(q)
    assert "%m : bf16[T,256] = gemm_fp8(%x.q, %x.s, %w.T.q, %w.T.s, block=128)  # attn.c_attn" in text
    assert "matmul(%z, %v)" in text
    assert [d.rule for d in ctx.derived] == ["fp8_block_quant_t"]
    assert "not quantized: %u = matmul @ mlp.c_fc: K=96 not a multiple of 128" in "\n".join(ctx.notes)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 128, generator=gen).bfloat16()
    ws = {"w": (torch.randn(128, 256, generator=gen) / 11).bfloat16(), "b": torch.randn(256, generator=gen).bfloat16(),
          "v": torch.randn(96, 64, generator=gen).bfloat16()}
    vals = dict(ws)
    for d in ctx.derived:
        vals.update(zip(d.outputs, evaluate(d, [ws[s] for s in d.sources])))
    y, _ = run_graph(q, [x] + [vals[p] for p in q.params])
    aq, as_ = quant_fp8_ref(x)
    wq, wsc = quant_weight_ref(ws["w"].t().contiguous())
    ref = (dequant_fp8_ref(aq, as_) @ dequant_weight_ref(wq, wsc).T).bfloat16() + ws["b"]
    assert compare_fp8(y, ref, "fp8_sim")["ok"]
