"""FP8 grouped GEMMs for the routed MoE experts (ir/ops/moe.py, codegen/families/moe_gemm_fp8.py): the
quantize_fp8 rewrite of the moe_gemm_gate_up/down pair and the whole MoE block compiled with
fp8=True on the interpreter, vs eager ("fp8") and vs the zoo module running the FP8 recipe in plain torch
("fp8_sim", dsr_compiler/models/fp8_ref.py: independent of the trace).
A small expert count keeps the interpreter quick (the layout pads every expert to block_m rows)."""
from __future__ import annotations

import torch

import dsr_compiler as dsr
from dsr_compiler.models import ModelConfig
from dsr_compiler.models.fp8_ref import fp8_reference
from dsr_compiler.tolerance import compare_fp8
from dsr_compiler.workloads import build

CFG = ModelConfig.named("deepseek-v3-tiny").replace(n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1)


def test_moe_experts_run_as_fp8_grouped_gemms():
    wl = build(CFG, "moe", 1, 8, "bf16")
    cm = dsr.compile(wl.module, wl.example_inputs, fp8=True, backend="interpret", dynamic=wl.dynamic, name="moe")
    pre = next(r.graph for r in cm.passes if r.name == "quantize_fp8")
    ops = [n.op for n in pre.nodes]
    assert "moe_gemm_gate_up_fp8" in ops and "moe_gemm_down_fp8" in ops and "moe_gemm_gate_up" not in ops
    assert ops.count("quant_fp8") == 2             # x once (routed + shared experts), the shared SwiGLU product
    assert "experts.w13" not in cm.graph.params and "experts.w13.q" in cm.graph.params
    fams = [k.spec.family for k in cm.kernels]
    assert fams.count("moe_gemm_fp8") == 2 and "moe_gemm" not in fams
    gate_up = next(k for k in cm.kernels if k.spec.name.endswith("gate_up_quant"))
    assert [o for o in gate_up.spec.args if o.role == "out"][0].dtype.value == "fp8e4m3"   # SwiGLU leaves as fp8
    x = wl.make_inputs(9, 2)[0]
    with torch.no_grad():
        y = cm(x)
        eager = wl.module(x)
        sim = fp8_reference(wl.module)(x)
    loose, tight = compare_fp8(y, eager, "fp8"), compare_fp8(y, sim, "fp8_sim")
    assert loose["ok"] and loose["calc_diff"] > 1e-5, loose
    assert tight["ok"], tight


def test_experts_policy_off_keeps_the_bf16_grouped_gemms():
    wl = build(CFG, "moe", 1, 8, "bf16")
    g = dsr.trace(wl.module, wl.example_inputs, dynamic=wl.dynamic)
    from dsr_compiler.ir.passes import PassContext, quantize_fp8
    ctx = PassContext(options={"fp8": {"experts": False}})
    out = quantize_fp8(g, ctx)
    assert [n.op for n in out.nodes].count("moe_gemm_gate_up") == 1
    assert any("routed experts" in n and "'experts' is off" in n for n in ctx.notes)
    assert any(n.op == "gemm_fp8" for n in out.nodes)          # the shared expert still quantizes
